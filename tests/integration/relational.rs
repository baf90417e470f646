//! Sort, group-by, distinct and join through the Dataset API, checked against DuckDB on
//! the same Parquet files: nulls, empty inputs, a skewed key and many keys.

use std::sync::Arc;

use volley::arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use volley::arrow::datatypes::{DataType, Field, Schema};
use volley::prelude::*;

use crate::common::*;

/// `n` rows: id (unique), k (skewed: 70% of rows hold 0; null every 13th), g (5,000
/// keys), s (strings, null every 7th), v (floats, null every 5th).
fn facts(n: i64, offset: i64) -> RecordBatch {
    let ids = offset..offset + n;
    let id: Int64Array = ids.clone().collect();
    let k: Int64Array = ids
        .clone()
        .map(|i| match i {
            _ if i % 13 == 0 => None,
            _ if i % 10 < 7 => Some(0),
            _ => Some(i % 17),
        })
        .collect();
    let g: Int64Array = ids.clone().map(|i| Some((i * 7919) % 5000)).collect();
    let s: StringArray = ids
        .clone()
        .map(|i| (i % 7 != 0).then(|| format!("s{}", i % 23)))
        .collect();
    let v: Float64Array = ids
        .map(|i| (i % 5 != 0).then(|| ((i * 37) % 1000) as f64 / 8.0 - 40.0))
        .collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("k", DataType::Int64, true),
            Field::new("g", DataType::Int64, true),
            Field::new("s", DataType::Utf8, true),
            Field::new("v", DataType::Float64, true),
        ])),
        vec![
            Arc::new(id),
            Arc::new(k),
            Arc::new(g),
            Arc::new(s),
            Arc::new(v),
        ],
    )
    .unwrap()
}

/// 3,000 dimension rows keyed by g (g in 2,000..5,000 plus a null key), with a name and
/// a column `v` that collides with the facts' `v`.
fn dims() -> RecordBatch {
    let g: Int64Array = (2000..5000).map(|i| (i != 2000).then_some(i)).collect();
    let name: StringArray = (2000..5000).map(|i| Some(format!("d{i}"))).collect();
    let v: Float64Array = (2000..5000).map(|i| Some(i as f64)).collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("g", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("v", DataType::Float64, true),
        ])),
        vec![Arc::new(g), Arc::new(name), Arc::new(v)],
    )
    .unwrap()
}

struct Data {
    dir: tempfile::TempDir,
    ctx: Context,
    facts: String,
    dims: String,
}

impl Data {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx();
        let facts_path = dir.path().join("facts").to_str().unwrap().to_string();
        let dims_path = dir.path().join("dims").to_str().unwrap().to_string();
        ctx.from_batches(vec![facts(30_000, 0), facts(25_000, 30_000)])
            .unwrap()
            .write_parquet(&facts_path)
            .unwrap();
        ctx.from_batches(vec![dims()])
            .unwrap()
            .write_parquet(&dims_path)
            .unwrap();
        Self {
            dir,
            ctx,
            facts: facts_path,
            dims: dims_path,
        }
    }

    fn facts(&self) -> Dataset {
        self.ctx.read_parquet(&self.facts).unwrap()
    }

    fn dims(&self) -> Dataset {
        self.ctx.read_parquet(&self.dims).unwrap()
    }

    /// Writes `ds` and checks its rows equal DuckDB's answer to `query` (`facts` and
    /// `dims` are the tables): as multisets, or in order when `ordered`. Floats compare
    /// to a relative tolerance of 1e-9.
    fn check(&self, name: &str, ds: &Dataset, query: &str, ordered: bool) {
        let out = self.dir.path().join(format!("out-{name}"));
        let out = out.to_str().unwrap();
        if ordered {
            // One file, rows in the dataset's order.
            ds.write(out, volley::WriteFormat::Parquet)
                .single_file()
                .run()
                .unwrap();
        } else {
            ds.write_parquet(out).unwrap();
        }
        let script = format!(
            r#"
import math
con = duckdb.connect()
con.sql("CREATE VIEW facts AS SELECT * FROM '{facts}/*.parquet'")
con.sql("CREATE VIEW dims AS SELECT * FROM '{dims}/*.parquet'")
v = con.sql("SELECT * FROM read_parquet('{read}')").fetchall()
d = con.sql("""{query}""").fetchall()
def norm(x):
    return round(x, 6) if isinstance(x, float) else x
def key(r):
    return tuple((x is None, type(x).__name__, norm(x) if x is not None else 0) for x in r)
if not {ordered}:
    v.sort(key=key)
    d.sort(key=key)
assert len(v) == len(d), f"{name}: volley {{len(v)}} rows, duckdb {{len(d)}}"
for i, (a, b) in enumerate(zip(v, d)):
    assert len(a) == len(b), f"{name}: row {{i}} has {{len(a)}} columns vs {{len(b)}}"
    for x, y in zip(a, b):
        same = (x is None and y is None) or (
            x is not None and y is not None and (
                math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-9)
                if isinstance(x, float) or isinstance(y, float) else x == y))
        assert same, f"{name}: row {{i}} differs: volley {{a}} duckdb {{b}}"
print("rows", len(v))
"#,
            facts = self.facts,
            dims = self.dims,
            ordered = if ordered { "True" } else { "False" },
            read = if ordered {
                out.to_string()
            } else {
                format!("{out}/*.parquet")
            },
        );
        let printed = duckdb(&script);
        assert!(printed.starts_with("rows"), "{printed}");
    }
}

