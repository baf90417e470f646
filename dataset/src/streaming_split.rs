//! One execution consumed by several iterators at once: how a training job feeds its
//! workers.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

use arrow::array::RecordBatch;
use volley_common::{Result, VolleyError};

use crate::dataset::Dataset;

/// How far (in batches) one consumer may run ahead of a slower one in `equal` mode.
const MAX_AHEAD: usize = 4;

type BatchIter = Box<dyn Iterator<Item = Result<RecordBatch>> + Send>;

struct Inner {
    dataset: Option<Dataset>,
    stream: Option<BatchIter>,
    queues: Vec<VecDeque<RecordBatch>>,
    /// Rows held back in `equal` mode until there are enough to share.
    carry: Option<RecordBatch>,
    done: bool,
    error: Option<String>,
    errors_delivered: Vec<bool>,
    dropped: Vec<bool>,
}

struct State {
    n: usize,
    equal: bool,
    inner: Mutex<Inner>,
    changed: Condvar,
}

/// One of the iterators of [`Dataset::streaming_split`]. `Send`: give each to its own
/// thread.
pub struct SplitIterator {
    state: Arc<State>,
    index: usize,
}

impl std::fmt::Debug for SplitIterator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SplitIterator({} of {})", self.index, self.state.n)
    }
}

impl Dataset {
    /// `n` iterators over one execution of the dataset, each getting a disjoint share
    /// of its batches; together they see every row once.
    ///
    /// The execution starts when the first iterator is polled. Without `equal`, a batch
    /// goes to whichever iterator asks first (fast consumers take more). With `equal`,
    /// every batch is cut into `n` equal slices, one per iterator, so all get the same
    /// number of rows (the last `rows % n` rows are dropped), and a consumer may run at
    /// most a few batches ahead of the slowest. Iterators run in threads of this
    /// process; feeding workers in other processes comes with the cluster runtime.
    ///
    /// ```
    /// use volley_dataset::Context;
    /// let ctx = Context::try_default().unwrap();
    /// let its = ctx.range(1000).streaming_split(2, true).unwrap();
    /// let rows: Vec<usize> = std::thread::scope(|s| {
    ///     let hs: Vec<_> = its
    ///         .into_iter()
    ///         .map(|it| s.spawn(move || it.map(|b| b.unwrap().num_rows()).sum::<usize>()))
    ///         .collect();
    ///     hs.into_iter().map(|h| h.join().unwrap()).collect()
    /// });
    /// assert_eq!(rows, vec![500, 500]);
    /// ```
    pub fn streaming_split(&self, n: usize, equal: bool) -> Result<Vec<SplitIterator>> {
        if n == 0 {
            return Err(VolleyError::plan(
                "streaming_split needs at least one iterator",
            ));
        }
        let state = Arc::new(State {
            n,
            equal,
            inner: Mutex::new(Inner {
                dataset: Some(self.clone()),
                stream: None,
                queues: vec![VecDeque::new(); n],
                carry: None,
                done: false,
                error: None,
                errors_delivered: vec![false; n],
                dropped: vec![false; n],
            }),
            changed: Condvar::new(),
        });
        Ok((0..n)
            .map(|index| SplitIterator {
                state: Arc::clone(&state),
                index,
            })
            .collect())
    }
}

impl Inner {
    /// The next batch of the execution (starting it on first use).
    fn pull(&mut self) -> Option<Result<RecordBatch>> {
        if self.stream.is_none() {
            let ds = self.dataset.take()?;
            match ds.iter_batches() {
                Ok(s) => self.stream = Some(Box::new(s)),
                Err(e) => return Some(Err(e)),
            }
        }
        self.stream.as_mut().and_then(Iterator::next)
    }

    fn fail(&mut self, e: &VolleyError) {
        self.error = Some(e.to_string());
        self.done = true;
        self.stream = None;
    }

    /// Cuts `batch` (after any carried rows) into `n` equal slices, one per queue.
    fn share(&mut self, n: usize, batch: RecordBatch) -> Result<()> {
        let batch = match self.carry.take() {
            Some(c) => arrow::compute::concat_batches(&batch.schema(), &[c, batch])?,
            None => batch,
        };
        let per = batch.num_rows() / n;
        if per > 0 {
            for (i, q) in self.queues.iter_mut().enumerate() {
                if !self.dropped[i] {
                    q.push_back(batch.slice(i * per, per));
                }
            }
        }
        let used = per * n;
        if used < batch.num_rows() {
            self.carry = Some(batch.slice(used, batch.num_rows() - used));
        }
        Ok(())
    }
}

impl Iterator for SplitIterator {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        let state = &self.state;
        let mut inner = state.inner.lock().expect("split lock");
        loop {
            if let Some(b) = inner.queues[self.index].pop_front() {
                state.changed.notify_all();
                return Some(Ok(b));
            }
            if inner.done {
                if let Some(e) = inner.error.clone() {
                    if !inner.errors_delivered[self.index] {
                        inner.errors_delivered[self.index] = true;
                        return Some(Err(VolleyError::execution(e)));
                    }
                }
                return None;
            }
            if state.equal {
                // Wait while another live consumer is too far behind.
                let behind = inner
                    .queues
                    .iter()
                    .enumerate()
                    .any(|(i, q)| i != self.index && !inner.dropped[i] && q.len() >= MAX_AHEAD);
                if behind {
                    inner = state.changed.wait(inner).expect("split lock");
                    continue;
                }
            }
            match inner.pull() {
                None => {
                    inner.done = true;
                    inner.carry = None;
                    state.changed.notify_all();
                }
                Some(Err(e)) => {
                    inner.fail(&e);
                    inner.errors_delivered[self.index] = true;
                    state.changed.notify_all();
                    return Some(Err(e));
                }
                Some(Ok(b)) => {
                    if !state.equal {
                        return Some(Ok(b));
                    }
                    if let Err(e) = inner.share(state.n, b) {
                        inner.fail(&e);
                    }
                    state.changed.notify_all();
                }
            }
        }
    }
}

impl Drop for SplitIterator {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.state.inner.lock() {
            inner.dropped[self.index] = true;
            inner.queues[self.index].clear();
            if inner.dropped.iter().all(|d| *d) {
                // Nobody is left: stop the execution.
                inner.stream = None;
                inner.done = true;
            }
        }
        self.state.changed.notify_all();
    }
}
