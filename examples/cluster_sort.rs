//! Sorts a folder of Parquet files by one column on a cluster and writes the result as
//! Parquet: the sort is an exchange on the nodes (sampled key ranges, a map task per
//! input block, a reduce task per range), and the write runs where the ranges are.
//! Nothing but references passes through the driver, so the data may be larger than
//! any one node's memory: what does not fit a node's object store spills to its disk.
//!
//! ```text
//! volley job submit --wait -- target/release/examples/cluster_sort IN_DIR OUT_DIR --by x
//! ```
//!
//! Prints `wrote <rows> rows in <files> files`. Each output file is sorted and holds one
//! range of keys; the ranges do not overlap.

use volley::prelude::*;

/// The job's arguments.
#[derive(clap::Parser)]
#[command(about = "Sorts Parquet files on a cluster and writes them back as Parquet")]
struct Args {
    /// A folder of Parquet files.
    input: String,
    /// The output folder (replaced).
    output: String,
    /// The column to sort by.
    #[arg(long)]
    by: String,
    /// Partitions of the exchange (default: `volley.exec.shuffle_partitions`).
    #[arg(long)]
    partitions: Option<usize>,
}

fn main() -> Result<()> {
    let session = volley::init()?;
    let args = <Args as clap::Parser>::parse();
    let mut config = session.config().clone();
    if let Some(n) = args.partitions {
        config.set("volley.exec.shuffle_partitions", &n.to_string())?;
    }
    let mut ctx = Context::try_new(config)?;
    if let Some(cluster) = volley::cluster()? {
        ctx = ctx.with_cluster(cluster);
    }
    let _ = std::fs::remove_dir_all(&args.output);
    let sorted = ctx
        .read_parquet(args.input.as_str())?
        .sort([args.by.as_str()])?;
    let summary = sorted.write_parquet(&args.output)?;
    println!(
        "wrote {} rows in {} files",
        summary.rows,
        summary.files.len()
    );
    Ok(())
}