#[test]
fn sort_matches_duckdb_with_nulls_and_directions() {
    let d = Data::new();
    let sorted = d
        .facts()
        .sort([
            SortKey::asc("k").nulls_first(),
            SortKey::desc("v"),
            SortKey::asc("id"),
        ])
        .unwrap();
    d.check(
        "sort",
        &sorted,
        "SELECT * FROM facts ORDER BY k ASC NULLS FIRST, v DESC NULLS LAST, id",
        true,
    );
    // string key, descending, nulls first; then id
    let sorted = d
        .facts()
        .sort([SortKey::desc("s").nulls_first(), SortKey::asc("id")])
        .unwrap()
        .select(&["id", "s"])
        .unwrap();
    d.check(
        "sort_str",
        &sorted,
        "SELECT id, s FROM facts ORDER BY s DESC NULLS FIRST, id",
        true,
    );
}

#[test]
fn groupby_matches_duckdb_on_skewed_and_many_keys() {
    let d = Data::new();
    let skewed = d
        .facts()
        .groupby(&["k"])
        .agg([
            agg::count_all(),
            agg::count("v"),
            agg::sum("id"),
            agg::min("v"),
            agg::max("s"),
            agg::mean("v"),
            agg::std("v"),
            agg::count_distinct("g"),
            agg::first("id", &[SortKey::asc("id")]),
            agg::last("id", &[SortKey::asc("id")]),
        ])
        .unwrap();
    d.check(
        "groupby_skewed",
        &skewed,
        "SELECT k, count(*), count(v), sum(id), min(v), max(s), avg(v), stddev_samp(v), \
         count(DISTINCT g), min(id), max(id) FROM facts GROUP BY k",
        false,
    );
    let many = d
        .facts()
        .groupby(&["g", "s"])
        .agg([agg::count_all(), agg::sum("v")])
        .unwrap();
    d.check(
        "groupby_many",
        &many,
        "SELECT g, s, count(*), sum(v) FROM facts GROUP BY g, s",
        false,
    );
    let global = d
        .facts()
        .aggregate([agg::count_all(), agg::mean("v"), agg::max("id")])
        .unwrap();
    d.check(
        "aggregate",
        &global,
        "SELECT count(*), avg(v), max(id) FROM facts",
        false,
    );
}

#[test]
fn distinct_and_unique_match_duckdb() {
    let d = Data::new();
    let distinct = d.facts().select(&["k", "s"]).unwrap().distinct().unwrap();
    d.check(
        "distinct",
        &distinct,
        "SELECT DISTINCT k, s FROM facts",
        false,
    );
    let unique = d.facts().unique("s").unwrap();
    d.check("unique", &unique, "SELECT DISTINCT s FROM facts", false);
}

#[test]
fn joins_match_duckdb_for_every_kind() {
    let d = Data::new();
    let facts = d.facts().select(&["id", "g", "v"]).unwrap();
    let cases = [
        (
            JoinHow::Inner,
            "SELECT f.g, f.id, f.v, d.name, d.v FROM facts f JOIN dims d ON f.g = d.g",
        ),
        (
            JoinHow::Left,
            "SELECT f.g, f.id, f.v, d.name, d.v FROM facts f LEFT JOIN dims d ON f.g = d.g",
        ),
        (
            JoinHow::Right,
            "SELECT d.g, f.id, f.v, d.name, d.v FROM facts f RIGHT JOIN dims d ON f.g = d.g",
        ),
        (
            JoinHow::Full,
            "SELECT coalesce(f.g, d.g), f.id, f.v, d.name, d.v FROM facts f FULL JOIN dims d ON f.g = d.g",
        ),
        (
            JoinHow::Semi,
            "SELECT f.g, f.id, f.v FROM facts f SEMI JOIN dims d ON f.g = d.g",
        ),
        (
            JoinHow::Anti,
            "SELECT f.g, f.id, f.v FROM facts f ANTI JOIN dims d ON f.g = d.g",
        ),
    ];
    for (how, query) in cases {
        let joined = facts.join(&d.dims(), &["g"], how).unwrap();
        let names: Vec<String> = joined
            .schema()
            .unwrap()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let expected: &[&str] = match how {
            JoinHow::Semi | JoinHow::Anti => &["g", "id", "v"],
            _ => &["g", "id", "v", "name", "v_right"],
        };
        assert_eq!(names, expected, "{how}");
        d.check(&format!("join_{how}"), &joined, query, false);
    }
}

#[test]
fn a_join_whose_renamed_column_clashes_is_refused_by_name() {
    let c = ctx();
    let left = c
        .range(4)
        .sql("t", "SELECT id, id AS v, id AS v_right FROM t")
        .unwrap();
    let right = c
        .range(4)
        .sql("t", "SELECT id, id * 2 AS v FROM t")
        .unwrap();
    let err = left
        .join(&right, &["id"], JoinHow::Inner)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`v`") && err.contains("`v_right`"), "{err}");
    // Without the clash the right side's `v` is renamed.
    let ok = left
        .select(&["id", "v"])
        .unwrap()
        .join(&right, &["id"], JoinHow::Inner)
        .unwrap();
    assert_eq!(ok.count().unwrap(), 4);
}

