//! The data-parallel trainer: rank actors gang-scheduled in a placement group, fed by
//! the driver's dataset pipelines, restarted from the latest checkpoint after a failure.
//!
//! ```text
//!  driver: DataParallelTrainer::fit
//!    ├─ CheckpointStore (storage_path/name)            ◀── rank 0 saves checkpoints
//!    ├─ SessionServer ── streaming_split per pass ──▶ ranks (Arrow IPC over TCP)
//!    │                ◀── reports ───────────────────  rank 0
//!    └─ placement group: one bundle per rank ──▶ RankActor (a worker process each)
//!                                                  └─ TcpRing: gradient all-reduce
//! ```

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Float64Array, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use serde::{Deserialize, Serialize};
use volley_common::{Result, VolleyError};
use volley_dataset::Dataset;
use volley_runtime::cluster::{
    object_value, value_object, ActorHandle, ActorOptions, Cluster, ObjectRef, PlacementStrategy,
    RemoteActor, TaskContext,
};

use volley_run::{
    on_own_thread, Checkpoint, CheckpointConfig, CheckpointStore, ClusterLease, Metrics, Peer,
    Report, ReportClient, ReportHandler, ReportServer, RunConfig, SavedCheckpoint,
};

use crate::collective::{RingConfig, TcpRing};
use crate::config::{Placement, ScalingConfig};
use crate::context::TrainContext;
use crate::session::{DataTransfer, ReportHook, Session};

/// A training loop that runs on every rank.
///
/// Ranks are processes (on this machine or on a cluster's nodes), so the loop travels
/// by name: it is a serializable value of a type registered with `#[typetag::serde]`,
/// and its fields are its settings. The same binary runs on every rank.
///
/// ```no_run
/// use volley_train::{TrainContext, TrainLoop};
///
/// #[derive(Debug, serde::Serialize, serde::Deserialize)]
/// struct Fit { lr: f64, epochs: usize }
///
/// #[typetag::serde]
/// impl TrainLoop for Fit {
///     fn run(&self, ctx: &mut TrainContext) -> volley_common::Result<()> {
///         let shard = ctx.dataset_shard("train")?;
///         for _epoch in 0..self.epochs {
///             for batch in shard.iter_batches(64, true)? {
///                 let _batch = batch?;
///                 // forward, backward, ctx.all_reduce_gradients(..), optimizer step
///             }
///             ctx.report([("loss".to_string(), 0.0)].into(), None)?;
///         }
///         Ok(())
///     }
/// }
/// ```
#[typetag::serde(tag = "train_loop", content = "args")]
pub trait TrainLoop: Send + Sync + std::fmt::Debug {
    /// Trains; returns when this rank is done.
    fn run(&self, ctx: &mut TrainContext) -> Result<()>;
}

/// How the datasets are shared among ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataConfig {
    /// Every rank gets the same number of rows per pass (the last `rows % ranks` rows of
    /// a pass are dropped); ranks then take the same number of steps, which gradient
    /// all-reduce needs. Without it, faster ranks take more rows.
    pub equal: bool,
    /// On a cluster, fetch every block into the driver and send its bytes to the ranks.
    /// Off (the default), a rank gets references to its rows and reads them from the
    /// nodes that hold them, so the data never passes through the driver; blocks the
    /// driver itself produced (a stage that runs in the driver) are sent either way.
    pub relay: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            equal: true,
            relay: false,
        }
    }
}

/// Runs a [`TrainLoop`] on a group of ranks.
pub struct DataParallelTrainer {
    train_loop: Box<dyn TrainLoop>,
    scaling: ScalingConfig,
    run: RunConfig,
    datasets: HashMap<String, Dataset>,
    data: DataConfig,
    config: serde_json::Value,
    cluster: Option<Cluster>,
    ring_timeout: Duration,
    hook: Option<ReportHook>,
}

impl std::fmt::Debug for DataParallelTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallelTrainer")
            .field("train_loop", &self.train_loop)
            .field("scaling", &self.scaling)
            .field("run", &self.run)
            .finish()
    }
}

