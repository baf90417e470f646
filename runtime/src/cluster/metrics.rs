//! The head's `/metrics`: the cluster in Prometheus' text format.
//!
//! Most of it is read from the head's state when scraped (nodes, their resources and
//! stores, tasks and jobs by state); what only the moment a task ends can tell (how it
//! ended, how long it ran) is counted then, in [`TaskMetrics`].
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `volley_nodes` | gauge | `state` (`alive`, draining ones included; `dead`; `left`) |
//! | `volley_node_cpus`, `volley_node_gpus`, `volley_node_memory_bytes` | gauge | `node`, `kind` (`total`, `available`) |
//! | `volley_node_object_store_bytes` | gauge | `node` (objects in memory) |
//! | `volley_node_object_store_limit_bytes` | gauge | `node` (memory before spilling) |
//! | `volley_node_object_store_disk_bytes` | gauge | `node` (objects spilled to disk now) |
//! | `volley_node_spilled_bytes_total` | counter | `node` (ever spilled) |
//! | `volley_node_workers`, `volley_node_running_tasks` | gauge | `node` |
//! | `volley_tasks` | gauge | `state` (`pending`, `running`) |
//! | `volley_tasks_ended_total` | counter | `outcome` (`succeeded`, `failed`, `retried`, `cancelled`) |
//! | `volley_task_duration_seconds` | histogram | (from being sent to a node to its report, tasks that succeeded) |
//! | `volley_jobs` | gauge | `state` |
//! | `volley_jobs_waiting` | gauge | `reason` (`node`, `room`, `beyond_nodes`) |
//! | `volley_objects` | gauge | |
//! | `volley_package_cache_bytes` | gauge | |
//! | `volley_package_received_bytes_total` | counter | |
//! | `volley_operator_rows`, `_bytes`, `_tasks_done`, `_tasks_running`, `_tasks`, `_queued_bytes`, `_spilled_bytes` | gauge | `job`, `execution`, `operator` (running executions) |
//!
//! Counters the head keeps itself (`volley_tasks_ended_total`, the duration histogram,
//! `volley_package_received_bytes_total`) count from the head's start: a restarted
//! head starts them at 0, which Prometheus' `rate` and `increase` take as a reset.
//!
//! A node agent started with `--metrics-port` serves its own figures as
//! `volley_agent_*` ([`render_agent`]): its store, workers, queued tasks and package
//! cache, with the same token.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::proto;
use super::resources::Resources;

type Labels = Vec<(String, String)>;
type Gauges = Family<Labels, Gauge<f64, AtomicU64>>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    // The text format's encoder writes label values as they are: a quote, backslash or
    // line break (a user's operator name) would break the whole page.
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.replace(['"', '\\', '\n', '\r'], " ")))
        .collect()
}

/// How a task ended, for `volley_tasks_ended_total`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TaskEnd {
    Succeeded,
    Failed,
    Retried,
    /// Stopped by its driver before it finished.
    Cancelled,
}

/// What the head counts as tasks end.
#[derive(Debug, Clone)]
pub(crate) struct TaskMetrics {
    ended: Family<Labels, Counter>,
    /// `ended`'s series, one per outcome, made once: every task's end counts in one,
    /// and looking it up by its labels (built, escaped and hashed) each time cost the
    /// head ~2% of its CPU with thousands of short tasks.
    succeeded: Counter,
    failed: Counter,
    retried: Counter,
    cancelled: Counter,
    duration: Histogram,
}

impl Default for TaskMetrics {
    fn default() -> Self {
        let ended = Family::<Labels, Counter>::default();
        let series = |outcome: &str| {
            ended
                .get_or_create(&labels(&[("outcome", outcome)]))
                .clone()
        };
        Self {
            succeeded: series("succeeded"),
            failed: series("failed"),
            retried: series("retried"),
            cancelled: series("cancelled"),
            ended,
            // 1 ms to ~9 minutes.
            duration: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.001, 2.0, 20,
            )),
        }
    }
}

