//! Tasks, objects, actors and placement groups on a volley cluster.
//!
//! ```text
//! volley start --head
//! volley start --address 127.0.0.1:6380 --num-cpus 2
//! volley job submit --wait -- target/release/examples/cluster_tasks 8
//! ```
//!
//! Each task makes a block of numbers on whichever node has room; a second wave sums
//! them where they are; an actor keeps a running total. The driver checks the answers.
//!
//! `cluster_tasks wait-for-resources` asks for what no node has yet (a task needing 2
//! GPUs, a placement group of two 2-CPU bundles on one node), shows that both wait, and
//! finishes once a node that fits joins.
//!
//! `cluster_tasks --across-restart` makes an actor and a placement group, starts a
//! long call of the actor with three more queued behind it whose results it lets go
//! of and one that fails, prints `PAUSED` and waits: restart the head meanwhile
//! (`kill -9` it, then `volley start --head` on the same state folder). The actor goes
//! on with its state, in the same process, having made every call once, and a task
//! runs in the group.
//!
//! `cluster_tasks --broken-workers` is a program whose workers fail as they start
//! (before `volley::init()`): its task fails, and the error says what they printed.
//! With `--broken-node NODE` only the workers on that node fail: the tasks the node
//! hands back run on the others, and all succeed.

use std::sync::Arc;
use std::time::Duration;

use volley::arrow::array::{ArrayRef, Int64Array, RecordBatch};
use volley::crates::common::ErrorKind;
use volley::crates::runtime::cluster::{
    object_value, value_object, ActorOptions, PlacementStrategy, RemoteActor, RemoteTask,
    Resources, TaskContext, TaskOptions,
};
use volley::{Result, VolleyError};

/// Makes the numbers `start..start + n`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Numbers {
    start: i64,
    n: i64,
}

#[typetag::serde]
impl RemoteTask for Numbers {
    fn run(&self, ctx: &TaskContext, _: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
        // Kept in the worker's output on its node: `volley logs --job ID --task NAME`.
        println!(
            "numbers {}..{} on {}",
            self.start,
            self.start + self.n,
            ctx.node_id
        );
        let values = Int64Array::from_iter_values(self.start..self.start + self.n);
        let node =
            volley::arrow::array::StringArray::from(vec![ctx.node_id.clone(); self.n as usize]);
        Ok(vec![RecordBatch::try_from_iter([
            ("x", Arc::new(values) as ArrayRef),
            ("node", Arc::new(node) as ArrayRef),
        ])?])
    }
}

/// Sums the `x` column of its inputs.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Sum;

#[typetag::serde]
impl RemoteTask for Sum {
    fn run(&self, _: &TaskContext, inputs: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
        value_object(&sum(inputs.iter().flatten()))
    }
}

/// A task that carries `bytes` itself (past gRPC's default 4 MiB message): answers
/// their count and sum.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Carry {
    bytes: Vec<u8>,
}

#[typetag::serde]
impl RemoteTask for Carry {
    fn run(&self, _: &TaskContext, _: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
        let sum: i64 = self.bytes.iter().map(|&b| i64::from(b)).sum();
        value_object(&(self.bytes.len() as i64, sum))
    }
}

fn sum<'a>(batches: impl Iterator<Item = &'a RecordBatch>) -> i64 {
    batches
        .map(|b| {
            let x = b
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("int64");
            x.values().iter().sum::<i64>()
        })
        .sum()
}

/// Keeps a total across calls.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Accumulator {
    total: i64,
    /// Calls of `fail` made.
    #[serde(default)]
    failures: i64,
}

