//! What runs on workers: tasks and actors, shipped by name.
//!
//! A task is a value of a type that implements [`RemoteTask`] and is registered with
//! `#[typetag::serde]`: it travels as JSON (`{"task": "MyTask", "args": {..}}`) and the
//! worker, which runs the same binary, rebuilds it by name. Its inputs are objects (the
//! results of other tasks, fetched before it runs, or as it runs for a task that
//! streams them) and its result is one object: a list
//! of Arrow record batches. [`RemoteActor`] is the stateful form: built once on its own
//! worker process, then called method by method, in order.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use serde::de::DeserializeOwned;
use serde::Serialize;
use volley_common::{Result, VolleyError};

/// Where a task or actor call runs.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The task's id (also its result object's id).
    pub task_id: String,
    /// 0 on the first run, then 1, 2, ... on retries and reconstructions.
    pub attempt: u32,
    /// The job the task belongs to.
    pub job_id: String,
    /// The node it runs on.
    pub node_id: String,
    /// GPUs given to it (also in `CUDA_VISIBLE_DEVICES`).
    pub gpu_ids: Vec<u32>,
    /// The name it was submitted with (`TaskOptions::name`); empty for an actor.
    pub name: String,
}

/// A stateless function that runs on a worker.
///
/// ```
/// use volley_runtime::cluster::{RemoteTask, TaskContext};
/// use arrow::array::RecordBatch;
///
/// #[derive(Debug, serde::Serialize, serde::Deserialize)]
/// struct CountRows;
///
/// #[typetag::serde]
/// impl RemoteTask for CountRows {
///     fn run(&self, _: &TaskContext, inputs: Vec<Vec<RecordBatch>>) -> volley_common::Result<Vec<RecordBatch>> {
///         let n: usize = inputs.iter().flatten().map(|b| b.num_rows()).sum();
///         volley_runtime::cluster::value_object(&n)
///     }
/// }
/// ```
#[typetag::serde(tag = "task", content = "args")]
pub trait RemoteTask: Send + Sync + Debug {
    /// Runs with the batches of each input object, in the order they were given.
    fn run(&self, ctx: &TaskContext, inputs: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>>;

    /// Called on the worker after `run` when this attempt turns out to be superseded:
    /// the cluster gave the task to another attempt (this one's node was declared dead
    /// while it ran, or its report could not be delivered), so its result is thrown
    /// away. Undo any side effect the attempt left outside its result (a write's staged
    /// files). The default does nothing.
    fn discard(&self, _ctx: &TaskContext) {}

    /// Whether [`Self::discard`] has anything to undo. Only then does the worker wait,
    /// before its next task, for the head's word on whether the attempt was
    /// superseded; other tasks hand their result over and go on at once.
    fn leaves_side_effects(&self) -> bool {
        false
    }

    /// Whether the task takes its inputs as they are read ([`Self::run_streamed`])
    /// instead of all at once before it runs: for a task whose inputs together may
    /// outgrow its worker's memory (a reduce task reads its partition of every map
    /// output) and that can consume them as they come (a sort that spills).
    fn streams_inputs(&self) -> bool {
        false
    }

    /// Runs with its inputs read while it runs, in order, at most
    /// [`InputStream::READ_AHEAD_BYTES`] of them read ahead of what it took; called
    /// instead of [`Self::run`] where [`Self::streams_inputs`] says so. The default
    /// reads them all and calls [`Self::run`].
    fn run_streamed(&self, ctx: &TaskContext, mut inputs: InputStream) -> Result<Vec<RecordBatch>> {
        let mut all = Vec::new();
        while let Some(input) = inputs.next_blocking() {
            all.push(input?);
        }
        self.run(ctx, all)
    }
}

/// A task's input objects as its worker reads them, in the order the task was given
/// them: each item one object's batches (or the part of it the task reads), or why it
/// could not be read (the task then fails, and its worker tells the cluster which
/// inputs to rebuild). The worker reads ahead of the task at most
/// [`Self::READ_AHEAD_BYTES`], plus the reads it has started (a few objects).
#[derive(Debug)]
pub struct InputStream {
    inputs: tokio::sync::mpsc::UnboundedReceiver<Result<Vec<RecordBatch>>>,
    ahead: Arc<ReadAhead>,
}

/// What a worker has read of a task's inputs and the task has not yet taken.
#[derive(Debug, Default)]
pub(crate) struct ReadAhead {
    bytes: std::sync::atomic::AtomicU64,
    /// Signalled as the task takes an input (or ends).
    pub(crate) taken: tokio::sync::Notify,
}

impl ReadAhead {
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn add(&self, n: u64) {
        self.bytes.fetch_add(n, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The bytes of memory `batches` hold, each allocation once: a decoded object's
/// buffers are slices of one message body and a mapped one's of one file, which
/// `RecordBatch::get_array_memory_size` would count once per buffer.
pub(crate) fn input_bytes(batches: &[RecordBatch]) -> u64 {
    fn add(b: &arrow::buffer::Buffer, allocations: &mut HashMap<usize, usize>) {
        // A mapped file's buffers report no capacity: what they reach of it counts.
        let reach = b.capacity().max(b.ptr_offset() + b.len());
        let held = allocations
            .entry(b.data_ptr().as_ptr() as usize)
            .or_default();
        *held = (*held).max(reach);
    }
    fn walk(data: &arrow::array::ArrayData, allocations: &mut HashMap<usize, usize>) {
        for b in data.buffers() {
            add(b, allocations);
        }
        if let Some(nulls) = data.nulls() {
            add(nulls.buffer(), allocations);
        }
        for child in data.child_data() {
            walk(child, allocations);
        }
    }
    let mut allocations = HashMap::new();
    for b in batches {
        for c in b.columns() {
            walk(&c.to_data(), &mut allocations);
        }
    }
    allocations.values().sum::<usize>() as u64
}

impl InputStream {
    /// Bytes a worker reads ahead of what its task took.
    pub const READ_AHEAD_BYTES: u64 = 64 << 20;

    /// A stream fed through `sender`, and what it has read ahead.
    pub(crate) fn channel() -> (
        tokio::sync::mpsc::UnboundedSender<Result<Vec<RecordBatch>>>,
        Arc<ReadAhead>,
        InputStream,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let ahead = Arc::new(ReadAhead::default());
        let stream = InputStream {
            inputs: rx,
            ahead: Arc::clone(&ahead),
        };
        (tx, ahead, stream)
    }

    /// A stream of inputs already read (a task run in this process, a test).
    pub fn of(inputs: Vec<Vec<RecordBatch>>) -> InputStream {
        let (tx, ahead, stream) = Self::channel();
        for input in inputs {
            ahead.add(input_bytes(&input));
            let _ = tx.send(Ok(input));
        }
        stream
    }

    fn took(&self, input: &Result<Vec<RecordBatch>>) {
        if let Ok(b) = input {
            let n = input_bytes(b);
            let _ = self.ahead.bytes.fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
                |v| Some(v.saturating_sub(n)),
            );
        }
        self.ahead.taken.notify_one();
    }

    /// The next input, waiting for it to be read; `None` after the last. For a task's
    /// own thread (it blocks), not for async code.
    pub fn next_blocking(&mut self) -> Option<Result<Vec<RecordBatch>>> {
        let input = self.inputs.blocking_recv()?;
        self.took(&input);
        Some(input)
    }

    /// The next input; `None` after the last.
    pub async fn next(&mut self) -> Option<Result<Vec<RecordBatch>>> {
        let input = self.inputs.recv().await?;
        self.took(&input);
        Some(input)
    }
}

impl Drop for InputStream {
    /// A task that ends without taking every input stops its worker's reads.
    fn drop(&mut self) {
        self.inputs.close();
        self.ahead.taken.notify_one();
    }
}

/// A stateful worker: built once from its serialized value, then called in order.
#[typetag::serde(tag = "actor", content = "state")]
pub trait RemoteActor: Send + Debug {
    /// Called once on the actor's worker before any method.
    fn start(&mut self, _ctx: &TaskContext) -> Result<()> {
        Ok(())
    }
    /// Runs `method` with a JSON argument and input objects.
    fn call(
        &mut self,
        ctx: &TaskContext,
        method: &str,
        arg: serde_json::Value,
        inputs: Vec<Vec<RecordBatch>>,
    ) -> Result<Vec<RecordBatch>>;

    /// Serves the calls sent to this actor until no more come. The default runs them
    /// one at a time through [`Self::call`], in the order they came. An actor that keeps
    /// work of several calls in flight (an LLM engine whose running batch takes the next
    /// call's rows as the last call's sequences finish) overrides it: it may take the
    /// next call before answering the last one, and answers each call once. The worker
    /// reads the next call's inputs while one runs, so a call taken early is ready.
    fn serve(&mut self, calls: &mut dyn ActorCalls) {
        while let Some(c) = calls.next(true) {
            let answer = catch_panic("an actor call", || {
                self.call(&c.ctx, &c.method, c.arg, c.inputs)
            });
            calls.answer(c.id, answer);
        }
    }
}

/// One call of an actor's method, as its actor receives it.
#[derive(Debug)]
pub struct ActorCall {
    /// Names the call in [`ActorCalls::answer`].
    pub id: u64,
    /// The call's task (its result is the call's result object).
    pub ctx: TaskContext,
    /// The method called.
    pub method: String,
    /// Its JSON argument.
    pub arg: serde_json::Value,
    /// The batches of each input object.
    pub inputs: Vec<Vec<RecordBatch>>,
}

/// The calls an actor serves ([`RemoteActor::serve`]): taken in the order they came,
/// answered in any order.
pub trait ActorCalls {
    /// The next call. With `wait`, waits for one (`None`: no more will come); without,
    /// takes one only if its inputs are already read (`None`: none is ready yet).
    fn next(&mut self, wait: bool) -> Option<ActorCall>;

    /// The result of call `id` (taken with [`Self::next`]).
    fn answer(&mut self, id: u64, result: Result<Vec<RecordBatch>>);
}

/// Runs user code, turning a panic into an error naming `what`.
pub fn catch_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(VolleyError::execution(format!(
            "{what} panicked: {}",
            panic_message(p.as_ref())
        ))),
    }
}

/// The message a panic carried.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// What a worker is asked to run, as it travels.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) enum Payload {
    /// A task.
    Task(Box<dyn RemoteTask>),
    /// A method call on the actor the task is sent to.
    Call {
        method: String,
        arg: serde_json::Value,
    },
}

