//! Repartitioning, shuffles, splits, streaming splits and map_groups.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use volley::arrow::array::{Int64Array, RecordBatch};
use volley::arrow::datatypes::{DataType, Field, Schema};
use volley::prelude::*;

use crate::common::*;

fn ordered_ctx() -> Context {
    ctx_with(|c| c.set("volley.exec.preserve_order", "true").unwrap())
}

fn ids(ds: &Dataset) -> Vec<i64> {
    i64_column(&ds.collect().unwrap(), "id")
        .into_iter()
        .map(Option::unwrap)
        .collect()
}

#[test]
fn repartition_keeps_order_and_makes_n_outputs() {
    let c = ordered_ctx();
    let ds = c.range(10_000).repartition(4).unwrap();
    assert_eq!(ids(&ds), (0..10_000).collect::<Vec<_>>());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let summary = ds.write_parquet(out.to_str().unwrap()).unwrap();
    assert_eq!(summary.files.len(), 4, "{summary:?}");
    assert!(c.range(1).repartition(0).is_err());
}

#[test]
fn repartition_by_puts_equal_keys_together() {
    let c = ctx();
    let ds = c
        .range(20_000)
        .with_column("k", (col("id") * lit(31i64)) % lit(97i64))
        .unwrap()
        .repartition_by(&["k"], 3)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let summary = ds.write_parquet(out.to_str().unwrap()).unwrap();
    assert_eq!(summary.files.len(), 3);
    let mut owner: BTreeMap<i64, String> = BTreeMap::new();
    let mut rows = 0;
    for f in &summary.files {
        let path = out.join(f);
        let keys = i64_column(
            &c.read_parquet(path.to_str().unwrap())
                .unwrap()
                .collect()
                .unwrap(),
            "k",
        );
        rows += keys.len();
        for k in keys.into_iter().flatten() {
            let prev = owner.insert(k, f.clone());
            assert!(
                prev.is_none() || prev.as_deref() == Some(f.as_str()),
                "key {k} in two files"
            );
        }
    }
    assert_eq!(rows, 20_000);
    assert_eq!(owner.len(), 97);
    let e = c
        .range(5)
        .repartition_by(&["nope"], 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn random_shuffle_is_reproducible_for_a_seed() {
    let c = ctx();
    let base = c.range(50_000);
    let a = ids(&base.random_shuffle(42).unwrap());
    let b = ids(&base.random_shuffle(42).unwrap());
    let other = ids(&base.random_shuffle(43).unwrap());
    assert!(a == b, "same seed, same order");
    // On a machine of many more CPUs too.
    let wide = ctx_with(|c| c.runtime.num_cpus = Some(48.0));
    let on_wide = ids(&wide.range(50_000).random_shuffle(42).unwrap());
    assert!(a == on_wide, "the order does not follow the CPUs");
    assert!(a != other);
    assert!(a != (0..50_000).collect::<Vec<_>>());
    let mut sorted = a.clone();
    sorted.sort();
    assert!(sorted == (0..50_000).collect::<Vec<_>>());
    // Counting asks for no column: the rows are still there, also when the
    // shuffle's input has columns only known when it runs.
    assert_eq!(base.random_shuffle(42).unwrap().count().unwrap(), 50_000);
    let opaque = base.map_batches("identity", Ok, MapOptions::default());
    assert_eq!(opaque.random_shuffle(1).unwrap().count().unwrap(), 50_000);
    let blocks = ids(&base.randomize_block_order(3).unwrap());
    assert!(blocks == ids(&base.randomize_block_order(3).unwrap()));
    let mut blocks_sorted = blocks.clone();
    blocks_sorted.sort();
    assert!(blocks_sorted == sorted);
}

#[test]
fn shuffle_spills_beyond_the_budget_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let spill = dir.path().join("spill");
    let c = ctx_with(|cfg| {
        cfg.set("volley.exec.memory_limit", "4MiB").unwrap();
        cfg.set("volley.exec.spill_dir", spill.to_str().unwrap())
            .unwrap();
    });
    // 3M rows x 2 columns: about 48 MiB through a 4 MiB budget.
    let ds = c
        .range(3_000_000)
        .with_column("v", col("id") * lit(2i64))
        .unwrap()
        .random_shuffle(7)
        .unwrap();
    let mut n = 0u64;
    let mut sum = 0i64;
    for b in ds.iter_batches().unwrap() {
        let b = b.unwrap();
        n += b.num_rows() as u64;
        sum += i64_column(&[b], "v").into_iter().flatten().sum::<i64>();
    }
    assert_eq!(n, 3_000_000);
    assert_eq!(sum, (0..3_000_000i64).map(|i| 2 * i).sum::<i64>());
    let stats = ds.stats().unwrap();
    assert!(stats.spilled_bytes() > 20 << 20, "{stats}");
    // No spill file is left (DataFusion keeps its empty folder for the context).
    let mut files = Vec::new();
    let mut dirs = vec![spill.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    assert!(files.is_empty(), "spill files left: {files:?}");
}

#[test]
fn splits_partition_the_rows() {
    let c = ctx();
    let base = c.range(1000);
    let parts = base.split(3).unwrap();
    let got: Vec<Vec<i64>> = parts.iter().map(ids).collect();
    assert_eq!(
        got.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![333, 333, 334]
    );
    assert!(got.concat() == (0..1000).collect::<Vec<_>>(), "in order");

    let parts = base.split_at_indices(&[10, 100, 5000]).unwrap();
    let sizes: Vec<u64> = parts.iter().map(|p| p.count().unwrap()).collect();
    assert_eq!(sizes, vec![10, 90, 900, 0]);
    assert!(base.split_at_indices(&[5, 2]).is_err());

    let (train, test) = base.train_test_split(0.25, 9).unwrap();
    let (tr, te) = (ids(&train), ids(&test));
    assert_eq!((tr.len(), te.len()), (750, 250));
    let all: BTreeSet<i64> = tr.iter().chain(&te).copied().collect();
    assert_eq!(all.len(), 1000);
    assert_ne!(
        tr,
        (0..750).collect::<Vec<_>>(),
        "shuffled before splitting"
    );
    let (train2, _) = base.train_test_split(0.25, 9).unwrap();
    assert!(ids(&train2) == tr);
    assert!(base.train_test_split(1.5, 0).is_err());
}

/// A split's output is a node of the plan over the split's input (`explain` shows
/// both); what one output reads is not pushed into the input the outputs share.
#[test]
fn a_split_is_a_plan_node_over_its_shared_input() {
    let c = ctx();
    let base = c
        .range(100)
        .with_column("sq", col("id") * col("id"))
        .unwrap();
    let parts = base.split(2).unwrap();
    assert!(matches!(
        parts[1].logical_plan().as_ref(),
        volley::crates::dataset::LogicalOp::Split { .. }
    ));
    let first = parts[0].select(&["id"]).unwrap();
    let plan = first.explain().unwrap();
    let optimized = plan
        .split("== optimized logical plan ==")
        .nth(1)
        .unwrap_or_default();
    assert!(optimized.contains("Split: part 1 of 2"), "{plan}");
    assert!(
        optimized.contains("WithColumn: sq"),
        "the input below the split: {plan}"
    );
    assert_eq!(ids(&first), (0..50).collect::<Vec<_>>());
    let second = parts[1].collect().unwrap();
    let ids2 = i64_column(&second, "id");
    let sq2 = i64_column(&second, "sq");
    assert_eq!(ids2.len(), 50);
    for (id, sq) in ids2.iter().zip(&sq2) {
        let id = id.unwrap();
        assert!(id >= 50 && *sq == Some(id * id), "{id}: {sq:?}");
    }
}

#[test]
fn streaming_split_feeds_threads_disjoint_shares() {
    let c = ctx();
    for equal in [true, false] {
        let its = c.range(100_001).streaming_split(3, equal).unwrap();
        let shares: Vec<Vec<i64>> = std::thread::scope(|s| {
            let handles: Vec<_> = its
                .into_iter()
                .map(|it| {
                    s.spawn(move || {
                        let mut v = Vec::new();
                        for b in it {
                            v.extend(i64_column(&[b.unwrap()], "id").into_iter().flatten());
                        }
                        v
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let seen: BTreeSet<i64> = shares.iter().flatten().copied().collect();
        let total: usize = shares.iter().map(Vec::len).sum();
        assert_eq!(seen.len(), total, "disjoint");
        if equal {
            assert!(
                shares.iter().all(|s| s.len() == 33_333),
                "{:?}",
                shares.iter().map(Vec::len).collect::<Vec<_>>()
            );
        } else {
            assert_eq!(total, 100_001);
        }
    }
}

#[test]
fn map_groups_sees_whole_groups() {
    let c = ctx();
    let ds = c
        .range(30_000)
        .with_column("k", col("id") % lit(101i64))
        .unwrap();
    let per_group = ds
        .groupby(&["k"])
        .map_groups("count", |b: RecordBatch| {
            let k = b
                .column(b.schema().index_of("k")?)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            let first = k.value(0);
            assert!(k.iter().all(|v| v == Some(first)), "one key per call");
            let schema = Arc::new(Schema::new(vec![
                Field::new("k", DataType::Int64, false),
                Field::new("n", DataType::Int64, false),
            ]));
            Ok(RecordBatch::try_new(
                schema,
                vec![
                    Arc::new(Int64Array::from(vec![first])),
                    Arc::new(Int64Array::from(vec![b.num_rows() as i64])),
                ],
            )?)
        })
        .unwrap();
    let out = per_group.collect().unwrap();
    let ks = i64_column(&out, "k");
    let ns = i64_column(&out, "n");
    assert_eq!(ks.len(), 101, "one call per group");
    let mut by_key: BTreeMap<i64, i64> = BTreeMap::new();
    for (k, n) in ks.into_iter().zip(ns) {
        assert!(by_key.insert(k.unwrap(), n.unwrap()).is_none());
    }
    for (k, n) in by_key {
        let expected = (0..30_000).filter(|i| i % 101 == k).count() as i64;
        assert_eq!(n, expected, "group {k}");
    }
}

#[test]
fn explain_shows_the_stage_boundary() {
    let c = ctx();
    let ds = c
        .range(100)
        .filter(col("id").gt(lit(5i64)))
        .unwrap()
        .repartition_by(&["id"], 2)
        .unwrap();
    let plan = ds.explain().unwrap();
    assert!(plan.contains("Exchange"), "{plan}");
    assert!(plan.contains("stage boundary"), "{plan}");
    assert!(plan.contains("Range"), "{plan}");
}

/// A column that is not first, selected after a local exchange, keeps its values (the
/// exchange's input ran with every column of its source while its schema said fewer,
/// and the select read the wrong column by position).
#[test]
fn a_later_column_selected_after_an_exchange_keeps_its_values() {
    let c = ctx();
    let column = |f: &dyn Fn(i64) -> i64| -> Arc<dyn volley::arrow::array::Array> {
        Arc::new(Int64Array::from_iter_values((0..1_000).map(f)))
    };
    let batch = RecordBatch::try_from_iter([
        ("a", column(&|i| i)),
        ("k", column(&|i| i % 7)),
        ("b", column(&|i| i * 10)),
    ])
    .unwrap();
    let base = || c.from_batches(vec![batch.clone()]).unwrap();
    let tens = |ds: Dataset| -> Vec<i64> {
        let mut v: Vec<i64> = i64_column(&ds.collect().unwrap(), "b")
            .into_iter()
            .map(Option::unwrap)
            .collect();
        v.sort();
        v
    };
    let want: Vec<i64> = (0..1_000).map(|i| i * 10).collect();
    let repartitioned = base().repartition(3).unwrap().select(&["b"]).unwrap();
    assert_eq!(tens(repartitioned), want);
    let shuffled = base().random_shuffle(5).unwrap().select(&["b"]).unwrap();
    assert_eq!(tens(shuffled), want);
    let by_key = base()
        .repartition_by(&["k"], 3)
        .unwrap()
        .select(&["b"])
        .unwrap();
    assert_eq!(tens(by_key), want);
}

/// Columns nobody reads after a shuffle are not read, stored or spilled by it: the
/// projection goes through the exchange down to the Parquet scan, and the rows come out
/// as without it (the same seed, the same order).
#[test]
fn a_projection_goes_through_shuffles_into_the_scan() {
    let c = ctx();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    c.range(20_000)
        .with_column("k", col("id") % lit(7i64))
        .unwrap()
        .with_column("wide", col("id") * lit(3i64))
        .unwrap()
        .write_parquet(path.to_str().unwrap())
        .unwrap();
    let read = || c.read_parquet(path.to_str().unwrap()).unwrap();
    let shuffled = read().random_shuffle(9).unwrap().select(&["id"]).unwrap();
    let plan = shuffled.explain().unwrap();
    assert!(plan.contains("projection=[id]"), "{plan}");
    assert!(!plan.contains("wide"), "{plan}");
    let full = ids(&read().random_shuffle(9).unwrap());
    assert_eq!(ids(&shuffled), full);

    // A hash exchange keeps its keys too.
    let by_key = read()
        .repartition_by(&["k"], 3)
        .unwrap()
        .select(&["id"])
        .unwrap();
    let plan = by_key.explain().unwrap();
    assert!(plan.contains("projection=[id, k]"), "{plan}");
    let mut got = ids(&by_key);
    got.sort();
    assert_eq!(got, (0..20_000).collect::<Vec<_>>());
}
