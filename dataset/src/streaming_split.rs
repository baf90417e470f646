//! One execution consumed by several iterators at once: how a training job feeds its
//! workers.
//!
//! On a cluster the execution's blocks stay in the nodes' stores: a split hands out
//! [`SplitPart::Remote`] parts (which rows of which object, with the reference that keeps
//! it alive), so that a consumer in another process (a training rank) reads its share
//! from the nodes and the bytes never pass through the driver. Consumers in this process
//! iterate batches: remote parts are fetched for them.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

use arrow::array::RecordBatch;
use volley_common::{Result, VolleyError};
use volley_exec::Block;
use volley_runtime::cluster::{object_batch, Cluster, ObjectMeta, ObjectRef, ObjectSlice};

use crate::dataset::{Dataset, StatsStream};

/// How far (in parts) one consumer may run ahead of a slower one in `equal` mode.
const MAX_AHEAD: usize = 4;

/// Rows of an object in a cluster node's store, and the reference that keeps the object
/// alive while the rows are handed on.
#[derive(Debug, Clone)]
pub struct RemoteRows {
    slice: ObjectSlice,
    object: ObjectRef,
    /// Where it can be fetched from into this process.
    cluster: Cluster,
    /// The object's rows and bytes (for the slice's share of them).
    object_rows: u64,
    object_bytes: u64,
}

impl RemoteRows {
    /// All rows of an object already in the cluster (made by a task, or stored with
    /// [`Cluster::put`]), as `meta` describes it.
    pub fn new(object: ObjectRef, meta: ObjectMeta, cluster: Cluster) -> Self {
        RemoteRows {
            slice: ObjectSlice {
                id: object.id().to_string(),
                addresses: meta.addresses,
                offset: 0,
                rows: meta.rows,
            },
            object,
            cluster,
            object_rows: meta.rows,
            object_bytes: meta.bytes,
        }
    }

    /// Which rows, of which object, on which nodes: what a reader in another process
    /// needs ([`volley_runtime::cluster::ObjectReader`]). Keep `self` until it has read
    /// them: dropping the last reference frees the object.
    pub fn slice(&self) -> &ObjectSlice {
        &self.slice
    }

    /// The rows, fetched into this process from a node that holds them (only these
    /// rows travel; a lost object is waited for while the cluster makes it again).
    pub fn fetch(&self) -> Result<RecordBatch> {
        let ObjectSlice { offset, rows, .. } = self.slice;
        let batches = self.cluster.get_rows(&self.object, offset, rows)?;
        object_batch(&self.slice.id, batches)
    }

    /// Its bytes in the node's store (its rows' share of the object's).
    pub fn bytes(&self) -> u64 {
        (self.object_bytes as u128 * self.slice.rows as u128 / self.object_rows.max(1) as u128)
            as u64
    }
}

/// What a split hands one consumer.
#[derive(Debug, Clone)]
pub enum SplitPart {
    /// Rows in this process.
    Batch(RecordBatch),
    /// Rows that stay in a cluster node's store.
    Remote(RemoteRows),
}

impl SplitPart {
    /// Its rows.
    pub fn rows(&self) -> usize {
        match self {
            SplitPart::Batch(b) => b.num_rows(),
            SplitPart::Remote(r) => r.slice.rows as usize,
        }
    }

    /// Rows `offset..offset + len` of it (no copy: a batch slice, or a narrower range of
    /// the same object).
    fn slice(&self, offset: usize, len: usize) -> SplitPart {
        match self {
            SplitPart::Batch(b) => SplitPart::Batch(b.slice(offset, len)),
            SplitPart::Remote(r) => SplitPart::Remote(RemoteRows {
                slice: ObjectSlice {
                    offset: r.slice.offset + offset as u64,
                    rows: len as u64,
                    ..r.slice.clone()
                },
                object: r.object.clone(),
                cluster: r.cluster.clone(),
                ..*r
            }),
        }
    }
}

