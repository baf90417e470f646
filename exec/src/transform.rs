//! User transforms: the code a user puts into a pipeline.
//!
//! A transform is a *value*, not just a closure, so that a plan can later be shipped to
//! worker processes (DESIGN.md, "User code on workers"). Two forms exist:
//!
//! - **Named** transforms implement [`NamedTransform`] (stateless) or
//!   [`NamedTransformFactory`] (stateful) on a `serde` type and register it with
//!   `#[typetag::serde]`. They serialize to JSON (`{"MyTransform": {..state..}}`), and a
//!   process running the same binary rebuilds them by name: these can travel.
//! - **Local** transforms are closures. They run in this process only; a plan holding
//!   one reports [`TransformFn::is_shippable`] `false`, and a cluster backend rejects it
//!   with a clear error when the plan is built, never on a worker.

use std::fmt;
use std::sync::Arc;

use arrow::array::{BooleanArray, RecordBatch};
use volley_common::{Result, VolleyError};

/// A stateless transform of a batch that can be named and shipped.
///
/// ```
/// use arrow::array::{Int64Array, RecordBatch};
/// use std::sync::Arc;
/// use volley_exec::NamedTransform;
///
/// #[derive(Debug, serde::Serialize, serde::Deserialize)]
/// struct AddOne { column: String }
///
/// #[typetag::serde]
/// impl NamedTransform for AddOne {
///     fn transform(&self, batch: RecordBatch) -> volley_common::Result<RecordBatch> {
///         let idx = batch.schema().index_of(&self.column)?;
///         let col = arrow::compute::kernels::numeric::add(
///             batch.column(idx), &Int64Array::new_scalar(1))?;
///         let mut cols = batch.columns().to_vec();
///         cols[idx] = col;
///         Ok(RecordBatch::try_new(batch.schema(), cols)?)
///     }
/// }
/// ```
#[typetag::serde(tag = "transform", content = "state")]
pub trait NamedTransform: Send + Sync + fmt::Debug {
    /// Transforms one batch (any number of rows in, any number out).
    fn transform(&self, batch: RecordBatch) -> Result<RecordBatch>;
}

/// A stateful transform, built once per worker by a [`NamedTransformFactory`] and
/// called for every batch that worker receives (a loaded model, a tokenizer).
pub trait StatefulTransform: Send {
    /// Transforms one batch.
    fn transform(&mut self, batch: RecordBatch) -> Result<RecordBatch>;

    /// Transforms several batches, one output per input, in order. A pool worker hands
    /// over at once the `batch_size` chunks of the input it holds. The default
    /// transforms them one by one; a transform that keeps many rows in flight (an LLM
    /// engine's running batch) overrides it so that the rows of a later chunk start as
    /// those of an earlier one finish, instead of each chunk draining before the next.
    fn transform_batches(&mut self, batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
        batches.into_iter().map(|b| self.transform(b)).collect()
    }

    /// Transforms bundles of batches as they come (a cluster pool actor's calls), each
    /// answered with one output per input batch, in order. The default transforms one
    /// bundle at a time ([`Self::transform_batches`]). A transform that keeps rows in
    /// flight overrides it to take the next bundle while the last one's rows finish, so
    /// that its running batch stays full across bundles, not just within one.
    fn transform_stream(&mut self, bundles: &mut dyn Bundles) {
        while let Some((id, batches)) = bundles.next(true) {
            let out = self.transform_batches(batches);
            bundles.done(id, out);
        }
    }
}

/// Bundles of batches a [`StatefulTransform`] serves in
/// [`StatefulTransform::transform_stream`].
pub trait Bundles {
    /// The next bundle, with the id to answer it by. With `wait`, waits for one
    /// (`None`: no more will come); without, takes one only if it is ready (`None`:
    /// none is, yet).
    fn next(&mut self, wait: bool) -> Option<(u64, Vec<RecordBatch>)>;

    /// The output of bundle `id`: one batch per input batch, in order (or the error
    /// that failed it). Each bundle taken is answered once.
    fn done(&mut self, id: u64, output: Result<Vec<RecordBatch>>);
}

/// `all` cut into chunks of `chunk` rows (the last may be shorter); none when empty.
pub(crate) fn chunks(all: &RecordBatch, chunk: Option<usize>) -> Vec<RecordBatch> {
    let n = all.num_rows();
    let chunk = chunk.unwrap_or(n).max(1);
    (0..n)
        .step_by(chunk)
        .map(|offset| all.slice(offset, chunk.min(n - offset)))
        .collect()
}

