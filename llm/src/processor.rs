//! The Dataset stage: prompts in, generated text out.
//!
//! [`LlmProcessor`] is a stateful transform factory: each worker of the stage loads
//! the model once into its own [`Engine`], then the rows it receives are generated with
//! continuous batching: every chunk of `batch_size` rows a worker holds (its block's,
//! and on this machine any blocks already waiting) joins one engine run, so rows of the
//! next chunk take the places of finished sequences instead of each chunk draining
//! before the next. On a cluster each engine is a pool actor, and its running batch
//! also takes the next call's rows (read while the last call runs) as the last call's
//! sequences finish: the batch drains only when no call is waiting. The input's
//! columns pass through; the stage
//! adds `generated_text`, `num_input_tokens`, `num_generated_tokens` and
//! `finish_reason`. The factory is named (`typetag`), so a plan holding it can travel
//! to cluster workers that have the model folder at the same path.

use std::collections::{BTreeMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray, StructArray};
use arrow::datatypes::{DataType, Field, Schema};
use serde::{Deserialize, Serialize};
use volley_common::{Result, ResultExt, VolleyError};
use volley_dataset::{Dataset, MapOptions};
use volley_exec::{Bundles, NamedTransformFactory, StatefulTransform, TransformFactory};

use crate::chat::Message;
use crate::engine::{Engine, EngineConfig, Generation};
use crate::sampling::SamplingParams;
use crate::CpuBackend;

/// What an [`LlmProcessor`] runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LlmConfig {
    /// A Hugging Face model folder.
    pub model: PathBuf,
    /// Engine sizes (KV cache, batch).
    pub engine: EngineConfig,
    /// Sampling of every row. With a `seed`, each row's seed is derived from it and
    /// the row's prompt tokens, so results do not depend on how rows are batched or
    /// ordered, and rows with the same prompt get the same answer. Without one, rows
    /// draw from the engine's sequence, in the order they reach it.
    pub sampling: SamplingParams,
    /// Column of prompt text; used when present.
    pub prompt_column: String,
    /// Column of chat messages (a list of `{role, content}` structs), rendered with the
    /// model's chat template; used when there is no prompt column.
    pub messages_column: String,
    /// Engines (one per worker).
    pub concurrency: usize,
    /// Rows per chunk handed to an engine; the chunks a worker holds at once run
    /// together (the engine's running batch is `engine.max_num_seqs`).
    pub batch_size: usize,
    /// CPUs each engine holds.
    pub num_cpus: f64,
    /// GPUs each engine holds (below 1, engines share a GPU); only a cluster's nodes
    /// give GPUs, and each engine sees its own through `CUDA_VISIBLE_DEVICES`.
    pub num_gpus: f64,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            engine: EngineConfig::default(),
            sampling: SamplingParams::default(),
            prompt_column: "prompt".into(),
            messages_column: "messages".into(),
            concurrency: 1,
            batch_size: 256,
            num_cpus: 1.0,
            num_gpus: 0.0,
        }
    }
}

/// A Dataset stage that generates text for each row.
///
/// ```no_run
/// use volley_llm::{LlmConfig, LlmProcessor, SamplingParams};
/// # fn main() -> volley_common::Result<()> {
/// let ctx = volley_dataset::Context::try_default()?;
/// let prompts = ctx.read_parquet("prompts.parquet")?;
/// let processor = LlmProcessor::new(LlmConfig {
///     model: "models/TinyLlama-1.1B-Chat".into(),
///     sampling: SamplingParams { max_tokens: 128, ..Default::default() },
///     ..Default::default()
/// });
/// processor.apply(&prompts).write_parquet("answers.parquet")?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlmProcessor {
    config: LlmConfig,
}

impl LlmProcessor {
    /// A processor for `config`.
    pub fn new(config: LlmConfig) -> Self {
        Self { config }
    }

    /// Its configuration.
    pub fn config(&self) -> &LlmConfig {
        &self.config
    }

