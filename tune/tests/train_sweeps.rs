//! Sweeps whose trials train Burn models (feature `train`): trials that are training
//! runs in a function trainable, and trials that are `DataParallelTrainer` runs. Trials
//! are worker processes of this test program (so it has its own `main`).

use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use volley_common::Result;
// Burn's derive macros name the `burn` crate.
use volley_train::burn;
use volley_train::{metrics, LoadRecord, RunConfig, TrainCheckpoint, WithRecord};
use volley_tune::{
    grid_search, AshaConfig, Mode, SchedulerConfig, SearchSpace, Trainable, TrialContext,
    TrialStatus, TuneConfig, Tuner,
};

/// A real training run per trial: a Burn MLP fitted to a regression target with SGD at
/// the trial's learning rate, a checkpoint (model record) per epoch.
#[derive(Debug, Serialize, Deserialize)]
struct TrainRegression {
    epochs: u64,
}

type B = volley_train::burn::backend::Autodiff<volley_train::burn::backend::NdArray<f32>>;

#[derive(volley_train::burn::module::Module, Debug)]
struct Mlp<B: volley_train::burn::tensor::backend::Backend> {
    l1: volley_train::burn::nn::Linear<B>,
    l2: volley_train::burn::nn::Linear<B>,
}

impl Mlp<B> {
    /// Seeded weights, or the trial's checkpoint.
    fn start(
        device: &volley_train::burn::backend::ndarray::NdArrayDevice,
        resume: Option<&volley_train::SavedCheckpoint>,
    ) -> Result<Self> {
        use volley_train::burn::nn::LinearConfig;
        use volley_train::burn::tensor::backend::Backend;
        B::seed(device, 5);
        let model = Mlp::<B> {
            l1: LinearConfig::new(3, 16).init(device),
            l2: LinearConfig::new(16, 1).init(device),
        };
        Ok(match resume {
            Some(ck) => ck.load_module("model", model, device)?,
            None => model,
        })
    }

    /// Mean squared error on `batch` (features `a`, `b`, `c`; target `y`).
    fn loss(
        &self,
        batch: &arrow::array::RecordBatch,
        device: &volley_train::burn::backend::ndarray::NdArrayDevice,
    ) -> Result<volley_train::burn::tensor::Tensor<B, 1>> {
        use volley_train::tensor::features_tensor;
        let x = features_tensor::<B>(batch, &["a", "b", "c"], device)?;
        let y = features_tensor::<B>(batch, &["y"], device)?;
        let h = volley_train::burn::tensor::activation::relu(self.l1.forward(x));
        Ok((self.l2.forward(h) - y).square().mean())
    }
}

fn regression_batch() -> arrow::array::RecordBatch {
    use arrow::array::{ArrayRef, Float32Array};
    use std::sync::Arc;
    let n = 512;
    let col = |k: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + k * 13) as f32 * 0.37).sin())
            .collect()
    };
    let (a, b, c) = (col(0), col(1), col(2));
    let y: Vec<f32> = (0..n)
        .map(|i| 0.8 * a[i] - 0.5 * b[i] * c[i] + 0.2)
        .collect();
    arrow::array::RecordBatch::try_from_iter([
        ("a", Arc::new(Float32Array::from(a)) as ArrayRef),
        ("b", Arc::new(Float32Array::from(b)) as ArrayRef),
        ("c", Arc::new(Float32Array::from(c)) as ArrayRef),
        ("y", Arc::new(Float32Array::from(y)) as ArrayRef),
    ])
    .unwrap()
}

#[typetag::serde]
impl Trainable for TrainRegression {
    fn run(&self, c: &Value, ctx: &mut TrialContext) -> Result<()> {
        use volley_train::burn::module::Module;
        use volley_train::burn::optim::{GradientsParams, Optimizer, SgdConfig};
        let lr = c["lr"].as_f64().unwrap();
        let device = Default::default();
        let mut model = Mlp::start(&device, ctx.checkpoint())?;
        let mut optim = SgdConfig::new().init::<B, Mlp<B>>();
        let batch = regression_batch();
        while ctx.iteration() < self.epochs {
            let mut total = 0.0;
            for start in (0..batch.num_rows()).step_by(32) {
                let b = batch.slice(start, 32);
                let loss = model.loss(&b, &device)?;
                total += loss.clone().into_scalar() as f64;
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                model = optim.step(lr, model, grads);
            }
            let ckpt =
                TrainCheckpoint::new().with_record::<B, _>("model", model.clone().into_record())?;
            ctx.report(metrics([("loss", total / 16.0)]), Some(ckpt))?;
        }
        Ok(())
    }
}