/// Builds a [`StatefulTransform`] on each worker; named and shippable.
#[typetag::serde(tag = "factory", content = "state")]
pub trait NamedTransformFactory: Send + Sync + fmt::Debug {
    /// Builds the worker's transform (loads the model, opens the connection).
    fn build(&self) -> Result<Box<dyn StatefulTransform>>;
}

type LocalFn = Arc<dyn Fn(RecordBatch) -> Result<RecordBatch> + Send + Sync>;
type LocalPredicate = Arc<dyn Fn(&RecordBatch) -> Result<BooleanArray> + Send + Sync>;
type LocalFactory = Arc<dyn Fn() -> Result<Box<dyn StatefulTransform>> + Send + Sync>;

/// A stateless batch transform in a plan.
#[derive(Clone)]
pub enum TransformFn {
    /// A named transform that can be shipped.
    Named(Arc<dyn NamedTransform>),
    /// A closure, for this process only.
    Local {
        /// Shown in plans and errors.
        name: String,
        /// The function.
        f: LocalFn,
    },
}

impl fmt::Debug for TransformFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl TransformFn {
    /// A local transform from a closure.
    pub fn local(
        name: impl Into<String>,
        f: impl Fn(RecordBatch) -> Result<RecordBatch> + Send + Sync + 'static,
    ) -> Self {
        TransformFn::Local {
            name: name.into(),
            f: Arc::new(f),
        }
    }

    /// A named transform.
    pub fn named(t: impl NamedTransform + 'static) -> Self {
        TransformFn::Named(Arc::new(t))
    }

    /// The name shown in plans and errors.
    pub fn name(&self) -> String {
        match self {
            TransformFn::Named(t) => type_label(t.typetag_name()),
            TransformFn::Local { name, .. } => name.clone(),
        }
    }

    /// Whether the transform can be sent to another process.
    pub fn is_shippable(&self) -> bool {
        matches!(self, TransformFn::Named(_))
    }

    /// The transform as JSON, for shipping. Fails for closures, naming them.
    pub fn to_json(&self) -> Result<String> {
        match self {
            TransformFn::Named(t) => serde_json::to_string(t.as_ref()).map_err(|e| {
                VolleyError::plan(format!("cannot serialize transform {}: {e}", self.name()))
            }),
            TransformFn::Local { name, .. } => Err(not_shippable(name)),
        }
    }

    /// Rebuilds a named transform from [`to_json`](Self::to_json)'s output.
    pub fn from_json(json: &str) -> Result<Self> {
        let t: Box<dyn NamedTransform> = serde_json::from_str(json)
            .map_err(|e| VolleyError::plan(format!("cannot rebuild transform from {json}: {e}")))?;
        Ok(TransformFn::Named(Arc::from(t)))
    }

    /// Runs the transform on one batch; a panic becomes an error naming the transform.
    pub fn call(&self, batch: RecordBatch) -> Result<RecordBatch> {
        let name = self.name();
        guard(&name, || match self {
            TransformFn::Named(t) => t.transform(batch),
            TransformFn::Local { f, .. } => f(batch),
        })
    }
}

/// A Rust predicate over a batch: `true` keeps the row.
#[derive(Clone)]
pub struct PredicateFn {
    name: String,
    f: LocalPredicate,
}

impl fmt::Debug for PredicateFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl PredicateFn {
    /// A predicate from a closure.
    pub fn new(
        name: impl Into<String>,
        f: impl Fn(&RecordBatch) -> Result<BooleanArray> + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            f: Arc::new(f),
        }
    }

    /// The name shown in plans and errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Evaluates the predicate; checks that it returned one value per row.
    pub fn call(&self, batch: &RecordBatch) -> Result<BooleanArray> {
        let mask = guard(&self.name, || (self.f)(batch))?;
        if mask.len() != batch.num_rows() {
            return Err(VolleyError::UserFunction {
                name: self.name.clone(),
                message: format!(
                    "predicate returned {} values for a batch of {} rows",
                    mask.len(),
                    batch.num_rows()
                ),
            });
        }
        Ok(mask)
    }
}

/// Builds stateful transforms, once per worker.
#[derive(Clone)]
pub enum TransformFactory {
    /// A named factory that can be shipped.
    Named(Arc<dyn NamedTransformFactory>),
    /// A closure, for this process only.
    Local {
        /// Shown in plans and errors.
        name: String,
        /// Builds one worker's transform.
        f: LocalFactory,
    },
}

