//! Options of Dataset operations. They live below [`Dataset`](crate::Dataset) (the
//! logical plan and the runners use them without depending on the API type).

use std::collections::BTreeMap;
use std::fmt;

/// How many workers a stateful stage runs: a fixed number, or a range the pool moves in
/// (it grows while blocks wait for a free worker and every worker is busy, and lets idle
/// workers go down to the minimum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    /// Exactly this many.
    Fixed(usize),
    /// Between `min` (started at once) and `max`.
    Range {
        /// At least (and at the start).
        min: usize,
        /// At most.
        max: usize,
    },
}

impl Concurrency {
    /// `(min, max)`.
    pub fn bounds(&self) -> (usize, usize) {
        match *self {
            Concurrency::Fixed(n) => (n, n),
            Concurrency::Range { min, max } => (min, max),
        }
    }
}

/// Options of `map_batches` and `map_batches_stateful`: rows per call, what each task or
/// worker holds, and how many run.
#[derive(Debug, Clone)]
pub struct MapOptions {
    /// Rows per call (the last call of a task may get fewer); `None` passes blocks as
    /// they come.
    pub batch_size: Option<usize>,
    /// CPUs each task (or worker) holds.
    pub num_cpus: f64,
    /// GPUs each task or worker holds; below 1 several share a GPU. A worker holding
    /// GPUs sees them as its only devices (`CUDA_VISIBLE_DEVICES`). Only a cluster has
    /// GPUs to give.
    pub num_gpus: f64,
    /// Bytes of memory each task or worker reserves (on a cluster: accounted, not
    /// enforced).
    pub memory: u64,
    /// Custom resources each task or worker holds (a cluster node's `--resource`).
    pub custom: BTreeMap<String, f64>,
    /// Tasks at once (stateless) or workers (stateful); `None`: as many as fit
    /// (stateless), 1 (stateful).
    pub concurrency: Option<Concurrency>,
    /// Blocks a stateful worker on a cluster holds at once (the next ones arrive while
    /// it works on the current one).
    pub max_calls_in_flight: usize,
}

impl Default for MapOptions {
    fn default() -> Self {
        Self {
            batch_size: None,
            num_cpus: 1.0,
            num_gpus: 0.0,
            memory: 0,
            custom: BTreeMap::new(),
            concurrency: None,
            max_calls_in_flight: 2,
        }
    }
}

impl MapOptions {
    /// Rows per call.
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = Some(n.max(1));
        self
    }
    /// CPUs per task or worker.
    pub fn with_num_cpus(mut self, n: f64) -> Self {
        self.num_cpus = n;
        self
    }
    /// GPUs per task or worker (fractions share a GPU).
    pub fn with_num_gpus(mut self, n: f64) -> Self {
        self.num_gpus = n;
        self
    }
    /// Memory per task or worker.
    pub fn with_memory(mut self, bytes: u64) -> Self {
        self.memory = bytes;
        self
    }
    /// A custom resource per task or worker.
    pub fn with_resource(mut self, name: impl Into<String>, amount: f64) -> Self {
        self.custom.insert(name.into(), amount);
        self
    }
    /// Exactly `n` tasks or workers at once.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = Some(Concurrency::Fixed(n.max(1)));
        self
    }
    /// Between `min` and `max` workers (a stateful stage's pool scales in this range).
    pub fn with_concurrency_range(mut self, min: usize, max: usize) -> Self {
        let min = min.max(1);
        self.concurrency = Some(Concurrency::Range {
            min,
            max: max.max(min),
        });
        self
    }
    /// Blocks a stateful worker on a cluster holds at once.
    pub fn with_max_calls_in_flight(mut self, n: usize) -> Self {
        self.max_calls_in_flight = n.max(1);
        self
    }

    /// Whether it asks for more than CPUs and memory (what only a cluster gives).
    pub(crate) fn wants_cluster_resources(&self) -> bool {
        self.num_gpus > 0.0 || !self.custom.is_empty()
    }
}

impl fmt::Display for MapOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "(cpus={}", self.num_cpus)?;
        if self.num_gpus > 0.0 {
            write!(f, ", gpus={}", self.num_gpus)?;
        }
        if self.memory > 0 {
            write!(f, ", memory={}", volley_common::format_bytes(self.memory))?;
        }
        for (k, v) in &self.custom {
            write!(f, ", {k}={v}")?;
        }
        if let Some(b) = self.batch_size {
            write!(f, ", batch_size={b}")?;
        }
        match self.concurrency {
            Some(Concurrency::Fixed(c)) => write!(f, ", concurrency={c}")?,
            Some(Concurrency::Range { min, max }) => write!(f, ", concurrency={min}..{max}")?,
            None => {}
        }
        write!(f, ")")
    }
}

/// Options of [`Dataset::iter_batches_with`](crate::Dataset::iter_batches_with).
#[derive(Debug, Clone, Default)]
pub struct IterOptions {
    /// Rows per batch (the last may have fewer); `None` yields blocks as they come.
    pub batch_size: Option<usize>,
    /// Batches a background thread prepares ahead of the consumer (0: none).
    pub prefetch: usize,
}
