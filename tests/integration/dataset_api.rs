//! The Dataset API: transforms, consumption, fusion and pushdown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use volley::arrow::array::{BooleanArray, Int64Array, RecordBatch};
use volley::prelude::*;

use crate::common::*;

#[test]
fn range_filter_count_take() {
    let c = ctx();
    let ds = c.range(100_000).filter(col("id").lt(lit(1000i64))).unwrap();
    assert_eq!(ds.count().unwrap(), 1000);
    assert_eq!(total_rows(&ds.take(10).unwrap()), 10);
    assert_eq!(c.range(0).count().unwrap(), 0);
}

#[test]
fn column_shaping() {
    let c = ctx();
    let ds = c.from_batches(vec![sample(100)]).unwrap();
    let out = ds
        .with_column("double", col("value") * lit(2.0))
        .unwrap()
        .rename(&[("id", "row_id")])
        .unwrap()
        .drop_columns(&["name"])
        .unwrap()
        .select(&["row_id", "double"])
        .unwrap();
    let schema = out.schema().unwrap();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["row_id", "double"]);
    let b = out.collect_batch().unwrap();
    assert_eq!(b.num_rows(), 100);
    let ids = i64_column(&[b], "row_id");
    let mut sorted: Vec<i64> = ids.into_iter().flatten().collect();
    sorted.sort();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>());
}

#[test]
fn map_batches_with_batch_size_and_fusion() {
    let c = ctx();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let ds = c
        .range(10_000)
        .filter(col("id").gt_eq(lit(0i64)))
        .unwrap()
        .map_batches(
            "check_size",
            move |b: RecordBatch| {
                seen.fetch_add(1, Ordering::Relaxed);
                assert!(b.num_rows() <= 1000);
                Ok(b)
            },
            MapOptions::default().with_batch_size(1000),
        );
    let explain = ds.explain().unwrap();
    // read, filter and map fuse into one operator
    assert!(
        explain.contains("fused: MapBatches check_size"),
        "{explain}"
    );
    assert_eq!(ds.count().unwrap(), 10_000);
    assert!(calls.load(Ordering::Relaxed) >= 10);
}

#[test]
fn with_column_after_map_resolves_at_run_time() {
    let c = ctx();
    let ds = c
        .range(50)
        .map_batches("identity", Ok, MapOptions::default())
        .with_column("twice", col("id") * lit(2i64))
        .unwrap();
    let b = ds.collect_batch().unwrap();
    let twice = i64_column(std::slice::from_ref(&b), "twice");
    let id = i64_column(&[b], "id");
    for (a, t) in id.iter().zip(twice) {
        assert_eq!(a.unwrap() * 2, t.unwrap());
    }
}

#[test]
fn stateful_map_builds_once_per_worker() {
    let c = ctx();
    let builds = Arc::new(AtomicUsize::new(0));
    let b2 = Arc::clone(&builds);
    let ds = c.range(100_000).map_batches_stateful(
        "model",
        move || {
            b2.fetch_add(1, Ordering::Relaxed);
            let offset = 1i64;
            Ok(move |b: RecordBatch| -> volley::Result<RecordBatch> {
                let id = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                let plus: Int64Array = id.iter().map(|v| v.map(|v| v + offset)).collect();
                Ok(RecordBatch::try_new(b.schema(), vec![Arc::new(plus)])?)
            })
        },
        MapOptions::default()
            .with_concurrency(2)
            .with_batch_size(4096),
    );
    let batches = ds.collect().unwrap();
    assert_eq!(total_rows(&batches), 100_000);
    let sum: i64 = i64_column(&batches, "id").into_iter().flatten().sum();
    assert_eq!(sum, (1..=100_000i64).sum::<i64>());
    assert_eq!(builds.load(Ordering::Relaxed), 2);
}

#[test]
fn filter_fn_and_union_and_limit() {
    let c = ctx();
    let a = c.range(100);
    let evens = a.filter_fn("even", |b| {
        let id = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        Ok(id
            .iter()
            .map(|v| v.map(|v| v % 2 == 0))
            .collect::<BooleanArray>())
    });
    assert_eq!(evens.count().unwrap(), 50);
    let u = a.union(&[&evens]).unwrap();
    assert_eq!(u.count().unwrap(), 150);
    assert_eq!(u.limit(120).count().unwrap(), 120);
}

