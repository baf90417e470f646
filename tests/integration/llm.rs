//! `volley llm generate` on the reference checkpoint: the answers are transformers'
//! greedy continuations, the input's columns are kept, and bad input fails cleanly.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use arrow::array::{AsArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use volley::Context;

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("llm/tests/fixtures/tiny-llama")
}

fn write_prompts(path: &std::path::Path, column: &str, prompts: &[&str]) {
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new(column, DataType::Utf8, false),
        ])),
        vec![
            Arc::new(Int64Array::from_iter_values(0..prompts.len() as i64)),
            Arc::new(StringArray::from(prompts.to_vec())),
        ],
    )
    .unwrap();
    Context::try_default()
        .unwrap()
        .from_batches(vec![batch])
        .unwrap()
        .write_parquet(path.to_str().unwrap())
        .unwrap();
}

fn generate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_volley"))
        .args(["llm", "generate"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn generate_answers_every_prompt_and_keeps_the_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("prompts.parquet");
    let output = tmp.path().join("answers.parquet");
    let prompts = ["The quick brown fox jumps over the lazy dog.", "a"];
    write_prompts(&input, "prompt", &prompts);
    let out = generate(&[
        "--model",
        model().to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--max-tokens",
        "24",
        "--ignore-eos",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("48 generated tokens"), "{err}");

    // The greedy tokens transformers produced for these prompts (reference prompts 0, 4).
    let bytes = std::fs::read(model().join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tok = volley::llm::Tokenizer::from_dir(&model()).unwrap();
    let want: Vec<String> = [0, 4]
        .iter()
        .map(|i| {
            let ids: Vec<u32> = st
                .tensor(&format!("greedy_{i}"))
                .unwrap()
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
                .collect();
            tok.decode(&ids, true).unwrap()
        })
        .collect();
    let ctx = Context::try_default().unwrap();
    let batches = ctx
        .read_parquet(output.to_str().unwrap())
        .unwrap()
        .collect()
        .unwrap();
    let b = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    let ids = b.column_by_name("id").unwrap().as_primitive::<Int64Type>();
    let text = b
        .column_by_name("generated_text")
        .unwrap()
        .as_string::<i32>();
    let reason = b
        .column_by_name("finish_reason")
        .unwrap()
        .as_string::<i32>();
    assert_eq!(b.num_rows(), 2);
    for r in 0..2 {
        let i = ids.value(r) as usize;
        assert_eq!(text.value(r), want[i]);
        assert_eq!(reason.value(r), "length");
    }
}

#[test]
fn generate_refuses_bad_input_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("texts.parquet");
    let output = tmp.path().join("answers.parquet");
    write_prompts(&input, "text", &["hello"]);
    let m = model();
    let long = tmp.path().join("long.parquet");
    let words = vec!["word"; 600].join(" ");
    write_prompts(&long, "prompt", &["short", &words]);
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec![
                "--model",
                m.to_str().unwrap(),
                "--input",
                long.to_str().unwrap(),
            ],
            "prompt \"word word word",
        ),
        (
            vec![
                "--model",
                "/no/such/model",
                "--input",
                input.to_str().unwrap(),
            ],
            "/no/such/model/config.json",
        ),
        (
            vec![
                "--model",
                m.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
            ],
            "needs a `prompt` or `messages` column",
        ),
        (
            vec![
                "--model",
                m.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--top-p",
                "0",
            ],
            "top_p",
        ),
    ];
    for (args, want) in cases {
        let mut args = args;
        args.extend(["--output", output.to_str().unwrap()]);
        let out = generate(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("volley: error:") && err.contains(want),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(!output.exists(), "a failed run leaves no output");
    }
}