/// A sweep over the learning rate whose trials are real (small) training runs: every
/// trial's loss falls over its epochs except where the rate is far too small, the best
/// rate is not the smallest, and the best trial's model loads from its checkpoint.
fn learning_rate_sweep_trains() {
    let dir = tempfile::tempdir().unwrap();
    let grid = Tuner::new(
        TrainRegression { epochs: 6 },
        SearchSpace::new().with("lr", grid_search([1e-4, 1e-2, 1e-1])),
        quiet(TuneConfig::new("loss", Mode::Min, 1)),
        RunConfig::new(dir.path().to_str().unwrap(), "lr"),
    )
    .fit()
    .unwrap();
    let best = grid.best_result().unwrap();
    assert_ne!(best.config["lr"], 1e-4, "{:?}", best.config);
    for t in &grid.trials {
        assert_eq!(t.history.len(), 6);
        let (first, last) = (t.history[0].metrics["loss"], t.history[5].metrics["loss"]);
        if t.config["lr"] != 1e-4 {
            assert!(last < first * 0.8, "{}: loss {first} -> {last}", t.config);
        }
    }
    let ck = best.checkpoint.as_ref().unwrap();
    assert_eq!(ck.info.step, 6);
    let device = Default::default();
    let _record: MlpRecord<B> = ck.record::<B, _>("model", &device).unwrap();
    println!(
        "ok: lr sweep, best {} with loss {:.4}",
        best.config["lr"], best.metrics["loss"]
    );
}

/// A data-parallel training loop whose learning rate comes from the sweep
/// (`ctx.config()`), reading its rows from the trainer's dataset.
#[derive(Debug, Serialize, Deserialize)]
struct FitFromConfig {
    epochs: u64,
}

#[typetag::serde]
impl volley_train::TrainLoop for FitFromConfig {
    fn run(&self, ctx: &mut volley_train::TrainContext) -> Result<()> {
        use volley_train::burn::module::Module;
        use volley_train::burn::optim::{GradientsParams, Optimizer, SgdConfig};
        let lr = ctx.config()["lr"].as_f64().unwrap();
        let device = ctx.device::<B>();
        let mut model = Mlp::start(&device, ctx.checkpoint())?;
        let mut optim = SgdConfig::new().init::<B, Mlp<B>>();
        let shard = ctx.dataset_shard("train")?;
        while ctx.iteration() < self.epochs {
            let (mut total, mut n) = (0.0, 0);
            for b in shard.iter_batches(32, true)? {
                let b = b?;
                let loss = model.loss(&b, &device)?;
                total += loss.clone().into_scalar() as f64;
                n += 1;
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                let grads = ctx.all_reduce_gradients(&model, grads)?;
                model = optim.step(lr, model, grads);
            }
            let ckpt =
                TrainCheckpoint::new().with_record::<B, _>("model", model.clone().into_record())?;
            ctx.report(metrics([("loss", total / n as f64)]), Some(ckpt))?;
        }
        Ok(())
    }
}

/// Trials that are data-parallel training runs (rank actors, dataset shards): the
/// sweep fills in their learning rate, ASHA stops the worse run through its reports,
/// and the better run's checkpoint is its trial's.
fn trainer_trials() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = volley_dataset::Context::try_default().unwrap();
    let data = ctx.from_batches(vec![regression_batch()]).unwrap();
    let trainer = volley_train::DataParallelTrainer::new(
        FitFromConfig { epochs: 4 },
        volley_train::ScalingConfig::workers(1),
        RunConfig::new(dir.path().to_str().unwrap(), "template"),
    )
    .with_dataset("train", data);
    let mut c = quiet(TuneConfig::new("loss", Mode::Min, 1));
    c.max_concurrent_trials = Some(1);
    c.scheduler = SchedulerConfig::Asha(AshaConfig {
        max_t: 4,
        grace_period: 1,
        reduction_factor: 2.0,
    });
    let grid = Tuner::for_trainer(
        trainer,
        SearchSpace::new().with("lr", grid_search([0.1, 1e-4])),
        c,
        RunConfig::new(dir.path().to_str().unwrap(), "trainer-sweep"),
    )
    .fit()
    .unwrap();
    let (good, bad) = (&grid.trials[0], &grid.trials[1]);
    assert_eq!(good.config["lr"], 0.1);
    assert_eq!(good.status, TrialStatus::Terminated);
    assert_eq!(good.history.len(), 4);
    let (first, last) = (
        good.history[0].metrics["loss"],
        good.history[3].metrics["loss"],
    );
    assert!(last < first, "the run trained: {first} -> {last}");
    assert_eq!(good.checkpoint.as_ref().unwrap().info.step, 4);
    assert_eq!(bad.status, TrialStatus::Terminated, "{:?}", bad.error);
    assert_eq!(
        bad.history.len(),
        1,
        "ASHA stopped the worse run at its first rung"
    );
    assert!(bad.stopped_early);
    assert_eq!(grid.best_result().unwrap().config["lr"], 0.1);
    println!("ok: trainer trials, the worse one stopped after 1 of 4 epochs");
}

fn quiet(mut c: TuneConfig) -> TuneConfig {
    c.progress = false;
    c
}

fn main() {
    if volley_runtime::cluster::is_worker() {
        volley_runtime::cluster::run_worker();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filter: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let tests: [(&str, fn()); 2] = [
        ("training", learning_rate_sweep_trains),
        ("trainer", trainer_trials),
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