/// What [`DataParallelTrainer::fit`] returns.
#[derive(Debug, Clone)]
pub struct TrainResult {
    /// The last report's metrics.
    pub metrics: Metrics,
    /// The latest checkpoint (where a resumed run would start).
    pub checkpoint: Option<SavedCheckpoint>,
    /// The best checkpoint by `RunConfig.checkpoint.score_metric` (the latest without).
    pub best_checkpoint: Option<SavedCheckpoint>,
    /// Every report of the run, in order, each iteration once (reports made after the
    /// checkpoint a restart resumed from are replaced by the restarted ones).
    pub history: Vec<Report>,
    /// Failures the run recovered from.
    pub failures: u32,
    /// The node each rank of the last attempt ran on (`rank_nodes[rank]`).
    pub rank_nodes: Vec<String>,
    /// How the datasets' rows reached the ranks: sent by the driver, or read from the
    /// nodes.
    pub data_transfer: DataTransfer,
    /// `storage_path/name`.
    pub path: String,
}

impl TrainResult {
    /// The metric history as a table: `iteration` and one `Float64` column per metric
    /// (null where a report did not carry it).
    pub fn history_table(&self) -> Result<RecordBatch> {
        let mut names: Vec<&String> = self.history.iter().flat_map(|r| r.metrics.keys()).collect();
        names.sort();
        names.dedup();
        let mut fields = vec![Field::new("iteration", DataType::UInt64, false)];
        let mut columns: Vec<ArrayRef> = vec![Arc::new(UInt64Array::from_iter_values(
            self.history.iter().map(|r| r.iteration),
        ))];
        for n in names {
            fields.push(Field::new(n, DataType::Float64, true));
            columns.push(Arc::new(Float64Array::from_iter(
                self.history.iter().map(|r| r.metrics.get(n).copied()),
            )));
        }
        Ok(RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            columns,
        )?)
    }
}

impl DataParallelTrainer {
    /// A trainer running `train_loop` on `scaling.num_workers` ranks, keeping the run
    /// under `run.storage_path/run.name`.
    pub fn new(
        train_loop: impl TrainLoop + 'static,
        scaling: ScalingConfig,
        run: RunConfig,
    ) -> Self {
        Self {
            train_loop: Box::new(train_loop),
            scaling,
            run,
            datasets: HashMap::new(),
            data: DataConfig::default(),
            config: serde_json::Value::Null,
            cluster: None,
            ring_timeout: Duration::from_secs(120),
            hook: None,
        }
    }

    /// Feeds `dataset` to the ranks as `name` (`ctx.dataset_shard(name)`).
    pub fn with_dataset(mut self, name: impl Into<String>, dataset: Dataset) -> Self {
        self.datasets.insert(name.into(), dataset);
        self
    }

    /// How datasets are shared.
    pub fn with_data_config(mut self, data: DataConfig) -> Self {
        self.data = data;
        self
    }

    /// A JSON value every rank reads with `ctx.config()` (what a sweep fills in).
    pub fn with_config(mut self, config: serde_json::Value) -> Self {
        self.config = config;
        self
    }

