//! Watches the cluster objects an execution is waiting for (the results of its stage
//! tasks and actor calls) and hands each to its operator as soon as it is made or
//! failed.
//!
//! One thread per execution asks the head about every pending object at once (a long
//! poll that returns as soon as one is ready), so an execution with many tasks in flight
//! costs one request per completion round, not one thread per task.
//!
//! Each object is watched for an operator ([`OpWatch`]): an operator that stops before
//! its work is done (its output is no longer read: a `limit` reached, the execution
//! stopped or failed) has the tasks still making its objects cancelled
//! ([`Watch::cancel`]), instead of waiting for them to finish for no one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use volley_common::{Result, VolleyError};
use volley_runtime::cluster::{Cluster, ObjectMeta, ObjectRef, ObjectState};

/// What to do with an object once it is made (its metadata) or failed.
pub(crate) type OnDone = Box<dyn FnOnce(Result<ObjectMeta>) + Send>;

pub(crate) struct Watch {
    cluster: Cluster,
    /// Each object with the operator it is watched for (its key) and what to do.
    pending: Mutex<Vec<(ObjectRef, usize, OnDone)>>,
    added: Condvar,
    stopped: AtomicBool,
}

/// The watch, as one operator adds to it.
pub(crate) struct OpWatch {
    pub(crate) watch: Arc<Watch>,
    /// The operator's key (unique within the execution).
    pub(crate) op: usize,
}

impl OpWatch {
    /// Calls `done` once `object` is made or failed.
    pub(crate) fn add(&self, object: ObjectRef, done: OnDone) {
        self.watch
            .pending
            .lock()
            .expect("watch lock")
            .push((object, self.op, done));
        self.watch.added.notify_all();
    }
}

impl Watch {
    /// Starts the watching thread.
    pub(crate) fn start(cluster: Cluster) -> Result<Arc<Watch>> {
        let watch = Arc::new(Watch {
            cluster,
            pending: Mutex::new(Vec::new()),
            added: Condvar::new(),
            stopped: AtomicBool::new(false),
        });
        let w = Arc::clone(&watch);
        std::thread::Builder::new()
            .name("volley-watch".into())
            .spawn(move || w.run())
            .map_err(|e| VolleyError::internal(format!("cannot start a thread: {e}")))?;
        Ok(watch)
    }

    /// Stops the tasks still making operator `op`'s objects (actor calls go on): each
    /// then fails as cancelled, and its `done` hears so.
    pub(crate) fn cancel(&self, op: usize) {
        let objects: Vec<ObjectRef> = self
            .pending
            .lock()
            .expect("watch lock")
            .iter()
            .filter(|(_, o, _)| *o == op)
            .map(|(r, _, _)| r.clone())
            .collect();
        if objects.is_empty() {
            return;
        }
        if let Err(e) = self.cluster.cancel(&objects.iter().collect::<Vec<_>>()) {
            // They run to their end instead.
            tracing::warn!("cannot cancel {} tasks: {e}", objects.len());
        }
    }

    /// Stops the thread; what is still pending is dropped (its objects are freed).
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.added.notify_all();
    }

    fn run(self: Arc<Self>) {
        while !self.stopped.load(Ordering::Acquire) {
            let refs: Vec<ObjectRef> = {
                let pending = self.pending.lock().expect("watch lock");
                if pending.is_empty() {
                    let _unused = self.added.wait_timeout(pending, Duration::from_millis(100));
                    continue;
                }
                pending.iter().map(|(r, _, _)| r.clone()).collect()
            };
            let states = match self
                .cluster
                .wait_objects(&refs, 1, Duration::from_millis(50))
            {
                Ok(s) => s,
                Err(e) => {
                    // The head cannot be asked: everything pending fails with why.
                    let all = std::mem::take(&mut *self.pending.lock().expect("watch lock"));
                    for (_, _, done) in all {
                        done(Err(VolleyError::execution(e.to_string())));
                    }
                    continue;
                }
            };
            let mut finished = Vec::new();
            for (r, state) in refs.iter().zip(states) {
                match state {
                    ObjectState::Pending => {}
                    ObjectState::Ready(meta) => finished.push((r.id().to_string(), Ok(meta))),
                    ObjectState::Failed(e) => finished.push((r.id().to_string(), Err(e))),
                }
            }
            if finished.is_empty() {
                continue;
            }
            let mut calls = Vec::new();
            {
                let mut pending = self.pending.lock().expect("watch lock");
                for (id, result) in finished {
                    if let Some(i) = pending.iter().position(|(r, _, _)| r.id() == id) {
                        let (_, _, done) = pending.swap_remove(i);
                        calls.push((done, result));
                    }
                }
            }
            for (done, result) in calls {
                // A callback that panics drops the work it held (which ends the
                // execution with an error); the other callbacks still run.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| done(result)));
            }
        }
        self.pending.lock().expect("watch lock").clear();
    }
}
