//! Data-parallel training of an MLP classifier on a tabular Parquet dataset, fed live by
//! a Dataset pipeline (read → with_column → random_shuffle → streaming_split into the
//! ranks); also the trainer's benchmark.
//!
//! ```text
//! cargo run --release --example train_mlp                      # 2 ranks, prints accuracy
//! cargo run --release --example train_mlp -- --workers 1,2 --python .venv/bin/python
//! ```
//!
//! The data (`--rows` rows, 16 features, 4 classes labelled by a fixed random teacher
//! network) is generated into `--data` on first use; every tenth row is held out. Each
//! epoch reports the training loss, the held-out accuracy and training samples/s; the
//! run fails unless the final accuracy reaches `--min-accuracy`. With `--python`, the
//! same model, data and settings run in PyTorch (`bench/peers/train_mlp_torch.py`: one
//! process, then DistributedDataParallel over gloo with as many processes as ranks) and
//! the ratios are printed.
//!
//! On a cluster (run as a job, or with `VOLLEY_ADDRESS`), the ranks read their shares
//! from the nodes that hold the blocks; the program prints how many rows the driver sent
//! itself and how many the ranks read from the nodes. (The shuffle still runs in the
//! driver, whose output it then sends: `--no-shuffle` keeps every block on the nodes.)
//! `--compare-relay` trains a second time with the driver relaying every block
//! (`DataConfig::relay`), in input order, and fails unless both runs end with identical
//! weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use serde::{Deserialize, Serialize};
use volley::arrow::array::{ArrayRef, Float32Array, Int64Array, RecordBatch};
use volley::prelude::*;
// Burn's derive macros name the `burn` crate: bring volley's into scope under that name.
use volley::train::burn;
use volley::train::burn::backend::{Autodiff, NdArray};
use volley::train::burn::module::{AutodiffModule, Module};
use volley::train::burn::nn::loss::CrossEntropyLossConfig;
use volley::train::burn::nn::{Linear, LinearConfig};
use volley::train::burn::optim::{AdamConfig, GradientsParams, Optimizer};
use volley::train::burn::tensor::activation::relu;
use volley::train::burn::tensor::backend::Backend;
use volley::train::burn::tensor::Tensor;
use volley::train::tensor::{features_tensor, int_tensor};
use volley::train::{
    metrics, DataConfig, DataParallelTrainer, LoadRecord, Placement, RunConfig, ScalingConfig,
    TrainCheckpoint, TrainContext, TrainLoop, TrainResult, WithRecord,
};

type B = Autodiff<NdArray<f32>>;

const FEATURES: usize = 16;
const CLASSES: usize = 4;

#[derive(Parser, Debug)]
#[command(
    about = "An MLP trained data-parallel on a Parquet pipeline (accuracy check; --python runs the PyTorch peer)"
)]
struct Args {
    /// Rows to generate.
    #[arg(long, default_value_t = 200_000)]
    rows: usize,
    /// Where the Parquet data lives (generated if missing).
    #[arg(long, default_value = "target/volley-train-mlp/data")]
    data: PathBuf,
    /// Where runs keep their checkpoints.
    #[arg(long, default_value = "target/volley-train-mlp/runs")]
    storage: String,
    /// Rank counts to run, comma-separated.
    #[arg(long, default_value = "2", value_delimiter = ',')]
    workers: Vec<usize>,
    #[arg(long, default_value_t = 6)]
    epochs: usize,
    /// Rows per step per rank.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    #[arg(long, default_value_t = 0.003)]
    lr: f64,
    /// Fail unless the last epoch's held-out accuracy reaches this.
    #[arg(long, default_value_t = 0.90)]
    min_accuracy: f64,
    /// How ranks spread over a cluster's nodes: pack or spread.
    #[arg(long, default_value = "pack")]
    placement: String,
    /// A Python with torch and pyarrow: run the PyTorch peer too.
    #[arg(long)]
    python: Option<String>,
    /// Train on the rows in input order (no `random_shuffle`).
    #[arg(long)]
    no_shuffle: bool,
    /// Train again with the driver relaying every block, both runs in input order, and
    /// fail unless the weights are identical.
    #[arg(long)]
    compare_relay: bool,
}

