//! The runtime: where volley's tasks run and what they may use.
//!
//! A *task* is a function that runs to completion on some worker with the resources it
//! declared ([`ResourceRequest`]: CPUs and memory). The executor decides *what* to run
//! next; the [`Runtime`] decides *whether it fits now* and runs it. This issue's backend
//! is [`LocalRuntime`], a pool of threads on this machine sized to its CPUs; the cluster
//! backend implements the same trait over worker processes.
//!
//! ```text
//!   StreamingExecutor ──try_spawn(spec, task)──▶ Runtime ──▶ worker thread / process
//!         ▲                                          │
//!         └──────────── task finishes, resources released ◀─┘
//! ```
//!
//! [`MemoryBudget`] is the other half: every block an execution buffers holds a
//! [`MemoryReservation`] against one budget, so memory is a number that is checked, not a
//! hope.

pub mod cluster;
mod local;
mod memory;
mod resources;

use std::fmt::Debug;

pub use local::LocalRuntime;
pub use memory::{MemoryBudget, MemoryReservation};
pub use resources::{machine_memory, ResourceRequest};

/// A unit of work handed to a [`Runtime`].
pub type Task = Box<dyn FnOnce() + Send + 'static>;

/// What a task needs and what to call it.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    /// A name for logs and thread names, e.g. `ReadParquet[3]`.
    pub name: String,
    /// Resources held while the task runs.
    pub resources: ResourceRequest,
}

impl TaskSpec {
    /// A task named `name` that needs `resources`.
    pub fn new(name: impl Into<String>, resources: ResourceRequest) -> Self {
        Self {
            name: name.into(),
            resources,
        }
    }
}

/// The scheduler backend contract.
///
/// Implementations account the resources of every running task and only start a task
/// whose request fits in what is free. They never queue: a task that does not fit is
/// handed back, and the caller (the executor, which knows priorities and backpressure)
/// tries again later.
pub trait Runtime: Send + Sync + Debug {
    /// Everything this runtime has.
    fn total(&self) -> ResourceRequest;
    /// What is free now.
    fn available(&self) -> ResourceRequest;
    /// Whether `request` could ever fit (it is not larger than [`total`](Runtime::total)).
    fn could_fit(&self, request: &ResourceRequest) -> bool {
        request.fits_in(&self.total())
    }
    /// Starts `task` now if its resources are free; otherwise returns it unchanged.
    /// The resources are released when the task returns or panics.
    fn try_spawn(&self, spec: TaskSpec, task: Task) -> Result<TaskHandle, Task>;
    /// The asynchronous I/O runtime that object-store reads and writes run on.
    fn io_handle(&self) -> tokio::runtime::Handle;
}

/// A started task.
#[derive(Debug)]
pub struct TaskHandle {
    inner: std::thread::JoinHandle<()>,
}

impl TaskHandle {
    /// Whether the task has returned.
    pub fn is_finished(&self) -> bool {
        self.inner.is_finished()
    }

    /// Waits for the task. Returns `false` if it panicked.
    pub fn join(self) -> bool {
        self.inner.join().is_ok()
    }
}