    /// Runs the ranks on `cluster`. Without it, `fit` uses the cluster of
    /// `VOLLEY_ADDRESS` when set, else a private one-node cluster on this machine whose
    /// workers are processes of this program.
    pub fn with_cluster(mut self, cluster: Cluster) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Calls `hook` with every report rank 0 makes; when it returns `false` the run
    /// stops (rank 0's `report` returns `VolleyError::Cancelled`, the group is
    /// released) and `fit` returns normally. How a sweep's scheduler stops a trial.
    pub fn with_report_hook(mut self, hook: ReportHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// A copy of this trainer (same loop, datasets, scaling and cluster) with
    /// `config` for its ranks and `run` for its storage: one trial of a sweep.
    pub fn for_trial(&self, config: serde_json::Value, run: RunConfig) -> Result<Self> {
        let json = serde_json::to_value(&self.train_loop)
            .map_err(|e| VolleyError::plan(format!("the train loop cannot be serialized: {e}")))?;
        let train_loop: Box<dyn TrainLoop> = serde_json::from_value(json)
            .map_err(|e| VolleyError::plan(format!("the train loop cannot be copied: {e}")))?;
        Ok(Self {
            train_loop,
            scaling: self.scaling.clone(),
            run,
            datasets: self.datasets.clone(),
            data: self.data,
            config,
            cluster: self.cluster.clone(),
            ring_timeout: self.ring_timeout,
            hook: None,
        })
    }

    /// What all its ranks hold together.
    pub fn resources(&self) -> volley_runtime::cluster::Resources {
        let mut total = volley_runtime::cluster::Resources::default();
        for _ in 0..self.scaling.num_workers {
            total.add(&self.scaling.bundle());
        }
        total
    }

    /// How long a rank waits on a silent neighbour in the all-reduce before failing.
    pub fn with_ring_timeout(mut self, timeout: Duration) -> Self {
        self.ring_timeout = timeout;
        self
    }

    /// Trains to the end, restarting the group from the latest checkpoint after a
    /// failure up to `max_failures` times.
    pub fn fit(&self) -> Result<TrainResult> {
        self.scaling.validate()?;
        if self.ring_timeout < Duration::from_millis(1) {
            return Err(VolleyError::Config(format!(
                "ring_timeout {:?}: give at least 1 ms for a rank to wait on its neighbours",
                self.ring_timeout
            )));
        }
        let storage = self.run.resolved_storage_path()?;
        let store = Arc::new(
            CheckpointStore::open(&storage, &self.run.name, self.run.checkpoint.clone())
                .map_err(|e| VolleyError::Config(format!("RunConfig.storage_path: {e}")))?,
        );
        let bundle = self.scaling.bundle();
        let world = self.scaling.num_workers;

        // The cluster: given, named by VOLLEY_ADDRESS, or private to this run.
        let lease = ClusterLease::acquire(self.cluster.as_ref(), |total, what| {
            check_fits(&bundle, world, total, what)
        })?;
        let total = lease.total();
        let left = total.num_cpus - bundle.num_cpus * world as f64;
        if !self.datasets.is_empty() && left < 1.0 && !lease.is_private() {
            // Reads of a pipeline on a cluster run as cluster tasks, which need a CPU.
            tracing::warn!(
                "the {world} ranks hold {:.1} of the cluster's {:.1} CPUs: dataset read \
                 tasks that run on the cluster will wait for a CPU; leave at least one \
                 outside the ranks' bundles",
                bundle.num_cpus * world as f64,
                total.num_cpus
            );
        }
        let host = lease.driver_host()?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let session = Arc::new(Session::new(
            world,
            self.data,
            self.datasets.clone(),
            self.hook.clone(),
            lease.cluster(),
        ));
        let server = ReportServer::start(
            &host,
            token.clone(),
            Arc::clone(&session) as Arc<dyn ReportHandler>,
            "volley-train",
        )?;
        let result = self.attempts(
            lease.cluster(),
            (&session, server.address()),
            &store,
            &token,
            &storage,
        );
        server.shutdown();
        drop(lease);
        let (failures, rank_nodes) = result?;

        let history = session.history();
        let latest = store.latest()?;
        let best = store.best()?;
        Ok(TrainResult {
            metrics: history
                .last()
                .map(|r| r.metrics.clone())
                .unwrap_or_default(),
            checkpoint: latest.map(|c| SavedCheckpoint::new(c, Arc::clone(&store))),
            best_checkpoint: best.map(|c| SavedCheckpoint::new(c, Arc::clone(&store))),
            history,
            failures,
            rank_nodes,
            data_transfer: session.transfer(),
            path: format!("{}/{}", storage.trim_end_matches('/'), self.run.name),
        })
    }

    /// Runs attempts until one finishes; returns how many failed and where the ranks of
    /// the last one ran.
    fn attempts(
        &self,
        cluster: &Cluster,
        (server, address): (&Session, SocketAddr),
        store: &Arc<CheckpointStore>,
        token: &str,
        storage: &str,
    ) -> Result<(u32, Vec<String>)> {
        let mut failures = 0u32;
        loop {
            let resume = store.latest()?;
            let iteration = resume.as_ref().map_or(0, |c| c.step);
            server.begin_attempt(failures, iteration);
            let spec = RankSpec {
                train_loop: serde_json::to_value(&self.train_loop).map_err(|e| {
                    VolleyError::plan(format!("the train loop cannot be serialized: {e}"))
                })?,
                world: self.scaling.num_workers,
                attempt: failures,
                session: address,
                token: token.to_string(),
                storage: storage.to_string(),
                name: self.run.name.clone(),
                checkpoint: self.run.checkpoint.clone(),
                config: self.config.clone(),
                ring_timeout_ms: u64::try_from(self.ring_timeout.as_millis()).unwrap_or(u64::MAX),
                cpus: self.scaling.bundle().num_cpus,
                resume,
                iteration,
            };
            let (result, stopped) = self.attempt(cluster, server, &spec);
            if let Err(e) = stopped {
                match &result {
                    // Done: the ranks saved what they would; one still exiting harms
                    // nothing.
                    Ok(_) => tracing::warn!("training attempt {failures} finished; {e}"),
                    // A rank may still run: the next attempt would work beside it.
                    Err(cause) => {
                        return Err(e.context(format!(
                            "stopping the ranks of training attempt {failures}, which failed \
                             ({cause}); not restarting"
                        )))
                    }
                }
            }
            match result {
                Ok(nodes) => return Ok((failures, nodes)),
                Err(e) => {
                    if failures >= self.run.failure.max_failures {
                        return Err(if failures == 0 {
                            e
                        } else {
                            e.context(format!("training failed after {failures} restarts"))
                        });
                    }
                    failures += 1;
                    tracing::warn!(
                        "training attempt {} failed ({e}); restarting from the latest checkpoint ({} of {} restarts)",
                        failures - 1,
                        failures,
                        self.run.failure.max_failures
                    );
                }
            }
        }
    }

    /// One attempt: reserve the bundles, start the ranks, run them to the end, stop
    /// them; returns the node of each rank, and whether the ranks were stopped (their
    /// processes gone).
    fn attempt(
        &self,
        cluster: &Cluster,
        server: &Session,
        spec: &RankSpec,
    ) -> (Result<Vec<String>>, Result<()>) {
        let group = match cluster.placement_group(
            vec![self.scaling.bundle(); spec.world],
            match self.scaling.placement {
                Placement::Pack => PlacementStrategy::Pack,
                Placement::Spread => PlacementStrategy::Spread,
            },
        ) {
            Ok(g) => g,
            Err(e) => return (Err(e), Ok(())),
        };
        let mut ranks = Ranks {
            actors: Vec::new(),
            group: Some(group),
        };
        let result = self.run_ranks(cluster, server, spec, &mut ranks);
        let stopped = ranks.stop(RANK_EXIT_WAIT);
        (result, stopped)
    }

    /// Starts the ranks of an attempt in `ranks` and runs them to the end.
    fn run_ranks(
        &self,
        cluster: &Cluster,
        server: &Session,
        spec: &RankSpec,
        ranks: &mut Ranks,
    ) -> Result<Vec<String>> {
        let world = spec.world;
        let group = ranks.group.as_ref().expect("set");
        let Some(nodes) = group.wait(Duration::from_secs(300))? else {
            return Err(VolleyError::ResourcesExhausted(format!(
                "could not reserve {world} bundles of {} within 5 minutes",
                self.scaling.bundle()
            )));
        };
        for rank in 0..world {
            let actor = RankActor {
                rank,
                spec: spec.clone(),
                listener: None,
            };
            let options = ActorOptions::default()
                .resources(self.scaling.bundle())
                .in_group(group, rank as i32);
            ranks.actors.push(cluster.create_actor(actor, &options)?);
        }
        let listening: Vec<ObjectRef> = ranks
            .actors
            .iter()
            .map(|a| a.call("listen", serde_json::Value::Null, &[]))
            .collect::<Result<_>>()?;
        let mut addresses = Vec::with_capacity(world);
        for (rank, r) in listening.iter().enumerate() {
            let batches = cluster
                .get(r)
                .map_err(|e| e.context(format!("starting rank {rank}")))?;
            addresses.push(object_value::<String>(&batches)?);
        }
        let running: Vec<(usize, ObjectRef)> = ranks
            .actors
            .iter()
            .enumerate()
            .map(|(rank, a)| Ok((rank, a.call("run", &addresses, &[])?)))
            .collect::<Result<_>>()?;
        let mut left = running;
        while !left.is_empty() {
            // Stopped by the report hook: done (the attempt stops the others).
            if server.stopped() {
                return Ok(nodes);
            }
            let refs: Vec<ObjectRef> = left.iter().map(|(_, r)| r.clone()).collect();
            let (ready, _) = cluster.wait(&refs, 1, Duration::from_millis(500))?;
            for r in ready {
                let pos = left
                    .iter()
                    .position(|(_, x)| x.id() == r.id())
                    .expect("a ref we asked about");
                let (rank, r) = left.remove(pos);
                if let Err(e) = cluster.get(&r) {
                    if server.stopped() {
                        return Ok(nodes);
                    }
                    return Err(first_cause(cluster, rank, e, left, world));
                }
                server.rank_finished(rank);
            }
        }
        Ok(nodes)
    }
}

/// The error to report when `rank` failed with `error`: when one rank fails, its
/// neighbours fail too (their all-reduce loses its peer), possibly first; the ranks
/// still running get a moment to fail, and an error that is not a lost peer wins.
fn first_cause(
    cluster: &Cluster,
    rank: usize,
    error: VolleyError,
    left: Vec<(usize, ObjectRef)>,
    world: usize,
) -> VolleyError {
    let mut errors = vec![(rank, error)];
    if !left.is_empty() {
        let refs: Vec<ObjectRef> = left.iter().map(|(_, r)| r.clone()).collect();
        if let Ok((ready, _)) = cluster.wait(&refs, refs.len(), Duration::from_secs(2)) {
            for r in ready {
                if let Some((rank, _)) = left.iter().find(|(_, x)| x.id() == r.id()) {
                    if let Err(e) = cluster.get(&r) {
                        errors.push((*rank, e));
                    }
                }
            }
        }
    }
    let pick = errors
        .iter()
        .position(|(_, e)| !e.to_string().contains("all-reduce: rank"))
        .unwrap_or(0);
    let (rank, e) = errors.swap_remove(pick);
    e.context(format!("rank {rank} of {world}"))
}

/// How long the ranks of an attempt may take to exit once killed before the run
/// fails instead of starting the next attempt beside them.
const RANK_EXIT_WAIT: Duration = Duration::from_secs(60);

/// The actors and bundles of one attempt; [`Ranks::stop`] (or dropping it) stops the
/// actors and gives the bundles back (also when the attempt fails half-way).
struct Ranks {
    actors: Vec<ActorHandle>,
    group: Option<volley_runtime::cluster::PlacementGroup>,
}

impl Ranks {
    /// Kills every rank, waits up to `wait` in all for their processes to be gone, and
    /// gives the bundles back. A rank 0 killed in the middle of a save would otherwise
    /// go on writing checkpoint files, and pruning old ones, while the next attempt
    /// reads the latest: it must be gone first.
    fn stop(&mut self, wait: Duration) -> Result<()> {
        let actors = std::mem::take(&mut self.actors);
        let mut first_error = None;
        for a in &actors {
            if let Err(e) = a.kill() {
                first_error.get_or_insert(e);
            }
        }
        let end = Instant::now() + wait;
        for a in &actors {
            let left = end.saturating_duration_since(Instant::now());
            // Killed above: this only waits.
            if let Err(e) = a.kill_and_wait(left) {
                first_error.get_or_insert(e);
            }
        }
        if let Some(g) = self.group.take() {
            if let Err(e) = g.remove() {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        let _ = self.stop(RANK_EXIT_WAIT);
    }
}

fn check_fits(
    bundle: &volley_runtime::cluster::Resources,
    world: usize,
    total: &volley_runtime::cluster::Resources,
    what: &str,
) -> Result<()> {
    let need_cpus = bundle.num_cpus * world as f64;
    let need_gpus = bundle.num_gpus * world as f64;
    if need_gpus > total.num_gpus + 1e-9 {
        return Err(VolleyError::Config(format!(
            "{world} ranks with {} GPUs each need {need_gpus} GPUs; {what} has {}",
            bundle.num_gpus, total.num_gpus
        )));
    }
    if need_cpus > total.num_cpus + 1e-9 {
        return Err(VolleyError::Config(format!(
            "{world} ranks with {} CPUs each need {need_cpus} CPUs; {what} has {}",
            bundle.num_cpus, total.num_cpus
        )));
    }
    for (name, amount) in &bundle.custom {
        let have = total.custom.get(name).copied().unwrap_or(0.0);
        if amount * world as f64 > have + 1e-9 {
            return Err(VolleyError::Config(format!(
                "{world} ranks with {amount} `{name}` each need {}; {what} has {have}",
                amount * world as f64
            )));
        }
    }
    Ok(())
}

/// What every rank of an attempt is told.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RankSpec {
    /// The serialized `Box<dyn TrainLoop>`.
    train_loop: serde_json::Value,
    world: usize,
    attempt: u32,
    session: SocketAddr,
    token: String,
    storage: String,
    name: String,
    checkpoint: CheckpointConfig,
    config: serde_json::Value,
    ring_timeout_ms: u64,
    /// CPUs of a rank's bundle: the size of its thread pool.
    cpus: f64,
    resume: Option<Checkpoint>,
    iteration: u64,
}

/// One rank: an actor on its own worker process.
#[derive(Debug, Serialize, Deserialize)]
struct RankActor {
    rank: usize,
    spec: RankSpec,
    #[serde(skip)]
    listener: Option<TcpListener>,
}

#[typetag::serde(name = "volley_train::RankActor")]
impl RemoteActor for RankActor {
    fn call(
        &mut self,
        ctx: &TaskContext,
        method: &str,
        arg: serde_json::Value,
        _inputs: Vec<Vec<RecordBatch>>,
    ) -> Result<Vec<RecordBatch>> {
        match method {
            "listen" => {
                // Bound on every interface, advertised as the address this machine
                // reaches the driver from (which the other ranks can reach too).
                let ip = std::net::UdpSocket::bind("0.0.0.0:0")
                    .and_then(|u| u.connect(self.spec.session).map(|_| u))
                    .and_then(|u| u.local_addr())
                    .map(|a| a.ip())?;
                let listener = TcpListener::bind((ip, 0))?;
                let address = listener.local_addr()?.to_string();
                self.listener = Some(listener);
                value_object(&address)
            }
            "run" => {
                let addresses: Vec<String> = serde_json::from_value(arg)
                    .map_err(|e| VolleyError::internal(format!("rank addresses: {e}")))?;
                let listener = self.listener.take();
                let (rank, spec) = (self.rank, &self.spec);
                on_own_thread(&format!("train loop of rank {rank}"), || {
                    run_rank(rank, spec, ctx, listener, &addresses)
                })?;
                value_object(&self.rank)
            }
            other => Err(VolleyError::internal(format!(
                "a rank has no method `{other}`"
            ))),
        }
    }
}

fn run_rank(
    rank: usize,
    spec: &RankSpec,
    ctx: &TaskContext,
    listener: Option<TcpListener>,
    addresses: &[String],
) -> Result<()> {
    {
        let train_loop: Box<dyn TrainLoop> = serde_json::from_value(spec.train_loop.clone())
            .map_err(|e| {
                VolleyError::execution(format!(
                    "the train loop cannot be rebuilt on this rank: {e} (ranks run the driver's \
                     binary; is the type registered with #[typetag::serde]?)"
                ))
            })?;
        let addrs: Vec<SocketAddr> = addresses
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|e| VolleyError::internal(format!("rank address {a}: {e}")))
            })
            .collect::<Result<_>>()?;
        // The CPU backend's threads match the rank's CPUs, so ranks sharing a machine do
        // not oversubscribe it (the pool is built once per process).
        let threads = (spec.cpus.ceil() as usize).max(1);
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
        let listener =
            listener.ok_or_else(|| VolleyError::internal("a rank ran before it listened"))?;
        // Every rank opens the store (which clears cut-short saves) before the ring
        // forms, so none does it while rank 0 is already saving.
        let store = Arc::new(CheckpointStore::open(
            &spec.storage,
            &spec.name,
            spec.checkpoint.clone(),
        )?);
        let ring = TcpRing::connect(
            rank,
            &addrs,
            listener,
            RingConfig {
                timeout: Duration::from_millis(spec.ring_timeout_ms),
                ..RingConfig::default()
            },
        )?;
        let resume = spec
            .resume
            .clone()
            .map(|c| SavedCheckpoint::new(c, Arc::clone(&store)));
        let mut tctx = TrainContext {
            rank,
            world: spec.world,
            attempt: spec.attempt,
            config: spec.config.clone(),
            ring,
            session: Arc::new(Mutex::new(ReportClient::new(
                spec.session,
                spec.token.clone(),
                Peer {
                    trial: 0,
                    attempt: spec.attempt,
                    rank,
                },
            ))),
            store,
            resume,
            iteration: spec.iteration,
            passes: HashMap::new(),
            gpu_ids: ctx.gpu_ids.clone(),
        };
        train_loop.run(&mut tctx)
    }
}
