//! The actor of a cluster actor pool: what runs on a worker process for a stateful
//! stage (`map_batches_stateful` with a named factory, an LLM engine).

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use serde::{Deserialize, Serialize};
use volley_common::{Result, VolleyError};
use volley_runtime::cluster::{on_own_thread, ActorCalls, RemoteActor, TaskContext};

use crate::transform::{
    chunks, guard, Bundles, NamedTransformFactory, StatefulTransform, TransformFactory,
};

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
        check_method(method)?;
        let parts = self.parts(inputs)?;
        if parts.is_empty() {
            return Ok(vec![]);
        }
        let name = self.name.clone();
        let transform = self.transform()?;
        let out = guard(&name, || transform.transform_batches(parts))?;
        Ok(non_empty(out))
    }

    /// The transform serves the calls as a stream of bundles: an LLM engine takes the
    /// next call's rows into its running batch while the last call's sequences finish.
    fn serve(&mut self, calls: &mut dyn ActorCalls) {
        let name = self.name.clone();
        let batch_size = self.batch_size;
        let Some(transform) = self.transform.as_mut() else {
            while let Some(c) = calls.next(true) {
                let e = VolleyError::internal("a pool worker was called before it started");
                calls.answer(c.id, Err(e));
            }
            return;
        };
        let mut bundles = CallBundles {
            calls,
            batch_size,
            outstanding: Vec::new(),
        };
        loop {
            let served = guard(&name, || {
                transform.transform_stream(&mut bundles);
                Ok(())
            });
            match served {
                Ok(()) => return,
                // A panic fails the calls it held; the next calls go on.
                Err(e) => {
                    for id in std::mem::take(&mut bundles.outstanding) {
                        let e = match &e {
                            VolleyError::UserFunction { name, message } => {
                                VolleyError::UserFunction {
                                    name: name.clone(),
                                    message: message.clone(),
                                }
                            }
                            e => VolleyError::execution(e.to_string()),
                        };
                        bundles.calls.answer(id, Err(e));
                    }
                }
            }
        }
    }
}

impl PoolWorker {
    fn transform(&mut self) -> Result<&mut Box<dyn StatefulTransform>> {
        self.transform
            .as_mut()
            .ok_or_else(|| VolleyError::internal("a pool worker was called before it started"))
    }

    /// A call's input blocks cut into the chunks the transform sees. Without a batch
    /// size, the transform sees one block per batch, however many blocks the call
    /// brings; with one, the call's rows are cut as one, so only its last batch may
    /// be short.
    fn parts(&self, inputs: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
        cut(inputs, self.batch_size)
    }
}

fn cut(inputs: Vec<Vec<RecordBatch>>, batch_size: Option<usize>) -> Result<Vec<RecordBatch>> {
    let whole = |batches: Vec<RecordBatch>| -> Result<RecordBatch> {
        Ok(if batches.len() == 1 {
            batches.into_iter().next().expect("one")
        } else {
            concat_batches(&batches[0].schema(), &batches)?
        })
    };
    let inputs: Vec<Vec<RecordBatch>> = inputs.into_iter().filter(|b| !b.is_empty()).collect();
    if batch_size.is_some() {
        let all: Vec<RecordBatch> = inputs.into_iter().flatten().collect();
        if all.is_empty() {
            return Ok(vec![]);
        }
        return Ok(chunks(&whole(all)?, batch_size));
    }
    let mut parts = Vec::new();
    for batches in inputs {
        parts.extend(chunks(&whole(batches)?, batch_size));
    }
    Ok(parts)
}

fn check_method(method: &str) -> Result<()> {
    if method == "process" {
        Ok(())
    } else {
        Err(VolleyError::internal(format!(
            "a pool worker has no method {method}"
        )))
    }
}

fn non_empty(batches: Vec<RecordBatch>) -> Vec<RecordBatch> {
    batches.into_iter().filter(|b| b.num_rows() > 0).collect()
}

/// A pool actor's calls as the transform's bundles.
struct CallBundles<'a> {
    calls: &'a mut dyn ActorCalls,
    batch_size: Option<usize>,
    /// Bundles handed to the transform and not answered yet.
    outstanding: Vec<u64>,
}

