//! Sorts, group-bys, aggregations, distincts, every join kind, a seeded shuffle, hash
//! and ordered repartitions, a block-order shuffle, splits and SQL (a group-by, a join
//! and a sort) run on a cluster (as exchanges on its nodes; a split's parts over its
//! input's blocks there; SQL as stages) and in this process, and compared: the
//! cluster's rows must be the local run's.
//!
//! ```text
//! volley job submit --wait -- target/release/examples/cluster_exchange IN_DIR
//! ```
//!
//! `IN_DIR` holds Parquet files with an int64 column `x` (distinct values). With
//! `--slow-ms` and `--pause-ms` the cluster's map and reduce phases last long enough
//! for a test to kill a node in either. Prints
//! `SAME <operation> rows=<n>` per operation (and exits with an error at the first
//! difference), `NODES a,b,c`: the nodes that held a sort's output partitions, the
//! sort's plan, and for `randomize_block_order` (whose blocks are the cluster's own):
//! `BLOCK ORDER seeded, shuffled, on a,b,c` when two runs give the same order, it is
//! not the input's, and the blocks stayed on those nodes.

use std::collections::BTreeSet;
use std::sync::Arc;

use volley::arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use volley::arrow::datatypes::{DataType, Field, Schema};
use volley::arrow::util::display::array_value_to_string;
use volley::datafusion::logical_expr::{cast, when, Expr};
use volley::datafusion::scalar::ScalarValue;
use volley::prelude::*;
use volley::{agg, NamedTransform, TransformFn, VolleyConfig};

/// Adds the node that computed each block.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct TagNode;

#[volley::typetag::serde]
impl NamedTransform for TagNode {
    fn transform(&self, batch: RecordBatch) -> volley::Result<RecordBatch> {
        let node = std::env::var("VOLLEY_NODE_ID").unwrap_or_else(|_| "local".into());
        let mut fields: Vec<Field> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new("node", DataType::Utf8, false));
        let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
        cols.push(Arc::new(StringArray::from(vec![
            node.as_str();
            batch.num_rows()
        ])));
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
    }
}

/// Passes blocks through after `ms` milliseconds (a slow stage before the exchange).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Slow {
    ms: u64,
}

#[volley::typetag::serde]
impl NamedTransform for Slow {
    fn transform(&self, batch: RecordBatch) -> volley::Result<RecordBatch> {
        std::thread::sleep(std::time::Duration::from_millis(self.ms));
        Ok(batch)
    }
}

/// The job's arguments.
#[derive(clap::Parser)]
#[command(about = "All-to-all operations on a cluster, compared with a local run")]
struct Args {
    /// A folder of Parquet files with an int64 column `x` of distinct values.
    input: String,
    /// Run only the operations whose names start with this.
    #[arg(long)]
    only: Option<String>,
    /// On the cluster: milliseconds a stage before the exchanges takes per block.
    #[arg(long, default_value_t = 0)]
    slow_ms: u64,
    /// On the cluster: milliseconds to stop reading after each operation's first
    /// block (the exchange waits in its reduce phase, its map outputs on the nodes).
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
    /// On the cluster: `volley.exec.object_store_limit` (e.g. `1MiB`).
    #[arg(long)]
    store_limit: Option<String>,
}

/// The rows of `batches` as text, one string per row.
fn rows(batches: &[RecordBatch]) -> volley::Result<Vec<String>> {
    let mut out = Vec::new();
    for b in batches {
        for r in 0..b.num_rows() {
            let cells = b
                .columns()
                .iter()
                .map(|c| array_value_to_string(c, r))
                .collect::<Result<Vec<_>, _>>()?;
            out.push(cells.join("|"));
        }
    }
    Ok(out)
}