    /// `ds` with the generated columns added.
    pub fn apply(&self, ds: &Dataset) -> Dataset {
        let c = &self.config;
        ds.map_factory(
            TransformFactory::named(self.clone()),
            MapOptions::default()
                .with_batch_size(c.batch_size)
                .with_concurrency(c.concurrency)
                .with_num_cpus(c.num_cpus)
                .with_num_gpus(c.num_gpus),
        )
    }
}

#[typetag::serde]
impl NamedTransformFactory for LlmProcessor {
    fn build(&self) -> Result<Box<dyn StatefulTransform>> {
        let engine = Engine::<CpuBackend>::load(
            &self.config.model,
            self.config.engine.clone(),
            &Default::default(),
        )?;
        Ok(Box::new(LlmStage {
            engine,
            config: self.config.clone(),
        }))
    }
}

struct LlmStage {
    engine: Engine<CpuBackend>,
    config: LlmConfig,
}

fn row_seed(seed: u64, prompt: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    seed.hash(&mut h);
    prompt.hash(&mut h);
    h.finish()
}

/// The messages of one row of a `List<Struct{role, content}>` column.
fn messages(column: &str, list: &dyn Array, row: usize) -> Result<Vec<Message>> {
    let bad = || {
        VolleyError::plan(format!(
            "column `{column}` must be a list of {{role, content}} structs of strings, is {}",
            list.data_type()
        ))
    };
    let item = match list.data_type() {
        DataType::List(_) => list.as_list::<i32>().value(row),
        DataType::LargeList(_) => list.as_list::<i64>().value(row),
        _ => return Err(bad()),
    };
    let s: &StructArray = item.as_struct_opt().ok_or_else(bad)?;
    let text = |name: &str| -> Result<StringArray> {
        let col = s.column_by_name(name).ok_or_else(bad)?;
        let col = arrow::compute::cast(col, &DataType::Utf8).map_err(|_| bad())?;
        Ok(col.as_string::<i32>().clone())
    };
    let (role, content) = (text("role")?, text("content")?);
    (0..s.len())
        .map(|i| {
            // A null is not an empty string: the message would be rendered wrong.
            for (field, values) in [("role", &role), ("content", &content)] {
                if values.is_null(i) {
                    return Err(VolleyError::plan(format!(
                        "column `{column}`: message {i} has a null {field}"
                    )));
                }
            }
            Ok(Message::new(role.value(i), content.value(i)))
        })
        .collect()
}

/// The prompts of one input batch, tokenized, and how each row is named in errors.
struct Prompts {
    /// Token ids per row; `None` for a null prompt.
    tokens: Vec<Option<Vec<u32>>>,
    labels: Vec<String>,
}

impl LlmStage {
    /// The batch's prompts, tokenized (chat messages rendered with the template).
    fn prompts(&self, batch: &RecordBatch) -> Result<Prompts> {
        let c = &self.config;
        let mut tokens: Vec<Option<Vec<u32>>> = Vec::with_capacity(batch.num_rows());
        let mut labels: Vec<String> = Vec::with_capacity(batch.num_rows());
        if let Some(col) = batch.column_by_name(&c.prompt_column) {
            let col = arrow::compute::cast(col, &DataType::Utf8).map_err(|e| {
                VolleyError::plan(format!("column `{}` is not text: {e}", c.prompt_column))
            })?;
            let col = col.as_string::<i32>();
            for i in 0..col.len() {
                let text: String = col.value(i).chars().take(40).collect();
                let label = format!("prompt {text:?}");
                tokens.push(if col.is_null(i) {
                    None
                } else {
                    Some(
                        self.engine
                            .encode(col.value(i))
                            .with_context(|| format!("column `{}`, {label}", c.prompt_column))?,
                    )
                });
                labels.push(label);
            }
        } else if let Some(col) = batch.column_by_name(&c.messages_column) {
            for i in 0..col.len() {
                let mut label = format!("row {i} of a batch of `{}`", c.messages_column);
                tokens.push(if col.is_null(i) {
                    None
                } else {
                    let m = messages(&c.messages_column, col.as_ref(), i)
                        .with_context(|| label.clone())?;
                    // The conversation's first words locate it better than its row.
                    if let Some(first) = m.iter().find(|m| m.role == "user").or(m.first()) {
                        let text: String = first.content.chars().take(40).collect();
                        label = format!("conversation {text:?}");
                    }
                    Some(
                        self.engine
                            .encode_chat(&m)
                            .with_context(|| format!("column `{}`, {label}", c.messages_column))?,
                    )
                });
                labels.push(label);
            }
        } else {
            return Err(VolleyError::plan(format!(
                "the LLM stage needs a `{}` or `{}` column; the input has {:?}",
                c.prompt_column,
                c.messages_column,
                batch
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect::<Vec<_>>()
            )));
        }
        Ok(Prompts { tokens, labels })
    }
}

