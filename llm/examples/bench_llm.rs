//! Generation throughput of volley's engine, with Hugging Face transformers `generate`
//! on the same checkpoint and prompts in the same run.
//!
//! ```text
//! cargo run --release -p volley-llm --example bench_llm -- \
//!     --shape 100m --prompt-len 32 --max-tokens 32 --batch-sizes 1,8,32
//! ```
//!
//! `--shape` makes a checkpoint with random weights (`tiny`: the test fixture's shape,
//! `100m`: a ~110M-parameter Llama, `tinyllama`: TinyLlama-1.1B's shape) under
//! `target/bench-llm/`, or `--model DIR` uses a folder. Prompts are random token ids,
//! every request generates `--max-tokens` tokens (EOS ignored). For each batch size B
//! the engine runs `B * --rounds` requests with at most B sequences at once; the figure
//! is output tokens per second of wall time (prefill included), median of `--runs`.
//! The peer (`bench/peers/llm_transformers.py`, run with `--python`) gets the same
//! prompts in batches of B. `--shared-prefix N` adds a run where every prompt starts
//! with the same N tokens, with volley's prefix cache off and on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use volley_llm::{CpuBackend, Engine, EngineConfig, KvCache, ModelConfig, SamplingParams};

/// The benchmark's settings.
#[derive(clap::Parser)]
#[command(
    about = "Generation throughput of volley's engine vs transformers on the same checkpoint"
)]
struct Args {
    /// A Hugging Face model folder to use instead of a random checkpoint.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Shape of the random checkpoint: tiny, 100m or tinyllama.
    #[arg(long, default_value = "tiny", value_parser = ["tiny", "100m", "tinyllama"])]
    shape: String,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Tokens each request generates (EOS ignored).
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    batch_sizes: Vec<usize>,
    /// Requests per batch size, in units of the batch size.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Runs per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Python with transformers and torch: runs the peer in the same invocation.
    #[arg(long)]
    python: Option<String>,
    /// Write the figures as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also measure prompts sharing this many leading tokens, prefix cache off and on.
    #[arg(long, default_value_t = 0)]
    shared_prefix: usize,
}

fn parse_args() -> Args {
    clap::Parser::parse()
}

/// `(hidden, intermediate, layers, heads, kv_heads, vocab)`.
fn shape(name: &str) -> (usize, usize, usize, usize, usize, usize) {
    match name {
        "tiny" => (64, 176, 2, 4, 2, 1024),
        "100m" => (768, 2048, 12, 12, 4, 32000),
        "tinyllama" => (2048, 5632, 22, 32, 4, 32000),
        other => panic!("unknown shape {other} (tiny, 100m, tinyllama)"),
    }
}

