//! The Burn decoder and the engine against Hugging Face transformers' outputs on the
//! reference checkpoints in `llm/tests/fixtures/` (f32, CPU).

use std::path::PathBuf;

use safetensors::SafeTensors;
use volley_llm::{
    AttentionGroup, AttentionSeq, Checkpoint, CpuBackend, Engine, EngineConfig, FinishReason,
    ForwardBatch, KvCache, Model, ModelConfig, SamplingParams,
};

const MODELS: [&str; 2] = ["tiny-llama", "tiny-qwen2"];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn load(model: &str) -> Self {
        Self {
            bytes: std::fs::read(fixtures().join(model).join("reference.safetensors")).unwrap(),
        }
    }
    fn i64s(&self, name: &str) -> Vec<u32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect()
    }
    fn f32s(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    fn prompts(&self) -> Vec<Vec<u32>> {
        (0..5)
            .map(|i| self.i64s(&format!("input_ids_{i}")))
            .collect()
    }
}

fn model(name: &str) -> Model<CpuBackend> {
    let dir = fixtures().join(name);
    let config = ModelConfig::from_dir(&dir).unwrap();
    let ck = Checkpoint::load(&dir, &config).unwrap();
    Model::new(config, ck, &Default::default()).unwrap()
}

fn engine(name: &str, config: EngineConfig) -> Engine<CpuBackend> {
    Engine::load(&fixtures().join(name), config, &Default::default()).unwrap()
}

