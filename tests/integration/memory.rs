//! The memory budget holds on data several times its size.

use std::sync::Arc;

use volley::arrow::array::{Int64Array, RecordBatch, StringArray};
use volley::arrow::datatypes::{DataType, Field, Schema};
use volley::prelude::*;

use crate::common::*;

#[test]
fn pipeline_larger_than_budget_stays_inside_it() {
    let budget: u64 = 16 << 20;
    let c = ctx_with(|cfg| {
        cfg.set("volley.exec.memory_limit", "16MiB").unwrap();
        cfg.set("volley.exec.batch_size", "8192").unwrap();
    });
    // ~100 bytes per row, 2M rows: about 200 MiB flows through a 16 MiB budget.
    let ds = c
        .range(2_000_000)
        .map_batches(
            "widen",
            |b: RecordBatch| {
                let id = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                let payload: StringArray = id
                    .iter()
                    .map(|v| Some(format!("{:0>96}", v.unwrap())))
                    .collect();
                let schema = Arc::new(Schema::new(vec![
                    Field::new("id", DataType::Int64, false),
                    Field::new("payload", DataType::Utf8, false),
                ]));
                Ok(RecordBatch::try_new(
                    schema,
                    vec![b.column(0).clone(), Arc::new(payload)],
                )?)
            },
            MapOptions::default(),
        )
        .map_batches(
            "slow_consumer_side",
            |b: RecordBatch| Ok(b),
            MapOptions::default().with_concurrency(1),
        );
    let mut bytes = 0u64;
    let mut rows = 0u64;
    for b in ds.iter_batches().unwrap() {
        let b = b.unwrap();
        bytes += b.get_array_memory_size() as u64;
        rows += b.num_rows() as u64;
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    assert_eq!(rows, 2_000_000);
    assert!(
        bytes > 5 * budget,
        "the data ({bytes} bytes) must be several times the budget"
    );
    let stats = ds.stats().unwrap();
    // At most one block per queue past the budget (blocks are ~1 MiB here).
    assert!(stats.peak_memory <= budget + 4 * (2 << 20), "{stats}");
}