/// How the rows reached the ranks, as one line.
fn transfer_line(result: &TrainResult) -> String {
    let t = result.data_transfer;
    format!(
        "the driver sent {} rows ({} bytes); the ranks read {} rows ({} bytes) from the nodes",
        t.relayed_rows, t.relayed_bytes, t.node_rows, t.node_bytes
    )
}

/// The trained weights of a run's last checkpoint, every parameter in order.
fn final_weights(result: &TrainResult, hidden: usize) -> Result<Vec<f32>> {
    type C = NdArray<f32>;
    let checkpoint = result
        .checkpoint
        .as_ref()
        .ok_or_else(|| VolleyError::execution("the run saved no checkpoint"))?;
    let device = Default::default();
    let model = Mlp::<C>::new(feature_names().len(), hidden, &device);
    let model = checkpoint.load_module("model", model, &device)?;
    let mut values = Vec::new();
    for layer in [&model.l1, &model.l2, &model.l3] {
        values.extend(layer.weight.val().into_data().iter::<f32>());
        if let Some(b) = &layer.bias {
            values.extend(b.val().into_data().iter::<f32>());
        }
    }
    Ok(values)
}

/// A small deterministic generator (splitmix64), so the data is the same everywhere.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn uniform(seed: u64) -> f32 {
    (mix(seed) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

/// Writes `rows` rows: `id`, `f0..f15` in [-1, 1), `label` = argmax of a fixed random
/// teacher network (16 → 32 tanh → 4).
fn generate(dir: &Path, rows: usize) -> Result<()> {
    let w1: Vec<f32> = (0..FEATURES * 32)
        .map(|i| uniform(1_000_000 + i as u64))
        .collect();
    let w2: Vec<f32> = (0..32 * CLASSES)
        .map(|i| uniform(2_000_000 + i as u64))
        .collect();
    let mut batches = Vec::new();
    for start in (0..rows).step_by(65_536) {
        let n = (rows - start).min(65_536);
        let mut cols: Vec<Vec<f32>> = (0..FEATURES).map(|_| Vec::with_capacity(n)).collect();
        let mut labels = Vec::with_capacity(n);
        for r in start..start + n {
            let x: Vec<f32> = (0..FEATURES)
                .map(|j| uniform((r * FEATURES + j) as u64))
                .collect();
            let h: Vec<f32> = (0..32)
                .map(|k| {
                    (0..FEATURES)
                        .map(|j| x[j] * w1[j * 32 + k])
                        .sum::<f32>()
                        .tanh()
                })
                .collect();
            let score = |c: usize| (0..32).map(|k| h[k] * w2[k * CLASSES + c]).sum::<f32>();
            let label = (0..CLASSES)
                .max_by(|&a, &b| score(a).total_cmp(&score(b)))
                .unwrap_or(0);
            for (j, v) in x.into_iter().enumerate() {
                cols[j].push(v);
            }
            labels.push(label as i64);
        }
        let mut columns: Vec<(String, ArrayRef)> = vec![(
            "id".into(),
            Arc::new(Int64Array::from_iter_values(
                start as i64..(start + n) as i64,
            )),
        )];
        for (j, c) in cols.into_iter().enumerate() {
            columns.push((format!("f{j}"), Arc::new(Float32Array::from(c))));
        }
        columns.push(("label".into(), Arc::new(Int64Array::from(labels))));
        batches.push(RecordBatch::try_from_iter(columns)?);
    }
    volley::from_batches(batches)?.write_parquet(dir.to_str().expect("utf-8 path"))?;
    Ok(())
}

/// The features the model reads: the 16 columns and one made by the pipeline.
fn feature_names() -> Vec<String> {
    let mut f: Vec<String> = (0..FEATURES).map(|j| format!("f{j}")).collect();
    f.push("radius".into());
    f
}

#[derive(Module, Debug)]
struct Mlp<B: Backend> {
    l1: Linear<B>,
    l2: Linear<B>,
    l3: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    fn new(inputs: usize, hidden: usize, device: &B::Device) -> Self {
        Self {
            l1: LinearConfig::new(inputs, hidden).init(device),
            l2: LinearConfig::new(hidden, hidden).init(device),
            l3: LinearConfig::new(hidden, CLASSES).init(device),
        }
    }
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.l3
            .forward(relu(self.l2.forward(relu(self.l1.forward(x)))))
    }
}