impl fmt::Debug for TransformFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl TransformFactory {
    /// A local factory from a closure that builds the state.
    pub fn local<S, B>(name: impl Into<String>, build: B) -> Self
    where
        S: StatefulTransform + 'static,
        B: Fn() -> Result<S> + Send + Sync + 'static,
    {
        TransformFactory::Local {
            name: name.into(),
            f: Arc::new(move || Ok(Box::new(build()?) as Box<dyn StatefulTransform>)),
        }
    }

    /// A named factory.
    pub fn named(f: impl NamedTransformFactory + 'static) -> Self {
        TransformFactory::Named(Arc::new(f))
    }

    /// The name shown in plans and errors.
    pub fn name(&self) -> String {
        match self {
            TransformFactory::Named(t) => type_label(t.typetag_name()),
            TransformFactory::Local { name, .. } => name.clone(),
        }
    }

    /// Whether the factory can be sent to another process.
    pub fn is_shippable(&self) -> bool {
        matches!(self, TransformFactory::Named(_))
    }

    /// The factory as JSON, for shipping. Fails for closures, naming them.
    pub fn to_json(&self) -> Result<serde_json::Value> {
        match self {
            TransformFactory::Named(t) => serde_json::to_value(t.as_ref()).map_err(|e| {
                VolleyError::plan(format!("cannot serialize transform {}: {e}", self.name()))
            }),
            TransformFactory::Local { name, .. } => Err(not_shippable(name)),
        }
    }

    /// Builds one worker's transform; a panic becomes an error.
    pub fn build(&self) -> Result<Box<dyn StatefulTransform>> {
        let name = self.name();
        guard(&name, || match self {
            TransformFactory::Named(t) => t.build(),
            TransformFactory::Local { f, .. } => f(),
        })
    }
}

impl<F> StatefulTransform for F
where
    F: FnMut(RecordBatch) -> Result<RecordBatch> + Send,
{
    fn transform(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        self(batch)
    }
}

fn type_label(name: &str) -> String {
    name.to_string()
}

fn not_shippable(name: &str) -> VolleyError {
    VolleyError::plan(format!(
        "transform `{name}` is a closure and cannot be sent to another process; \
         implement NamedTransform (with #[typetag::serde]) to run it on a cluster"
    ))
}

/// Runs user code, turning a panic into [`VolleyError::UserFunction`] and naming the
/// function in its errors.
pub fn guard<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(match e {
            e @ VolleyError::UserFunction { .. } => e,
            e if e.is_cancelled() => e,
            e => VolleyError::UserFunction {
                name: name.to_string(),
                message: e.to_string(),
            },
        }),
        Err(panic) => Err(VolleyError::UserFunction {
            name: name.to_string(),
            message: format!("panicked: {}", panic_text(panic.as_ref())),
        }),
    }
}

/// The message a panic carried (`panic!("...")`'s text), or "panicked".
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panicked".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    struct Scale {
        factor: i64,
    }

    #[typetag::serde]
    impl NamedTransform for Scale {
        fn transform(&self, batch: RecordBatch) -> Result<RecordBatch> {
            let col = arrow::compute::kernels::numeric::mul(
                batch.column(0),
                &Int64Array::new_scalar(self.factor),
            )?;
            Ok(RecordBatch::try_new(batch.schema(), vec![col])?)
        }
    }

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1, 2, 3]))]).unwrap()
    }

    #[test]
    fn named_transform_ships_as_json() {
        let t = TransformFn::named(Scale { factor: 10 });
        assert!(t.is_shippable());
        let json = t.to_json().unwrap();
        assert!(json.contains("Scale") && json.contains("10"), "{json}");
        let back = TransformFn::from_json(&json).unwrap();
        let out = back.call(batch()).unwrap();
        let col = out.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(col.values(), &[10, 20, 30]);
    }

    #[test]
    fn closures_are_not_shippable() {
        let t = TransformFn::local("my_fn", Ok);
        assert!(!t.is_shippable());
        let err = t.to_json().unwrap_err().to_string();
        assert!(
            err.contains("my_fn") && err.contains("NamedTransform"),
            "{err}"
        );
    }

    #[test]
    fn panics_become_errors() {
        let t = TransformFn::local("boom", |_b| panic!("bad row"));
        let err = t.call(batch()).unwrap_err().to_string();
        assert!(err.contains("boom") && err.contains("bad row"), "{err}");
    }
}
