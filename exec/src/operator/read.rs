//! Reads a source: one task per read task (a file split, a partition of a plan), with
//! the fused row-local steps applied inside each task.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::StreamExt;
use volley_common::VolleyError;
use volley_connectors::ReadTask;
use volley_runtime::ResourceRequest;

use super::{Operator, StepContext, TaskBody};
use crate::driver::ExecShared;

pub(crate) struct ReadOp {
    /// Read tasks not started yet, with their sequence numbers.
    pending: VecDeque<(u64, ReadTask)>,
    resources: ResourceRequest,
    body: TaskBody,
}

impl ReadOp {
    pub(crate) fn new(
        tasks: Vec<ReadTask>,
        first_seq: u64,
        resources: ResourceRequest,
        body: TaskBody,
    ) -> Self {
        let pending = tasks
            .into_iter()
            .enumerate()
            .map(|(i, t)| (first_seq + i as u64, t))
            .collect();
        Self {
            pending,
            resources,
            body,
        }
    }
}

/// Opens `task` and runs its batches through `body`.
fn run_read(
    body: &TaskBody,
    shared: &ExecShared,
    task: &ReadTask,
    seq: u64,
) -> volley_common::Result<()> {
    // Opening may start DataFusion's own tasks (repartition, joins): on the I/O runtime.
    let mut stream = {
        let _runtime = shared.io.enter();
        task.open(Arc::clone(&shared.task_ctx))?
    };
    let batches = std::iter::from_fn(|| {
        shared.io.block_on(stream.next()).map(|r| {
            r.map_err(|e| {
                let e = VolleyError::from(e);
                if task.names_its_errors() {
                    e
                } else {
                    e.context(format!("reading {}", task.label))
                }
            })
        })
    });
    body.run(seq, batches)
}

impl Operator for ReadOp {
    fn step(&mut self, cx: &mut StepContext<'_>) -> bool {
        if cx.stopping {
            self.pending.clear();
        }
        while cx.room && cx.running() < cx.max_tasks {
            let Some((seq, task)) = self.pending.pop_front() else {
                break;
            };
            cx.out.register(seq);
            let (body, shared, t) = (self.body.clone(), Arc::clone(cx.shared), task.clone());
            let started = cx.spawn(cx.name.to_string(), self.resources, move || {
                // A panic in a source or decoder names the file it read.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_read(&body, &shared, &t, seq)
                }))
                .unwrap_or_else(|panic| {
                    Err(VolleyError::internal(format!(
                        "reading {}: {}",
                        t.label,
                        crate::transform::panic_text(panic.as_ref())
                    )))
                });
                body.out.finish_seq(seq);
                r
            });
            if !started {
                self.pending.push_front((seq, task));
                break;
            }
        }
        self.pending.is_empty()
    }
}
