//! The trainer end to end: ranks are worker processes of this test program (so it has
//! its own `main`: a worker enters its loop before any test runs), started by a private
//! one-node cluster on 127.0.0.1.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Float32Array, Int64Array, RecordBatch};
use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use volley_common::{Result, VolleyConfig, VolleyError};
use volley_dataset::{Context, Dataset};
use volley_train::tensor::{features_tensor, int_tensor};
use volley_train::{
    metrics, DataParallelTrainer, FailureConfig, LoadRecord, RunConfig, ScalingConfig,
    TrainCheckpoint, TrainContext, TrainLoop, WithRecord,
};

type B = Autodiff<NdArray<f32>>;

#[derive(Module, Debug)]
struct Mlp<B: Backend> {
    l1: Linear<B>,
    l2: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    fn new(device: &B::Device) -> Self {
        Self {
            l1: LinearConfig::new(4, 8).init(device),
            l2: LinearConfig::new(8, 1).init(device),
        }
    }
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.l2
            .forward(burn::tensor::activation::relu(self.l1.forward(x)))
    }
    fn params(&self) -> Vec<f32> {
        let mut out = Vec::new();
        for l in [&self.l1, &self.l2] {
            out.extend(l.weight.val().into_data().into_vec::<f32>().unwrap());
            out.extend(
                l.bias
                    .as_ref()
                    .unwrap()
                    .val()
                    .into_data()
                    .into_vec::<f32>()
                    .unwrap(),
            );
        }
        out
    }
}

/// SGD on a regression target, gradients averaged over the group; checkpoints every
/// `checkpoint_every` steps (model, optimizer, step, parameters as a plain list).
#[derive(Debug, Serialize, Deserialize)]
struct Regression {
    batch_size: usize,
    steps: u64,
    checkpoint_every: u64,
    /// On the first attempt, rank 1 writes its pid here at `stall_at` and waits to be
    /// killed.
    stall_file: Option<String>,
    stall_at: u64,
}

#[typetag::serde]
impl TrainLoop for Regression {
    fn run(&self, ctx: &mut TrainContext) -> Result<()> {
        let device = ctx.device::<B>();
        B::seed(&device, 7);
        let mut model = Mlp::<B>::new(&device);
        let mut optim = SgdConfig::new().init::<B, Mlp<B>>();
        let mut step = 0u64;
        if let Some(c) = ctx.checkpoint() {
            model = c.load_module("model", model, &device)?;
            optim = optim.load_record(c.record::<B, _>("optimizer", &device)?);
            step = c.value("step")?;
        }
        let shard = ctx.dataset_shard("train")?;
        while step < self.steps {
            for batch in shard.iter_batches(self.batch_size, true)? {
                if step >= self.steps {
                    break;
                }
                let batch = batch?;
                let x = features_tensor::<B>(&batch, &["x0", "x1", "x2", "x3"], &device)?;
                let y = features_tensor::<B>(&batch, &["y"], &device)?;
                let loss = (model.forward(x) - y).square().mean();
                let loss_value: f32 = loss.clone().into_scalar();
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                let grads = ctx.all_reduce_gradients(&model, grads)?;
                model = optim.step(0.05, model, grads);
                step += 1;
                if ctx.attempt() == 0 && ctx.rank() == 1 && step == self.stall_at {
                    if let Some(f) = &self.stall_file {
                        std::fs::write(format!("{f}.tmp"), std::process::id().to_string())?;
                        std::fs::rename(format!("{f}.tmp"), f)?;
                        std::thread::sleep(Duration::from_secs(120));
                    }
                }
                let checkpoint = if step.is_multiple_of(self.checkpoint_every) || step == self.steps
                {
                    Some(
                        TrainCheckpoint::new()
                            .with_record::<B, _>("model", model.clone().into_record())?
                            .with_record::<B, _>("optimizer", optim.to_record())?
                            .with_value("step", &step)?
                            .with_value("params", &model.params())?,
                    )
                } else {
                    None
                };
                ctx.report(
                    metrics([("loss", loss_value as f64), ("step", step as f64)]),
                    checkpoint,
                )?;
            }
        }
        Ok(())
    }
}

