//! Watches the cluster objects an execution is waiting for (the results of its stage
//! tasks and actor calls) and hands each to its operator as soon as it is made or
//! failed.
//!
//! One thread per execution asks the head about every pending object at once (a long
//! poll that returns as soon as one is ready), so an execution with many tasks in flight
//! costs one request per completion round, not one thread per task.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use volley_common::{Result, VolleyError};
use volley_runtime::cluster::{Cluster, ObjectMeta, ObjectRef, ObjectState};

/// What to do with an object once it is made (its metadata) or failed.
pub(crate) type OnDone = Box<dyn FnOnce(Result<ObjectMeta>) + Send>;

pub(crate) struct Watch {
    cluster: Cluster,
    pending: Mutex<Vec<(ObjectRef, OnDone)>>,
    added: Condvar,
    stopped: AtomicBool,
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

    /// Calls `done` once `object` is made or failed.
    pub(crate) fn add(&self, object: ObjectRef, done: OnDone) {
        self.pending
            .lock()
            .expect("watch lock")
            .push((object, done));
        self.added.notify_all();
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
                pending.iter().map(|(r, _)| r.clone()).collect()
            };
            let states = match self
                .cluster
                .wait_objects(&refs, 1, Duration::from_millis(50))
            {
                Ok(s) => s,
                Err(e) => {
                    // The head cannot be asked: everything pending fails with why.
                    let all = std::mem::take(&mut *self.pending.lock().expect("watch lock"));
                    for (_, done) in all {
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
                    if let Some(i) = pending.iter().position(|(r, _)| r.id() == id) {
                        let (_, done) = pending.swap_remove(i);
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