#[typetag::serde]
impl RemoteActor for Accumulator {
    fn call(
        &mut self,
        _: &TaskContext,
        method: &str,
        arg: serde_json::Value,
        _: Vec<Vec<RecordBatch>>,
    ) -> Result<Vec<RecordBatch>> {
        match method {
            "add" => {
                self.total += arg.as_i64().unwrap_or(0);
                println!("accumulator total {}", self.total);
                value_object(&self.total)
            }
            // Takes the actor's process down, to show a restart.
            "crash" => std::process::exit(3),
            // Fails, counting that it did.
            "fail" => {
                self.failures += 1;
                Err(VolleyError::plan(format!("failure {}", self.failures)))
            }
            "failures" => value_object(&self.failures),
            // Keeps the actor busy for `arg` milliseconds.
            "nap" => {
                std::thread::sleep(Duration::from_millis(arg.as_u64().unwrap_or(0)));
                value_object(&self.total)
            }
            other => Err(VolleyError::plan(format!(
                "Accumulator has no method {other}"
            ))),
        }
    }
}

/// Fails with an error of the given category, to show that the category reaches the
/// driver.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct FailAs(ErrorKind);

#[typetag::serde]
impl RemoteTask for FailAs {
    fn run(&self, _: &TaskContext, _: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
        Err(match self.0 {
            ErrorKind::UserFunction => VolleyError::UserFunction {
                name: "score".into(),
                message: "division by zero".into(),
            },
            ErrorKind::Cancelled => VolleyError::Cancelled,
            ErrorKind::ResourcesExhausted => {
                VolleyError::ResourcesExhausted("the model needs 80 GiB".into())
            }
            _ => VolleyError::plan("no column `x`"),
        }
        .context("in FailAs"))
    }
}

/// Sleeps for its number of seconds: a task to cancel.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Sleep(u64);

#[typetag::serde]
impl RemoteTask for Sleep {
    fn run(&self, _: &TaskContext, _: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
        std::thread::sleep(Duration::from_secs(self.0));
        Ok(vec![])
    }
}

/// Reports where it ran and which GPUs it was given.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct WhereAmI;

#[typetag::serde]
impl RemoteTask for WhereAmI {
    fn run(&self, ctx: &TaskContext, _: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default();
        value_object(&(ctx.node_id.clone(), ctx.gpu_ids.clone(), visible))
    }
}

fn wait_for_resources(cluster: &volley::crates::runtime::cluster::Cluster) -> Result<()> {
    let gpu_task = cluster.submit(
        WhereAmI,
        &[],
        &TaskOptions::default().resources(Resources::cpus(0.0).with_gpus(2.0)),
    )?;
    let group =
        cluster.placement_group(vec![Resources::cpus(2.0); 2], PlacementStrategy::StrictPack)?;
    let (ready, _) = cluster.wait(std::slice::from_ref(&gpu_task), 1, Duration::from_secs(2))?;
    let placed = group.wait(Duration::from_millis(10))?;
    if !ready.is_empty() || placed.is_some() {
        return Err(VolleyError::execution(
            "expected both to wait for a bigger node",
        ));
    }
    println!("WAITING: the 2-GPU task and the 2x2-CPU group wait for a node that fits");
    let placed = group
        .wait(Duration::from_secs(120))?
        .ok_or_else(|| VolleyError::execution("the group was never placed"))?;
    let (node, gpus, visible): (String, Vec<u32>, String) = object_value(&cluster.get(&gpu_task)?)?;
    println!("group placed on {placed:?}");
    println!("GPU task ran on {node} with GPUs {gpus:?}, CUDA_VISIBLE_DEVICES={visible}");
    if placed[0] != placed[1] || gpus.len() != 2 {
        return Err(VolleyError::execution("wrong placement"));
    }
    println!("OK");
    Ok(())
}

/// What to show.
#[derive(clap::Parser)]
#[command(about = "Tasks, actors and placement groups on a cluster (run as a job: VOLLEY_ADDRESS)")]
struct Args {
    /// Number of tasks that each make 100,000 numbers.
    #[arg(default_value_t = 8)]
    tasks: i64,
    /// Instead: show a 2-GPU task and a 2x2-CPU placement group waiting for a node that
    /// fits them.
    #[arg(long)]
    wait_for_resources: bool,
    /// Instead: exit as a worker before starting as one, and show the error its task
    /// fails with.
    #[arg(long)]
    broken_workers: bool,
    /// With `--broken-workers`: only the workers on this node fail, and the tasks
    /// (`TASKS` of them) all succeed on the other nodes.
    #[arg(long)]
    broken_node: Option<String>,
    /// Instead: make an actor and a placement group, pause (restart the head then),
    /// and show that both are still there.
    #[arg(long)]
    across_restart: bool,
    /// With `--across-restart`: how long to pause, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    pause_ms: u64,
}