impl Bundles for CallBundles<'_> {
    fn next(&mut self, wait: bool) -> Option<(u64, Vec<RecordBatch>)> {
        loop {
            let c = self.calls.next(wait)?;
            let parts = check_method(&c.method).and_then(|()| cut(c.inputs, self.batch_size));
            match parts {
                Ok(parts) if !parts.is_empty() => {
                    self.outstanding.push(c.id);
                    return Some((c.id, parts));
                }
                Ok(_) => self.calls.answer(c.id, Ok(vec![])),
                Err(e) => self.calls.answer(c.id, Err(e)),
            }
        }
    }

    fn done(&mut self, id: u64, output: Result<Vec<RecordBatch>>) {
        self.outstanding.retain(|&o| o != id);
        self.calls.answer(id, output.map(non_empty));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array};
    use volley_runtime::cluster::ActorCall;

    use super::*;

    /// Passes batches through; panics on a batch of 3 rows.
    struct Picky;

    impl StatefulTransform for Picky {
        fn transform(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
            assert_ne!(batch.num_rows(), 3, "three rows");
            Ok(batch)
        }
    }

    #[derive(Default)]
    struct Calls {
        queue: VecDeque<ActorCall>,
        answers: Vec<(u64, Result<Vec<RecordBatch>>)>,
    }

    impl ActorCalls for Calls {
        fn next(&mut self, _wait: bool) -> Option<ActorCall> {
            self.queue.pop_front()
        }
        fn answer(&mut self, id: u64, result: Result<Vec<RecordBatch>>) {
            self.answers.push((id, result));
        }
    }

    fn call(id: u64, method: &str, rows: &[usize]) -> ActorCall {
        let block = |n: usize| {
            vec![RecordBatch::try_from_iter([(
                "x",
                Arc::new(Int64Array::from_iter_values(0..n as i64)) as ArrayRef,
            )])
            .unwrap()]
        };
        ActorCall {
            id,
            ctx: TaskContext {
                task_id: format!("t{id}"),
                attempt: 0,
                job_id: "j".into(),
                node_id: "n".into(),
                gpu_ids: vec![],
                name: String::new(),
            },
            method: method.into(),
            arg: serde_json::Value::Null,
            inputs: rows.iter().map(|&n| block(n)).collect(),
        }
    }

    /// With a batch size, a call's blocks are cut as one: only its last batch is short.
    #[test]
    fn a_calls_blocks_are_cut_into_whole_batches() {
        let sizes = |batch_size| {
            let c = call(0, "process", &[3, 3, 0, 3]);
            cut(c.inputs, batch_size)
                .unwrap()
                .iter()
                .map(RecordBatch::num_rows)
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(Some(4)), [4, 4, 1]);
        assert_eq!(sizes(None), [3, 3, 3]);
        assert!(cut(vec![vec![], vec![]], Some(4)).unwrap().is_empty());
    }

    /// Every call is answered once: a wrong method and a panic fail only their own
    /// call, and the calls after them are served.
    #[test]
    fn serves_each_call_once_and_a_failure_stays_in_its_call() {
        let mut worker = PoolWorker {
            factory: serde_json::Value::Null,
            name: "picky".into(),
            batch_size: None,
            transform: Some(Box::new(Picky)),
        };
        let mut calls = Calls {
            queue: [
                call(0, "process", &[4, 1]),
                call(1, "other", &[2]),
                call(2, "process", &[]),
                call(3, "process", &[3]),
                call(4, "process", &[1]),
            ]
            .into(),
            ..Default::default()
        };
        worker.serve(&mut calls);
        let rows = |r: &Result<Vec<RecordBatch>>| {
            r.as_ref()
                .map(|b| b.iter().map(|b| b.num_rows()).collect::<Vec<_>>())
                .map_err(|e| e.to_string())
        };
        let got: Vec<_> = calls.answers.iter().map(|(id, r)| (*id, rows(r))).collect();
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!(got[0], (0, Ok(vec![4, 1])));
        assert!(
            matches!(&got[1], (1, Err(e)) if e.contains("no method other")),
            "{got:?}"
        );
        assert_eq!(got[2], (2, Ok(vec![])));
        assert!(
            matches!(&got[3], (3, Err(e)) if e.contains("three rows")),
            "{got:?}"
        );
        assert_eq!(got[4], (4, Ok(vec![1])));
    }
}