pub(crate) fn encode<T: Serialize + ?Sized>(what: &str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| {
        VolleyError::plan(format!(
            "{what} cannot be serialized to ship to a worker: {e}"
        ))
    })
}

pub(crate) fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        VolleyError::execution(format!(
            "{what} cannot be rebuilt on this worker: {e} (workers run the driver's binary; \
             is the type registered with #[typetag::serde]?)"
        ))
    })
}

/// A small serde value as an object: one row, one `value` column of JSON.
pub fn value_object<T: Serialize + ?Sized>(value: &T) -> Result<Vec<RecordBatch>> {
    let json = serde_json::to_string(value)
        .map_err(|e| VolleyError::execution(format!("cannot serialize a value: {e}")))?;
    let schema = Arc::new(Schema::new(vec![Field::new(
        "value",
        DataType::Utf8,
        false,
    )]));
    let array: ArrayRef = Arc::new(StringArray::from(vec![json]));
    Ok(vec![RecordBatch::try_new(schema, vec![array])?])
}

/// Reads back what [`value_object`] made.
pub fn object_value<T: DeserializeOwned>(batches: &[RecordBatch]) -> Result<T> {
    let column = batches
        .first()
        .and_then(|b| b.column_by_name("value"))
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .filter(|c| !c.is_empty())
        .ok_or_else(|| VolleyError::execution("the object is not a value (one `value` row)"))?;
    serde_json::from_str(column.value(0))
        .map_err(|e| VolleyError::execution(format!("cannot read the object's value: {e}")))
}

/// Runs `f` on a thread of its own named `name` and returns its result; a panic
/// becomes a user-function error. Code that runs inside a worker's task or actor call
/// goes through this: the worker's thread drives an async runtime, inside which
/// blocking APIs (the checkpoint store, a user's own runtime) may not block.
pub fn on_own_thread<T: Send>(name: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn_scoped(s, f)
            .map_err(|e| VolleyError::internal(format!("cannot start a thread: {e}")))?
            .join()
            .map_err(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                VolleyError::UserFunction {
                    name: name.to_string(),
                    message: format!("panicked: {msg}"),
                }
            })?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let o = value_object(&vec![1.5f64, 2.5]).unwrap();
        let v: Vec<f64> = object_value(&o).unwrap();
        assert_eq!(v, vec![1.5, 2.5]);
        assert!(object_value::<u32>(&[]).is_err());
    }
}