impl TaskMetrics {
    /// A task ended; `seconds` since it was sent to its node, for one that succeeded.
    pub(crate) fn ended(&self, how: TaskEnd, seconds: Option<f64>) {
        match how {
            TaskEnd::Succeeded => &self.succeeded,
            TaskEnd::Failed => &self.failed,
            TaskEnd::Retried => &self.retried,
            TaskEnd::Cancelled => &self.cancelled,
        }
        .inc();
        if let Some(s) = seconds {
            self.duration.observe(s);
        }
    }
}

/// The head's cache of job files.
#[derive(Debug, Default)]
pub(crate) struct PackageFigures {
    /// Bytes cached now.
    pub cached: u64,
    /// Bytes uploaded since the head started.
    pub received: u64,
}

/// The cluster's metrics in Prometheus' text format.
pub(crate) fn render(
    status: &proto::ClusterStatus,
    jobs: &[proto::JobInfo],
    waits: &[(&str, usize)],
    tasks: &TaskMetrics,
    packages: &PackageFigures,
    executions: &[proto::ExecutionProgress],
) -> String {
    let mut r = Registry::with_prefix("volley");

    let nodes = Gauges::default();
    let alive = status.nodes.iter().filter(|n| n.alive).count();
    let left = status
        .nodes
        .iter()
        .filter(|n| !n.alive && n.draining)
        .count();
    for (state, n) in [
        ("alive", alive),
        ("left", left),
        ("dead", status.nodes.len() - alive - left),
    ] {
        nodes
            .get_or_create(&labels(&[("state", state)]))
            .set(n as f64);
    }
    r.register(
        "nodes",
        "Nodes the head knows, by state (left: drained and gone)",
        nodes,
    );

    let (cpus, gpus, memory) = (Gauges::default(), Gauges::default(), Gauges::default());
    let node_gauges: Vec<Gauges> = (0..5).map(|_| Gauges::default()).collect();
    let spilled_total = Family::<Labels, Counter>::default();
    for n in status.nodes.iter().filter(|n| n.alive) {
        let id = n.node_id.as_str();
        for (kind, res) in [("total", &n.total), ("available", &n.available)] {
            let res: Resources = res.clone().into();
            let l = labels(&[("node", id), ("kind", kind)]);
            cpus.get_or_create(&l).set(res.num_cpus);
            gpus.get_or_create(&l).set(res.num_gpus);
            memory.get_or_create(&l).set(res.memory as f64);
        }
        let l = labels(&[("node", id)]);
        for (g, v) in node_gauges.iter().zip([
            n.object_store_bytes,
            n.object_store_memory,
            n.spilled_bytes,
            u64::from(n.workers),
            u64::from(n.running_tasks),
        ]) {
            g.get_or_create(&l).set(v as f64);
        }
        spilled_total.get_or_create(&l).inc_by(n.spilled_total);
    }
    r.register("node_cpus", "CPUs of a live node", cpus);
    r.register("node_gpus", "GPUs of a live node", gpus);
    r.register("node_memory_bytes", "Memory of a live node", memory);
    let mut node_gauges = node_gauges.into_iter();
    for (name, help) in [
        (
            "node_object_store_bytes",
            "Bytes of objects a node's store keeps in memory",
        ),
        (
            "node_object_store_limit_bytes",
            "Bytes a node's store keeps in memory before spilling",
        ),
        (
            "node_object_store_disk_bytes",
            "Bytes of objects a node's store holds on disk",
        ),
        ("node_workers", "Worker processes of a node"),
        ("node_running_tasks", "Tasks running on a node"),
    ] {
        r.register(name, help, node_gauges.next().expect("one gauge per name"));
    }
    r.register(
        "node_spilled_bytes",
        "Bytes a node's store ever spilled to disk",
        spilled_total,
    );

    let t = Gauges::default();
    t.get_or_create(&labels(&[("state", "pending")]))
        .set(f64::from(status.pending_tasks));
    t.get_or_create(&labels(&[("state", "running")]))
        .set(f64::from(status.running_tasks));
    r.register("tasks", "Tasks waiting for room or running", t);
    r.register(
        "tasks_ended",
        "Task attempts that ended, by how",
        tasks.ended.clone(),
    );
    r.register(
        "task_duration_seconds",
        "Seconds from a task being sent to a node to its report (tasks that succeeded)",
        tasks.duration.clone(),
    );

    let by_state = Gauges::default();
    for state in ["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"] {
        let n = jobs.iter().filter(|j| j.state == state).count();
        by_state
            .get_or_create(&labels(&[("state", state)]))
            .set(n as f64);
    }
    r.register("jobs", "Jobs, by state", by_state);
    let waiting = Gauges::default();
    for (kind, n) in waits {
        waiting
            .get_or_create(&labels(&[("reason", kind)]))
            .set(*n as f64);
    }
    r.register(
        "jobs_waiting",
        "Jobs not ended that wait: for a node to take work (node), for room on one (room), \
         or for a node bigger than any there is, as some of their work asks more than any \
         node has (beyond_nodes)",
        waiting,
    );

    let objects = Gauge::<f64, AtomicU64>::default();
    objects.set(f64::from(status.objects));
    r.register("objects", "Objects the head's directory holds", objects);

    let cached = Gauge::<f64, AtomicU64>::default();
    cached.set(packages.cached as f64);
    r.register(
        "package_cache_bytes",
        "Bytes of job files the head keeps (once per content digest)",
        cached,
    );
    let received = Counter::<u64>::default();
    received.inc_by(packages.received);
    r.register(
        "package_received_bytes",
        "Bytes of job files uploaded to the head (files it had already are not sent)",
        received,
    );

    // Running Dataset executions, per operator (`0 ReadParquet->Filter`: its place
    // from the source, so that two operators of the same name stay apart).
    let operator_gauges: Vec<Gauges> = (0..7).map(|_| Gauges::default()).collect();
    for e in executions {
        for (i, o) in e.operators.iter().enumerate() {
            let name = format!("{i} {}", o.name);
            let l = labels(&[
                ("job", e.job_id.as_str()),
                ("execution", e.execution_id.as_str()),
                ("operator", name.as_str()),
            ]);
            for (g, v) in operator_gauges.iter().zip([
                o.rows,
                o.bytes,
                o.tasks_done,
                o.tasks_running,
                o.tasks_total,
                o.queued_bytes,
                o.spilled_bytes,
            ]) {
                g.get_or_create(&l).set(v as f64);
            }
        }
    }
    let mut operator_gauges = operator_gauges.into_iter();
    for (name, help) in [
        (
            "operator_rows",
            "Rows an operator of a running execution produced",
        ),
        (
            "operator_bytes",
            "Bytes an operator of a running execution produced",
        ),
        ("operator_tasks_done", "Tasks of an operator that finished"),
        ("operator_tasks_running", "Tasks of an operator that run"),
        ("operator_tasks", "Tasks of an operator known so far"),
        (
            "operator_queued_bytes",
            "Bytes waiting in an operator's output queue",
        ),
        (
            "operator_spilled_bytes",
            "Bytes an operator wrote to spill files",
        ),
    ] {
        r.register(
            name,
            help,
            operator_gauges.next().expect("one gauge per name"),
        );
    }

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

/// What a node agent shows on its own `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct AgentFigures {
    pub node_id: String,
    pub object_store_bytes: u64,
    pub object_store_limit: u64,
    pub object_store_disk_bytes: u64,
    pub spilled_total: u64,
    pub workers: u64,
    pub running_tasks: u64,
    pub queued_tasks: u64,
    pub package_cache_bytes: u64,
    pub package_fetched_bytes: u64,
}