fn values(t: burn::tensor::Tensor<CpuBackend, 2>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

#[test]
fn logits_at_every_position_match_transformers() {
    for name in MODELS {
        let m = model(name);
        let r = Reference::load(name);
        for (i, prompt) in r.prompts().iter().enumerate() {
            let got = values(m.forward_contiguous(prompt));
            let want = r.f32s(&format!("logits_{i}"));
            let d = max_diff(&got, &want);
            assert!(d < 1e-4, "{name} prompt {i}: logits differ by {d}");
        }
    }
}

/// The paged path, with blocks scattered over the cache and the prompt read in two
/// chunks and then token by token, gives the logits of a plain causal attention.
#[test]
fn paged_attention_equals_plain_attention() {
    for name in MODELS {
        let m = model(name);
        let r = Reference::load(name);
        let prompt = &r.prompts()[3];
        let n = prompt.len();
        let bs = 4;
        let num_blocks = n.div_ceil(bs) * 2 + 3;
        let mut cache = KvCache::<CpuBackend>::new(m.config(), num_blocks, bs, &Default::default());
        // Every other block, from the end: nothing about the table is contiguous.
        let table: Vec<usize> = (0..n.div_ceil(bs))
            .map(|i| num_blocks - 1 - 2 * i)
            .collect();
        let slot = |p: usize| table[p / bs] * bs + p % bs;
        let plain = values(m.forward_contiguous(prompt));
        let vocab = m.config().vocab_size;
        let mut chunks = vec![0..n / 3, n / 3..n / 2];
        chunks.extend((n / 2..n).map(|p| p..p + 1));
        for range in chunks {
            let batch = ForwardBatch {
                tokens: prompt[range.clone()].to_vec(),
                positions: range.clone().collect(),
                slots: range.clone().map(slot).collect(),
                groups: vec![AttentionGroup {
                    seqs: vec![AttentionSeq {
                        first_row: 0,
                        num_queries: range.len(),
                        context: (0..range.end).map(slot).collect(),
                    }],
                }],
                logits_rows: (0..range.len()).collect(),
            };
            let got = values(m.forward(&batch, &mut cache).unwrap());
            let d = max_diff(&got, &plain[range.start * vocab..range.end * vocab]);
            assert!(d < 1e-4, "{name} positions {range:?}: {d}");
        }
    }
}

#[test]
fn greedy_tokens_alone_and_in_one_continuous_batch_match_transformers() {
    for name in MODELS {
        let r = Reference::load(name);
        let prompts = r.prompts();
        let want: Vec<Vec<u32>> = (0..5).map(|i| r.i64s(&format!("greedy_{i}"))).collect();
        let batched = r.i64s("batched_greedy");
        for i in 0..5 {
            assert_eq!(&batched[i * 24..(i + 1) * 24], want[i].as_slice());
        }
        let config = EngineConfig {
            block_size: 4,
            ..Default::default()
        };
        let mut e = engine(name, config.clone());
        for (i, p) in prompts.iter().enumerate() {
            let g = e.generate(vec![(p.clone(), greedy(24))]).unwrap();
            assert_eq!(g[0].tokens, want[i], "{name} prompt {i} alone");
            assert_eq!(g[0].finish_reason, FinishReason::Length);
            assert_eq!(g[0].prompt_tokens, p.len());
        }
        // All five at once in a fresh engine (no prefix cache to help): they share
        // every forward pass, and the long prompt is read in chunks of 8.
        let mut e = engine(
            name,
            EngineConfig {
                max_batched_tokens: 8,
                prefix_caching: false,
                ..config
            },
        );
        let reqs = prompts.iter().map(|p| (p.clone(), greedy(24))).collect();
        let g = e.generate(reqs).unwrap();
        for i in 0..5 {
            assert_eq!(g[i].tokens, want[i], "{name} prompt {i} in the batch");
        }
        let s = e.stats();
        let generated: u64 = 5 * 24;
        assert_eq!(s.generated_tokens, generated);
        assert!(s.steps < generated, "the sequences shared steps: {s:?}");
    }
}

#[test]
fn prefix_cache_hits_and_preemption_give_the_same_tokens() {
    let name = "tiny-llama";
    let r = Reference::load(name);
    let prompts = r.prompts();
    let want: Vec<Vec<u32>> = (0..5).map(|i| r.i64s(&format!("greedy_{i}"))).collect();
    let mut e = engine(
        name,
        EngineConfig {
            block_size: 4,
            ..Default::default()
        },
    );
    let first = e.generate(vec![(prompts[3].clone(), greedy(24))]).unwrap();
    let before = e.stats();
    assert_eq!(before.cached_prompt_tokens, 0);
    let again = e
        .generate(vec![
            (prompts[3].clone(), greedy(24)),
            (prompts[3].clone(), greedy(24)),
        ])
        .unwrap();
    let after = e.stats();
    let full_blocks = (prompts[3].len() - 1) / 4;
    assert_eq!(
        after.cached_prompt_tokens,
        2 * 4 * full_blocks as u64,
        "{after:?}"
    );
    assert_eq!(first[0].tokens, want[3]);
    assert_eq!(again[0].tokens, want[3]);
    assert_eq!(again[1].tokens, want[3]);

    // A prompt extending a cached one reuses its blocks too.
    let mut longer = prompts[3].clone();
    longer.extend_from_slice(&want[3][..5]);
    let ext = e.generate(vec![(longer, greedy(19))]).unwrap();
    assert_eq!(ext[0].tokens, want[3][5..]);

    // A cache too small for all five at once: the newest are preempted and recomputed.
    let per_block = KvCache::<CpuBackend>::bytes_per_block(e.model().config(), 4) as u64;
    let mut small = engine(
        name,
        EngineConfig {
            block_size: 4,
            kv_cache_memory: 30 * per_block,
            prefix_caching: false,
            ..Default::default()
        },
    );
    let g = small
        .generate(prompts.iter().map(|p| (p.clone(), greedy(24))).collect())
        .unwrap();
    for i in 0..5 {
        assert_eq!(g[i].tokens, want[i], "prompt {i} under preemption");
    }
    assert!(small.stats().preemptions > 0, "{:?}", small.stats());
}

#[test]
fn seeded_sampling_does_not_depend_on_the_batch() {
    let mut e = engine("tiny-qwen2", EngineConfig::default());
    let r = Reference::load("tiny-qwen2");
    let prompts = r.prompts();
    let params = |seed| SamplingParams {
        max_tokens: 16,
        temperature: 0.8,
        top_k: 50,
        top_p: 0.9,
        seed: Some(seed),
        ignore_eos: true,
        ..Default::default()
    };
    let alone = e.generate(vec![(prompts[0].clone(), params(11))]).unwrap();
    let mixed = e
        .generate(vec![
            (prompts[1].clone(), params(3)),
            (prompts[0].clone(), params(11)),
            (prompts[2].clone(), params(5)),
        ])
        .unwrap();
    assert_eq!(alone[0].tokens, mixed[1].tokens);
    let other = e.generate(vec![(prompts[0].clone(), params(12))]).unwrap();
    assert_ne!(alone[0].tokens, other[0].tokens);
}

#[test]
fn stop_strings_and_tokens_end_generation() {
    let mut e = engine("tiny-llama", EngineConfig::default());
    let prompt = e.encode("def read_parquet(path):").unwrap();
    let full = e
        .generate(vec![(prompt.clone(), greedy(24))])
        .unwrap()
        .remove(0);
    assert_eq!(full.tokens.len(), 24);
    // Stop at a piece of text the model is known to produce.
    let chars: Vec<char> = full.text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let cut = full.text.find(&stop).unwrap();
    let g = e
        .generate(vec![(
            prompt.clone(),
            SamplingParams {
                stop: vec![stop.clone()],
                ..greedy(24)
            },
        )])
        .unwrap()
        .remove(0);
    assert_eq!(g.text, full.text[..cut], "stop string {stop:?}");
    assert_eq!(g.finish_reason, FinishReason::StopString(stop));
    assert!(g.tokens.len() < 24);
    assert_eq!(g.tokens, full.tokens[..g.tokens.len()]);

    // A stop token: generation ends at its first occurrence and it is not in the text.
    let token = full.tokens[5];
    let at = full.tokens.iter().position(|&t| t == token).unwrap();
    let g = e
        .generate(vec![(
            prompt,
            SamplingParams {
                stop_token_ids: vec![token],
                ..greedy(24)
            },
        )])
        .unwrap()
        .remove(0);
    assert_eq!(g.tokens, full.tokens[..=at]);
    assert_eq!(g.finish_reason, FinishReason::StopToken(token));
    let t = e.tokenizer().unwrap();
    assert_eq!(g.text, t.decode(&full.tokens[..at], true).unwrap());
}

#[test]
fn bad_requests_are_refused_with_the_reason() {
    let mut e = engine("tiny-llama", EngineConfig::default());
    let err = |r: volley_common::Result<u64>| r.unwrap_err().to_string();
    assert!(err(e.add_request(vec![], greedy(4))).contains("empty prompt"));
    assert!(err(e.add_request(vec![5000], greedy(4))).contains("outside the vocabulary"));
    assert!(err(e.add_request(vec![5; 500], greedy(100))).contains("context of 512"));
    let bad = SamplingParams {
        top_p: 1.5,
        ..greedy(4)
    };
    assert!(err(e.add_request(vec![5], bad)).contains("top_p"));
    let err = Engine::<CpuBackend>::load(
        &fixtures().join("tiny-llama"),
        EngineConfig {
            kv_cache_memory: 10,
            ..Default::default()
        },
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("kv_cache_memory"), "{err}");
    assert!(!e.has_unfinished());
}

/// Writes the fixture's weights into `dir` as two shards with an index, the first in
/// `first_dtype`, the second in f32.
fn write_shards(dir: &std::path::Path, first_dtype: safetensors::Dtype) {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let src = fixtures().join("tiny-llama");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part, dtype) in [
        ("model-00001-of-00002.safetensors", a, first_dtype),
        ("model-00002-of-00002.safetensors", b, Dtype::F32),
    ] {
        let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for n in part {
            let t = st.tensor(n).unwrap();
            let floats = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()));
            let raw: Vec<u8> = match dtype {
                Dtype::BF16 => floats
                    .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
                Dtype::F16 => floats
                    .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
                _ => t.data().to_vec(),
            };
            data.push((n.clone(), t.shape().to_vec(), raw));
            weight_map.insert(n.clone(), serde_json::Value::String(shard.into()));
        }
        let views: Vec<(String, TensorView)> = data
            .iter()
            .map(|(n, s, r)| (n.clone(), TensorView::new(dtype, s.clone(), r).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(shard)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_and_half_precision_checkpoints_load() {
    let r = Reference::load("tiny-llama");
    // Two f32 shards with an index: the same model, the same greedy tokens.
    let tmp = tempfile::tempdir().unwrap();
    write_shards(tmp.path(), safetensors::Dtype::F32);
    let mut e =
        Engine::<CpuBackend>::load(tmp.path(), EngineConfig::default(), &Default::default())
            .unwrap();
    let g = e
        .generate(vec![(r.prompts()[0].clone(), greedy(24))])
        .unwrap();
    assert_eq!(g[0].tokens, r.i64s("greedy_0"));

    // A bf16 and an f16 shard: weights widened to f32, equal to the rounded originals.
    let orig_dir = fixtures().join("tiny-llama");
    let config = ModelConfig::from_dir(&orig_dir).unwrap();
    let orig = Checkpoint::load(&orig_dir, &config).unwrap();
    for (dtype, round) in [
        (
            safetensors::Dtype::BF16,
            (|v: f32| half::bf16::from_f32(v).to_f32()) as fn(f32) -> f32,
        ),
        (safetensors::Dtype::F16, |v: f32| {
            half::f16::from_f32(v).to_f32()
        }),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        write_shards(tmp.path(), dtype);
        let ck = Checkpoint::load(tmp.path(), &config).unwrap();
        let name = "model.embed_tokens.weight"; // sorts into the first shard
        let want: Vec<f32> = orig
            .get(name)
            .unwrap()
            .data
            .iter()
            .map(|&v| round(v))
            .collect();
        assert_eq!(ck.get(name).unwrap().data, want, "{dtype:?}");
        assert_ne!(ck.get(name).unwrap().data, orig.get(name).unwrap().data);
        // And the engine runs on it.
        let mut e =
            Engine::<CpuBackend>::load(tmp.path(), EngineConfig::default(), &Default::default())
                .unwrap();
        assert_eq!(
            e.generate(vec![(r.prompts()[4].clone(), greedy(8))])
                .unwrap()[0]
                .tokens
                .len(),
            8
        );
    }
}

/// Llama-3 RoPE scaling and tied embeddings, against transformers on a tiny model made
/// by `tests/fixtures/make_llama3.py` (original context 16, factor 8, 48 positions).
#[test]
fn llama3_rope_scaling_and_tied_embeddings_match_transformers() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama3");
    let config = ModelConfig::from_dir(&dir).unwrap();
    assert!(config.rope_scaling.is_some() && config.tie_word_embeddings);
    let ck = Checkpoint::load(&dir, &config).unwrap();
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let r = Reference { bytes };
    let ids = r.i64s("input_ids");
    let mut unscaled = config.clone();
    unscaled.rope_scaling = None;
    let m = Model::<CpuBackend>::new(config, ck.clone(), &Default::default()).unwrap();
    let d = max_diff(&values(m.forward_contiguous(&ids)), &r.f32s("logits"));
    assert!(d < 1e-4, "logits differ by {d}");
    // The scaling matters at these positions: without it the logits are off.
    let m = Model::<CpuBackend>::new(unscaled, ck, &Default::default()).unwrap();
    let d = max_diff(&values(m.forward_contiguous(&ids)), &r.f32s("logits"));
    assert!(d > 1e-3, "unscaled RoPE differs by only {d}");
}