#[test]
fn preserve_order_keeps_input_order() {
    let c = ctx_with(|cfg| {
        cfg.set("volley.exec.preserve_order", "true").unwrap();
        cfg.set("volley.exec.batch_size", "1000").unwrap();
    });
    let a = c.range(50_000);
    let b = c.range(10);
    let ds = a
        .map_batches(
            "jitter",
            |b: RecordBatch| {
                // Later batches finish sooner: order must come from sequence numbers.
                let first = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .value(0);
                std::thread::sleep(std::time::Duration::from_micros(
                    ((50_000 - first) / 100) as u64,
                ));
                Ok(b)
            },
            MapOptions::default(),
        )
        .union(&[&b])
        .unwrap();
    let ids: Vec<i64> = i64_column(&ds.collect().unwrap(), "id")
        .into_iter()
        .flatten()
        .collect();
    let expected: Vec<i64> = (0..50_000).chain(0..10).collect();
    assert_eq!(ids, expected);
}

/// Unions of unions keep every input's rows together and in order: the inner union's
/// last input is not cut off by the outer union's next one.
#[test]
fn chained_unions_keep_input_order() {
    let c = ctx_with(|cfg| {
        cfg.set("volley.exec.preserve_order", "true").unwrap();
        cfg.set("volley.exec.batch_size", "1000").unwrap();
    });
    let a = c.range(10);
    let b = c.range(200_000).map_batches(
        "slow",
        |b: RecordBatch| {
            std::thread::sleep(std::time::Duration::from_millis(2));
            Ok(b)
        },
        MapOptions::default(),
    );
    let last = c.range(10);
    let ds = a.union(&[&b]).unwrap().union(&[&last]).unwrap();
    let ids: Vec<i64> = i64_column(&ds.collect().unwrap(), "id")
        .into_iter()
        .flatten()
        .collect();
    let expected: Vec<i64> = (0..10).chain(0..200_000).chain(0..10).collect();
    assert!(ids == expected, "rows out of the inputs' order");
}

#[test]
fn iter_batches_rebatches_and_prefetches() {
    let c = ctx();
    let it = c
        .range(10_500)
        .iter_batches_with(IterOptions {
            batch_size: Some(1000),
            prefetch: 2,
        })
        .unwrap();
    let sizes: Vec<usize> = it.map(|b| b.unwrap().num_rows()).collect();
    assert_eq!(sizes.len(), 11);
    assert!(sizes[..10].iter().all(|&s| s == 1000));
    assert_eq!(sizes[10], 500);
}

#[test]
fn dropping_an_iterator_cancels() {
    let c = ctx();
    let mut it = c.range(100_000_000).iter_batches().unwrap();
    assert!(it.next().unwrap().is_ok());
    let t = std::time::Instant::now();
    drop(it);
    assert!(t.elapsed().as_secs() < 10);
}

#[test]
fn stats_report_operators() {
    let c = ctx();
    let ds = c.range(10_000).filter(col("id").lt(lit(10i64))).unwrap();
    assert_eq!(ds.count().unwrap(), 10);
    let stats = ds.stats().unwrap();
    assert_eq!(stats.operators.len(), 1);
    assert_eq!(stats.operators[0].rows_out, 10);
    assert!(stats.operators[0].tasks >= 1);
    assert!(stats.to_string().contains("Range"));
}