#[test]
fn empty_inputs_give_empty_or_zero_results() {
    let d = Data::new();
    let none = d.facts().filter(col("id").lt(lit(0i64))).unwrap();
    assert_eq!(none.sort(["id"]).unwrap().count().unwrap(), 0);
    assert_eq!(
        none.groupby(&["k"])
            .agg([agg::sum("v")])
            .unwrap()
            .count()
            .unwrap(),
        0
    );
    assert_eq!(none.distinct().unwrap().count().unwrap(), 0);
    assert_eq!(
        none.join(&d.dims(), &["g"], JoinHow::Inner)
            .unwrap()
            .count()
            .unwrap(),
        0
    );
    assert_eq!(
        d.dims()
            .join(&none, &["g"], JoinHow::Left)
            .unwrap()
            .count()
            .unwrap(),
        3000
    );
    let global = none.aggregate([agg::count_all()]).unwrap();
    d.check(
        "empty_aggregate",
        &global,
        "SELECT count(*) FROM facts WHERE id < 0",
        false,
    );
}

#[test]
fn bad_keys_name_the_column() {
    let d = Data::new();
    let e = d.facts().sort(["nope"]).unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");
    let e = d
        .facts()
        .groupby(&["nope"])
        .agg([agg::count_all()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
    let e = d
        .facts()
        .join(&d.dims(), &["id"], JoinHow::Inner)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`id`") && e.contains("right"), "{e}");
    let e = "sideways".parse::<JoinHow>().unwrap_err().to_string();
    assert!(e.contains("sideways"), "{e}");
}

#[test]
fn explain_shows_the_exchanges_and_stats_count_spills() {
    let d = Data::new();
    let sorted = d.facts().sort(["v"]).unwrap();
    let plan = sorted.explain().unwrap();
    assert!(plan.contains("Sort"), "{plan}");
    // By one integer key: sorted in memory and gathered once.
    assert!(plan.contains("GatherSortExec"), "{plan}");
    // By two: DataFusion's sort.
    let plan = d.facts().sort(["g", "v"]).unwrap().explain().unwrap();
    assert!(
        plan.contains("SortExec") && !plan.contains("GatherSortExec"),
        "{plan}"
    );
    let grouped = d.facts().groupby(&["g"]).agg([agg::sum("v")]).unwrap();
    let plan = grouped.explain().unwrap();
    assert!(plan.contains("RepartitionExec"), "{plan}");

    // A budget far below the data: the sort spills, and stats say how much.
    let dir = tempfile::tempdir().unwrap();
    let spill = dir.path().to_str().unwrap().to_string();
    let small = ctx_with(|c| {
        c.set("volley.exec.memory_limit", "8MiB").unwrap();
        c.set("volley.exec.spill_dir", &spill).unwrap();
    });
    let big = small
        .range(2_000_000)
        .with_column("r", (col("id") * lit(7919i64)) % lit(100_003i64))
        .unwrap()
        .sort(["r", "id"])
        .unwrap();
    let mut prev = i64::MIN;
    let mut n = 0;
    for b in big.iter_batches().unwrap() {
        let b = b.unwrap();
        for r in i64_column(&[b], "r").into_iter().flatten() {
            assert!(r >= prev);
            prev = r;
            n += 1;
        }
    }
    assert_eq!(n, 2_000_000);
    let stats = big.stats().unwrap();
    assert!(stats.spilled_bytes() > 0, "{stats}");
    assert!(stats.to_string().contains("spilled"), "{stats}");
}

/// The plan type and plan text of each row of an `EXPLAIN` statement's result.
fn explain_rows(ds: &Dataset) -> Vec<(String, String)> {
    let batch = ds.collect_batch().unwrap();
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .iter()
            .map(|v| v.unwrap().to_string())
            .collect::<Vec<_>>()
    };
    column("plan_type")
        .into_iter()
        .zip(column("plan"))
        .collect()
}

#[test]
fn sql_explain_shows_the_plan_volley_runs() {
    let d = Data::new();
    d.ctx.register_files("facts", &d.facts).unwrap();
    // One integer key: volley runs GatherSortExec where DataFusion plans SortExec.
    let query = "SELECT id, v FROM facts ORDER BY id DESC";
    let rows = explain_rows(&d.ctx.sql(&format!("EXPLAIN {query}"), &[]).unwrap());
    let types: Vec<&str> = rows.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(types, ["logical_plan", "physical_plan"]);
    assert!(rows[0].1.contains("Sort: facts.id DESC"), "{}", rows[0].1);
    assert!(rows[1].1.contains("GatherSortExec"), "{}", rows[1].1);
    assert!(
        !rows[1].1.contains("SortPreservingMergeExec"),
        "{}",
        rows[1].1
    );
    // The same text as the dataset's own `explain`, whose logical sections show the
    // query's logical plan under it, as written and as optimized (here the sort's
    // scan reads only the columns it needs).
    let shown = d.ctx.sql(query, &[]).unwrap().explain().unwrap();
    assert!(
        shown.ends_with(&format!("{}\n", rows[1].1)),
        "{shown}\n---\n{}",
        rows[1].1
    );
    let section = |name: &str| {
        let from = shown.find(&format!("== {name} ==\n")).unwrap();
        shown[from..].split("\n\n").next().unwrap().to_string()
    };
    let (written, optimized) = (section("logical plan"), section("optimized logical plan"));
    assert!(written.contains("  | Sort: facts.id DESC"), "{written}");
    assert!(
        written.contains("TableScan: facts\n") || written.ends_with("TableScan: facts"),
        "{written}"
    );
    assert!(
        optimized.contains("TableScan: facts projection=["),
        "{optimized}"
    );
    // Turned off, the explained plan follows.
    let off = ctx_with(|c| c.set("volley.plan.gather_sorts", "false").unwrap());
    off.register_files("facts", &d.facts).unwrap();
    let rows = explain_rows(&off.sql(&format!("EXPLAIN {query}"), &[]).unwrap());
    assert!(!rows[1].1.contains("GatherSortExec"), "{}", rows[1].1);
    assert!(rows[1].1.contains("SortExec"), "{}", rows[1].1);

    let verbose = explain_rows(&d.ctx.sql(&format!("EXPLAIN VERBOSE {query}"), &[]).unwrap());
    assert_eq!(verbose[0].0, "initial_logical_plan");
    assert_eq!(verbose.len(), 3);

    // ANALYZE runs the query through volley: its rows, and GatherSortExec's metrics.
    let analyzed = explain_rows(&d.ctx.sql(&format!("EXPLAIN ANALYZE {query}"), &[]).unwrap());
    let (kind, plan) = &analyzed[0];
    assert_eq!(kind, "Plan with Metrics");
    assert!(
        plan.contains("GatherSortExec") && plan.contains("output_rows=55.00 K"),
        "{plan}"
    );
    assert!(
        analyzed[1].1.contains("output rows: 55000"),
        "{}",
        analyzed[1].1
    );

    // Other formats are DataFusion's renderings of a plan volley does not run.
    let e = d
        .ctx
        .sql(&format!("EXPLAIN FORMAT tree {query}"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("EXPLAIN FORMAT tree"), "{e}");
}

#[test]
fn registered_files_serve_every_query_and_native_scans_explain() {
    let d = Data::new();
    d.ctx.register_files("facts", &d.facts).unwrap();
    let n = d.ctx.sql("SELECT count(*) AS n FROM facts", &[]).unwrap();
    assert_eq!(i64_column(&n.collect().unwrap(), "n"), vec![Some(55_000)]);
    let m = d.ctx.sql("SELECT max(id) AS m FROM facts", &[]).unwrap();
    assert_eq!(i64_column(&m.collect().unwrap(), "m"), vec![Some(54_999)]);
    let e = d
        .ctx
        .register_files("nope", "/no/such/folder/")
        .unwrap_err()
        .to_string();
    assert!(e.contains("/no/such/folder"), "{e}");
    // A table given to one query replaces a registered one of its name, for that query.
    let count = |q: &str, files: &[(&str, &str)]| {
        let n = d.ctx.sql_with_files(q, files).unwrap().collect().unwrap();
        i64_column(&n, "n")[0].unwrap()
    };
    let q = "SELECT count(*) AS n FROM facts";
    assert_eq!(count(q, &[("facts", &d.dims)]), 3000);
    let dims = d.ctx.read_parquet(&d.dims).unwrap();
    let n = d
        .ctx
        .sql(q, &[("facts", &dims)])
        .unwrap()
        .collect()
        .unwrap();
    assert_eq!(i64_column(&n, "n"), vec![Some(3000)]);
    assert_eq!(count(q, &[]), 55_000);
    // Qualified, the name is the same table's.
    assert_eq!(count(q, &[("public.facts", &d.dims)]), 3000);
    assert_eq!(count(q, &[("datafusion.public.facts", &d.dims)]), 3000);
    let n = d
        .ctx
        .sql(q, &[("public.facts", &dims)])
        .unwrap()
        .collect()
        .unwrap();
    assert_eq!(i64_column(&n, "n"), vec![Some(3000)]);
    // Names are SQL's: `Facts` replaces `facts`; a name of two parts is refused.
    d.ctx.register_files("Facts", &d.dims).unwrap();
    assert_eq!(count(q, &[]), 3000);
    d.ctx.register_files("facts", &d.facts).unwrap();
    let e = d
        .ctx
        .register_files("tpch.facts", &d.facts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("table name `tpch.facts`"), "{e}");
    assert_eq!(count(q, &[]), 55_000);
    // A glob naming an extension in capitals finds its files (and reads them as CSV).
    let upper = d.dir.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    std::fs::write(upper.join("A.CSV"), "a,b\n1,2\n3,4\n").unwrap();
    let glob = format!("SELECT count(*) AS n FROM '{}/*.CSV'", upper.display());
    assert_eq!(count(&glob, &[]), 2);
    // A sort over files under column steps is planned by DataFusion from the files.
    let plan = d
        .facts()
        .filter(col("k").eq(lit(0i64)))
        .unwrap()
        .select(&["id", "v"])
        .unwrap()
        .sort(["v"])
        .unwrap()
        .explain()
        .unwrap();
    assert!(plan.contains("DataSourceExec"), "{plan}");
}

#[test]
fn a_set_before_a_query_reaches_its_execution_and_its_quoted_files() {
    let d = Data::new();
    // The executor's batches are the session's after the SET, not the context's.
    let batches = d
        .ctx
        .sql(
            &format!(
                "SET datafusion.execution.batch_size = 100; SELECT id FROM '{}/'",
                d.facts
            ),
            &[],
        )
        .unwrap()
        .collect()
        .unwrap();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 55_000);
    let most = batches.iter().map(|b| b.num_rows()).max().unwrap();
    assert!(most <= 100, "a batch of {most} rows");
    // A file table in quotes is made with the options the SET gave.
    let file = d.dir.path().join("bytes.parquet");
    let batch = RecordBatch::try_from_iter([(
        "b",
        Arc::new(volley::arrow::array::BinaryArray::from_iter_values([
            b"x".as_slice()
        ])) as volley::arrow::array::ArrayRef,
    )])
    .unwrap();
    let mut w = volley::datafusion::parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&file).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let q = format!(
        "SET datafusion.execution.parquet.binary_as_string = true; \
         SELECT arrow_typeof(b) AS t FROM '{}'",
        file.display()
    );
    let t = d.ctx.sql(&q, &[]).unwrap().collect().unwrap();
    let t = volley::arrow::compute::cast(t[0].column(0), &DataType::Utf8).unwrap();
    let t = t
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap()
        .value(0)
        .to_string();
    assert!(t.starts_with("Utf8"), "{t}");
}

