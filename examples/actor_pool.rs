//! A named stateful transform on a pool of cluster actors that scales between `--min`
//! and `--max` actors: Parquet files are read on the nodes, paced by a closure in the
//! driver (a burst, then a pause, then the rest), and given to the pool, whose actors
//! each take `--sleep-ms` per block.
//!
//! ```text
//! volley job submit --wait -- target/release/examples/actor_pool IN_DIR --min 1 --max 3
//! ```
//!
//! Prints a checksum of the rows (`RESULT ...`, each input row exactly once), the
//! pool's sizes over time (`POOL 1->2->3->1`) and, with `--pids-dir`, each actor writes
//! a file named after its process there when it starts (so a test can kill one).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use volley::arrow::array::{Array, Int64Array, RecordBatch};
use volley::prelude::*;
use volley::{NamedTransformFactory, TransformFactory};

/// Passes blocks through after `sleep_ms`; records its process id at start.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Slow {
    sleep_ms: u64,
    pids_dir: Option<String>,
}

struct SlowWorker {
    sleep_ms: u64,
}

#[volley::typetag::serde]
impl NamedTransformFactory for Slow {
    fn build(&self) -> volley::Result<Box<dyn StatefulTransform>> {
        if let Some(dir) = &self.pids_dir {
            std::fs::write(
                std::path::Path::new(dir).join(format!("actor-{}", std::process::id())),
                b"",
            )?;
        }
        Ok(Box::new(SlowWorker {
            sleep_ms: self.sleep_ms,
        }))
    }
}

impl StatefulTransform for SlowWorker {
    fn transform(&mut self, batch: RecordBatch) -> volley::Result<RecordBatch> {
        std::thread::sleep(Duration::from_millis(self.sleep_ms));
        Ok(batch)
    }
}

/// The job's arguments.
#[derive(clap::Parser)]
#[command(about = "A stateful transform on an autoscaling pool of cluster actors")]
struct Args {
    /// A folder of Parquet files with an int64 column `x`.
    input: String,
    /// Actors at least.
    #[arg(long, default_value_t = 1)]
    min: usize,
    /// Actors at most.
    #[arg(long, default_value_t = 3)]
    max: usize,
    /// Milliseconds an actor takes per block.
    #[arg(long, default_value_t = 200)]
    sleep_ms: u64,
    /// Blocks passed before the pause.
    #[arg(long, default_value_t = 0)]
    burst: usize,
    /// Milliseconds of the pause after the burst (0: none).
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
    /// Where each actor writes a file named after its process id when it starts.
    #[arg(long)]
    pids_dir: Option<String>,
}

fn main() -> volley::Result<()> {
    volley::init()?;
    let args: Args = clap::Parser::parse();
    let seen = Arc::new(AtomicUsize::new(0));
    let (burst, pause) = (args.burst, args.pause_ms);
    let files = volley::read_parquet(args.input.as_str())?;
    // A burst of blocks, a pause (the pool goes idle), then the rest.
    let paced = files.map_batches(
        "pace",
        move |b: RecordBatch| {
            if seen.fetch_add(1, Ordering::SeqCst) == burst && pause > 0 {
                std::thread::sleep(Duration::from_millis(pause));
            }
            Ok(b)
        },
        MapOptions::default().with_concurrency(1),
    );
    let pool = paced.map_factory(
        TransformFactory::named(Slow {
            sleep_ms: args.sleep_ms,
            pids_dir: args.pids_dir.clone(),
        }),
        MapOptions::default()
            .with_concurrency_range(args.min, args.max)
            .with_max_calls_in_flight(1),
    );
    let (mut rows, mut sum) = (0usize, 0i64);
    let mut distinct = std::collections::HashSet::new();
    for b in pool.iter_batches()? {
        let b = b?;
        rows += b.num_rows();
        let x = b
            .column_by_name("x")
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned())
            .ok_or_else(|| VolleyError::plan("expected an int64 column `x`"))?;
        for i in 0..x.len() {
            sum += x.value(i);
            distinct.insert(x.value(i));
        }
    }
    println!("RESULT rows={rows} distinct={} sum={sum}", distinct.len());
    let stats = pool
        .stats()
        .ok_or_else(|| VolleyError::internal("no statistics"))?;
    let sizes = stats
        .operators
        .iter()
        .find(|o| !o.pool_sizes.is_empty())
        .map(|o| {
            o.pool_sizes
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join("->")
        })
        .unwrap_or_default();
    println!("POOL {sizes}");
    println!("{stats}");
    Ok(())
}