/// Writes the ids each rank sees in each epoch to `dir/r{rank}_e{epoch}`.
#[derive(Debug, Serialize, Deserialize)]
struct ShardLog {
    dir: String,
    epochs: usize,
    /// Epochs rank 1 reads, where it reads fewer than the others.
    #[serde(default)]
    rank1_epochs: Option<usize>,
}

#[typetag::serde]
impl TrainLoop for ShardLog {
    fn run(&self, ctx: &mut TrainContext) -> Result<()> {
        let shard = ctx.dataset_shard("train")?;
        let epochs = match ctx.rank() {
            1 => self.rank1_epochs.unwrap_or(self.epochs),
            _ => self.epochs,
        };
        for epoch in 0..epochs {
            let mut ids = Vec::new();
            for batch in shard.iter_batches(64, false)? {
                let batch = batch?;
                let t = int_tensor::<NdArray<f32>>(&batch, "id", &Default::default())?;
                ids.extend(t.into_data().into_vec::<i64>().unwrap());
            }
            let text: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            std::fs::write(
                Path::new(&self.dir).join(format!("r{}_e{epoch}", ctx.rank())),
                text.join("\n"),
            )?;
            ctx.report(metrics([("rows", ids.len() as f64)]), None)?;
        }
        Ok(())
    }
}

/// Fails on one rank with a message.
#[derive(Debug, Serialize, Deserialize)]
struct Fails;

#[typetag::serde]
impl TrainLoop for Fails {
    fn run(&self, ctx: &mut TrainContext) -> Result<()> {
        if ctx.rank() == 1 {
            return Err(VolleyError::execution("the loss became NaN at step 3"));
        }
        ctx.collective().barrier()
    }
}

fn context() -> Context {
    let mut config = VolleyConfig::default();
    config.set("volley.exec.preserve_order", "true").unwrap();
    Context::try_new(config).unwrap()
}

