//! A Dataset job that runs on a cluster unchanged: read Parquet, compute columns with an
//! expression and a named transform, filter, write Parquet.
//!
//! ```text
//! volley start --head && volley start --address 127.0.0.1:6380
//! volley job submit --wait -- target/release/examples/cluster_pipeline IN_DIR OUT_DIR
//! ```
//!
//! Run without a cluster (no `VOLLEY_ADDRESS`) it runs locally and writes the same rows.
//! Each read task of the input becomes a cluster task; every node's workers take some.
//! `--slow-ms N` makes the transform sleep N ms per batch (to watch it, or kill a node
//! while it runs; `--fast-first` spares the batch holding the first row); `--tag-node`
//! adds the node each row was computed on.

use std::sync::Arc;

use volley::arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use volley::arrow::datatypes::{DataType, Field, Schema};
use volley::datafusion::logical_expr::cast;
use volley::prelude::*;
use volley::WriteMode;

/// Adds `score = sqrt(x) * weight` (and, if asked, the node that computed it).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Score {
    slow_ms: u64,
    /// The batch holding the first row (`x = 0`) does not sleep.
    fast_first: bool,
    tag_node: bool,
}

#[volley::typetag::serde]
impl NamedTransform for Score {
    fn transform(&self, batch: RecordBatch) -> volley::Result<RecordBatch> {
        let x = batch
            .column_by_name("x")
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
            .ok_or_else(|| VolleyError::plan("Score needs an int64 column `x`"))?;
        let first = self.fast_first && x.values().contains(&0);
        if self.slow_ms > 0 && !first {
            std::thread::sleep(std::time::Duration::from_millis(self.slow_ms));
        }
        let w = batch
            .column_by_name("weight")
            .and_then(|c| c.as_any().downcast_ref::<Float64Array>())
            .ok_or_else(|| VolleyError::plan("Score needs a float64 column `weight`"))?;
        let score: Float64Array = x
            .iter()
            .zip(w.iter())
            .map(|(x, w)| Some((x? as f64).sqrt() * w?))
            .collect();
        let mut fields: Vec<Field> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        fields.push(Field::new("score", DataType::Float64, true));
        columns.push(Arc::new(score));
        if self.tag_node {
            let node = std::env::var("VOLLEY_NODE_ID").unwrap_or_else(|_| "local".into());
            fields.push(Field::new("node", DataType::Utf8, false));
            columns.push(Arc::new(StringArray::from(vec![node; batch.num_rows()])));
        }
        Ok(RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            columns,
        )?)
    }
}

/// The job's arguments.
#[derive(clap::Parser)]
#[command(about = "A Dataset job: read Parquet, score rows with a named transform, write Parquet")]
struct Args {
    /// Input Parquet file, folder or glob.
    input: String,
    /// Output folder (replaced).
    output: String,
    /// Milliseconds the transform sleeps per batch.
    #[arg(long, default_value_t = 0)]
    slow_ms: u64,
    /// The batch holding the first row (`x = 0`) does not sleep: with `--limit` the
    /// limit is reached while the other tasks still sleep.
    #[arg(long)]
    fast_first: bool,
    /// Add the node each row was computed on (column `node`).
    #[arg(long)]
    tag_node: bool,
    /// Add a stateful stage standing in for a model: a pool of this many actors (0:
    /// none), each taking `--model-ms` per batch of `--model-batch` rows.
    #[arg(long, default_value_t = 0)]
    actors: usize,
    /// Milliseconds the model stage takes per batch.
    #[arg(long, default_value_t = 2)]
    model_ms: u64,
    /// Rows per call of the model stage.
    #[arg(long, default_value_t = 4096)]
    model_batch: usize,
    /// Write only the first this many rows (the tasks still running when they are
    /// made are cancelled).
    #[arg(long)]
    limit: Option<usize>,
}

/// A stand-in for a model: built once per actor, `ms` milliseconds of work per batch
/// (busy, like inference on a CPU), the rows passed through.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Model {
    ms: u64,
}

struct Loaded {
    ms: u64,
}

#[volley::typetag::serde]
impl volley::NamedTransformFactory for Model {
    fn build(&self) -> volley::Result<Box<dyn StatefulTransform>> {
        Ok(Box::new(Loaded { ms: self.ms }))
    }
}

impl StatefulTransform for Loaded {
    fn transform(&mut self, batch: RecordBatch) -> volley::Result<RecordBatch> {
        let until = std::time::Instant::now() + std::time::Duration::from_millis(self.ms);
        while std::time::Instant::now() < until {
            std::hint::spin_loop();
        }
        Ok(batch)
    }
}

fn main() -> Result<()> {
    volley::init()?;
    let Args {
        input,
        output,
        slow_ms,
        fast_first,
        tag_node,
        actors,
        model_ms,
        model_batch,
        limit,
    } = clap::Parser::parse();
    let on = match volley::cluster()? {
        Some(c) => format!("cluster {} (job {})", c.address(), c.job_id()),
        None => "this machine".to_string(),
    };
    let start = std::time::Instant::now();
    let mut ds = read_parquet(input.as_str())?
        .with_column("weight", cast(col("x") % lit(7i64), DataType::Float64))?
        .map_transform(
            TransformFn::named(Score {
                slow_ms,
                fast_first,
                tag_node,
            }),
            MapOptions::default(),
        )
        .filter(col("x").gt_eq(lit(0i64)))?;
    if actors > 0 {
        ds = ds.map_factory(
            volley::TransformFactory::named(Model { ms: model_ms }),
            MapOptions::default()
                .with_concurrency(actors)
                .with_batch_size(model_batch),
        );
    }
    if let Some(n) = limit {
        ds = ds.limit(n);
    }
    let summary = ds
        .write(&output, volley::WriteFormat::Parquet)
        .mode(WriteMode::Overwrite)
        .run()?;
    println!(
        "wrote {} rows in {} files to {output} on {on} in {:.2}s",
        summary.rows,
        summary.files.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
