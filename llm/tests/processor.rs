//! The Dataset stage: prompts (or chat messages) in a column, generated text out, with
//! the reference checkpoints' greedy tokens as the oracle.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, AsArray, Int64Array, ListArray, RecordBatch, StringArray, StructArray};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields, Int64Type, Schema};
use safetensors::SafeTensors;
use volley_dataset::Context;
use volley_llm::{LlmConfig, LlmProcessor, SamplingParams, Tokenizer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference_prompts() -> Vec<String> {
    let text = std::fs::read_to_string(fixtures().join("tiny-llama/reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

fn greedy_text(i: usize) -> String {
    let bytes = std::fs::read(fixtures().join("tiny-llama/reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<u32> = st
        .tensor(&format!("greedy_{i}"))
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    Tokenizer::from_dir(&fixtures().join("tiny-llama"))
        .unwrap()
        .decode(&ids, true)
        .unwrap()
}

fn config(model: PathBuf) -> LlmConfig {
    LlmConfig {
        model,
        sampling: SamplingParams {
            max_tokens: 24,
            ignore_eos: true,
            ..Default::default()
        },
        batch_size: 2,
        ..Default::default()
    }
}

#[test]
fn prompts_stream_through_to_parquet_with_their_columns() {
    let prompts = reference_prompts();
    let ids: Vec<i64> = (0..prompts.len() as i64 + 1).collect();
    let mut texts: Vec<Option<&str>> = prompts.iter().map(|p| Some(p.as_str())).collect();
    texts.insert(2, None);
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("prompt", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(ids)),
            Arc::new(StringArray::from(texts)),
        ],
    )
    .unwrap();
    let ctx = Context::try_default().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("prompts.parquet");
    ctx.from_batches(vec![batch])
        .unwrap()
        .write_parquet(input.to_str().unwrap())
        .unwrap();
    let out = tmp.path().join("answers");
    let processor = LlmProcessor::new(config(fixtures().join("tiny-llama")));
    let ds = processor.apply(&ctx.read_parquet(input.to_str().unwrap()).unwrap());
    assert!(ds.explain().unwrap().contains("LlmProcessor"));
    let summary = ds.write_parquet(out.to_str().unwrap()).unwrap();
    assert_eq!(summary.rows, 6);

    let mut rows = Vec::new();
    for b in ctx
        .read_parquet(out.to_str().unwrap())
        .unwrap()
        .collect()
        .unwrap()
    {
        let id = b.column_by_name("id").unwrap().as_primitive::<Int64Type>();
        let prompt = b.column_by_name("prompt").unwrap().as_string::<i32>();
        let text = b
            .column_by_name("generated_text")
            .unwrap()
            .as_string::<i32>();
        let n_in = b
            .column_by_name("num_input_tokens")
            .unwrap()
            .as_primitive::<Int64Type>();
        let n_out = b
            .column_by_name("num_generated_tokens")
            .unwrap()
            .as_primitive::<Int64Type>();
        for r in 0..b.num_rows() {
            rows.push((
                id.value(r),
                (!prompt.is_null(r)).then(|| prompt.value(r).to_string()),
                (!text.is_null(r)).then(|| text.value(r).to_string()),
                (!n_in.is_null(r)).then(|| n_in.value(r)),
                (!n_out.is_null(r)).then(|| n_out.value(r)),
            ));
        }
    }
    rows.sort_by_key(|r| r.0);
    assert_eq!(rows.len(), 6);
    let mut i = 0;
    for row in rows {
        if row.0 == 2 {
            assert_eq!(row.1, None);
            assert_eq!(
                (row.2, row.3, row.4),
                (None, None, None),
                "null prompt, null answer"
            );
            continue;
        }
        assert_eq!(row.1.as_deref(), Some(prompts[i].as_str()));
        assert_eq!(row.2.unwrap(), greedy_text(i), "row {}", row.0);
        assert!(row.3.unwrap() > 1);
        assert_eq!(row.4, Some(24));
        i += 1;
    }
}

#[test]
fn chat_messages_are_rendered_with_the_template() {
    // The fixture model with a chat template added.
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixtures().join("tiny-llama").join(f), model.join(f)).unwrap();
    }
    let template = "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
    std::fs::write(
        model.join("tokenizer_config.json"),
        serde_json::json!({"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"})
            .to_string(),
    )
    .unwrap();
    let item = Fields::from(vec![
        Field::new("role", DataType::Utf8, false),
        Field::new("content", DataType::Utf8, false),
    ]);
    let structs = StructArray::new(
        item.clone(),
        vec![
            Arc::new(StringArray::from(vec!["system", "user", "user"])),
            Arc::new(StringArray::from(vec!["Be brief.", "Hello", "Arrow?"])),
        ],
        None,
    );
    let list = ListArray::new(
        Arc::new(Field::new("item", DataType::Struct(item), false)),
        OffsetBuffer::new(vec![0, 2, 3].into()),
        Arc::new(structs),
        None,
    );
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new(
            "messages",
            list.data_type().clone(),
            false,
        )])),
        vec![Arc::new(list)],
    )
    .unwrap();
    let ctx = Context::try_default().unwrap();
    let out = LlmProcessor::new(config(model.clone()))
        .apply(&ctx.from_batches(vec![batch]).unwrap())
        .collect()
        .unwrap();
    let out = arrow::compute::concat_batches(&out[0].schema(), &out).unwrap();
    let n_in = out
        .column_by_name("num_input_tokens")
        .unwrap()
        .as_primitive::<Int64Type>();
    let tok = Tokenizer::from_dir(&model).unwrap();
    let first = "<s><|system|>Be brief.\n<|user|>Hello\n<|assistant|>";
    assert_eq!(
        n_in.value(0) as usize,
        tok.encode(first, false).unwrap().len()
    );
    assert_eq!(out.num_rows(), 2);

    // Neither column: the error names both and what the input has.
    let plain = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("text", DataType::Utf8, false)])),
        vec![Arc::new(StringArray::from(vec!["hi"]))],
    )
    .unwrap();
    let err = LlmProcessor::new(config(model))
        .apply(&ctx.from_batches(vec![plain]).unwrap())
        .collect()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`prompt`") && err.contains("`messages`") && err.contains("text"),
        "{err}"
    );
}

