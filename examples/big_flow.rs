//! Gigabytes flowing between a cluster's nodes while the driver holds only references:
//! each input row becomes `--mib` MiB of payload in a stage on the nodes, passes through
//! a pool of actors, and is measured by a last stage; the driver gets one small row per
//! block. Runs the pipeline at a quarter of its size and then whole, and prints the
//! driver's peak resident memory after each. With `--pause-ms`, the payload comes to
//! the driver instead, which stops reading for a while after the first block.
//!
//! ```text
//! volley job submit --wait -- target/release/examples/big_flow IN_DIR --mib 64
//! ```

use std::sync::Arc;

use volley::arrow::array::{Array, ArrayRef, BinaryArray, Int64Array, RecordBatch};
use volley::prelude::*;
use volley::{NamedTransformFactory, TransformFactory, TransformFn};

/// Replaces each row by `mib` MiB of bytes (rows of 1 MiB).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Inflate {
    mib: usize,
}

#[volley::typetag::serde]
impl NamedTransform for Inflate {
    fn transform(&self, batch: RecordBatch) -> volley::Result<RecordBatch> {
        let rows = batch.num_rows() * self.mib;
        let chunk = vec![7u8; 1 << 20];
        let payload = BinaryArray::from_iter_values((0..rows).map(|_| chunk.as_slice()));
        Ok(RecordBatch::try_from_iter([(
            "payload",
            Arc::new(payload) as ArrayRef,
        )])?)
    }
}

/// Passes blocks through (an actor pool stage standing in for a model).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Pass;

#[volley::typetag::serde]
impl NamedTransformFactory for Pass {
    fn build(&self) -> volley::Result<Box<dyn StatefulTransform>> {
        Ok(Box::new(|b: RecordBatch| Ok(b)))
    }
}

/// One row per block: its payload bytes.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Measure;

#[volley::typetag::serde]
impl NamedTransform for Measure {
    fn transform(&self, batch: RecordBatch) -> volley::Result<RecordBatch> {
        let bytes = payload_bytes(&batch)?;
        Ok(RecordBatch::try_from_iter([(
            "bytes",
            Arc::new(Int64Array::from(vec![bytes])) as ArrayRef,
        )])?)
    }
}

/// Bytes of payload in a batch of [`Inflate`]'s output.
fn payload_bytes(batch: &RecordBatch) -> volley::Result<i64> {
    let payload = batch
        .column(0)
        .as_any()
        .downcast_ref::<BinaryArray>()
        .ok_or_else(|| VolleyError::plan("the payload must be a binary column"))?;
    Ok((0..payload.len())
        .map(|i| payload.value(i).len() as i64)
        .sum())
}

/// The input inflated on the nodes and passed through a pool of 2 actors.
fn inflated(files: &[String], mib: usize) -> volley::Result<Dataset> {
    Ok(volley::read_parquet(files.to_vec())?
        .map_transform(TransformFn::named(Inflate { mib }), MapOptions::default())
        .map_factory(
            TransformFactory::named(Pass),
            MapOptions::default().with_concurrency(2),
        ))
}

/// The job's arguments.
#[derive(clap::Parser)]
#[command(about = "Gigabytes between a cluster's nodes; the driver's peak memory")]
struct Args {
    /// Parquet files of one row each (one block each).
    input: String,
    /// MiB of payload each input row becomes.
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Instead: bring every payload block to this process, stopping for this many
    /// milliseconds after the first (a consumer that stops reading: the cluster's
    /// stores must not fill up behind it).
    #[arg(long)]
    pause_ms: Option<u64>,
}

/// This process's peak resident memory, in MiB.
fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .map_or(0, |kib: u64| kib / 1024)
}

fn run(files: &[String], mib: usize) -> volley::Result<i64> {
    let ds =
        inflated(files, mib)?.map_transform(TransformFn::named(Measure), MapOptions::default());
    let mut total = 0i64;
    for b in ds.iter_batches()? {
        let b = b?;
        let col = b
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| VolleyError::internal("bytes column"))?;
        total += col.iter().flatten().sum::<i64>();
    }
    Ok(total)
}

/// The payload itself comes to this process, with a pause after the first block.
fn slow_consumer(files: &[String], mib: usize, pause_ms: u64) -> volley::Result<i64> {
    let mut total = 0i64;
    for (i, b) in inflated(files, mib)?.iter_batches()?.enumerate() {
        total += payload_bytes(&b?)?;
        if i == 0 {
            println!("PAUSED");
            std::thread::sleep(std::time::Duration::from_millis(pause_ms));
        }
    }
    Ok(total)
}

fn main() -> volley::Result<()> {
    volley::init()?;
    let args: Args = clap::Parser::parse();
    let mut files: Vec<String> = std::fs::read_dir(&args.input)?
        .filter_map(|e| e.ok())
        .map(|e| e.path().to_string_lossy().to_string())
        .filter(|p| p.ends_with(".parquet"))
        .collect();
    files.sort();
    if let Some(pause) = args.pause_ms {
        let bytes = slow_consumer(&files, args.mib, pause)?;
        println!("SLOW bytes={bytes} peak_rss_mib={}", peak_rss_mib());
        return Ok(());
    }
    let quarter = run(&files[..files.len().div_ceil(4)], args.mib)?;
    println!("QUARTER bytes={quarter} peak_rss_mib={}", peak_rss_mib());
    let all = run(&files, args.mib)?;
    println!("ALL bytes={all} peak_rss_mib={}", peak_rss_mib());
    Ok(())
}