/// Fails unless `cluster` and `local` give the same rows (in the same order when
/// `ordered`).
fn same(
    what: &str,
    cluster: &Dataset,
    local: &Dataset,
    ordered: bool,
    pause_ms: u64,
) -> volley::Result<()> {
    let mut got = Vec::new();
    for (i, b) in cluster.iter_batches()?.enumerate() {
        got.push(b?);
        if i == 0 && pause_ms > 0 {
            println!("PAUSED {what}");
            std::thread::sleep(std::time::Duration::from_millis(pause_ms));
        }
    }
    let (mut a, mut b) = (rows(&got)?, rows(&local.collect()?)?);
    if !ordered {
        a.sort();
        b.sort();
    }
    if a != b {
        let first = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len()));
        return Err(VolleyError::execution(format!(
            "{what}: the cluster gave {} rows, the local run {}; first difference at row {first}: {:?} vs {:?}",
            a.len(),
            b.len(),
            a.get(first),
            b.get(first)
        )));
    }
    println!("SAME {what} rows={}", a.len());
    Ok(())
}

/// The nodes that hold `data`'s blocks: a stage over them runs where they are.
fn nodes_of(data: &Dataset) -> volley::Result<BTreeSet<String>> {
    let tagged = data.map_transform(TransformFn::named(TagNode), MapOptions::default());
    let mut nodes = BTreeSet::new();
    for b in tagged.select(&["node"])?.collect()? {
        let n = b
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| VolleyError::internal("node is a string column"))?;
        for i in 0..n.len() {
            nodes.insert(n.value(i).to_string());
        }
    }
    Ok(nodes)
}

/// Tasks the join operator of `data`'s last run ran.
fn join_tasks(data: &Dataset) -> usize {
    data.stats()
        .and_then(|s| {
            s.operators
                .iter()
                .find(|o| o.name == "Join")
                .map(|o| o.tasks)
        })
        .unwrap_or(0)
}

/// `randomize_block_order` on the cluster: the same seed gives the same order twice,
/// the order is not the input's, and the blocks stay on the nodes that made them.
fn block_order(ctx: &Context, input: &str) -> volley::Result<()> {
    let read = ctx.read_parquet(input)?;
    let shuffled = read.randomize_block_order(11)?;
    let (first, again, plain) = (
        rows(&shuffled.collect()?)?,
        rows(&shuffled.collect()?)?,
        rows(&read.collect()?)?,
    );
    if first != again {
        return Err(VolleyError::execution(
            "randomize_block_order: two runs with one seed gave different orders",
        ));
    }
    if first == plain {
        return Err(VolleyError::execution(
            "randomize_block_order: the input's order came out",
        ));
    }
    let nodes = nodes_of(&shuffled)?;
    println!(
        "BLOCK ORDER seeded, shuffled, on {}",
        nodes.into_iter().collect::<Vec<_>>().join(",")
    );
    Ok(())
}

