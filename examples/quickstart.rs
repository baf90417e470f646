//! The quick start: generates a small Parquet dataset, then runs a pipeline over it.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```
//!
//! 1. writes 2,000,000 synthetic "trip" rows as Parquet, partitioned by `city`;
//! 2. reads them back lazily, filters, adds a column, applies a Rust batch function;
//! 3. writes the result (atomically) and reads its row count back;
//! 4. runs SQL over the output, and prints per-operator stats;
//! 5. groups, sorts, and splits the output into train and test sets (seeded shuffle).

use std::sync::Arc;

use volley::arrow::array::{Array, Float64Array, Int64Array, RecordBatch, StringArray};
use volley::arrow::datatypes::{DataType, Field, Schema};
use volley::prelude::*;

/// Where the quick start writes.
#[derive(clap::Parser)]
#[command(about = "The quick start: generate trips, run a pipeline, write, query with SQL")]
struct Args {
    /// Output folder (replaced).
    #[arg(default_value = "target/quickstart")]
    dir: String,
}

fn main() -> volley::Result<()> {
    let ctx = volley::init()?;
    let Args { dir } = clap::Parser::parse();
    let _ = std::fs::remove_dir_all(&dir);

    // 1. Generate: ids 0..2M, a city from the id, a distance and a fare.
    let trips = ctx.range(2_000_000).map_batches(
        "make_trips",
        |b: RecordBatch| {
            let id = b
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("id");
            let cities = ["paris", "lyon", "nantes", "lille"];
            let city: StringArray = id
                .values()
                .iter()
                .map(|v| Some(cities[(*v % 4) as usize]))
                .collect();
            let km: Float64Array = id
                .values()
                .iter()
                .map(|v| Some(((*v * 7919) % 500) as f64 / 10.0))
                .collect();
            let fare: Float64Array = km.values().iter().map(|k| Some(2.5 + k * 1.1)).collect();
            let schema = Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, false),
                Field::new("city", DataType::Utf8, false),
                Field::new("km", DataType::Float64, false),
                Field::new("fare", DataType::Float64, false),
            ]));
            Ok(RecordBatch::try_new(
                schema,
                vec![
                    Arc::clone(b.column(0)),
                    Arc::new(city),
                    Arc::new(km),
                    Arc::new(fare),
                ],
            )?)
        },
        MapOptions::default(),
    );
    let input = format!("{dir}/trips");
    let written = trips
        .write(&input, volley::crates::connectors::WriteFormat::Parquet)
        .partition_by(&["city"])
        .run()?;
    println!(
        "generated {} rows in {} files under {input}",
        written.rows,
        written.files.len()
    );

    // 2. The pipeline: nothing runs until it is consumed.
    let long_trips = volley::read_parquet(input.as_str())?
        .filter(col("km").gt_eq(lit(10.0)))?
        .with_column("fare_per_km", col("fare") / col("km"))?
        .map_batches(
            "round_fares",
            |b: RecordBatch| {
                let idx = b.schema().index_of("fare_per_km")?;
                let v = b
                    .column(idx)
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .expect("f64");
                let rounded: Float64Array = v
                    .iter()
                    .map(|x| x.map(|x| (x * 100.0).round() / 100.0))
                    .collect();
                let mut cols = b.columns().to_vec();
                cols[idx] = Arc::new(rounded);
                Ok(RecordBatch::try_new(b.schema(), cols)?)
            },
            MapOptions::default().with_batch_size(65_536),
        );
    println!("{}", long_trips.explain()?);

    // 3. Write, atomically, and count what landed.
    let output = format!("{dir}/long_trips");
    let summary = long_trips.write_parquet(&output)?;
    println!("wrote {} rows to {output}", summary.rows);
    if let Some(stats) = long_trips.stats() {
        println!("{stats}");
    }
    let back = volley::read_parquet(output.as_str())?;
    println!("read back {} rows", back.count()?);

    // 4. SQL over the result.
    let by_city = ctx.sql(
        "SELECT city, count(*) AS trips, round(avg(fare_per_km), 3) AS avg_fare_per_km \
         FROM trips GROUP BY city ORDER BY city",
        &[("trips", &back)],
    )?;
    by_city.show(10)?;

    // 5. All-to-all: group, sort, shuffle and split, spilling beyond the budget.
    let top = back
        .groupby(&["city"])
        .agg([agg::count_all(), agg::mean("km"), agg::max("fare")])?
        .sort([SortKey::desc("mean(km)")])?;
    top.show(10)?;
    let (train, test) = back.train_test_split(0.2, 42)?;
    println!(
        "train_test_split: {} train rows, {} test rows",
        train.count()?,
        test.count()?
    );
    Ok(())
}
