//! Rows of blocks already in the cluster (a part of a split): whole blocks go on as
//! they are, where they are; a block the part cuts is sliced by a task on a node that
//! holds it.
//!
//! The pieces are made on a thread of their own the first time the operator steps (a
//! split runs its input then, once for all its parts), so that planning and `explain`
//! run nothing; an execution that stops tells that thread to stop too. Pieces are
//! handed on as the object-store budget has room for them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use volley_common::{Result, VolleyError};
use volley_runtime::cluster::{Cluster, Resources, TaskInput, TaskOptions};

use super::cluster_read::task_result;
use super::{Expected, Operator, OutputEstimate, StepContext};
use crate::plan::{ClusterRows, RowsPiece};
use crate::queue::{Block, RemoteBlock};

/// What the thread making the pieces left.
type Made = Arc<Mutex<Option<Result<Vec<RowsPiece>>>>>;

pub(crate) struct ClusterRowsOp {
    cluster: Cluster,
    rows: Arc<dyn ClusterRows>,
    made: Made,
    cancel: Arc<AtomicBool>,
    started: bool,
    /// The pieces not handed on yet, with their sequence numbers.
    pending: Option<VecDeque<(u64, RowsPiece)>>,
    first_seq: u64,
    window: usize,
    estimate: Arc<OutputEstimate>,
}

impl ClusterRowsOp {
    pub(crate) fn new(
        cluster: Cluster,
        rows: Arc<dyn ClusterRows>,
        window: usize,
        first_seq: u64,
    ) -> Self {
        Self {
            cluster,
            rows,
            made: Arc::default(),
            cancel: Arc::default(),
            started: false,
            pending: None,
            first_seq,
            window: window.max(1),
            estimate: Arc::default(),
        }
    }

    /// Starts making the pieces on a thread of their own.
    fn start(&mut self, cx: &StepContext<'_>) {
        self.started = true;
        let (rows, made, cancel) = (
            Arc::clone(&self.rows),
            Arc::clone(&self.made),
            Arc::clone(&self.cancel),
        );
        // Held apart from the thread, so that a thread that cannot start still
        // finishes it, with the reason.
        let work = Arc::new(Mutex::new(Some(
            cx.background_work(format!("making the blocks of {}", cx.name)),
        )));
        let finish = move |work: &Mutex<Option<_>>, result: Result<()>| {
            let taken: Option<super::BackgroundWork> =
                work.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(w) = taken {
                w.finish(result);
            }
        };
        let on_thread = Arc::clone(&work);
        let spawned = std::thread::Builder::new()
            .name("volley-split".into())
            .spawn(move || {
                let result =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rows.pieces(&cancel)))
                        .unwrap_or_else(|_| {
                            Err(VolleyError::internal("making the pieces panicked"))
                        });
                *made.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                // The result is read by the next step; the work only wakes it.
                finish(&on_thread, Ok(()));
            });
        if let Err(e) = spawned {
            *self.made.lock().unwrap_or_else(|e| e.into_inner()) = Some(Ok(vec![]));
            finish(
                &work,
                Err(VolleyError::execution(format!("starting a thread: {e}"))),
            );
        }
    }

    /// Submits the task that slices `piece`.
    fn slice(&self, cx: &StepContext<'_>, seq: u64, piece: RowsPiece) {
        let expected = Expected {
            estimate: &self.estimate,
            input: piece_bytes(&piece),
            node: piece.meta.addresses.first().map(String::as_str),
        };
        let label = format!(
            "rows {}..{} of a block for {}",
            piece.offset,
            piece.offset + piece.rows,
            cx.name
        );
        cx.counters.tasks_total.fetch_add(1, Ordering::Relaxed);
        let work = cx.remote_work(seq, label.clone(), Some(expected));
        let task = match self.rows.slice_task(piece.offset, piece.rows) {
            Ok(t) => t,
            Err(e) => return work.abandon(e),
        };
        let options = TaskOptions::default()
            .resources(Resources::cpus(1.0))
            .name(label);
        match self.cluster.submit_selected(
            &task,
            &[TaskInput::Object(&piece.object, None)],
            &options,
        ) {
            Ok(object) => {
                let cluster = self.cluster.clone();
                let output = object.clone();
                cx.watch().add(
                    object,
                    Box::new(move |meta| {
                        let result = task_result(&cluster, None, output, meta, &work);
                        work.finish(result)
                    }),
                );
            }
            Err(e) => work.abandon(e),
        }
    }

    /// The pieces, once made: `None` while the thread works, `Some(false)` after it
    /// failed (the execution ends).
    fn take_made(&mut self, cx: &StepContext<'_>) -> Option<bool> {
        let made = self.made.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        match made {
            Ok(pieces) => {
                let first = self.first_seq;
                self.pending = Some(
                    pieces
                        .into_iter()
                        .filter(|p| p.rows > 0)
                        .enumerate()
                        .map(|(i, p)| (first + i as u64, p))
                        .collect(),
                );
                Some(true)
            }
            Err(e) => {
                if !e.is_cancelled() {
                    cx.fail(e.context(format!("making the blocks of {}", cx.name)));
                } else if !self.cancel.load(Ordering::Acquire) {
                    // Stopped without being asked: its rows would silently be missing.
                    cx.fail(VolleyError::internal(format!(
                        "making the blocks of {} stopped unasked",
                        cx.name
                    )));
                }
                self.pending = Some(VecDeque::new());
                Some(false)
            }
        }
    }
}

/// A piece's share of its object's bytes.
fn piece_bytes(piece: &RowsPiece) -> u64 {
    (piece.meta.bytes as u128 * piece.rows as u128 / piece.meta.rows.max(1) as u128) as u64
}

impl Operator for ClusterRowsOp {
    fn step(&mut self, cx: &mut StepContext<'_>) -> bool {
        if cx.stopping {
            self.cancel.store(true, Ordering::Release);
            self.pending = Some(VecDeque::new());
            return true;
        }
        if !self.started {
            self.start(cx);
        }
        if self.pending.is_none() && self.take_made(cx).is_none() {
            return false;
        }
        let mut pending = self.pending.take().expect("set above");
        while let Some((seq, piece)) = pending.front() {
            let whole = piece.offset == 0 && piece.rows == piece.meta.rows;
            let node = piece.meta.addresses.first().map(String::as_str);
            // A whole block is handed on as it is: it needs room in the budget, as a
            // slice task's output does.
            let room = if whole {
                cx.store_has_room(piece.meta.bytes, node) || cx.may_pass_full_budget()
            } else {
                let expected = Expected {
                    estimate: &self.estimate,
                    input: piece_bytes(piece),
                    node,
                };
                cx.running() < self.window && cx.store_room(&expected)
            };
            if !room {
                break;
            }
            let seq = *seq;
            let (_, piece) = pending.pop_front().expect("looked at above");
            cx.out.register(seq);
            if whole {
                let (rows, bytes) = (piece.meta.rows as usize, piece.meta.bytes as usize);
                let block = Block::Remote(RemoteBlock::new(piece.object, piece.meta));
                match cx.out.push_now(seq, block) {
                    Ok(()) => cx.counters.output(rows, bytes),
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => cx.fail(e),
                }
                cx.out.finish_seq(seq);
            } else {
                self.slice(cx, seq, piece);
            }
        }
        let done = pending.is_empty();
        self.pending = Some(pending);
        done
    }
}
