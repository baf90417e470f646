//! A plan of every shape, run on a cluster or locally with the same result: a file read
//! with steps (a stage on the nodes), a closure (it stays in the driver), a union, a
//! limit, and a named stateful transform on a pool of 2-4 cluster actors.
//!
//! ```text
//! volley job submit --wait -- target/release/examples/cluster_plan IN_DIR --limit 30000
//! ```
//!
//! Prints a checksum of the rows (`RESULT ...`, the same locally and on a cluster), the
//! nodes the stateful transform ran on (`NODES ...`) and the operators in the
//! execution's statistics (`OPERATORS ...`).

use std::collections::BTreeSet;
use std::sync::Arc;

use volley::arrow::array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray};
use volley::arrow::datatypes::{DataType, Field, Schema};
use volley::prelude::*;
use volley::{NamedTransformFactory, TransformFactory};

/// Tags each row with the node that computed it and adds `y = 3x`, taking a little time
/// per block so that the pool's actors share the work.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct TagNode {
    sleep_ms: u64,
}

struct Tagger {
    node: String,
    sleep_ms: u64,
}

#[volley::typetag::serde]
impl NamedTransformFactory for TagNode {
    fn build(&self) -> volley::Result<Box<dyn StatefulTransform>> {
        Ok(Box::new(Tagger {
            node: std::env::var("VOLLEY_NODE_ID").unwrap_or_else(|_| "local".into()),
            sleep_ms: self.sleep_ms,
        }))
    }
}

impl StatefulTransform for Tagger {
    fn transform(&mut self, batch: RecordBatch) -> volley::Result<RecordBatch> {
        std::thread::sleep(std::time::Duration::from_millis(self.sleep_ms));
        let x = batch
            .column_by_name("x")
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
            .ok_or_else(|| VolleyError::plan("TagNode needs an int64 column `x`"))?;
        let y: Int64Array = x.iter().map(|v| v.map(|v| v * 3)).collect();
        Ok(RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("x", DataType::Int64, true),
                Field::new("y", DataType::Int64, true),
                Field::new("node", DataType::Utf8, false),
            ])),
            vec![
                Arc::new(x.clone()) as ArrayRef,
                Arc::new(y),
                Arc::new(StringArray::from(vec![
                    self.node.as_str();
                    batch.num_rows()
                ])),
            ],
        )?)
    }
}

/// The job's arguments.
#[derive(clap::Parser)]
#[command(about = "A plan with a read stage, a closure, a union, a limit and an actor pool")]
struct Args {
    /// A folder of Parquet files with an int64 column `x`.
    input: String,
    /// Rows the limit passes.
    #[arg(long, default_value_t = 30_000)]
    limit: usize,
    /// Milliseconds the stateful transform takes per block.
    #[arg(long, default_value_t = 20)]
    sleep_ms: u64,
}

fn main() -> volley::Result<()> {
    let global = volley::init()?;
    let args: Args = clap::Parser::parse();
    // In input order, so that the limit keeps the same rows wherever it runs.
    let mut config = global.config().clone();
    config.set("volley.exec.preserve_order", "true")?;
    let mut ctx = Context::try_new(config)?;
    if let Some(cluster) = volley::cluster()? {
        ctx = ctx.with_cluster(cluster);
    }
    // Made in the driver: a range and a closure.
    let generated = ctx.range(2_000).map_batches(
        "offset",
        |b: RecordBatch| {
            let id = b
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("int64 id");
            let x: Int64Array = id.iter().map(|v| v.map(|v| v + 10_000_000)).collect();
            Ok(RecordBatch::try_from_iter([(
                "x",
                Arc::new(x) as ArrayRef,
            )])?)
        },
        MapOptions::default(),
    );
    // Read on the nodes, with the steps fused into the read tasks.
    let files = ctx
        .read_parquet(args.input.as_str())?
        .filter(col("x").gt_eq(lit(0i64)))?
        .select(&["x"])?;
    let tagged = generated.union(&[&files])?.limit(args.limit).map_factory(
        TransformFactory::named(TagNode {
            sleep_ms: args.sleep_ms,
        }),
        MapOptions::default().with_concurrency_range(2, 4),
    );
    let batches = tagged.collect()?;
    let (mut rows, mut sum_x, mut sum_y) = (0usize, 0i64, 0i64);
    let mut nodes = BTreeSet::new();
    for b in &batches {
        rows += b.num_rows();
        let col = |name: &str| {
            b.column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned())
                .expect("int64 column")
        };
        sum_x += col("x").iter().flatten().sum::<i64>();
        sum_y += col("y").iter().flatten().sum::<i64>();
        let node = b
            .column_by_name("node")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
            .expect("node column");
        for i in 0..node.len() {
            nodes.insert(node.value(i).to_string());
        }
    }
    println!("RESULT rows={rows} sum_x={sum_x} sum_y={sum_y}");
    println!("NODES {}", nodes.into_iter().collect::<Vec<_>>().join(","));
    let stats = tagged
        .stats()
        .ok_or_else(|| VolleyError::internal("no statistics"))?;
    let names: Vec<String> = stats
        .operators
        .iter()
        .map(|o| format!("{}:{}", o.name, o.rows_out))
        .collect();
    println!("OPERATORS {}", names.join("|"));
    println!("{}", tagged.explain()?);
    Ok(())
}