/// The operations over `ctx`'s read of `input`, by name.
fn operations(
    ctx: &Context,
    input: &str,
    slow_ms: u64,
) -> volley::Result<Vec<(&'static str, Dataset, bool)>> {
    let null_every_11th = |e: Expr| -> volley::Result<Expr> {
        Ok(when(
            (col("x") % lit(11i64)).eq(lit(0i64)),
            lit(ScalarValue::Int64(None)),
        )
        .otherwise(e)?)
    };
    let mut read = ctx.read_parquet(input)?;
    if slow_ms > 0 {
        read = read.map_transform(
            TransformFn::named(Slow { ms: slow_ms }),
            MapOptions::default(),
        );
    }
    let left = read
        .with_column("g", col("x") % lit(7i64))?
        .with_column("k", null_every_11th(col("x") % lit(1000i64))?)?
        .with_column("s", cast(col("x") % lit(13i64), DataType::Utf8))?;
    // Unique Int32 keys 0..1500: matched by a third of the left keys' values, and
    // some left unmatched; the key types differ (Int64 on the left).
    let right = ctx
        .read_parquet(input)?
        .filter(col("x").lt(lit(1500i64)))?
        .with_column("rk", cast(col("x"), DataType::Int32))?
        .with_column("y", col("x") * lit(10i64))?
        .select(&["rk", "y"])?;
    let mut ops = vec![
        (
            "sort",
            left.sort([SortKey::asc("g"), SortKey::desc("x")])?,
            true,
        ),
        (
            "groupby",
            left.groupby(&["g", "k"]).agg([
                agg::count_all(),
                agg::sum("x"),
                agg::min("s"),
                agg::max("x"),
            ])?,
            false,
        ),
        (
            "aggregate",
            left.aggregate([agg::count_all(), agg::sum("x"), agg::mean("x")])?,
            false,
        ),
        // Its first pass (sampling the keys) reads the filter's column too.
        (
            "filtered sort",
            left.filter(col("k").is_not_null())?
                .sort([SortKey::desc("s"), SortKey::asc("x")])?,
            true,
        ),
        // No row passes: no samples, no boundaries (over the read itself, whose schema
        // is known with or without the slow stage).
        (
            "empty sort",
            ctx.read_parquet(input)?
                .filter(col("x").lt(lit(0i64)))?
                .sort(["x"])?,
            true,
        ),
        // No row passes: an aggregation without keys still gives its one row.
        (
            "empty aggregate",
            ctx.read_parquet(input)?
                .filter(col("x").lt(lit(0i64)))?
                .aggregate([agg::count_all(), agg::sum("x")])?,
            false,
        ),
        ("distinct", left.select(&["g", "s"])?.distinct()?, false),
        ("unique", left.unique("k")?, false),
        ("random_shuffle", left.random_shuffle(7)?, true),
        ("repartition_by", left.repartition_by(&["g"], 5)?, false),
        ("repartition", left.repartition(9)?, true),
        (
            "randomize_block_order",
            left.randomize_block_order(5)?,
            false,
        ),
    ];
    for (name, part) in ["split 1/3", "split 2/3", "split 3/3"]
        .into_iter()
        .zip(left.split(3)?)
    {
        ops.push((name, part, true));
    }
    let at = left.split_at_indices(&[1_000, 50_000, 50_000, 200_000])?;
    for (name, part) in [
        "split_at 1",
        "split_at 2",
        "split_at 3",
        "split_at 4",
        "split_at 5",
    ]
    .into_iter()
    .zip(at)
    {
        ops.push((name, part, true));
    }
    // SQL over the same files: on a cluster its plan is cut into stages that run on
    // the nodes (the scans, the partial and final aggregates, both sides of the join).
    let sql = |query: &str| ctx.sql_with_files(query, &[("t", input)]);
    ops.push((
        "sql groupby",
        sql("SELECT x % 7 AS g, x % 1000 AS k, count(*) AS n, sum(x) AS s FROM t GROUP BY 1, 2")?,
        false,
    ));
    ops.push((
        "sql join",
        sql("SELECT a.x, b.x * 10 AS y FROM t a JOIN t b ON a.x = b.x + 1 WHERE b.x % 3 = 0")?,
        false,
    ));
    ops.push((
        "sql union",
        sql("SELECT x % 7 AS g, count(*) AS n FROM t GROUP BY 1 \
             UNION ALL SELECT x % 5 AS g, count(*) AS n FROM t GROUP BY 1")?,
        false,
    ));
    ops.push((
        "sql sort",
        sql("SELECT x, x % 7 AS g FROM t ORDER BY g, x DESC")?,
        true,
    ));
    let (train, test) = left.train_test_split(0.25, 3)?;
    ops.push(("train_test_split train", train, true));
    ops.push(("train_test_split test", test, true));
    for (name, how) in [
        ("join inner", JoinHow::Inner),
        ("join left", JoinHow::Left),
        ("join right", JoinHow::Right),
        ("join full", JoinHow::Full),
        ("join semi", JoinHow::Semi),
        ("join anti", JoinHow::Anti),
    ] {
        ops.push((name, left.join_on(&right, &["k"], &["rk"], how)?, false));
    }
    // A left side whose schema a transform decides (unknown to the plan): its Int64
    // keys still meet the right side's equal Float64 keys (a full join is partitioned).
    let transformed = left.map_transform(TransformFn::named(Slow { ms: 0 }), MapOptions::default());
    let float_keys = right.with_column("rk", cast(col("rk"), DataType::Float64))?;
    ops.push((
        "join full transformed",
        transformed.join_on(&float_keys, &["k"], &["rk"], JoinHow::Full)?,
        false,
    ));
    // A join that matches nothing, then an aggregation without keys: one row.
    ops.push((
        "empty join aggregate",
        left.join_on(
            &right.filter(col("rk").lt(lit(0i32)))?,
            &["k"],
            &["rk"],
            JoinHow::Inner,
        )?
        .aggregate([agg::count_all(), agg::sum("y")])?,
        false,
    ));
    // An exchange over an exchange: the join's reduce tasks run the group-by's map.
    ops.push((
        "join groupby",
        left.join_on(&right, &["k"], &["rk"], JoinHow::Left)?
            .groupby(&["g"])
            .agg([agg::count_all(), agg::sum("y"), agg::max("x")])?,
        false,
    ));
    Ok(ops)
}