/// The driver of `--across-restart`.
fn across_restart(
    cluster: &volley::crates::runtime::cluster::Cluster,
    pause: Duration,
) -> Result<()> {
    let half = Resources::cpus(0.5);
    let acc = cluster.create_actor(
        Accumulator::default(),
        &ActorOptions::default().resources(half.clone()),
    )?;
    let group = cluster.placement_group(vec![half.clone()], PlacementStrategy::Pack)?;
    let add = |range: std::ops::RangeInclusive<i64>| -> Result<i64> {
        let mut last = None;
        for i in range {
            last = Some(acc.call("add", i, &[])?);
        }
        object_value(&cluster.get(&last.expect("calls"))?)
    };
    let before = add(1..=5)?;
    let pid = acc.info()?.pid;
    group
        .wait(Duration::from_secs(60))?
        .ok_or_else(|| VolleyError::execution("the placement group was not placed"))?;
    // A call that outlasts the pause, three queued behind it on the actor's node whose
    // results the driver lets go of at once, and one that fails: each is made once,
    // whenever the head is away.
    let nap = acc.call("nap", pause.as_millis() as u64 + 2000, &[])?;
    for _ in 0..3 {
        drop(acc.call("add", 100, &[])?);
    }
    let failing = acc.call("fail", 0, &[])?;
    // (A moment for them to reach the actor's node, also on a loaded machine.)
    std::thread::sleep(Duration::from_millis(1000));
    println!("PAUSED actor total {before} in process {pid}");
    std::thread::sleep(pause);
    cluster.get(&nap)?;
    let failed = cluster.get(&failing).err().map(|e| e.to_string());
    let after = add(6..=10)?;
    let failures: i64 = object_value(&cluster.get(&acc.call("failures", 0, &[])?)?)?;
    println!("the failing call: {failed:?}; made {failures} time(s)");
    if failed.is_none() || failures != 1 {
        return Err(VolleyError::execution(
            "the failing call was not made exactly once across the head's restart",
        ));
    }
    let info = acc.info()?;
    let in_group = cluster.submit(
        Numbers { start: 0, n: 10 },
        &[],
        &TaskOptions::default().resources(half).in_group(&group, 0),
    )?;
    let rows: usize = cluster
        .get(&in_group)?
        .iter()
        .map(RecordBatch::num_rows)
        .sum();
    println!(
        "actor total {after} in process {} ({} restarts, {}); a task in the group made {rows} rows",
        info.pid, info.restarts, info.state
    );
    if before != 15 || after != 355 || info.pid != pid || info.restarts != 0 || rows != 10 {
        return Err(VolleyError::execution(
            "the actor or the group did not outlive the head's restart",
        ));
    }
    acc.kill()?;
    group.remove()?;
    println!("OK across restart");
    Ok(())
}

/// The driver of `--broken-workers --broken-node`: every one of `tasks` tasks runs on
/// a node other than the broken one.
fn one_broken_node(
    cluster: &volley::crates::runtime::cluster::Cluster,
    broken: &str,
    tasks: i64,
) -> Result<()> {
    let blocks: Vec<_> = (0..tasks)
        .map(|i| cluster.submit(Numbers { start: i, n: 1 }, &[], &TaskOptions::default()))
        .collect::<Result<_>>()?;
    for b in &blocks {
        let batches = cluster.get(b)?;
        if batches.iter().map(RecordBatch::num_rows).sum::<usize>() != 1 {
            return Err(VolleyError::execution("a task made the wrong rows"));
        }
    }
    println!("{tasks} tasks ran on the nodes other than {broken}");
    println!("OK");
    Ok(())
}