/// A node agent's metrics in Prometheus' text format, each labelled with its node.
pub(crate) fn render_agent(f: &AgentFigures) -> String {
    let mut r = Registry::with_prefix("volley_agent");
    let l = labels(&[("node", f.node_id.as_str())]);
    for (name, help, v) in [
        (
            "object_store_bytes",
            "Bytes of objects its store keeps in memory",
            f.object_store_bytes,
        ),
        (
            "object_store_limit_bytes",
            "Bytes its store keeps in memory before spilling",
            f.object_store_limit,
        ),
        (
            "object_store_disk_bytes",
            "Bytes of objects its store holds on disk",
            f.object_store_disk_bytes,
        ),
        ("workers", "Its worker processes", f.workers),
        ("running_tasks", "Tasks its workers run", f.running_tasks),
        (
            "queued_tasks",
            "Tasks waiting here for a worker",
            f.queued_tasks,
        ),
        (
            "package_cache_bytes",
            "Bytes of job files in this machine's cache",
            f.package_cache_bytes,
        ),
    ] {
        let g = Gauges::default();
        g.get_or_create(&l).set(v as f64);
        r.register(name, help, g);
    }
    for (name, help, v) in [
        (
            "spilled_bytes",
            "Bytes its store ever spilled to disk",
            f.spilled_total,
        ),
        (
            "package_fetched_bytes",
            "Bytes of job files it fetched from the head",
            f.package_fetched_bytes,
        ),
    ] {
        let c = Family::<Labels, Counter>::default();
        c.get_or_create(&l).inc_by(v);
        r.register(name, help, c);
    }
    let mut out = String::new();
    let _ = encode(&mut out, &r);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_nodes_tasks_and_jobs() {
        let node = |id: &str, alive: bool| proto::NodeInfo {
            node_id: id.into(),
            alive,
            total: Some((&Resources::cpus(4.0).with_memory(1 << 30)).into()),
            available: Some((&Resources::cpus(1.5)).into()),
            object_store_bytes: 100,
            object_store_memory: 1 << 20,
            spilled_total: 7,
            ..Default::default()
        };
        let status = proto::ClusterStatus {
            nodes: vec![node("node-1", true), node("node-2", false)],
            pending_tasks: 3,
            running_tasks: 2,
            running_jobs: 1,
            objects: 9,
        };
        let jobs = vec![proto::JobInfo {
            state: "RUNNING".into(),
            ..Default::default()
        }];
        let tasks = TaskMetrics::default();
        tasks.ended(TaskEnd::Succeeded, Some(0.25));
        tasks.ended(TaskEnd::Retried, None);
        let waits = [("node", 0), ("room", 2), ("beyond_nodes", 1)];
        let text = render(
            &status,
            &jobs,
            &waits,
            &tasks,
            &PackageFigures::default(),
            &[],
        );
        for line in [
            "volley_nodes{state=\"alive\"} 1",
            "volley_nodes{state=\"dead\"} 1",
            "volley_node_cpus{node=\"node-1\",kind=\"total\"} 4",
            "volley_node_cpus{node=\"node-1\",kind=\"available\"} 1.5",
            "volley_node_object_store_limit_bytes{node=\"node-1\"} 1048576",
            "volley_node_spilled_bytes_total{node=\"node-1\"} 7",
            "volley_tasks{state=\"pending\"} 3",
            "volley_tasks_ended_total{outcome=\"succeeded\"} 1",
            "volley_tasks_ended_total{outcome=\"retried\"} 1",
            // Every outcome's series exists from the start.
            "volley_tasks_ended_total{outcome=\"failed\"} 0",
            "volley_tasks_ended_total{outcome=\"cancelled\"} 0",
            "volley_task_duration_seconds_count 1",
            "volley_jobs{state=\"RUNNING\"} 1",
            "volley_jobs_waiting{reason=\"node\"} 0",
            "volley_jobs_waiting{reason=\"room\"} 2",
            "volley_jobs_waiting{reason=\"beyond_nodes\"} 1",
            "volley_objects 9",
            "# EOF",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("node-2\""), "dead nodes have no resources");
    }
}