/// `blocks` blocks of `rows` rows: features x0..x3, target y, id.
fn regression_data(ctx: &Context, blocks: usize, rows: usize) -> Dataset {
    let batches = (0..blocks)
        .map(|b| {
            let ids: Vec<i64> = (0..rows).map(|r| (b * rows + r) as i64).collect();
            let x = |k: usize| -> Vec<f32> {
                ids.iter()
                    .map(|&i| ((i as f32) * 0.37 + k as f32).sin())
                    .collect()
            };
            let (x0, x1, x2, x3) = (x(0), x(1), x(2), x(3));
            let y: Vec<f32> = (0..rows)
                .map(|r| 0.5 * x0[r] - x1[r] + 0.25 * x2[r] * x3[r] + 0.1)
                .collect();
            RecordBatch::try_from_iter([
                ("id", Arc::new(Int64Array::from(ids)) as ArrayRef),
                ("x0", Arc::new(Float32Array::from(x0)) as ArrayRef),
                ("x1", Arc::new(Float32Array::from(x1)) as ArrayRef),
                ("x2", Arc::new(Float32Array::from(x2)) as ArrayRef),
                ("x3", Arc::new(Float32Array::from(x3)) as ArrayRef),
                ("y", Arc::new(Float32Array::from(y)) as ArrayRef),
            ])
            .unwrap()
        })
        .collect();
    ctx.from_batches(batches).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// 2 ranks with batch 8 end with the weights of 1 rank with batch 16 (same seed, same
/// rows per step): the gradient average over the ring is the big batch's gradient.
fn two_ranks_match_one_rank_with_twice_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context();
    let run = |workers: usize, batch_size: usize, name: &str| {
        let trainer = DataParallelTrainer::new(
            Regression {
                batch_size,
                steps: 6,
                checkpoint_every: 3,
                stall_file: None,
                stall_at: 0,
            },
            ScalingConfig::workers(workers),
            RunConfig::new(dir.path().to_str().unwrap(), name),
        )
        .with_dataset("train", regression_data(&ctx, 8, 16));
        trainer.fit().unwrap()
    };
    let one = run(1, 16, "one");
    let two = run(2, 8, "two");
    let p1: Vec<f32> = one.checkpoint.as_ref().unwrap().value("params").unwrap();
    let p2: Vec<f32> = two.checkpoint.as_ref().unwrap().value("params").unwrap();
    let d = max_diff(&p1, &p2);
    assert!(
        d < 1e-5,
        "2 ranks x 8 rows differ from 1 rank x 16 rows by {d}"
    );
    // The weights moved, and the history has every step once.
    let init = {
        let dev = Default::default();
        B::seed(&dev, 7);
        Mlp::<B>::new(&dev).params()
    };
    assert!(max_diff(&p1, &init) > 1e-3, "training changed the weights");
    let iters: Vec<u64> = two.history.iter().map(|r| r.iteration).collect();
    assert_eq!(iters, (1..=6).collect::<Vec<_>>());
    assert_eq!(two.checkpoint.as_ref().unwrap().info.step, 6);
    // The model record loads back into a model with the same parameters.
    let dev = Default::default();
    let saved = two.checkpoint.as_ref().unwrap();
    let model = saved
        .load_module("model", Mlp::<B>::new(&dev), &dev)
        .unwrap();
    assert!(max_diff(&model.params(), &p2) == 0.0);
    // Into a model of another size: refused by name (Burn alone loads any shape).
    let wider = Mlp::<B> {
        l1: LinearConfig::new(4, 16).init(&dev),
        l2: LinearConfig::new(16, 1).init(&dev),
    };
    let e = saved
        .load_module("model", wider, &dev)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "parameter `l1.weight` has shape [4, 8] in the checkpoint and [4, 16] in the model"
        ),
        "{e}"
    );
    let table = two.history_table().unwrap();
    assert_eq!(table.num_rows(), 6);
    assert!(table.column_by_name("loss").is_some());
    println!("ok: 2 ranks x 8 == 1 rank x 16 (max diff {d:e})");
}

/// Every row reaches exactly one rank in every epoch.
fn every_row_once_per_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let ctx = context();
    let data = regression_data(&ctx, 10, 100)
        .filter(volley_dataset::col("id").lt(volley_dataset::lit(1000i64)))
        .unwrap();
    let result = DataParallelTrainer::new(
        ShardLog {
            dir: logs.to_str().unwrap().to_string(),
            epochs: 2,
            rank1_epochs: None,
        },
        ScalingConfig::workers(2),
        RunConfig::new(dir.path().join("runs").to_str().unwrap(), "shards"),
    )
    .with_dataset("train", data)
    .fit()
    .unwrap();
    for epoch in 0..2 {
        let mut all = Vec::new();
        for rank in 0..2 {
            let text = std::fs::read_to_string(logs.join(format!("r{rank}_e{epoch}"))).unwrap();
            let ids: Vec<i64> = text.lines().map(|l| l.parse().unwrap()).collect();
            assert_eq!(ids.len(), 500, "rank {rank} epoch {epoch}: equal shares");
            all.extend(ids);
        }
        let set: BTreeSet<i64> = all.iter().copied().collect();
        assert_eq!(all.len(), 1000);
        assert_eq!(set, (0..1000).collect(), "epoch {epoch}: every row once");
    }
    assert_eq!(result.history.len(), 2);
    println!("ok: every row once per epoch over 2 ranks");

    // Rank 1 reads one epoch, rank 0 two: once rank 1's loop returned, its share of
    // the second pass is given up, and rank 0 is not held back waiting for it to be
    // read (it waited for good).
    let logs = dir.path().join("short");
    std::fs::create_dir_all(&logs).unwrap();
    let data = regression_data(&ctx, 10, 100)
        .filter(volley_dataset::col("id").lt(volley_dataset::lit(1000i64)))
        .unwrap();
    let trainer = DataParallelTrainer::new(
        ShardLog {
            dir: logs.to_str().unwrap().to_string(),
            epochs: 2,
            rank1_epochs: Some(1),
        },
        ScalingConfig::workers(2),
        RunConfig::new(dir.path().join("runs").to_str().unwrap(), "short"),
    )
    .with_dataset("train", data);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(trainer.fit().map(|r| r.history.len())));
    let reports = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("a rank that read one pass fewer held the others up")
        .unwrap();
    assert_eq!(reports, 2);
    let second = std::fs::read_to_string(logs.join("r0_e1")).unwrap();
    assert_eq!(second.lines().count(), 500, "rank 0's equal share");
    assert!(!logs.join("r1_e1").exists());
    println!("ok: a rank that reads one pass fewer holds no one up");
}