#[test]
fn dataset_sql_streams_datasets_as_tables() {
    let c = ctx();
    let t = c.from_batches(vec![sample(1000)]).unwrap();
    let out = c
        .sql(
            "SELECT key, count(*) AS n, sum(value) AS s FROM t WHERE key IS NOT NULL GROUP BY key ORDER BY key",
            &[("t", &t)],
        )
        .unwrap();
    let b = out.collect_batch().unwrap();
    assert_eq!(b.num_rows(), 7);
    let n: i64 = i64_column(&[b], "n").into_iter().flatten().sum();
    assert_eq!(n, 1000 - 91); // every 11th key is null
                              // The result is a dataset: it composes.
    let more = out.filter(col("n").gt(lit(0i64))).unwrap();
    assert_eq!(more.count().unwrap(), 7);
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct AddConst {
    k: i64,
}

#[volley::typetag::serde]
impl NamedTransform for AddConst {
    fn transform(&self, b: RecordBatch) -> volley::Result<RecordBatch> {
        let id = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        let out: Int64Array = id.iter().map(|v| v.map(|v| v + self.k)).collect();
        Ok(RecordBatch::try_new(b.schema(), vec![Arc::new(out)])?)
    }
}

#[test]
fn named_transforms_ship_and_run() {
    let c = ctx();
    let f = TransformFn::named(AddConst { k: 5 });
    let json = f.to_json().unwrap();
    let back = TransformFn::from_json(&json).unwrap();
    let ds = c.range(10).map_transform(back, MapOptions::default());
    let mut ids: Vec<i64> = i64_column(&ds.collect().unwrap(), "id")
        .into_iter()
        .flatten()
        .collect();
    ids.sort();
    assert_eq!(ids, (5..15).collect::<Vec<_>>());
}

/// A union of inputs whose columns differ only in nullability, or in string views
/// against plain strings (what sorts and distincts give), runs, with every row under
/// one schema: nullable where any input is, plain strings where the types differ.
#[test]
fn union_widens_nullability_and_plain_strings() {
    use volley::arrow::array::{Array, StringViewArray};
    use volley::arrow::datatypes::DataType;
    let c = ctx();
    // `id` is not nullable in `sample`; here it is, with a null.
    let strict = c
        .from_batches(vec![sample(10)])
        .unwrap()
        .select(&["id"])
        .unwrap();
    let loose = c
        .from_batches(vec![RecordBatch::try_from_iter([(
            "id",
            Arc::new(Int64Array::from(vec![Some(1), None])) as _,
        )])
        .unwrap()])
        .unwrap();
    let u = strict.union(&[&loose]).unwrap();
    assert!(u.schema().unwrap().field(0).is_nullable());
    let all = u.collect_batch().unwrap();
    assert_eq!((all.num_rows(), all.column(0).null_count()), (12, 1));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("u.parquet");
    u.write(out.to_str().unwrap(), volley::WriteFormat::Parquet)
        .single_file()
        .run()
        .unwrap();
    assert_eq!(
        c.read_parquet(out.to_str().unwrap())
            .unwrap()
            .count()
            .unwrap(),
        12
    );

    let views = c
        .from_batches(vec![RecordBatch::try_from_iter([(
            "s",
            Arc::new(StringViewArray::from(vec!["a", "b", "a"])) as _,
        )])
        .unwrap()])
        .unwrap();
    let both = views.union(&[&views.distinct().unwrap()]).unwrap();
    assert_eq!(both.schema().unwrap().field(0).data_type(), &DataType::Utf8);
    assert_eq!(both.collect_batch().unwrap().num_rows(), 5);
    // With an input whose columns a user transform decides, nothing is relabelled: the
    // known inputs must be the same exactly.
    let opaque = loose.map_batches("identity", Ok, MapOptions::default());
    let same = loose.union(&[&opaque, &loose]).unwrap();
    assert_eq!(same.count().unwrap(), 6);
    // Inputs none of whose columns are known before they run.
    let both_opaque = opaque.union(&[&opaque]).unwrap();
    assert_eq!(both_opaque.count().unwrap(), 4);
    assert_eq!(opaque.union(&[]).unwrap().count().unwrap(), 2);
    let e = strict
        .union(&[&opaque, &loose])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("input 2 has columns") && e.contains("cannot be made one"),
        "{e}"
    );
    // Other names or types are still refused, naming both.
    let e = strict
        .union(&[&views])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains(
            "union: input 1 has columns [s Utf8View not null] but input 0 has [id Int64 not null]"
        ),
        "{e}"
    );
}
