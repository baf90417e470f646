//! The local backend: tasks on threads of this process.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use volley_common::{Result, RuntimeOptions, VolleyError};

use crate::{machine_memory, ResourceRequest, Runtime, Task, TaskHandle, TaskSpec};

/// Runs tasks on threads of this process, holding each task's CPUs and memory while it
/// runs. Sized to the machine unless [`RuntimeOptions`] say otherwise.
///
/// Each task gets its own thread: tasks are coarse (a file split, a bundle of blocks,
/// an actor's lifetime), so a thread start is noise, and a blocked task (waiting for
/// downstream room) never holds up another.
pub struct LocalRuntime {
    total: ResourceRequest,
    used: Arc<Mutex<ResourceRequest>>,
    io: tokio::runtime::Runtime,
    /// Whether the system refused the last thread asked for (said once per refusal).
    refused_thread: AtomicBool,
}

impl fmt::Debug for LocalRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalRuntime")
            .field("total", &self.total)
            .field("available", &self.available())
            .finish()
    }
}

impl LocalRuntime {
    /// A runtime with the resources `options` give, defaulting to the whole machine.
    pub fn try_new(options: &RuntimeOptions) -> Result<Arc<Self>> {
        let cpus = options.num_cpus.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1) as f64
        });
        let memory = options.memory.unwrap_or_else(machine_memory);
        let io = tokio::runtime::Builder::new_multi_thread()
            .worker_threads((cpus.ceil() as usize).max(2))
            .thread_name("volley-io")
            .enable_all()
            .build()
            .map_err(|e| VolleyError::internal(format!("cannot start the I/O runtime: {e}")))?;
        Ok(Arc::new(Self {
            total: ResourceRequest {
                num_cpus: cpus,
                memory,
            },
            used: Arc::new(Mutex::new(ResourceRequest::default())),
            io,
            refused_thread: AtomicBool::new(false),
        }))
    }
}

/// Gives a task's resources back when the task ends, also by panic.
struct Release {
    used: Arc<Mutex<ResourceRequest>>,
    request: ResourceRequest,
}

impl Drop for Release {
    fn drop(&mut self) {
        let mut used = self.used.lock().expect("runtime lock");
        used.num_cpus = (used.num_cpus - self.request.num_cpus).max(0.0);
        used.memory = used.memory.saturating_sub(self.request.memory);
    }
}

impl Runtime for LocalRuntime {
    fn total(&self) -> ResourceRequest {
        self.total
    }

    fn available(&self) -> ResourceRequest {
        let used = self.used.lock().expect("runtime lock");
        ResourceRequest {
            num_cpus: (self.total.num_cpus - used.num_cpus).max(0.0),
            memory: self.total.memory.saturating_sub(used.memory),
        }
    }

    fn try_spawn(&self, spec: TaskSpec, task: Task) -> std::result::Result<TaskHandle, Task> {
        {
            let mut used = self.used.lock().expect("runtime lock");
            let free = ResourceRequest {
                num_cpus: self.total.num_cpus - used.num_cpus,
                memory: self.total.memory.saturating_sub(used.memory),
            };
            if !spec.resources.fits_in(&free) {
                return Err(task);
            }
            used.num_cpus += spec.resources.num_cpus;
            used.memory += spec.resources.memory;
        }
        let release = Release {
            used: Arc::clone(&self.used),
            request: spec.resources,
        };
        // Where the system refuses a thread (too many), the task is handed back as one
        // that does not fit now: it starts once running tasks end.
        let slot = Arc::new(Mutex::new(Some(task)));
        let started = Arc::clone(&slot);
        let spawned = std::thread::Builder::new()
            .name(format!("volley:{}", spec.name))
            .spawn(move || {
                let _release = release;
                let task = started.lock().expect("task slot lock").take();
                if let Some(task) = task {
                    task();
                }
            });
        match spawned {
            Ok(inner) => {
                if self.refused_thread.load(Ordering::Relaxed) {
                    self.refused_thread.store(false, Ordering::Relaxed);
                }
                Ok(TaskHandle { inner })
            }
            Err(e) => {
                if !self.refused_thread.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "the system refused a thread for {} ({e}): tasks wait for running \
                         ones to end",
                        spec.name
                    );
                }
                let task = slot.lock().expect("task slot lock").take();
                Err(task.expect("a thread that did not start took its task"))
            }
        }
    }

    fn io_handle(&self) -> tokio::runtime::Handle {
        self.io.handle().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn accounts_cpus() {
        let rt = LocalRuntime::try_new(&RuntimeOptions {
            num_cpus: Some(2.0),
            memory: Some(1 << 30),
        })
        .unwrap();
        let (tx, rx) = mpsc::channel::<()>();
        let (tx2, rx2) = mpsc::channel::<()>();
        let h1 = rt
            .try_spawn(
                TaskSpec::new("a", ResourceRequest::cpus(1.5)),
                Box::new(move || {
                    rx.recv().unwrap();
                }),
            )
            .ok()
            .expect("fits");
        assert!((rt.available().num_cpus - 0.5).abs() < 1e-9);
        // 1.0 CPU does not fit next to 1.5 of 2.
        assert!(rt
            .try_spawn(
                TaskSpec::new("b", ResourceRequest::cpus(1.0)),
                Box::new(|| {})
            )
            .is_err());
        let h2 = rt
            .try_spawn(
                TaskSpec::new("c", ResourceRequest::cpus(0.5)),
                Box::new(move || {
                    tx2.send(()).unwrap();
                }),
            )
            .ok()
            .expect("fits");
        rx2.recv().unwrap();
        assert!(h2.join());
        tx.send(()).unwrap();
        assert!(h1.join());
        assert!((rt.available().num_cpus - 2.0).abs() < 1e-9);
    }

    #[test]
    fn panicking_task_releases() {
        let rt = LocalRuntime::try_new(&RuntimeOptions {
            num_cpus: Some(1.0),
            memory: None,
        })
        .unwrap();
        let h = rt
            .try_spawn(
                TaskSpec::new("boom", ResourceRequest::cpus(1.0)),
                Box::new(|| panic!("boom")),
            )
            .ok()
            .expect("fits");
        assert!(!h.join());
        assert!((rt.available().num_cpus - 1.0).abs() < 1e-9);
    }
}