/// A rank's process is killed mid-run: the group restarts from the latest checkpoint
/// and finishes; the step count, checkpoint and history are right.
fn killed_rank_resumes_from_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let stall = dir.path().join("stall.pid");
    let ctx = context();
    let trainer = DataParallelTrainer::new(
        Regression {
            batch_size: 8,
            steps: 12,
            checkpoint_every: 4,
            stall_file: Some(stall.to_str().unwrap().to_string()),
            stall_at: 6,
        },
        ScalingConfig::workers(2),
        RunConfig {
            failure: FailureConfig { max_failures: 2 },
            ..RunConfig::new(dir.path().join("runs").to_str().unwrap(), "recover")
        },
    )
    .with_dataset("train", regression_data(&ctx, 8, 16));
    let killer = std::thread::spawn(move || {
        let start = Instant::now();
        while !stall.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "rank 1 never stalled"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid: i32 = std::fs::read_to_string(&stall).unwrap().parse().unwrap();
        let status = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        pid
    });
    let result = trainer.fit().unwrap();
    let pid = killer.join().unwrap();
    assert_eq!(result.failures, 1, "one restart");
    let last = result.checkpoint.as_ref().unwrap();
    assert_eq!(last.info.step, 12);
    assert_eq!(last.value::<u64>("step").unwrap(), 12);
    let iters: Vec<u64> = result.history.iter().map(|r| r.iteration).collect();
    assert_eq!(
        iters,
        (1..=12).collect::<Vec<_>>(),
        "each step reported once"
    );
    // Steps 5 and 6 ran twice (before the kill and after resuming from step 4); the
    // history keeps the second run's.
    let steps: Vec<f64> = result.history.iter().map(|r| r.metrics["step"]).collect();
    assert_eq!(steps, (1..=12).map(|s| s as f64).collect::<Vec<_>>());
    println!("ok: rank process {pid} killed at step 6; resumed from step 4 and finished");
}

fn bad_input_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context();
    let data = regression_data(&ctx, 1, 16);
    let trainer = |scaling: ScalingConfig, storage: &str| {
        DataParallelTrainer::new(Fails, scaling, RunConfig::new(storage, "bad"))
            .with_dataset("train", data.clone())
    };
    let ok_storage = dir.path().to_str().unwrap().to_string();
    let start = Instant::now();
    let e = trainer(ScalingConfig::workers(0), &ok_storage)
        .fit()
        .unwrap_err();
    assert!(e.to_string().contains("num_workers"), "{e}");
    let gpus = ScalingConfig {
        use_gpu: true,
        ..ScalingConfig::workers(64)
    };
    let e = trainer(gpus, &ok_storage).fit().unwrap_err();
    assert!(e.to_string().contains("GPUs"), "{e}");
    let e = trainer(ScalingConfig::workers(100_000), &ok_storage)
        .fit()
        .unwrap_err();
    assert!(e.to_string().contains("CPUs"), "{e}");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let under_file = file.join("runs");
    let e = trainer(ScalingConfig::workers(1), under_file.to_str().unwrap())
        .fit()
        .unwrap_err();
    assert!(e.to_string().contains("storage_path"), "{e}");
    let e = trainer(ScalingConfig::workers(1), "nosuch://bucket/x")
        .fit()
        .unwrap_err();
    assert!(e.to_string().contains("storage_path"), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "bad configs fail fast"
    );
    // A loop that fails on one rank ends the run with that rank's error.
    let e = trainer(ScalingConfig::workers(2), &ok_storage)
        .fit()
        .unwrap_err();
    assert!(e.to_string().contains("rank 1 of 2"), "{e}");
    assert!(e.to_string().contains("NaN at step 3"), "{e}");
    println!("ok: bad configs and a failing rank give clear errors");
}