/// Rows several times the memory budget stream through the stage: the executor's
/// queues stay inside the budget while the engine works batch by batch.
#[test]
fn rows_larger_than_the_budget_stream_through_inside_it() {
    let budget: u64 = 2 << 20;
    let mut cfg = volley_common::VolleyConfig::default();
    cfg.set("volley.exec.progress", "off").unwrap();
    cfg.set("volley.exec.memory_limit", "2MiB").unwrap();
    cfg.set("volley.exec.batch_size", "128").unwrap();
    let ctx = Context::try_new(cfg).unwrap();
    let words = ["a", "def", "Arrow", "The quick"];
    let rows = 4000u64;
    let ds = ctx.range(rows).map_batches(
        "prompts with a 2 KiB payload",
        move |b: RecordBatch| {
            let id = b.column(0).as_primitive::<Int64Type>();
            let prompt: StringArray = id
                .iter()
                .map(|v| Some(words[v.unwrap() as usize % words.len()]))
                .collect();
            let payload: StringArray = id
                .iter()
                .map(|v| Some(format!("{:0>2048}", v.unwrap())))
                .collect();
            Ok(RecordBatch::try_new(
                Arc::new(Schema::new(vec![
                    Field::new("id", DataType::Int64, false),
                    Field::new("prompt", DataType::Utf8, false),
                    Field::new("payload", DataType::Utf8, false),
                ])),
                vec![Arc::clone(b.column(0)), Arc::new(prompt), Arc::new(payload)],
            )?)
        },
        volley_dataset::MapOptions::default(),
    );
    let mut config = config(fixtures().join("tiny-llama"));
    config.sampling.max_tokens = 1;
    config.batch_size = 128;
    let ds = LlmProcessor::new(config).apply(&ds);
    let (mut n, mut bytes, mut generated) = (0u64, 0u64, 0i64);
    for b in ds.iter_batches().unwrap() {
        let b = b.unwrap();
        n += b.num_rows() as u64;
        bytes += b.get_array_memory_size() as u64;
        let g = b
            .column_by_name("num_generated_tokens")
            .unwrap()
            .as_primitive::<Int64Type>();
        generated += g.iter().flatten().sum::<i64>();
    }
    assert_eq!(n, rows);
    assert_eq!(generated, rows as i64);
    assert!(
        bytes > 3 * budget,
        "data of {bytes} B must be several times the budget"
    );
    let stats = ds.stats().unwrap();
    // At most a block (128 rows, ~300 KiB) per queue past the budget.
    assert!(stats.peak_memory <= budget + 3 * (400 << 10), "{stats}");
}