/// `batch` with the generated columns, from the generations of its non-null prompts in
/// row order.
fn with_generations(
    batch: &RecordBatch,
    prompts: &Prompts,
    generations: &mut impl Iterator<Item = Generation>,
) -> Result<RecordBatch> {
    let schema = batch.schema();
    let n = prompts.tokens.len();
    let (mut text, mut input, mut output, mut reason) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for p in &prompts.tokens {
        match p {
            None => {
                text.push(None);
                input.push(None);
                output.push(None);
                reason.push(None);
            }
            Some(_) => {
                let g = generations.next().ok_or_else(|| {
                    VolleyError::execution("the engine returned fewer generations than rows")
                })?;
                input.push(Some(g.prompt_tokens as i64));
                output.push(Some(g.tokens.len() as i64));
                reason.push(Some(g.finish_reason.as_str()));
                text.push(Some(g.text));
            }
        }
    }
    let mut fields: Vec<Arc<Field>> = schema.fields().iter().cloned().collect();
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    let new: [(&str, DataType, ArrayRef); 4] = [
        (
            "generated_text",
            DataType::Utf8,
            Arc::new(StringArray::from(text)),
        ),
        (
            "num_input_tokens",
            DataType::Int64,
            Arc::new(Int64Array::from(input)),
        ),
        (
            "num_generated_tokens",
            DataType::Int64,
            Arc::new(Int64Array::from(output)),
        ),
        (
            "finish_reason",
            DataType::Utf8,
            Arc::new(StringArray::from(reason)),
        ),
    ];
    for (name, ty, col) in new {
        if let Some(i) = fields.iter().position(|f| f.name() == name) {
            fields[i] = Arc::new(Field::new(name, ty, true));
            columns[i] = col;
        } else {
            fields.push(Arc::new(Field::new(name, ty, true)));
            columns.push(col);
        }
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone())),
        columns,
    )?)
}

impl StatefulTransform for LlmStage {
    fn transform(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        self.transform_batches(vec![batch])?
            .pop()
            .ok_or_else(|| VolleyError::internal("the LLM stage returned no batch"))
    }

    /// Every row of every batch joins one engine run: the engine's running batch stays
    /// full across the batches' boundaries (a later batch's rows start as earlier ones
    /// finish), and only the last rows of the whole bundle drain.
    fn transform_batches(&mut self, batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
        let queued = self.queue(batches)?;
        let mut done = self.engine.run_to_completion()?;
        queued.output(&mut done)
    }