/// A Llama checkpoint with random weights (normal, std 0.02; norms 1), f32.
fn make_model(dir: &Path, name: &str) {
    if dir.join("model.safetensors").exists() {
        return;
    }
    let (h, i, layers, heads, kv, vocab) = shape(name);
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": false,
        "torch_dtype": "float32",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    std::fs::copy(fixtures.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let c = ModelConfig::from_dir(dir).unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, shape) in c.expected_tensors() {
        let n: usize = shape.iter().product();
        let norm = name.ends_with("norm.weight");
        let mut bytes = Vec::with_capacity(n * 4);
        for _ in 0..n {
            // Sum of uniforms: close enough to a normal for random weights.
            let v: f32 = if norm {
                1.0
            } else {
                (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * 0.02 * 1.732
            };
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        tensors.push((name, shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &dir.join("model.safetensors")).unwrap();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run_volley(
    dir: &Path,
    prompts: &[Vec<u32>],
    batch: usize,
    max_tokens: usize,
    runs: usize,
    prefix_caching: bool,
    vary_at: Option<usize>,
) -> f64 {
    let c = ModelConfig::from_dir(dir).unwrap();
    let tokens_per_seq = prompts[0].len() + max_tokens;
    let per_block = KvCache::<CpuBackend>::bytes_per_block(&c, 16) as u64;
    let config = EngineConfig {
        max_num_seqs: batch,
        max_batched_tokens: 2048,
        kv_cache_memory: per_block * ((batch * tokens_per_seq).div_ceil(16) as u64 + 8),
        prefix_caching,
        ..Default::default()
    };
    let mut engine = Engine::<CpuBackend>::load(dir, config, &Default::default()).unwrap();
    let params = SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    // Warm-up: one short request.
    engine
        .generate(vec![(
            prompts[0].clone(),
            SamplingParams {
                max_tokens: 2,
                ..params.clone()
            },
        )])
        .unwrap();
    let mut rates = Vec::new();
    let vocab = c.vocab_size.min(1024) as u32;
    for run in 0..runs {
        // With `vary_at`, each run changes the token there, so that no run finds the
        // previous run's prompts (past the shared prefix) in the prefix cache.
        let batch: Vec<(Vec<u32>, SamplingParams)> = prompts
            .iter()
            .map(|p| {
                let mut p = p.clone();
                if let Some(at) = vary_at {
                    p[at] = 3 + (p[at] - 3 + run as u32 + 1) % (vocab - 3);
                }
                (p, params.clone())
            })
            .collect();
        let start = Instant::now();
        let out = engine.generate(batch).unwrap();
        let secs = start.elapsed().as_secs_f64();
        let n: usize = out.iter().map(|g| g.tokens.len()).sum();
        assert_eq!(n, prompts.len() * max_tokens);
        rates.push(n as f64 / secs);
    }
    median(rates)
}

fn run_peer(
    python: &str,
    dir: &Path,
    prompts_file: &Path,
    batch: usize,
    max_tokens: usize,
    runs: usize,
) -> Option<f64> {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/peers/llm_transformers.py");
    let out = Command::new(python)
        .arg(script)
        .args([
            "--model",
            dir.to_str()?,
            "--prompts",
            prompts_file.to_str()?,
        ])
        .args([
            "--batch-size",
            &batch.to_string(),
            "--max-new-tokens",
            &max_tokens.to_string(),
        ])
        .args([
            "--runs",
            &runs.to_string(),
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("peer failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.starts_with('{'))?;
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v["tokens_per_s"].as_f64()
}

fn main() {
    let a = parse_args();
    let dir = match &a.model {
        Some(d) => d.clone(),
        None => {
            let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bench-llm")
                .join(&a.shape);
            make_model(&d, &a.shape);
            d
        }
    };
    let c = ModelConfig::from_dir(&dir).unwrap();
    let params: usize = c
        .expected_tensors()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let mut rng = StdRng::seed_from_u64(42);
    let mut lines = vec![
        format!(
            "model {} ({:.1}M parameters, {} layers, hidden {}), prompts of {} random tokens, {} new tokens each (EOS ignored), {} x batch requests per batch size, median of {} runs, f32 on CPU ({} threads)",
            a.model.as_ref().map(|d| d.display().to_string()).unwrap_or(format!("random `{}`", a.shape)),
            params as f64 / 1e6,
            c.num_layers,
            c.hidden_size,
            a.prompt_len,
            a.max_tokens,
            a.rounds,
            a.runs,
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        ),
        String::new(),
        "| batch | volley tokens/s | transformers tokens/s | volley / transformers |".into(),
        "|---:|---:|---:|---:|".into(),
    ];
    println!("{}", lines[0]);
    for &b in &a.batch_sizes {
        let n = b * a.rounds;
        let vocab = c.vocab_size.min(1024) as u32;
        let prompts: Vec<Vec<u32>> = (0..n)
            .map(|_| {
                (0..a.prompt_len)
                    .map(|_| rng.random_range(3..vocab))
                    .collect()
            })
            .collect();
        let ours = run_volley(&dir, &prompts, b, a.max_tokens, a.runs, false, None);
        let peer = a.python.as_ref().and_then(|py| {
            let f = std::env::temp_dir()
                .join(format!("volley-bench-prompts-{}.json", std::process::id()));
            std::fs::write(&f, serde_json::to_string(&prompts).unwrap()).unwrap();
            let r = run_peer(py, &dir, &f, b, a.max_tokens, a.runs);
            std::fs::remove_file(&f).ok();
            r
        });
        let line = match peer {
            Some(p) => format!("| {b} | {ours:.1} | {p:.1} | {:.2}x |", ours / p),
            None => format!("| {b} | {ours:.1} | - | - |"),
        };
        println!("{line}");
        lines.push(line);
    }
    if a.shared_prefix > 0 {
        // Every prompt starts with the same `shared_prefix` tokens (a system prompt):
        // prefix caching on against off, the largest batch size.
        let b = *a.batch_sizes.iter().max().unwrap_or(&8);
        let vocab = c.vocab_size.min(1024) as u32;
        let prefix: Vec<u32> = (0..a.shared_prefix)
            .map(|_| rng.random_range(3..vocab))
            .collect();
        let prompts: Vec<Vec<u32>> = (0..b * a.rounds)
            .map(|_| {
                let mut p = prefix.clone();
                p.extend((0..a.prompt_len).map(|_| rng.random_range(3..vocab)));
                p
            })
            .collect();
        let off = run_volley(
            &dir,
            &prompts,
            b,
            a.max_tokens,
            a.runs,
            false,
            Some(a.shared_prefix),
        );
        let on = run_volley(
            &dir,
            &prompts,
            b,
            a.max_tokens,
            a.runs,
            true,
            Some(a.shared_prefix),
        );
        let line = format!(
            "\nshared {}-token prefix + {} own tokens, batch {b}: prefix caching off {off:.1} tokens/s, on {on:.1} tokens/s ({:.2}x)",
            a.shared_prefix,
            a.prompt_len,
            on / off
        );
        println!("{line}");
        lines.push(line);
    }
    if let Some(out) = &a.out {
        let mut text = std::fs::read_to_string(out).unwrap_or_default();
        text.push_str(&lines.join("\n"));
        text.push_str("\n\n");
        std::fs::write(out, text).unwrap();
    }
}
