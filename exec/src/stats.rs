//! Per-operator statistics of an execution.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use volley_common::format_bytes;

/// Live counters of one operator, updated by its tasks.
#[derive(Debug, Default)]
pub(crate) struct OpCounters {
    pub tasks_started: AtomicUsize,
    pub tasks_done: AtomicUsize,
    pub tasks_total: AtomicUsize,
    pub rows_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub cpu_nanos: AtomicU64,
    pub first_start: Mutex<Option<Instant>>,
    pub last_end: Mutex<Option<Instant>>,
    /// An actor pool's size after each change.
    pub pool_sizes: Mutex<Vec<usize>>,
}

impl OpCounters {
    pub fn task_started(&self) {
        self.tasks_started.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_start.lock().expect("stats lock");
        if first.is_none() {
            *first = Some(Instant::now());
        }
    }

    pub fn task_done(&self, cpu: Duration) {
        self.tasks_done.fetch_add(1, Ordering::Relaxed);
        self.cpu_nanos
            .fetch_add(cpu.as_nanos() as u64, Ordering::Relaxed);
        *self.last_end.lock().expect("stats lock") = Some(Instant::now());
    }

    /// Records an actor pool's size (when it changed).
    pub fn pool_size(&self, n: usize) {
        let mut sizes = self.pool_sizes.lock().expect("stats lock");
        if sizes.last() != Some(&n) {
            sizes.push(n);
        }
    }

    pub fn output(&self, rows: usize, bytes: usize) {
        self.rows_out.fetch_add(rows as u64, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self, name: &str, peak_memory: u64, spilled_bytes: u64) -> OperatorStats {
        let first = *self.first_start.lock().expect("stats lock");
        let last = *self.last_end.lock().expect("stats lock");
        let wall = match (first, last) {
            (Some(f), Some(l)) if l > f => l - f,
            (Some(f), _) => f.elapsed(),
            _ => Duration::ZERO,
        };
        OperatorStats {
            name: name.to_string(),
            tasks: self.tasks_done.load(Ordering::Relaxed),
            rows_out: self.rows_out.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            wall,
            cpu: Duration::from_nanos(self.cpu_nanos.load(Ordering::Relaxed)),
            peak_memory,
            spilled_bytes,
            pool_sizes: self.pool_sizes.lock().expect("stats lock").clone(),
        }
    }
}

/// What one operator did.
#[derive(Debug, Clone)]
pub struct OperatorStats {
    /// Operator name, with its fused steps (`ReadParquet->Filter->Project`).
    pub name: String,
    /// Tasks run.
    pub tasks: usize,
    /// Rows produced.
    pub rows_out: u64,
    /// Bytes produced (Arrow memory size).
    pub bytes_out: u64,
    /// From its first task's start to its last task's end.
    pub wall: Duration,
    /// CPU time of its tasks' threads.
    pub cpu: Duration,
    /// The most bytes its output queue held at once.
    pub peak_memory: u64,
    /// Bytes its operators wrote to spill files (sorts, aggregations, shuffles).
    pub spilled_bytes: u64,
    /// For an actor pool on a cluster: its size after each change (`[2, 3, 4, 2]`:
    /// started with 2, grew to 4, shrank to 2); empty for other operators.
    pub pool_sizes: Vec<usize>,
}

/// What an execution did.
#[derive(Debug, Clone, Default)]
pub struct ExecutionStats {
    /// Per operator, from the source to the output.
    pub operators: Vec<OperatorStats>,
    /// Wall time of the whole execution.
    pub wall: Duration,
    /// The most bytes buffered at once across all operators.
    pub peak_memory: u64,
    /// The memory budget.
    pub memory_limit: u64,
    /// On a cluster, `(peak, budget)`: the most bytes the execution held in the nodes'
    /// object stores at once (blocks it referenced, and room held for running work's
    /// output) and its object-store budget; `None` off a cluster.
    pub object_store: Option<(u64, u64)>,
}

impl fmt::Display for OperatorStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} tasks, {} rows, {}, wall {:.3}s, cpu {:.3}s, peak memory {}{}",
            self.name,
            self.tasks,
            self.rows_out,
            format_bytes(self.bytes_out),
            self.wall.as_secs_f64(),
            self.cpu.as_secs_f64(),
            format_bytes(self.peak_memory),
            if self.spilled_bytes > 0 {
                format!(", spilled {}", format_bytes(self.spilled_bytes))
            } else {
                String::new()
            }
        )?;
        if !self.pool_sizes.is_empty() {
            let sizes: Vec<String> = self.pool_sizes.iter().map(|n| n.to_string()).collect();
            write!(f, ", actors {}", sizes.join("->"))?;
        }
        Ok(())
    }
}

impl ExecutionStats {
    /// Bytes spilled to disk by all operators.
    pub fn spilled_bytes(&self) -> u64 {
        self.operators.iter().map(|o| o.spilled_bytes).sum()
    }
}

impl fmt::Display for ExecutionStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for op in &self.operators {
            writeln!(f, "{op}")?;
        }
        write!(
            f,
            "total: wall {:.3}s, peak memory {} of {} budget, spilled {}",
            self.wall.as_secs_f64(),
            format_bytes(self.peak_memory),
            format_bytes(self.memory_limit),
            format_bytes(self.spilled_bytes())
        )?;
        if let Some((peak, limit)) = self.object_store {
            write!(
                f,
                ", object stores: peak {} of {} budget",
                format_bytes(peak),
                format_bytes(limit)
            )?;
        }
        Ok(())
    }
}