    /// Bundles as they come: when no row of the bundles taken is still waiting for a
    /// place in the running batch, the next bundle (a pool actor's next call, already
    /// read) is taken, so its rows start as the last bundle's sequences finish and the
    /// batch drains only when no bundle is left. Each bundle is answered once all its
    /// rows are done, in the order they came.
    fn transform_stream(&mut self, bundles: &mut dyn Bundles) {
        // Whatever an interrupted stream left queued is not wanted any more.
        self.engine.clear();
        let mut taken: VecDeque<(u64, Queued)> = VecDeque::new();
        let mut done = BTreeMap::new();
        let mut open = true;
        loop {
            while open && self.engine.num_waiting() == 0 {
                let idle = taken.is_empty();
                match bundles.next(idle) {
                    Some((id, batches)) => match self.queue(batches) {
                        Ok(q) => taken.push_back((id, q)),
                        Err(e) => bundles.done(id, Err(e)),
                    },
                    None => {
                        open = !idle;
                        break;
                    }
                }
            }
            while taken
                .front()
                .is_some_and(|(_, q)| q.ids.iter().all(|i| done.contains_key(i)))
            {
                let (id, q) = taken.pop_front().expect("checked");
                bundles.done(id, q.output(&mut done));
            }
            if taken.is_empty() {
                if !open {
                    return;
                }
                continue;
            }
            let step = if self.engine.has_unfinished() {
                self.engine.step()
            } else {
                Err(VolleyError::internal("the engine lost rows of a bundle"))
            };
            match step {
                Ok(finished) => done.extend(finished.into_iter().map(|g| (g.id, g))),
                Err(e) => {
                    self.engine.clear();
                    done.clear();
                    for (id, _) in taken.drain(..) {
                        bundles.done(id, Err(VolleyError::execution(format!("LLM stage: {e}"))));
                    }
                }
            }
        }
    }
}

/// A bundle's rows queued in the engine.
struct Queued {
    batches: Vec<RecordBatch>,
    prompts: Vec<Prompts>,
    /// The engine's request ids of its non-null rows, in row order.
    ids: Vec<u64>,
}

impl LlmStage {
    /// Queues every row of `batches`. A row the engine refuses (too long for the model,
    /// say) fails the bundle naming it, and leaves none of its rows queued.
    fn queue(&mut self, batches: Vec<RecordBatch>) -> Result<Queued> {
        let prompts = batches
            .iter()
            .map(|b| self.prompts(b))
            .collect::<Result<Vec<_>>>()?;
        let c = &self.config;
        let mut ids = Vec::new();
        for p in &prompts {
            for (tokens, label) in p.tokens.iter().zip(&p.labels) {
                if let Some(t) = tokens {
                    let mut params = c.sampling.clone();
                    params.seed = c.sampling.seed.map(|s| row_seed(s, t));
                    match self.engine.add_request(t.clone(), params) {
                        Ok(id) => ids.push(id),
                        Err(e) => {
                            self.engine.cancel(&ids);
                            return Err(VolleyError::plan(format!("LLM stage, {label}: {e}")));
                        }
                    }
                }
            }
        }
        Ok(Queued {
            batches,
            prompts,
            ids,
        })
    }
}