/// The training loop every rank runs.
#[derive(Debug, Serialize, Deserialize)]
struct MlpClassifier {
    hidden: usize,
    epochs: usize,
    batch_size: usize,
    lr: f64,
}

#[typetag::serde]
impl TrainLoop for MlpClassifier {
    fn run(&self, ctx: &mut TrainContext) -> Result<()> {
        let device = ctx.device::<B>();
        B::seed(&device, 42);
        let names = feature_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut model = Mlp::<B>::new(names.len(), self.hidden, &device);
        let mut optim = AdamConfig::new().init::<B, Mlp<B>>();
        let mut epoch = 0usize;
        if let Some(c) = ctx.checkpoint() {
            model = c.load_module("model", model, &device)?;
            optim = optim.load_record(c.record::<B, _>("optimizer", &device)?);
            epoch = c.value("epoch")?;
        }
        let train = ctx.dataset_shard("train")?;
        let test = ctx.dataset_shard("test")?;
        let loss_fn = CrossEntropyLossConfig::new().init(&device);
        while epoch < self.epochs {
            let start = Instant::now();
            let (mut rows, mut loss_sum, mut steps) = (0usize, 0f64, 0usize);
            for batch in train.iter_batches(self.batch_size, true)? {
                let batch = batch?;
                let x = features_tensor::<B>(&batch, &names, &device)?;
                let y = int_tensor::<B>(&batch, "label", &device)?;
                let loss = loss_fn.forward(model.forward(x), y);
                loss_sum += loss.clone().into_scalar() as f64;
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                let grads = ctx.all_reduce_gradients(&model, grads)?;
                model = optim.step(self.lr, model, grads);
                rows += batch.num_rows();
                steps += 1;
            }
            let seconds = start.elapsed().as_secs_f64();
            // Held-out accuracy on this rank's share of the test rows, summed over ranks.
            let valid = model.valid();
            let (mut correct, mut total) = (0usize, 0usize);
            for batch in test.iter_batches(4096, false)? {
                let batch = batch?;
                let x = features_tensor::<NdArray<f32>>(&batch, &names, &device)?;
                let y = int_tensor::<NdArray<f32>>(&batch, "label", &device)?;
                let predicted = valid.forward(x).argmax(1).squeeze_dim::<1>(1);
                correct += predicted.equal(y).int().sum().into_scalar() as usize;
                total += batch.num_rows();
            }
            let mut sums = [
                correct as f32,
                total as f32,
                rows as f32,
                loss_sum as f32,
                steps as f32,
            ];
            ctx.collective().all_reduce_sum(&mut sums)?;
            epoch += 1;
            let checkpoint = TrainCheckpoint::new()
                .with_record::<B, _>("model", model.clone().into_record())?
                .with_record::<B, _>("optimizer", optim.to_record())?
                .with_value("epoch", &epoch)?;
            ctx.report(
                metrics([
                    ("epoch", epoch as f64),
                    ("loss", (sums[3] / sums[4].max(1.0)) as f64),
                    ("accuracy", (sums[0] / sums[1].max(1.0)) as f64),
                    ("samples_per_s", sums[2] as f64 / seconds),
                    ("train_seconds", seconds),
                ]),
                Some(checkpoint),
            )?;
        }
        Ok(())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let ctx = volley::init()?;
    let args = Args::parse();
    // Runs that must match row for row deliver blocks in input order.
    let ctx = if args.compare_relay {
        let mut config = ctx.config().clone();
        config.exec.preserve_order = true;
        let ordered = Context::try_new(config)?;
        match ctx.cluster() {
            Some(c) => ordered.with_cluster(c.clone()),
            None => ordered,
        }
    } else {
        ctx
    };
    if !args.data.exists() {
        println!("generating {} rows into {}", args.rows, args.data.display());
        generate(&args.data, args.rows)?;
    }
    let data = args.data.to_str().expect("utf-8 path");
    // The pipeline runs while the ranks train: every epoch reads, derives a feature and
    // shuffles again, and streams each rank its share.
    let prepared = ctx
        .read_parquet(data)?
        .with_column("radius", col("f0") * col("f0") + col("f1") * col("f1"))?;
    let train = prepared.filter((col("id") % lit(10i64)).not_eq(lit(0i64)))?;
    let train = if args.no_shuffle {
        train
    } else {
        train.random_shuffle(7)?
    };
    let test = prepared.filter((col("id") % lit(10i64)).eq(lit(0i64)))?;

    let placement = match args.placement.as_str() {
        "pack" => Placement::Pack,
        "spread" => Placement::Spread,
        other => {
            return Err(VolleyError::Config(format!(
                "--placement {other}: expected pack or spread"
            )))
        }
    };
    let mut volley_rates = Vec::new();
    for &workers in &args.workers {
        let trainer = |name: &str, relay: bool| {
            DataParallelTrainer::new(
                MlpClassifier {
                    hidden: args.hidden,
                    epochs: args.epochs,
                    batch_size: args.batch_size,
                    lr: args.lr,
                },
                ScalingConfig {
                    placement,
                    ..ScalingConfig::workers(workers)
                },
                RunConfig::new(&args.storage, name),
            )
            .with_dataset("train", train.clone())
            .with_dataset("test", test.clone())
            .with_data_config(DataConfig {
                relay,
                ..DataConfig::default()
            })
        };
        let name = format!("mlp-{workers}-ranks-{}", std::process::id());
        let start = Instant::now();
        let result = trainer(&name, false).fit()?;
        let wall = start.elapsed().as_secs_f64();
        println!("data {workers} ranks: {}", transfer_line(&result));
        if args.compare_relay {
            let relayed = trainer(&format!("{name}-relayed"), true).fit()?;
            let same =
                final_weights(&result, args.hidden)? == final_weights(&relayed, args.hidden)?;
            println!("data {workers} ranks, relayed: {}", transfer_line(&relayed));
            println!("weights identical with the driver relaying: {same}");
            if !same {
                return Err(VolleyError::execution(
                    "the weights differ between reading from the nodes and relaying",
                ));
            }
        }
        for r in &result.history {
            println!(
                "ranks {workers} epoch {:.0}: loss {:.4}  accuracy {:.4}  {:.0} samples/s",
                r.metrics["epoch"],
                r.metrics["loss"],
                r.metrics["accuracy"],
                r.metrics["samples_per_s"]
            );
        }
        let accuracy = result.metrics.get("accuracy").copied().unwrap_or(0.0);
        // The first epoch includes the pipeline's start; the median is the steady rate.
        let rate = median(
            result
                .history
                .iter()
                .map(|r| r.metrics["samples_per_s"])
                .collect(),
        );
        println!("ranks ran on nodes {:?}", result.rank_nodes);
        println!(
            "volley {workers} ranks: accuracy {accuracy:.4}, median {rate:.0} samples/s, wall {wall:.1} s (incl. start), checkpoints in {}",
            result.path
        );
        if accuracy < args.min_accuracy {
            return Err(VolleyError::execution(format!(
                "accuracy {accuracy:.4} is below --min-accuracy {}",
                args.min_accuracy
            )));
        }
        volley_rates.push((workers, rate));
    }
    if let Some((1, base)) = volley_rates.first().copied() {
        for &(w, r) in &volley_rates[1..] {
            println!(
                "volley scaling 1 -> {w} ranks: {:.2}x ({:.0}% efficiency)",
                r / base,
                100.0 * r / base / w as f64
            );
        }
    }
    if let Some(py) = &args.python {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/peers/train_mlp_torch.py");
        for &(workers, rate) in &volley_rates {
            let out = std::process::Command::new(py)
                .arg(&script)
                .args(["--data", data])
                .args(["--workers", &workers.to_string()])
                .args(["--epochs", &args.epochs.to_string()])
                .args(["--batch-size", &args.batch_size.to_string()])
                .args(["--hidden", &args.hidden.to_string()])
                .args(["--lr", &args.lr.to_string()])
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            print!("{text}");
            if !out.status.success() {
                return Err(VolleyError::execution(format!(
                    "the PyTorch peer failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            let peer: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("median_samples_per_s "))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| VolleyError::execution("the PyTorch peer printed no rate"))?;
            println!(
                "{workers} ranks: volley {rate:.0} vs PyTorch {peer:.0} samples/s: {:.2}x",
                rate / peer
            );
        }
    }
    Ok(())
}
