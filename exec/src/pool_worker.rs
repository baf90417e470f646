//! The actor of a cluster actor pool: what runs on a worker process for a stateful
//! stage (`map_batches_stateful` with a named factory, an LLM engine).

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use serde::{Deserialize, Serialize};
use volley_common::{Result, VolleyError};
use volley_runtime::cluster::{on_own_thread, RemoteActor, TaskContext};

use crate::transform::{chunks, guard, NamedTransformFactory, StatefulTransform, TransformFactory};

/// Builds the stage's transform once on its worker (loads the model), then transforms
/// the blocks it is called with (`process`: one or more), each cut into chunks of
/// `batch_size` rows when set, all handed to the transform at once.
#[derive(Serialize, Deserialize)]
pub struct PoolWorker {
    /// The named factory, as JSON.
    factory: serde_json::Value,
    name: String,
    batch_size: Option<usize>,
    #[serde(skip)]
    transform: Option<Box<dyn StatefulTransform>>,
}

impl std::fmt::Debug for PoolWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolWorker")
            .field("name", &self.name)
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

impl PoolWorker {
    /// A worker of `factory`'s transform; fails for a closure (it cannot travel).
    pub fn new(factory: &TransformFactory, batch_size: Option<usize>) -> Result<Self> {
        Ok(Self {
            factory: factory.to_json()?,
            name: factory.name(),
            batch_size,
            transform: None,
        })
    }
}

#[typetag::serde(name = "volley::PoolWorker")]
impl RemoteActor for PoolWorker {
    fn start(&mut self, _ctx: &TaskContext) -> Result<()> {
        let name = self.name.clone();
        let factory: Box<dyn NamedTransformFactory> = serde_json::from_value(self.factory.clone())
            .map_err(|e| {
                VolleyError::execution(format!(
                    "{name} cannot be rebuilt on this worker: {e} (workers run the driver's \
                     binary; is the type registered with #[typetag::serde]?)"
                ))
            })?;
        // Loading a model may block on I/O: not on the worker's async runtime thread.
        let built = on_own_thread(&name, || guard(&name, || factory.build()))?;
        self.transform = Some(built);
        Ok(())
    }

    fn call(
        &mut self,
        _ctx: &TaskContext,
        method: &str,
        _arg: serde_json::Value,
        inputs: Vec<Vec<RecordBatch>>,
    ) -> Result<Vec<RecordBatch>> {
        if method != "process" {
            return Err(VolleyError::internal(format!(
                "a pool worker has no method {method}"
            )));
        }
        let name = self.name.clone();
        let batch_size = self.batch_size;
        let transform = self
            .transform
            .as_mut()
            .ok_or_else(|| VolleyError::internal("a pool worker was called before it started"))?;
        // Each input block is cut on its own: without a batch size, the transform sees
        // one block per batch, however many blocks the call brings.
        let mut parts = Vec::new();
        for batches in inputs.into_iter().filter(|b| !b.is_empty()) {
            let all = if batches.len() == 1 {
                batches.into_iter().next().expect("one")
            } else {
                concat_batches(&batches[0].schema(), &batches)?
            };
            parts.extend(chunks(&all, batch_size));
        }
        if parts.is_empty() {
            return Ok(vec![]);
        }
        let thread = name.clone();
        on_own_thread(&thread, move || {
            let out = guard(&name, || transform.transform_batches(parts))?;
            Ok(out.into_iter().filter(|b| b.num_rows() > 0).collect())
        })
    }
}