impl Queued {
    /// The bundle's batches with their generations (taken out of `done`).
    fn output(self, done: &mut BTreeMap<u64, Generation>) -> Result<Vec<RecordBatch>> {
        let mut generations = self.ids.iter().filter_map(|id| done.remove(id));
        self.batches
            .iter()
            .zip(&self.prompts)
            .map(|(b, p)| with_generations(b, p, &mut generations))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_with_a_null_field_is_named() {
        use arrow::array::{ListArray, StructArray};
        use arrow::buffer::OffsetBuffer;
        use arrow::datatypes::Field;
        let role = StringArray::from(vec![Some("user"), None]);
        let content = StringArray::from(vec![Some("hi"), Some("there")]);
        let fields = vec![
            Field::new("role", DataType::Utf8, true),
            Field::new("content", DataType::Utf8, true),
        ];
        let items = StructArray::new(
            fields.clone().into(),
            vec![Arc::new(role), Arc::new(content)],
            None,
        );
        let item = Arc::new(Field::new("item", items.data_type().clone(), true));
        let list = ListArray::new(
            item,
            OffsetBuffer::new(vec![0, 2].into()),
            Arc::new(items),
            None,
        );
        let e = messages("messages", &list, 0).unwrap_err().to_string();
        assert!(e.contains("message 1 has a null role"), "{e}");
    }

    fn stage() -> LlmStage {
        let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let processor = LlmProcessor::new(LlmConfig {
            model,
            sampling: SamplingParams {
                max_tokens: 12,
                ignore_eos: true,
                ..Default::default()
            },
            ..Default::default()
        });
        let config = processor.config().clone();
        let engine =
            Engine::<CpuBackend>::load(&config.model, config.engine.clone(), &Default::default())
                .unwrap();
        LlmStage { engine, config }
    }

    fn batch(prompts: &[&str]) -> RecordBatch {
        RecordBatch::try_from_iter([(
            "prompt",
            Arc::new(StringArray::from(prompts.to_vec())) as ArrayRef,
        )])
        .unwrap()
    }

    /// Chunks handed over together share the engine's running batch: the same text as
    /// one chunk at a time, in fewer forward passes (no chunk drains before the next
    /// starts).
    #[test]
    fn chunks_handed_over_together_keep_the_batch_full() {
        let chunks = vec![
            batch(&["Hello there", "The capital of France"]),
            batch(&["Once upon a time", "1, 2, 3,"]),
            batch(&["A", "The quick brown fox"]),
        ];
        let mut one_by_one = stage();
        let separate: Vec<RecordBatch> = chunks
            .iter()
            .map(|c| one_by_one.transform(c.clone()).unwrap())
            .collect();
        let mut together = stage();
        let joined = together.transform_batches(chunks).unwrap();
        assert_eq!(joined, separate);
        let (steps_apart, steps_joined) = (
            one_by_one.engine.stats().steps,
            together.engine.stats().steps,
        );
        assert!(
            steps_joined * 2 < steps_apart,
            "{steps_joined} forward passes together vs {steps_apart} one chunk at a time"
        );
    }

    /// Bundles ready at once, answered by id.
    struct Ready {
        bundles: VecDeque<(u64, Vec<RecordBatch>)>,
        answers: Vec<(u64, Result<Vec<RecordBatch>>)>,
    }

    impl Bundles for Ready {
        fn next(&mut self, _wait: bool) -> Option<(u64, Vec<RecordBatch>)> {
            self.bundles.pop_front()
        }
        fn done(&mut self, id: u64, output: Result<Vec<RecordBatch>>) {
            self.answers.push((id, output));
        }
    }

    /// A stream of bundles (a cluster actor's calls) shares the running batch across
    /// bundles: each bundle gets the text it gets alone, in fewer forward passes than
    /// bundle after bundle; a bundle with a bad row fails alone.
    #[test]
    fn bundles_streamed_refill_the_batch_across_bundles() {
        let bundles = vec![
            vec![batch(&["Hello there", "The capital of France"])],
            vec![batch(&["Once upon a time"]), batch(&["1, 2, 3,"])],
            vec![RecordBatch::try_from_iter([(
                "text",
                Arc::new(StringArray::from(vec!["no prompt column"])) as ArrayRef,
            )])
            .unwrap()],
            vec![batch(&["A", "The quick brown fox"])],
        ];
        let mut alone = stage();
        let expected: Vec<Option<Vec<RecordBatch>>> = bundles
            .iter()
            .map(|b| alone.transform_batches(b.clone()).ok())
            .collect();
        let steps_alone = alone.engine.stats().steps;
        let mut streamed = stage();
        let mut ready = Ready {
            bundles: bundles
                .into_iter()
                .enumerate()
                .map(|(i, b)| (i as u64 * 10, b))
                .collect(),
            answers: Vec::new(),
        };
        streamed.transform_stream(&mut ready);
        ready.answers.sort_by_key(|(id, _)| *id);
        let ids: Vec<u64> = ready.answers.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![0, 10, 20, 30], "each bundle answered once");
        for ((id, got), want) in ready.answers.into_iter().zip(expected) {
            match (got, want) {
                (Ok(got), Some(want)) => assert_eq!(got, want, "bundle {id}"),
                (Err(e), None) => assert!(e.to_string().contains("prompt"), "{e}"),
                (got, want) => panic!("bundle {id}: {got:?} vs {want:?}"),
            }
        }
        assert!(!streamed.engine.has_unfinished());
        let steps_streamed = streamed.engine.stats().steps;
        assert!(
            steps_streamed < steps_alone,
            "{steps_streamed} forward passes streamed vs {steps_alone} bundle by bundle"
        );
    }
}