fn main() -> volley::Result<()> {
    let global = volley::init()?;
    let args: Args = clap::Parser::parse();
    let local = Context::try_new(global.config().clone())?;
    let mut config = global.config().clone();
    if let Some(limit) = &args.store_limit {
        config.set("volley.exec.object_store_limit", limit)?;
    }
    let handle = volley::cluster()?;
    let on = |config: VolleyConfig| -> volley::Result<Context> {
        Ok(match &handle {
            Some(c) => Context::try_new(config)?.with_cluster(c.clone()),
            None => local.clone(),
        })
    };
    let cluster = on(config.clone())?;
    let on_cluster = operations(&cluster, &args.input, args.slow_ms)?;
    let here = operations(&local, &args.input, 0)?;
    let chosen = |name: &str| args.only.as_deref().is_none_or(|o| name.starts_with(o));
    for ((name, c, ordered), (_, l, _)) in on_cluster.iter().zip(&here) {
        if chosen(name) {
            same(name, c, l, *ordered, args.pause_ms)?;
        }
    }
    if chosen("randomize_block_order") {
        block_order(&cluster, &args.input)?;
    }
    if chosen("empty sort") {
        // No rows reach a transform that decides the schema: the same plan error as in
        // one process (the stage's tasks made no block to read a schema from).
        let empty = cluster
            .read_parquet(&args.input)?
            .filter(col("x").lt(lit(0i64)))?
            .map_transform(TransformFn::named(Slow { ms: 0 }), MapOptions::default());
        match empty.schema() {
            Err(e) if e.to_string().contains("the dataset is empty") => {
                println!("EMPTY SCHEMA unknown")
            }
            other => {
                return Err(VolleyError::execution(format!(
                    "the schema of an empty transformed dataset: {other:?}"
                )))
            }
        }
    }
    if chosen("join") {
        // The joins that broadcast their small right side above, partitioned here.
        config.set("volley.exec.broadcast_join_bytes", "0")?;
        let partitioned = operations(&on(config)?, &args.input, 0)?;
        let mut tasks = (0, 0);
        for (((name, b, _), (_, p, _)), (_, l, _)) in on_cluster.iter().zip(&partitioned).zip(&here)
        {
            if ["join inner", "join left", "join semi", "join anti"].contains(name) {
                same(&format!("{name} partitioned"), p, l, false, 0)?;
            }
            if *name == "join inner" {
                tasks = (join_tasks(b), join_tasks(p));
            }
        }
        println!("JOIN TASKS broadcast={} partitioned={}", tasks.0, tasks.1);
    }
    if chosen("split") {
        let part = &on_cluster
            .iter()
            .find(|(name, _, _)| *name == "split 2/3")
            .ok_or_else(|| VolleyError::internal("no split 2/3"))?
            .1;
        println!("{}", part.explain()?);
    }
    // The group-by's and the seeded shuffle's input stages partition their rows as
    // they read them; after a join, the join's reduce tasks do.
    for op in ["groupby", "join groupby", "random_shuffle"] {
        if chosen(op) {
            let groupby = &on_cluster
                .iter()
                .find(|(name, _, _)| *name == op)
                .ok_or_else(|| VolleyError::internal(format!("no {op}")))?
                .1;
            println!("{}", groupby.explain()?);
        }
    }
    if !chosen("sort") {
        return Ok(());
    }
    // Where the sort's output partitions were: a stage over them runs on their nodes.
    let sorted = &on_cluster[0].1;
    let nodes = nodes_of(sorted)?;
    println!("NODES {}", nodes.into_iter().collect::<Vec<_>>().join(","));
    println!("{}", sorted.explain()?);
    // The steps after it run in its reduce tasks.
    let tagged = sorted.map_transform(TransformFn::named(TagNode), MapOptions::default());
    println!("{}", tagged.select(&["node"])?.explain()?);
    Ok(())
}