#[test]
fn sql_window_functions_and_external_tables_match_duckdb() {
    let d = Data::new();
    let ds = d
        .ctx
        .sql(
            &format!(
                "CREATE EXTERNAL TABLE f STORED AS PARQUET LOCATION '{}/'; \
                 SELECT k, id, sum(v) OVER (PARTITION BY k ORDER BY id) AS running, \
                        row_number() OVER (PARTITION BY k ORDER BY id) AS rn, \
                        rank() OVER (ORDER BY g DESC) AS r \
                 FROM f WHERE id < 5000",
                d.facts
            ),
            &[],
        )
        .unwrap();
    d.check(
        "window",
        &ds,
        "SELECT k, id, sum(v) OVER (PARTITION BY k ORDER BY id), \
                row_number() OVER (PARTITION BY k ORDER BY id), rank() OVER (ORDER BY g DESC) \
         FROM facts WHERE id < 5000",
        false,
    );
    let joined = d
        .ctx
        .sql(
            "SELECT DISTINCT d.name, f.k FROM facts f JOIN dims d ON f.g = d.g \
             WHERE f.k IS NOT NULL ORDER BY d.name, f.k",
            &[("facts", &d.facts()), ("dims", &d.dims())],
        )
        .unwrap();
    d.check(
        "sql_join_distinct",
        &joined,
        "SELECT DISTINCT d.name, f.k FROM facts f JOIN dims d ON f.g = d.g \
         WHERE f.k IS NOT NULL ORDER BY d.name, f.k",
        true,
    );
}