/// The driver of `--broken-workers`: its one task fails, saying why its workers exit.
fn broken_workers(cluster: &volley::crates::runtime::cluster::Cluster) -> Result<()> {
    let task = cluster.submit(Numbers { start: 0, n: 10 }, &[], &TaskOptions::default())?;
    let asked = std::time::Instant::now();
    match cluster.get(&task) {
        Err(e) if e.to_string().contains("weights.bin is missing") => {
            println!(
                "the task failed after {:.1} s: {e}",
                asked.elapsed().as_secs_f64()
            );
            println!("OK");
            Ok(())
        }
        other => Err(VolleyError::execution(format!(
            "expected the task to fail with its workers' error, got {other:?}"
        ))),
    }
}

fn main() -> Result<()> {
    let args: Args = clap::Parser::parse();
    let broken_here = args
        .broken_node
        .as_deref()
        .is_none_or(|node| std::env::var("VOLLEY_NODE_ID").is_ok_and(|here| here == node));
    if args.broken_workers && broken_here && std::env::var_os("VOLLEY_WORKER_ID").is_some() {
        // A worker that fails before `volley::init()` makes it one.
        eprintln!("cannot load the model: weights.bin is missing");
        std::process::exit(2);
    }
    volley::init()?;
    let cluster = volley::cluster()?
        .ok_or_else(|| VolleyError::Config("run this on a cluster (VOLLEY_ADDRESS)".into()))?;
    if args.wait_for_resources {
        return wait_for_resources(&cluster);
    }
    if args.across_restart {
        return across_restart(&cluster, Duration::from_millis(args.pause_ms));
    }
    if args.broken_workers {
        return match &args.broken_node {
            Some(node) => one_broken_node(&cluster, node, args.tasks),
            None => broken_workers(&cluster),
        };
    }
    let tasks = args.tasks;
    let n = 100_000;
    let blocks: Vec<_> = (0..tasks)
        .map(|i| cluster.submit(Numbers { start: i * n, n }, &[], &TaskOptions::default()))
        .collect::<Result<_>>()?;
    let sums: Vec<_> = blocks
        .iter()
        .map(|b| {
            cluster.submit(
                Sum,
                &[b],
                &TaskOptions::default().resources(Resources::cpus(0.5)),
            )
        })
        .collect::<Result<_>>()?;
    let mut total = 0i64;
    for s in &sums {
        total += object_value::<i64>(&cluster.get(s)?)?;
    }
    let expected: i64 = (0..tasks * n).sum();
    println!("sum over {tasks} tasks: {total} (expected {expected})");
    if total != expected {
        return Err(VolleyError::execution("wrong sum"));
    }
    let mut nodes = std::collections::BTreeSet::new();
    for b in &blocks {
        for batch in cluster.get(b)? {
            let col = batch
                .column(1)
                .as_any()
                .downcast_ref::<volley::arrow::array::StringArray>()
                .expect("utf8");
            nodes.insert(col.value(0).to_string());
        }
    }
    println!("blocks were made on {} node(s): {nodes:?}", nodes.len());

    // A task bigger than gRPC's default message limit goes through the node agent to
    // its worker (both sides take messages up to the head's limit).
    let bytes: Vec<u8> = (0..6 << 20).map(|i: u32| (i % 251) as u8).collect();
    let want = (
        bytes.len() as i64,
        bytes.iter().map(|&b| i64::from(b)).sum::<i64>(),
    );
    let carried = cluster.submit(Carry { bytes }, &[], &TaskOptions::default())?;
    let got: (i64, i64) = object_value(&cluster.get(&carried)?)?;
    println!("a task of {} bytes ran: {}", want.0, got == want);
    if got != want {
        return Err(VolleyError::execution(format!(
            "a 6 MiB task answered {got:?}, not {want:?}"
        )));
    }

    let acc = cluster.create_actor(Accumulator::default(), &ActorOptions::default())?;
    let mut last = None;
    for i in 1..=10 {
        last = Some(acc.call("add", i, &[])?);
    }
    let running: i64 = object_value(&cluster.get(&last.expect("ten calls"))?)?;
    println!("actor total: {running}");
    if running != 55 {
        return Err(VolleyError::execution("wrong actor total"));
    }
    // A killed actor's process is gone once `kill_and_wait` returns: its GPUs and
    // files are free for what comes next.
    let pid = acc.info()?.pid;
    acc.kill_and_wait(Duration::from_secs(60))?;
    if pid == 0 || std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Err(VolleyError::execution(format!(
            "the killed actor's process {pid} is still there"
        )));
    }
    println!("a killed actor's process {pid} is gone");

    // A task's error reaches the driver with its category.
    for kind in [
        ErrorKind::UserFunction,
        ErrorKind::Cancelled,
        ErrorKind::ResourcesExhausted,
        ErrorKind::Plan,
    ] {
        let failed = cluster.submit(FailAs(kind), &[], &TaskOptions::default())?;
        match cluster.get(&failed) {
            Err(e) if e.kind() == kind => println!("a {kind:?} error arrives as one: {e}"),
            other => {
                return Err(VolleyError::execution(format!(
                    "expected a {kind:?} error, got {other:?}"
                )))
            }
        }
    }

    // A cancelled task stops where it runs: reading what it would make fails at once.
    let sleeper = cluster.submit(Sleep(600), &[], &TaskOptions::default())?;
    std::thread::sleep(Duration::from_millis(500));
    let asked = std::time::Instant::now();
    cluster.cancel(&[&sleeper])?;
    match cluster.get(&sleeper) {
        Err(e) if e.kind() == ErrorKind::Cancelled && asked.elapsed() < Duration::from_secs(60) => {
            println!("a cancelled task stops: {e}")
        }
        other => {
            return Err(VolleyError::execution(format!(
                "expected the sleeping task to be cancelled, got {other:?}"
            )))
        }
    }

    // An actor whose process dies is rebuilt from its initial value (max_restarts).
    let fragile = cluster.create_actor(
        Accumulator::default(),
        &ActorOptions::default().max_restarts(1),
    )?;
    let five: i64 = object_value(&cluster.get(&fragile.call("add", 5, &[])?)?)?;
    let crashed = cluster.get(&fragile.call("crash", 0, &[])?);
    let seven: i64 = object_value(&cluster.get(&fragile.call("add", 7, &[])?)?)?;
    let info = fragile.info()?;
    println!(
        "actor before crash: {five}; the crashing call: {}; after restart: {seven} ({} restart, {})",
        match &crashed {
            Ok(_) => "returned".to_string(),
            Err(e) => format!("failed ({e})"),
        },
        info.restarts,
        info.state
    );
    if five != 5 || crashed.is_ok() || seven != 7 || info.restarts != 1 || info.state != "ALIVE" {
        return Err(VolleyError::execution(
            "the actor did not restart as expected",
        ));
    }
    fragile.kill()?;

    let group =
        cluster.placement_group(vec![Resources::cpus(1.0); 2], PlacementStrategy::Spread)?;
    let placed = group
        .wait(Duration::from_secs(30))?
        .ok_or_else(|| VolleyError::execution("placement group did not fit"))?;
    println!("placement group bundles on {placed:?}");
    let in_group = cluster.submit(
        Numbers { start: 0, n: 10 },
        &[],
        &TaskOptions::default().in_group(&group, 1),
    )?;
    let got = cluster.get(&in_group)?;
    println!(
        "task in bundle 1 ran on {:?}",
        got[0]
            .column(1)
            .as_any()
            .downcast_ref::<volley::arrow::array::StringArray>()
            .map(|c| c.value(0).to_string())
    );
    group.remove()?;
    println!("OK");
    Ok(())
}