struct Inner {
    dataset: Option<Dataset>,
    /// The cluster the dataset runs on, if any.
    cluster: Option<Cluster>,
    stream: Option<StatsStream>,
    queues: Vec<VecDeque<SplitPart>>,
    /// Rows held back in `equal` mode until there are enough to share, in order.
    carry: VecDeque<SplitPart>,
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
/// thread, or serve it to another process with [`next_part`](Self::next_part).
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
    /// of its rows; together they see every row once.
    ///
    /// The execution starts when the first iterator is polled. Without `equal`, a block
    /// goes to whichever iterator asks first (fast consumers take more). With `equal`,
    /// every block is cut into `n` equal slices, one per iterator, so all get the same
    /// number of rows (the last `rows % n` rows are dropped), and a consumer may run at
    /// most a few parts ahead of the slowest.
    ///
    /// On a cluster the blocks stay on the nodes: [`SplitIterator::next_part`] hands out
    /// references to rows that another process reads from the nodes (the trainer's ranks
    /// do), while iterating batches fetches them into this process.
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
        crate::exchange::check_parts("streaming_split", n)?;
        let state = Arc::new(State {
            n,
            equal,
            inner: Mutex::new(Inner {
                dataset: Some(self.clone()),
                cluster: self.context().cluster().cloned(),
                stream: None,
                queues: vec![VecDeque::new(); n],
                carry: VecDeque::new(),
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
    /// The next part of the execution (starting it on first use); empty blocks are
    /// skipped.
    fn pull(&mut self) -> Option<Result<SplitPart>> {
        if self.stream.is_none() {
            let ds = self.dataset.take()?;
            match ds.stream() {
                Ok(s) => self.stream = Some(s),
                Err(e) => return Some(Err(e)),
            }
        }
        loop {
            let stream = self.stream.as_mut()?;
            let block = match stream.next_block()? {
                Ok(b) if b.rows() == 0 => continue,
                Ok(b) => b,
                Err(e) => return Some(Err(e)),
            };
            return Some(match (block, &self.cluster) {
                (Block::Local(b), _) => Ok(SplitPart::Batch(b)),
                // An object small enough to live with the head has no node to read it
                // from: its few bytes travel through here.
                (Block::Remote(r), _) if r.meta.addresses.is_empty() => {
                    stream.resolve(Block::Remote(r)).map(SplitPart::Batch)
                }
                (Block::Remote(_), None) => Err(VolleyError::internal(
                    "a remote block in an execution without a cluster",
                )),
                (Block::Remote(r), Some(cluster)) => Ok(SplitPart::Remote(RemoteRows::new(
                    r.object,
                    r.meta,
                    cluster.clone(),
                ))),
            });
        }
    }

    fn fail(&mut self, e: &VolleyError) {
        self.error = Some(e.to_string());
        self.done = true;
        self.stream = None;
    }

    /// Cuts `part` (after any carried rows) into `n` equal shares, one per queue; the
    /// rows left over wait for the next part.
    fn share(&mut self, n: usize, part: SplitPart) {
        self.carry.push_back(part);
        let total: usize = self.carry.iter().map(SplitPart::rows).sum();
        let per = total / n;
        if per == 0 {
            return;
        }
        for i in 0..n {
            let share = take_rows(&mut self.carry, per);
            if !self.dropped[i] {
                self.queues[i].extend(share);
            }
        }
    }
}

/// The first `k` rows of `pieces`, taken off the front (the last piece taken may be
/// cut, its rest staying in front).
fn take_rows(pieces: &mut VecDeque<SplitPart>, mut k: usize) -> Vec<SplitPart> {
    let mut out = Vec::new();
    while k > 0 {
        let Some(front) = pieces.pop_front() else {
            break;
        };
        let rows = front.rows();
        if rows <= k {
            k -= rows;
            out.push(front);
        } else {
            out.push(front.slice(0, k));
            pieces.push_front(front.slice(k, rows - k));
            k = 0;
        }
    }
    out
}

impl SplitIterator {
    /// The next part of this iterator's share, as the execution produced it: on a
    /// cluster, usually [`SplitPart::Remote`] (rows left in a node's store).
    pub fn next_part(&mut self) -> Option<Result<SplitPart>> {
        let state = &self.state;
        let mut inner = state.inner.lock().expect("split lock");
        loop {
            if let Some(p) = inner.queues[self.index].pop_front() {
                state.changed.notify_all();
                return Some(Ok(p));
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
                    inner.carry.clear();
                    state.changed.notify_all();
                }
                Some(Err(e)) => {
                    inner.fail(&e);
                    inner.errors_delivered[self.index] = true;
                    state.changed.notify_all();
                    return Some(Err(e));
                }
                Some(Ok(p)) => {
                    if !state.equal {
                        return Some(Ok(p));
                    }
                    inner.share(state.n, p);
                    state.changed.notify_all();
                }
            }
        }
    }
}

impl Iterator for SplitIterator {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(match self.next_part()? {
            Ok(SplitPart::Batch(b)) => Ok(b),
            Ok(SplitPart::Remote(r)) => r.fetch(),
            Err(e) => Err(e),
        })
    }
}

impl Drop for SplitIterator {
    /// A consumer that stops early gives up its share: the others are not held back
    /// waiting for it in `equal` mode.
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, Int64Array};

    fn part(from: i64, n: i64) -> SplitPart {
        SplitPart::Batch(
            RecordBatch::try_from_iter([(
                "x",
                Arc::new(Int64Array::from_iter_values(from..from + n)) as arrow::array::ArrayRef,
            )])
            .unwrap(),
        )
    }

    fn values(parts: &[SplitPart]) -> Vec<i64> {
        parts
            .iter()
            .flat_map(|p| match p {
                SplitPart::Batch(b) => b
                    .column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .values()
                    .to_vec(),
                SplitPart::Remote(_) => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn taking_rows_cuts_across_pieces_and_keeps_the_rest_in_order() {
        let mut pieces: VecDeque<SplitPart> = [part(0, 3), part(3, 4), part(7, 2)].into();
        assert_eq!(values(&take_rows(&mut pieces, 5)), vec![0, 1, 2, 3, 4]);
        assert_eq!(values(&take_rows(&mut pieces, 1)), vec![5]);
        assert_eq!(
            values(&pieces.iter().cloned().collect::<Vec<_>>()),
            vec![6, 7, 8]
        );
        assert_eq!(values(&take_rows(&mut pieces, 10)), vec![6, 7, 8]);
        assert!(pieces.is_empty());
        assert!(take_rows(&mut pieces, 0).is_empty());
        let first = match &part(0, 9).slice(2, 3) {
            SplitPart::Batch(b) => b.column(0).len(),
            SplitPart::Remote(_) => unreachable!(),
        };
        assert_eq!(first, 3);
    }
}