/// Sorts, aggregations, distincts and joins are nodes of the logical plan: the optimizer
/// moves a filter below a sort into the scan, and an aggregation's input reads only the
/// columns it aggregates; the answers stay the same.
#[test]
fn the_optimizer_sees_through_sorts_and_aggregations() {
    let d = Data::new();
    let sorted = d
        .facts()
        .sort(["v"])
        .unwrap()
        .filter(col("k").eq(lit(0i64)))
        .unwrap()
        .select(&["id", "v"])
        .unwrap();
    let plan = sorted.explain().unwrap();
    let optimized = plan
        .split("== optimized logical plan ==")
        .nth(1)
        .and_then(|p| p.split("== physical plan ==").next())
        .unwrap();
    assert!(optimized.contains("Sort: v asc"), "{plan}");
    assert!(optimized.contains("filters=[k = Int64(0)]"), "{plan}");
    let unfiltered = d.facts().sort(["v"]).unwrap().collect_batch().unwrap();
    let keep = volley::arrow::compute::kernels::cmp::eq(
        unfiltered.column_by_name("k").unwrap(),
        &volley::arrow::array::Int64Array::new_scalar(0),
    )
    .unwrap();
    let expected = volley::arrow::compute::filter_record_batch(&unfiltered, &keep).unwrap();
    let got = sorted.collect().unwrap();
    // Ties in `v` may come in any order: the same values in the same order, the same
    // ids.
    let v = |batches: &[RecordBatch]| -> Vec<Option<u64>> {
        let all = volley::arrow::compute::concat_batches(&batches[0].schema(), batches).unwrap();
        let c = all.column_by_name("v").unwrap();
        let c = c
            .as_any()
            .downcast_ref::<volley::arrow::array::Float64Array>()
            .unwrap();
        c.iter().map(|x| x.map(f64::to_bits)).collect()
    };
    assert!(v(&got) == v(std::slice::from_ref(&expected)));
    let (mut a, mut b) = (i64_column(&got, "id"), i64_column(&[expected], "id"));
    a.sort();
    b.sort();
    assert!(!a.is_empty() && a == b, "{} vs {} ids", a.len(), b.len());

    let summed = d.facts().groupby(&["k"]).agg([agg::sum("v")]).unwrap();
    let plan = summed.explain().unwrap();
    assert!(plan.contains("Aggregate: group by [k]"), "{plan}");
    assert!(plan.contains("projection=[k, v]"), "{plan}");
    assert_eq!(
        summed.count().unwrap(),
        d.facts().unique("k").unwrap().count().unwrap()
    );
}

