//! `volley llm`: batch generation for users who do not write Rust.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use volley::llm::{EngineConfig, LlmConfig, LlmProcessor, ModelConfig, SamplingParams};
use volley::{Context, Result, VolleyError};

/// `volley llm ...`
#[derive(Subcommand)]
pub enum LlmCommand {
    /// Generate text for every row of a Parquet file of prompts.
    ///
    /// The input needs a `prompt` column (text) or a `messages` column (a list of
    /// {role, content} structs, rendered with the model's chat template). The output
    /// keeps the input's columns and adds generated_text, num_input_tokens,
    /// num_generated_tokens and finish_reason. It is written atomically.
    Generate(GenerateArgs),
}

/// Arguments of `volley llm generate`.
#[derive(Args)]
pub struct GenerateArgs {
    /// A Hugging Face model folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Parquet file(s) of prompts (a path, folder or glob).
    #[arg(long)]
    input: String,
    /// Where to write the answers (Parquet).
    #[arg(long)]
    output: String,
    /// Most new tokens per row.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed; each row's seed is derived from it and its prompt.
    #[arg(long)]
    seed: Option<u64>,
    /// Generate max-tokens tokens whatever the model's end-of-sequence says.
    #[arg(long)]
    ignore_eos: bool,
    /// Stop when the text contains this string (repeatable).
    #[arg(long = "stop", value_name = "TEXT")]
    stop: Vec<String>,
    /// Name of the prompt column.
    #[arg(long, default_value = "prompt")]
    prompt_column: String,
    /// Name of the chat messages column (used when there is no prompt column).
    #[arg(long, default_value = "messages")]
    messages_column: String,
    /// Rows an engine takes at a time.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Most sequences in an engine's running batch.
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Most tokens in one forward pass.
    #[arg(long, default_value_t = 1024)]
    max_batched_tokens: usize,
    /// Memory for each engine's KV cache, e.g. 2GiB.
    #[arg(long, default_value = "512MiB")]
    kv_cache_memory: String,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Engines working side by side.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// CPUs each engine holds.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    num_cpus: f64,
    /// GPUs each engine holds (below 1: engines share a GPU). Needs a cluster with GPUs.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    num_gpus: f64,
    /// Run the engines on a cluster: --address HOST:PORT, or VOLLEY_ADDRESS.
    #[command(flatten)]
    conn: crate::cli_cluster::Conn,
}

/// Runs a `volley llm` command.
pub fn run(cmd: LlmCommand) -> Result<()> {
    match cmd {
        LlmCommand::Generate(a) => generate(a),
    }
}

fn generate(a: GenerateArgs) -> Result<()> {
    // Fail on a bad model folder before any data moves.
    let model = ModelConfig::from_dir(&a.model)?;
    if !a.model.join("tokenizer.json").exists() {
        return Err(VolleyError::plan(format!(
            "{}: no tokenizer.json",
            a.model.display()
        )));
    }
    let config = LlmConfig {
        model: a.model.clone(),
        engine: EngineConfig {
            block_size: a.block_size,
            kv_cache_memory: volley::crates::common::parse_bytes(&a.kv_cache_memory)
                .map_err(|e| e.context("--kv-cache-memory"))?,
            max_num_seqs: a.max_num_seqs,
            max_batched_tokens: a.max_batched_tokens,
            ..Default::default()
        },
        sampling: SamplingParams {
            max_tokens: a.max_tokens,
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
            stop: a.stop,
            ignore_eos: a.ignore_eos,
            ..Default::default()
        },
        prompt_column: a.prompt_column,
        messages_column: a.messages_column,
        concurrency: a.concurrency,
        batch_size: a.batch_size,
        num_cpus: a.num_cpus,
        num_gpus: a.num_gpus,
    };
    config
        .sampling
        .validate()
        .map_err(|e| VolleyError::plan(format!("sampling: {e}")))?;
    // Checked here too, not only in each worker once the model is loaded.
    for (flag, n) in [
        ("--block-size", a.block_size),
        ("--max-num-seqs", a.max_num_seqs),
        ("--max-batched-tokens", a.max_batched_tokens),
        ("--batch-size", a.batch_size),
        ("--concurrency", a.concurrency),
    ] {
        if n == 0 {
            return Err(VolleyError::Config(format!("{flag} 0: give 1 or more")));
        }
    }
    for (flag, n) in [("--num-cpus", a.num_cpus), ("--num-gpus", a.num_gpus)] {
        if !(n.is_finite() && n >= 0.0) {
            return Err(VolleyError::Config(format!(
                "{flag} {n}: give what each engine uses, 0 or more"
            )));
        }
    }
    let mut ctx = Context::try_default()?;
    let cluster = a.conn.cluster_if_named(false)?;
    if let Some(cluster) = &cluster {
        ctx = ctx.with_cluster(cluster.clone());
    }
    let ran = run_generate(
        &ctx,
        config,
        &a.input,
        &a.output,
        &a.model,
        model.num_layers,
    );
    crate::cli_cluster::end_attached_job(cluster.as_ref(), &ran);
    ran
}

/// Generates for every row of `input` into `output`, then says how many tokens.
fn run_generate(
    ctx: &Context,
    config: LlmConfig,
    input: &str,
    output: &str,
    model: &std::path::Path,
    num_layers: usize,
) -> Result<()> {
    let input = ctx.read_parquet(input)?;
    let start = Instant::now();
    let summary = LlmProcessor::new(config)
        .apply(&input)
        .write_parquet(output)?;
    let secs = start.elapsed().as_secs_f64();
    // Only the token counts are read back, batch by batch.
    let mut generated = 0i64;
    for batch in ctx
        .read_parquet(output)?
        .select(&["num_generated_tokens"])?
        .iter_batches()?
    {
        let batch = batch?;
        if let Some(counts) = batch
            .column(0)
            .as_any()
            .downcast_ref::<volley::arrow::array::Int64Array>()
        {
            generated += counts.iter().flatten().sum::<i64>();
        }
    }
    let totals = (summary.rows, generated);
    eprintln!(
        "volley llm: {} rows, {} generated tokens in {secs:.1} s ({:.1} tokens/s), {} ({} layers) -> {} ({} file(s))",
        totals.0,
        totals.1,
        totals.1 as f64 / secs.max(1e-9),
        model.display(),
        num_layers,
        output,
        summary.files.len()
    );
    Ok(())
}