/// An S3-compatible server (moto, which `scripts/test.sh` installs) on 127.0.0.1 with a
/// bucket `volley`; killed on drop.
struct Moto(std::process::Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_moto() -> (Moto, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 with moto[server] (scripts/test.sh installs it)");
    let server = Moto(child);
    let endpoint = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "moto did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let made = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import boto3\nboto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='test', \
             aws_secret_access_key='test', region_name='us-east-1').create_bucket(Bucket='volley')"
        ))
        .status()
        .unwrap();
    assert!(made.success(), "could not create the test bucket");
    (server, endpoint)
}

/// Checkpoints in an S3 bucket: rank 0 (a worker process, which inherits the `AWS_*`
/// settings) writes them, the store prunes them, the driver reads the best back.
fn checkpoints_in_object_storage() {
    let (_moto, endpoint) = start_moto();
    for (k, v) in [
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ] {
        std::env::set_var(k, v);
    }
    let ctx = context();
    let mut run = RunConfig::new("s3://volley/train-runs", "s3-run");
    run.checkpoint = volley_train::CheckpointConfig {
        num_to_keep: Some(1),
        score_metric: Some("loss".into()),
        order: volley_train::Order::Min,
    };
    let result = DataParallelTrainer::new(
        Regression {
            batch_size: 8,
            steps: 6,
            checkpoint_every: 2,
            stall_file: None,
            stall_at: 0,
        },
        ScalingConfig::workers(2),
        run,
    )
    .with_dataset("train", regression_data(&ctx, 8, 16))
    .fit()
    .unwrap();
    assert_eq!(result.path, "s3://volley/train-runs/s3-run");
    let latest = result.checkpoint.as_ref().unwrap();
    assert_eq!(latest.info.step, 6);
    assert_eq!(latest.value::<u64>("step").unwrap(), 6);
    // Kept: the best by loss and the latest (which may be the same one).
    let store = volley_train::CheckpointStore::open(
        "s3://volley/train-runs",
        "s3-run",
        volley_train::CheckpointConfig::default(),
    )
    .unwrap();
    let kept: Vec<u64> = store.list().unwrap().iter().map(|c| c.step).collect();
    let best = result.best_checkpoint.as_ref().unwrap().info.step;
    let mut expect = vec![best, 6];
    expect.sort();
    expect.dedup();
    assert_eq!(kept, expect, "pruned to the best and the latest");
    let params: Vec<f32> = latest.value("params").unwrap();
    assert_eq!(params.len(), 4 * 8 + 8 + 8 + 1);
    println!("ok: checkpoints written to and read from S3 (kept steps {kept:?})");
}

fn main() {
    if volley_runtime::cluster::is_worker() {
        volley_runtime::cluster::run_worker();
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let tests: [(&str, fn()); 5] = [
        ("equivalence", two_ranks_match_one_rank_with_twice_the_batch),
        ("shards", every_row_once_per_epoch),
        ("recovery", killed_rank_resumes_from_checkpoint),
        ("bad_input", bad_input_fails_fast),
        ("s3", checkpoints_in_object_storage),
    ];
    for (name, test) in tests {
        if filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str())) {
            let start = Instant::now();
            test();
            println!(
                "test {name} ... ok ({:.1} s)",
                start.elapsed().as_secs_f64()
            );
        }
    }
}