/// A sort of view strings (an exchange's reduce task sorts the partition it reads
/// this way) counts each string once. DataFusion's sorted chunks of a view batch each
/// keep every string buffer of that batch: counted as they were, 37 chunks of one
/// 300,000-row batch made ~330 MiB of ~13 MiB, and the sort failed under a 64 MiB
/// budget. The sort reads plain strings instead.
#[test]
fn a_sort_of_view_strings_counts_each_string_once() {
    use volley::arrow::array::{Array, StringViewArray};
    let n = 300_000i64;
    let key = |i: i64| (i * 7919) % n;
    // Longer than 12 bytes: the strings live in the views' buffers, not inline.
    let label = |k: i64| format!("the string of key {k:>12}");
    let s: StringViewArray = (0..n).map(|i| Some(label(key(i)))).collect();
    let k = Int64Array::from_iter_values((0..n).map(key));
    let batch =
        RecordBatch::try_from_iter([("k", Arc::new(k) as _), ("s", Arc::new(s) as _)]).unwrap();
    let c = ctx_with(|c| c.set("volley.exec.memory_limit", "64MiB").unwrap());
    let views = c.from_batches(vec![batch]).unwrap();
    let sorted = views.sort(["k"]).unwrap();
    // The plan says what comes out, so it unions with another sort of the same rows.
    assert_eq!(
        sorted.schema().unwrap().field(1).data_type(),
        &DataType::Utf8
    );
    let twice = sorted.union(&[&views.sort(["s"]).unwrap()]).unwrap();
    assert_eq!(twice.count().unwrap(), 2 * n as u64);
    let mut next = 0i64;
    for b in sorted.iter_batches().unwrap() {
        let b = b.unwrap();
        let s = b.column(1);
        assert_eq!(s.data_type(), &DataType::Utf8, "sorted strings are plain");
        let s = s.as_any().downcast_ref::<StringArray>().unwrap();
        let k = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        for i in 0..b.num_rows() {
            assert_eq!(k.value(i), next);
            assert_eq!(s.value(i), label(next));
            next += 1;
        }
    }
    assert_eq!(next, n);
}

#[test]
fn a_join_builds_a_side_of_a_few_mib_once_and_partitions_beyond_the_budget() {
    // 400,000 build rows of two integer columns (~6 MiB): above DataFusion's own limit
    // for collecting a side (1 MiB or 128 Ki rows), far below volley's (256 MiB per CPU).
    let dir = tempfile::tempdir().unwrap();
    let build_path = dir.path().join("build").to_str().unwrap().to_string();
    let probe_path = dir.path().join("probe").to_str().unwrap().to_string();
    // Two CPUs and a 1 GiB budget: the limit is 128 MiB on any machine.
    let c = ctx_with(|c| {
        c.set("volley.runtime.num_cpus", "2").unwrap();
        c.set("volley.exec.memory_limit", "1GiB").unwrap();
    });
    c.range(400_000)
        .with_column("key", col("id") * lit(2i64))
        .unwrap()
        .with_column("payload", (col("id") * lit(7919i64)) % lit(1_000_003i64))
        .unwrap()
        .select(&["key", "payload"])
        .unwrap()
        .write_parquet(&build_path)
        .unwrap();
    c.range(1_600_000)
        .with_column("k", col("id") % lit(800_000i64))
        .unwrap()
        .write_parquet(&probe_path)
        .unwrap();
    let join = |c: &Context| {
        c.read_parquet(probe_path.as_str())
            .unwrap()
            .join_on(
                &c.read_parquet(build_path.as_str()).unwrap(),
                &["k"],
                &["key"],
                JoinHow::Inner,
            )
            .unwrap()
            .aggregate([agg::count_all().alias("n"), agg::sum("payload").alias("s")])
            .unwrap()
    };
    let joined = join(&c);
    let plan = joined.explain().unwrap();
    assert!(plan.contains("HashJoinExec: mode=CollectLeft"), "{plan}");
    // Every even k below 800,000 matches one build row, and each k appears twice.
    let out = joined.collect().unwrap();
    assert_eq!(i64_column(&out, "n"), vec![Some(800_000)]);
    let expected: i64 = (0..400_000i64).map(|i| 2 * ((i * 7919) % 1_000_003)).sum();
    assert_eq!(i64_column(&out, "s"), vec![Some(expected)]);
    // Under a budget of 16 MiB the limit is a quarter of it: both sides are partitioned.
    let small = ctx_with(|c| {
        c.set("volley.runtime.num_cpus", "2").unwrap();
        c.set("volley.exec.memory_limit", "16MiB").unwrap();
    });
    let plan = join(&small).explain().unwrap();
    assert!(
        plan.contains("HashJoinExec: mode=Partitioned") && !plan.contains("CollectLeft"),
        "{plan}"
    );
}

