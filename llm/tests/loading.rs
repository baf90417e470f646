//! Loading the reference checkpoints in `llm/tests/fixtures/` (random tiny Llama and
//! Qwen2 models with Hugging Face transformers' outputs).

use std::path::PathBuf;

use safetensors::SafeTensors;
use volley_llm::{Architecture, Checkpoint, ModelConfig, Tokenizer};

fn fixtures() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    assert!(
        dir.is_dir(),
        "the LLM fixtures are expected at {}",
        dir.display()
    );
    dir
}

fn prompts(model: &str) -> Vec<String> {
    let text = std::fs::read_to_string(fixtures().join(model).join("reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn configs_and_checkpoints_load_with_their_shapes() {
    for (model, arch, bias) in [
        ("tiny-llama", Architecture::Llama, false),
        ("tiny-qwen2", Architecture::Qwen2, true),
    ] {
        let dir = fixtures().join(model);
        let c = ModelConfig::from_dir(&dir).unwrap();
        assert_eq!(c.architecture, arch);
        assert_eq!(
            (
                c.hidden_size,
                c.num_layers,
                c.num_heads,
                c.num_kv_heads,
                c.head_dim
            ),
            (64, 2, 4, 2, 16)
        );
        assert_eq!(c.rope_theta, 10_000.0, "read from rope_parameters");
        assert_eq!(c.attention_bias, bias);
        let ck = Checkpoint::load(&dir, &c).unwrap();
        assert_eq!(ck.len(), c.expected_tensors().len());
        assert_eq!(ck.get("lm_head.weight").unwrap().shape, vec![1024, 64]);
    }
}

#[test]
fn tokenizer_matches_the_reference_ids_and_round_trips() {
    for model in ["tiny-llama", "tiny-qwen2"] {
        let dir = fixtures().join(model);
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
        let reference = SafeTensors::deserialize(&bytes).unwrap();
        for (i, prompt) in prompts(model).iter().enumerate() {
            let ids = tok.encode(prompt, true).unwrap();
            let want: Vec<u32> = reference
                .tensor(&format!("input_ids_{i}"))
                .unwrap()
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
                .collect();
            assert_eq!(ids, want, "{model} prompt {i}");
            assert_eq!(tok.decode(&ids, true).unwrap(), *prompt);
        }
    }
}

/// A tokenizer.json saved with truncation and padding on (as after tokenizing with
/// `truncation=True`) does not cut or pad prompts.
#[test]
fn a_saved_tokenizers_truncation_and_padding_are_off() {
    let dir = fixtures().join("tiny-llama");
    let plain = Tokenizer::from_dir(&dir).unwrap();
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    json["truncation"] = serde_json::json!({
        "direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0
    });
    json["padding"] = serde_json::json!({
        "strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": null,
        "pad_id": 0, "pad_type_id": 0, "pad_token": "<unk>"
    });
    let saved = tempfile::tempdir().unwrap();
    let path = saved.path().join("tokenizer.json");
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    let prompt = prompts("tiny-llama")[0].clone();
    let ids = tok.encode(&prompt, true).unwrap();
    assert!(ids.len() > 3);
    assert_eq!(ids, plain.encode(&prompt, true).unwrap());
}

#[test]
fn bad_folders_fail_naming_the_file_and_the_problem() {
    let tmp = std::env::temp_dir().join(format!("volley-llm-bad-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let err = ModelConfig::from_dir(&tmp).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");

    let base = std::fs::read_to_string(fixtures().join("tiny-llama/config.json")).unwrap();
    let gpt = base.replace("LlamaForCausalLM", "GPT2LMHeadModel");
    let err = ModelConfig::from_json(&gpt, "config.json")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("GPT2LMHeadModel") && err.contains("not supported"),
        "{err}"
    );

    // A config that disagrees with the weights: the tensor and both shapes are named.
    let wider = ModelConfig::from_json(
        &base.replace("\"intermediate_size\": 176", "\"intermediate_size\": 200"),
        "config.json",
    )
    .unwrap();
    let err = Checkpoint::load(&fixtures().join("tiny-llama"), &wider)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.mlp.down_proj.weight")
            && err.contains("[64, 176]")
            && err.contains("[64, 200]"),
        "{err}"
    );

    // Weights the model has no place for (Qwen2's q/k/v biases read as a Llama without
    // them) would be dropped and the outputs silently differ: refused, naming one.
    let qwen = std::fs::read_to_string(fixtures().join("tiny-qwen2/config.json")).unwrap();
    let as_llama = ModelConfig::from_json(
        &qwen.replace("Qwen2ForCausalLM", "LlamaForCausalLM"),
        "config.json",
    )
    .unwrap();
    assert!(!as_llama.attention_bias);
    let err = Checkpoint::load(&fixtures().join("tiny-qwen2"), &as_llama)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("_proj.bias") && err.contains("not part of"),
        "{err}"
    );

    // `num_key_value_heads: null` means as many as the attention heads.
    let null_kv = ModelConfig::from_json(
        &base.replace(
            "\"num_key_value_heads\": 2",
            "\"num_key_value_heads\": null",
        ),
        "config.json",
    )
    .unwrap();
    assert_eq!(null_kv.num_kv_heads, null_kv.num_heads);

    // No weights at all.
    let c = ModelConfig::from_json(&base, "config.json").unwrap();
    let err = Checkpoint::load(&tmp, &c).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn generation_config_adds_end_of_sequence_tokens() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("tiny-llama/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    assert_eq!(
        ModelConfig::from_dir(dir.path()).unwrap().eos_token_ids,
        vec![1]
    );
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [1, 7], "temperature": 0.7}"#,
    )
    .unwrap();
    assert_eq!(
        ModelConfig::from_dir(dir.path()).unwrap().eos_token_ids,
        vec![1, 7]
    );
    std::fs::write(dir.path().join("generation_config.json"), "{not json").unwrap();
    let err = ModelConfig::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("generation_config.json"), "{err}");
}

#[test]
fn llama3_rope_scaling_and_transformers4_fields_are_read() {
    let v4 = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "rope_theta": 500000.0, "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": true,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#;
    let c = ModelConfig::from_json(v4, "config.json").unwrap();
    assert_eq!(c.rope_theta, 500_000.0);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    assert_eq!(c.rope_scaling.unwrap().factor, 32.0);
    assert_eq!(c.sliding_window, None);
    let mistral = v4
        .replace("LlamaForCausalLM", "MistralForCausalLM")
        .replace("\"rope_theta\"", "\"sliding_window\": 4096, \"rope_theta\"");
    let m = ModelConfig::from_json(&mistral, "config.json").unwrap();
    assert_eq!(m.sliding_window, Some(4096));
    let qwen = mistral.replace(
        "\"sliding_window\"",
        "\"use_sliding_window\": false, \"sliding_window\"",
    );
    assert_eq!(
        ModelConfig::from_json(&qwen, "config.json")
            .unwrap()
            .sliding_window,
        None
    );
    assert!(!c
        .expected_tensors()
        .iter()
        .any(|(n, _)| n == "lm_head.weight"));
}

/// The benchmark program answers `--help` without running, and refuses unknown flags.
#[test]
fn bench_llm_answers_help() {
    // Cargo builds a package's examples before its tests: target/<profile>/examples.
    let exe = std::env::current_exe().unwrap();
    let bench = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples/bench_llm");
    let help = std::process::Command::new(&bench)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", bench.display()));
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage:"));
    let bad = std::process::Command::new(&bench)
        .arg("--shape=huge")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("huge"));
}