/// SQL over Parquet files whose strings are views reads them as views where nothing
/// buffers them (an aggregation's groups, a filter's conditions), and casts what a
/// filter keeps to plain strings before a sort; a scan that neither filters nor feeds
/// an aggregation reads plain strings as before. Answers and types are unchanged.
#[test]
fn sql_reads_view_strings_where_no_operator_buffers_them() {
    use std::collections::BTreeMap;
    use volley::arrow::array::{Array, StringViewArray};
    use volley::datafusion::parquet::arrow::ArrowWriter;
    let n = 90_000i64;
    let flag = |i: i64| ["A", "B", "C"][(i % 3) as usize];
    // Longer than 12 bytes: these live in the views' buffers, not inline.
    let note = |i: i64| format!("a note longer than a view {:>5}", (i * 7919) % 1000);
    let flags: StringViewArray = (0..n).map(|i| Some(flag(i))).collect();
    let notes: StringViewArray = (0..n).map(|i| Some(note(i))).collect();
    let batch = RecordBatch::try_from_iter([
        ("x", Arc::new(Int64Array::from_iter_values(0..n)) as _),
        ("flag", Arc::new(flags) as _),
        ("note", Arc::new(notes) as _),
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.parquet");
    let file = std::fs::File::create(&path).unwrap();
    let mut w = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let c = ctx();
    c.register_files("t", path.to_str().unwrap()).unwrap();
    let strings = |batches: &[RecordBatch], name: &str| -> Vec<String> {
        batches
            .iter()
            .flat_map(|b| {
                let s = b.column_by_name(name).unwrap();
                assert_eq!(s.data_type(), &DataType::Utf8, "{name} is a plain string");
                let s = s.as_any().downcast_ref::<StringArray>().unwrap();
                (0..s.len())
                    .map(|i| s.value(i).to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    };

    // Grouped: the aggregation reads views, its output is cast to plain strings.
    let grouped = c
        .sql(
            "SELECT flag, count(*) AS n, max(note) AS m FROM t WHERE x % 2 = 0 \
             GROUP BY flag ORDER BY flag",
            &[],
        )
        .unwrap();
    let plan = grouped.explain().unwrap();
    assert!(plan.contains("CAST(flag@0 AS Utf8) as flag"), "{plan}");
    let out = grouped.collect().unwrap();
    let mut expected: BTreeMap<&str, (i64, String)> = BTreeMap::new();
    for i in (0..n).filter(|i| i % 2 == 0) {
        let e = expected.entry(flag(i)).or_insert((0, String::new()));
        e.0 += 1;
        e.1 = e.1.clone().max(note(i));
    }
    assert_eq!(
        strings(&out, "flag"),
        expected.keys().map(|k| k.to_string()).collect::<Vec<_>>()
    );
    assert_eq!(
        i64_column(&out, "n"),
        expected.values().map(|v| Some(v.0)).collect::<Vec<_>>()
    );
    assert_eq!(
        strings(&out, "m"),
        expected.values().map(|v| v.1.clone()).collect::<Vec<_>>()
    );

    // Filtered, then sorted: the filter compares views, and the sort buffers plain
    // strings (a sorted copy of a view array would count its whole pages).
    let sorted = c
        .sql(
            "SELECT x, note FROM t WHERE flag = 'B' AND x < 3000 ORDER BY note, x",
            &[],
        )
        .unwrap();
    let plan = sorted.explain().unwrap();
    let sort = plan.find("SortExec").expect("a sort");
    let cast = plan.find("AS Utf8) as note").expect("a cast");
    assert!(sort < cast, "the sort reads the cast: {plan}");
    let mut rows: Vec<(String, i64)> = (0..3000)
        .filter(|i| i % 3 == 1)
        .map(|i| (note(i), i))
        .collect();
    rows.sort();
    let out = sorted.collect().unwrap();
    assert_eq!(
        strings(&out, "note"),
        rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>()
    );
    assert_eq!(
        i64_column(&out, "x"),
        rows.iter().map(|r| Some(r.1)).collect::<Vec<_>>()
    );

    // Neither filtered nor grouped, or grouped by an aggregate that sorts its input:
    // plain strings straight from the decoder.
    for query in [
        "SELECT note FROM t ORDER BY x LIMIT 3",
        "SELECT flag, array_agg(x ORDER BY note) AS a FROM t GROUP BY flag",
    ] {
        let plan = c.sql(query, &[]).unwrap().explain().unwrap();
        assert!(!plan.contains("CAST("), "{plan}");
    }
}

/// A sort of rows runs on batches of 32,768 rows where the budget is roomy (its sorted
/// chunks and merge come out that size), and on the configured 8,192 under a small one.
#[test]
fn a_sort_of_rows_runs_on_larger_batches_under_a_roomy_budget() {
    let rows = 200_000u64;
    let largest = |c: &Context| -> usize {
        let out = c.range(rows).sort(["id"]).unwrap().collect().unwrap();
        assert_eq!(
            out.iter().map(RecordBatch::num_rows).sum::<usize>(),
            rows as usize
        );
        out.iter().map(RecordBatch::num_rows).max().unwrap()
    };
    let roomy = ctx_with(|c| {
        c.set("volley.exec.memory_limit", "8GiB").unwrap();
        c.set("volley.runtime.num_cpus", "2").unwrap();
    });
    assert!(largest(&roomy) > 8192, "{}", largest(&roomy));
    let small = ctx_with(|c| {
        c.set("volley.exec.memory_limit", "256MiB").unwrap();
        c.set("volley.runtime.num_cpus", "2").unwrap();
    });
    assert!(largest(&small) <= 8192, "{}", largest(&small));
}

/// A query's inner joins run smallest estimated result first, whatever order the query
/// names its tables in; `volley.plan.reorder_joins=false` keeps the written order.
/// Answers are the same either way.
#[test]
fn inner_joins_run_smallest_first_unless_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = |t: &str| dir.path().join(t).to_str().unwrap().to_string();
    let c = ctx_with(|c| c.set("volley.runtime.num_cpus", "2").unwrap());
    // fact: 200,000 rows over 1,000 `a`; dim_a: `a` -> `b` (1,000 rows); dim_b: 50 `b`.
    c.range(200_000)
        .with_column("a", col("id") % lit(1_000i64))
        .unwrap()
        .write_parquet(&path("fact"))
        .unwrap();
    c.range(1_000)
        .with_column("a", col("id"))
        .unwrap()
        .with_column("b", col("id") % lit(50i64))
        .unwrap()
        .select(&["a", "b"])
        .unwrap()
        .write_parquet(&path("dim_a"))
        .unwrap();
    c.range(50)
        .with_column("b", col("id"))
        .unwrap()
        .select(&["b"])
        .unwrap()
        .write_parquet(&path("dim_b"))
        .unwrap();
    let query = "SELECT count(*) AS n, sum(fact.id) AS s FROM fact, dim_a, dim_b \
                 WHERE fact.a = dim_a.a AND dim_a.b = dim_b.b AND dim_b.b < 2";
    // The tables the deepest join reads (the lines below it, indented further).
    let deepest_join = |c: &Context| {
        for t in ["fact", "dim_a", "dim_b"] {
            c.register_files(t, &path(t)).unwrap();
        }
        let ds = c.sql(query, &[]).unwrap();
        let plan = ds.explain().unwrap();
        let physical = &plan[plan.find("== physical plan ==").unwrap()..];
        let lines: Vec<&str> = physical.lines().collect();
        let indent = |l: &str| l.len() - l.trim_start_matches([' ', '|']).len();
        let at = lines
            .iter()
            .rposition(|l| l.contains("HashJoinExec"))
            .unwrap_or_else(|| panic!("{plan}"));
        let mut tables: Vec<&str> = lines[at + 1..]
            .iter()
            .take_while(|l| indent(l) > indent(lines[at]))
            .flat_map(|l| {
                ["fact", "dim_a", "dim_b"]
                    .into_iter()
                    .filter(move |t| l.contains(&format!("/{t}/")))
            })
            .collect();
        tables.sort();
        tables.dedup();
        let out = ds.collect().unwrap();
        (tables, i64_column(&out, "n"), i64_column(&out, "s"), plan)
    };
    let (tables, n, s, plan) = deepest_join(&c);
    assert_eq!(tables, ["dim_a", "dim_b"], "{plan}");
    // `b` in {0, 1}: 40 of the 1,000 `a`, 200 rows each.
    assert_eq!(n, vec![Some(8_000)]);
    let written = ctx_with(|c| {
        c.set("volley.runtime.num_cpus", "2").unwrap();
        c.set("volley.plan.reorder_joins", "false").unwrap();
    });
    let (tables, n_written, s_written, plan) = deepest_join(&written);
    assert_eq!(tables, ["dim_a", "fact"], "{plan}");
    assert_eq!((n_written, s_written), (n, s));
}

/// A query ordered by a column it does not return (a projection above its sort) hands
/// its rows on in that order: steps after it, however many run at once, keep it.
#[test]
fn sql_order_under_a_projection_is_kept() {
    let c = ctx();
    let n = 100_000i64;
    let ds = c
        .range(n as u64)
        .with_column("r", (col("id") * lit(7919i64)) % lit(100_003i64))
        .unwrap();
    let query = ds.sql("t", "SELECT id FROM t ORDER BY r").unwrap();
    let options = MapOptions {
        batch_size: Some(1_000),
        ..MapOptions::default()
    }
    .with_concurrency(4);
    // Batches take unequal times, so that later ones could finish first.
    let mapped = query.map_batches(
        "uneven",
        |b: RecordBatch| {
            let first = b
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .value(0);
            std::thread::sleep(std::time::Duration::from_millis((first % 5) as u64 * 3));
            Ok(b)
        },
        options,
    );
    let got: Vec<i64> = i64_column(&mapped.collect().unwrap(), "id")
        .into_iter()
        .flatten()
        .collect();
    let mut want: Vec<i64> = (0..n).collect();
    want.sort_by_key(|i| (i * 7919) % 100_003);
    assert_eq!(got.len(), want.len());
    assert!(got == want, "rows out of the query's order");
}
