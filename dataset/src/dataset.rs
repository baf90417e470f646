//! The Dataset API.

use std::fmt;
use std::sync::{Arc, Mutex};

use arrow::array::{BooleanArray, RecordBatch};
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use arrow::util::pretty::pretty_format_batches;
use datafusion::logical_expr::Expr;
use volley_common::{Result, ResultExt, VolleyError};
use volley_connectors::{
    Compression, WriteFormat, WriteJob, WriteMode, WriteOptions, WriteSummary,
};
use volley_exec::{
    execute, Block, ExecContext, ExecutionStats, ExecutionStream, PhysicalPlan, PredicateFn,
    StatefulTransform, TransformFactory, TransformFn, WriteTarget,
};

use crate::context::Context;
use crate::logical::LogicalOp;
use crate::logical::WriteSpec;
use crate::lower::lower;
use crate::optimizer;
pub use crate::options::{IterOptions, MapOptions};

/// A lazy, distributed-ready collection of rows in Arrow batches.
///
/// Transformations return a new `Dataset` and run nothing; consumption (`iter_batches`,
/// `collect`, `take`, `count`, `show`, `write_*`) plans and executes. Each consumption
/// runs the pipeline again from its sources.
#[derive(Clone)]
pub struct Dataset {
    ctx: Context,
    plan: Arc<LogicalOp>,
    last_stats: Arc<Mutex<Option<ExecutionStats>>>,
}

impl fmt::Debug for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dataset(\n{}\n)", self.plan)
    }
}

/// The most batches [`Dataset::iter_batches_with`] prepares ahead.
const MAX_PREFETCH: usize = 4096;

impl Dataset {
    pub(crate) fn new(ctx: Context, plan: Arc<LogicalOp>) -> Self {
        Self {
            ctx,
            plan,
            last_stats: Arc::new(Mutex::new(None)),
        }
    }

    pub(crate) fn with(&self, plan: LogicalOp) -> Self {
        Self::new(self.ctx.clone(), Arc::new(plan))
    }

    /// Checks a column-shaping step against the schema now, where it is known, so that
    /// a wrong column name fails here rather than at run time.
    fn checked(&self, plan: LogicalOp) -> Result<Self> {
        if let Some(schema) = self.plan.schema(self.ctx.session_state())? {
            if let Some(exprs) = plan.projection(&schema, true)? {
                volley_exec::Step::project(&exprs, &schema, self.ctx.session_state())?;
            }
            if let LogicalOp::Filter { predicate, .. } = &plan {
                volley_exec::Step::filter(predicate, &schema, self.ctx.session_state())?;
            }
        }
        Ok(self.with(plan))
    }

    /// The logical plan.
    pub fn logical_plan(&self) -> &Arc<LogicalOp> {
        &self.plan
    }

    /// The context.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    // ---- transformations ----

    /// Keeps the named columns, in this order.
    pub fn select<S: AsRef<str>>(&self, columns: &[S]) -> Result<Self> {
        self.select_exprs(columns.iter().map(|c| crate::col(c.as_ref())).collect())
    }

    /// Computes the output columns from expressions (name them with `.alias(..)`).
    pub fn select_exprs(&self, exprs: Vec<Expr>) -> Result<Self> {
        self.checked(LogicalOp::Select {
            input: Arc::clone(&self.plan),
            exprs,
        })
    }

    /// Removes columns.
    pub fn drop_columns<S: AsRef<str>>(&self, columns: &[S]) -> Result<Self> {
        self.checked(LogicalOp::Drop {
            input: Arc::clone(&self.plan),
            columns: columns.iter().map(|c| c.as_ref().to_string()).collect(),
        })
    }

    /// Renames columns: `[("old", "new")]`.
    pub fn rename<A: AsRef<str>, B: AsRef<str>>(&self, pairs: &[(A, B)]) -> Result<Self> {
        self.checked(LogicalOp::Rename {
            input: Arc::clone(&self.plan),
            pairs: pairs
                .iter()
                .map(|(a, b)| (a.as_ref().to_string(), b.as_ref().to_string()))
                .collect(),
        })
    }

    /// Adds (or replaces) a column computed by an expression.
    pub fn with_column(&self, name: &str, expr: Expr) -> Result<Self> {
        self.checked(LogicalOp::WithColumn {
            input: Arc::clone(&self.plan),
            name: name.to_string(),
            expr,
        })
    }

    /// Keeps rows where `predicate` is true (nulls drop the row).
    pub fn filter(&self, predicate: Expr) -> Result<Self> {
        self.checked(LogicalOp::Filter {
            input: Arc::clone(&self.plan),
            predicate,
        })
    }

    /// Keeps rows where a Rust predicate over the batch is true.
    pub fn filter_fn(
        &self,
        name: &str,
        predicate: impl Fn(&RecordBatch) -> Result<BooleanArray> + Send + Sync + 'static,
    ) -> Self {
        self.with(LogicalOp::FilterFn {
            input: Arc::clone(&self.plan),
            predicate: PredicateFn::new(name, predicate),
        })
    }

    /// Applies a closure to every batch (this process only; see [`TransformFn`]).
    pub fn map_batches(
        &self,
        name: &str,
        f: impl Fn(RecordBatch) -> Result<RecordBatch> + Send + Sync + 'static,
        options: MapOptions,
    ) -> Self {
        self.map_transform(TransformFn::local(name, f), options)
    }

    /// Applies a transform (a named, shippable one or a closure) to every batch.
    pub fn map_transform(&self, f: TransformFn, options: MapOptions) -> Self {
        self.with(LogicalOp::MapBatches {
            input: Arc::clone(&self.plan),
            f,
            options,
        })
    }

    /// Applies a stateful transform: `build` runs once per worker (`concurrency`
    /// workers), and each worker's transform is called for the batches it receives.
    pub fn map_batches_stateful<S, B>(&self, name: &str, build: B, options: MapOptions) -> Self
    where
        S: StatefulTransform + 'static,
        B: Fn() -> Result<S> + Send + Sync + 'static,
    {
        self.map_factory(TransformFactory::local(name, build), options)
    }

    /// Applies a stateful transform from a factory (named or local).
    pub fn map_factory(&self, factory: TransformFactory, options: MapOptions) -> Self {
        self.with(LogicalOp::MapBatchesStateful {
            input: Arc::clone(&self.plan),
            factory,
            options,
        })
    }

    /// The first `n` rows.
    pub fn limit(&self, n: usize) -> Self {
        self.with(LogicalOp::Limit {
            input: Arc::clone(&self.plan),
            n,
        })
    }

    /// The rows of this dataset and then of `others` (same columns).
    pub fn union(&self, others: &[&Dataset]) -> Result<Self> {
        let mut inputs = vec![Arc::clone(&self.plan)];
        inputs.extend(others.iter().map(|o| Arc::clone(&o.plan)));
        // The inputs whose schemas are known must agree (names, and types up to string
        // views and nullability): said now, not when it runs.
        let state = self.ctx.session_state();
        let mut known = Vec::new();
        for (at, i) in inputs.iter().enumerate() {
            if let Some(s) = i.schema(state)? {
                known.push((at, s));
            }
        }
        if known.len() == inputs.len() {
            crate::logical::union_schema(&known)?;
        } else if known.len() > 1 {
            // An input whose columns a user transform decides gives them as they come,
            // so nothing can be relabelled: the known ones must be the same exactly.
            crate::logical::same_schemas(&known)?;
        }
        Ok(self.with(LogicalOp::Union { inputs }))
    }

    // ---- planning ----

    /// The logical plan as built (not optimized).
    pub(crate) fn logical(&self) -> &Arc<LogicalOp> {
        &self.plan
    }

    /// The operators of the optimized plan, as the context's runner places them.
    pub(crate) fn physical(&self) -> Result<PhysicalPlan> {
        let optimized = optimizer::optimize(&self.plan, self.ctx.session_state())?;
        let lowered = lower(optimized, &self.ctx)?;
        self.ctx.runner().plan(&lowered, self.ctx.exec_context())
    }

    /// The logical plan, the optimized plan, and the physical plan, as text.
    pub fn explain(&self) -> Result<String> {
        let state = self.ctx.session_state();
        let optimized = optimizer::optimize(&self.plan, state)?;
        let lowered = lower(Arc::clone(&optimized), &self.ctx)?;
        let physical = self.ctx.runner().plan(&lowered, self.ctx.exec_context())?;
        Ok(format!(
            "== logical plan ==\n{}\n\n== optimized logical plan ==\n{}\n\n== physical plan ==\n{}\n",
            self.plan.explain(false),
            optimized.explain(true),
            physical
        ))
    }

    /// The schema. Known without reading data unless a user transform decides it; then
    /// the first batch is computed to see it.
    pub fn schema(&self) -> Result<SchemaRef> {
        if let Some(s) = self.plan.schema(self.ctx.session_state())? {
            return Ok(s);
        }
        let mut stream = self.limit(1).stream()?;
        match stream.next() {
            Some(b) => Ok(b?.schema()),
            None => Err(VolleyError::plan(
                "the dataset is empty and its schema is decided by a user transform, so it is unknown",
            )),
        }
    }

    // ---- consumption ----

    /// The execution context for this dataset: the context's, switched to
    /// order-preserving mode when `ordered` or when a source's order is the point (a
    /// sort, a seeded shuffle, a split).
    fn exec_context(&self, ordered: bool) -> ExecContext {
        let mut exec = self.ctx.exec_context().clone();
        if (ordered || self.plan.needs_order()) && !exec.config.exec.preserve_order {
            let mut config = (*exec.config).clone();
            config.exec.preserve_order = true;
            exec.config = Arc::new(config);
        }
        self.ctx.runner().exec_context(exec)
    }

    /// Runs the dataset in order-preserving mode (what exchanges need to be
    /// reproducible), whatever the context's setting.
    pub(crate) fn ordered_batches(&self) -> Result<StatsStream> {
        Ok(StatsStream {
            inner: execute(self.physical()?, &self.exec_context(true))?,
            sink: Arc::clone(&self.last_stats),
        })
    }

    pub(crate) fn stream(&self) -> Result<StatsStream> {
        Ok(StatsStream {
            inner: execute(self.physical()?, &self.exec_context(false))?,
            sink: Arc::clone(&self.last_stats),
        })
    }

    /// Streams the output batches as they are produced.
    pub fn iter_batches(&self) -> Result<impl Iterator<Item = Result<RecordBatch>> + Send> {
        self.iter_batches_with(IterOptions::default())
    }

    /// Streams the output in batches of `batch_size` rows, with `prefetch` batches
    /// prepared ahead.
    pub fn iter_batches_with(
        &self,
        options: IterOptions,
    ) -> Result<Box<dyn Iterator<Item = Result<RecordBatch>> + Send>> {
        let stream: Box<dyn Iterator<Item = Result<RecordBatch>> + Send> = Box::new(self.stream()?);
        let rebatched: Box<dyn Iterator<Item = Result<RecordBatch>> + Send> =
            match options.batch_size {
                Some(n) => Box::new(Rebatch::new(stream, n.max(1))),
                None => Box::new(stream),
            };
        if options.prefetch == 0 {
            return Ok(rebatched);
        }
        // The channel's slots are made at once: a prefetch past a few thousand batches
        // buys nothing but that allocation.
        let (tx, rx) = std::sync::mpsc::sync_channel(options.prefetch.min(MAX_PREFETCH));
        std::thread::Builder::new()
            .name("volley-prefetch".into())
            .spawn(move || {
                for item in rebatched {
                    let stop = item.is_err();
                    if tx.send(item).is_err() || stop {
                        break;
                    }
                }
            })
            .map_err(|e| VolleyError::internal(format!("cannot start the prefetch thread: {e}")))?;
        Ok(Box::new(rx.into_iter()))
    }

    /// Runs the dataset and returns every batch.
    pub fn collect(&self) -> Result<Vec<RecordBatch>> {
        self.stream()?.collect()
    }

    /// Runs the dataset and returns all rows as one batch.
    pub fn collect_batch(&self) -> Result<RecordBatch> {
        let batches = self.collect()?;
        let schema = match batches.first() {
            Some(b) => b.schema(),
            None => self.schema()?,
        };
        Ok(concat_batches(&schema, &batches)?)
    }

    /// The first `n` rows (reads only as much input as it needs).
    pub fn take(&self, n: usize) -> Result<Vec<RecordBatch>> {
        self.limit(n).collect()
    }

    /// The number of rows. Reads no columns where none are needed.
    pub fn count(&self) -> Result<u64> {
        let counted = self.with(LogicalOp::Select {
            input: Arc::clone(&self.plan),
            exprs: vec![],
        });
        let mut n = 0u64;
        for b in counted.stream()? {
            n += b?.num_rows() as u64;
        }
        *self.last_stats.lock().expect("stats lock") =
            counted.last_stats.lock().expect("stats lock").clone();
        Ok(n)
    }

    /// The first `n` rows as a table.
    pub fn show_string(&self, n: usize) -> Result<String> {
        let batches = self.take(n)?;
        Ok(pretty_format_batches(&batches)?.to_string())
    }

    /// Prints the first `n` rows as a table.
    pub fn show(&self, n: usize) -> Result<()> {
        println!("{}", self.show_string(n)?);
        Ok(())
    }

    /// Statistics of the last execution of this dataset (per operator: wall and CPU
    /// time, rows, bytes, tasks, peak memory).
    pub fn stats(&self) -> Option<ExecutionStats> {
        self.last_stats.lock().expect("stats lock").clone()
    }

    /// Writes Parquet files into the folder `path` (committed atomically).
    pub fn write_parquet(&self, path: &str) -> Result<WriteSummary> {
        self.write(path, WriteFormat::Parquet).run()
    }

    /// Writes CSV files into the folder `path`.
    pub fn write_csv(&self, path: &str) -> Result<WriteSummary> {
        self.write(path, WriteFormat::Csv).run()
    }

    /// Writes newline-delimited JSON files into the folder `path`.
    pub fn write_json(&self, path: &str) -> Result<WriteSummary> {
        self.write(path, WriteFormat::Json).run()
    }

    /// A write with options: compression, partitioning, mode.
    pub fn write(&self, path: &str, format: WriteFormat) -> WriteBuilder {
        WriteBuilder {
            dataset: self.clone(),
            path: path.to_string(),
            options: WriteOptions::new(format),
        }
    }

    /// Runs SQL with this dataset as table `name`.
    pub fn sql(&self, name: &str, query: &str) -> Result<Dataset> {
        self.ctx.sql(query, &[(name, self)])
    }
}

/// A configured write; [`run`](WriteBuilder::run) executes it.
#[derive(Debug)]
pub struct WriteBuilder {
    dataset: Dataset,
    path: String,
    options: WriteOptions,
}

impl WriteBuilder {
    /// Compression (`Compression::Zstd`, ...).
    pub fn compression(mut self, c: Compression) -> Self {
        self.options.compression = c;
        self
    }
    /// Hive-style partition folders by these columns.
    pub fn partition_by<S: AsRef<str>>(mut self, columns: &[S]) -> Self {
        self.options.partition_by = columns.iter().map(|c| c.as_ref().to_string()).collect();
        self
    }
    /// What to do if the destination exists.
    pub fn mode(mut self, mode: WriteMode) -> Self {
        self.options.mode = mode;
        self
    }
    /// Rows per file at most.
    pub fn max_rows_per_file(mut self, n: usize) -> Self {
        self.options.max_rows_per_file = Some(n.max(1));
        self
    }
    /// One file at `path` instead of a folder of parts (written by one task).
    pub fn single_file(mut self) -> Self {
        self.options.single_file = true;
        self
    }

    /// Runs the dataset and writes it. Nothing appears at the destination unless the
    /// whole write succeeds.
    pub fn run(self) -> Result<WriteSummary> {
        let ds = self.dataset;
        let exec = &ds.exec_context(false);
        let registry = Arc::clone(&exec.session.runtime_env().object_store_registry);
        let single = self.options.single_file;
        let label = format!("{} to {}", self.options.format.extension(), self.path);
        let job = WriteJob::try_new(
            &self.path,
            self.options,
            registry.as_ref(),
            exec.config.exec.spill_dir.as_deref(),
            exec.runtime.io_handle(),
        )?;
        if single {
            // One writer, on this thread.
            let result = (|| {
                let mut writer = job.part_writer(0)?;
                for b in ds.stream()? {
                    writer.write(&b?)?;
                }
                writer.ensure_file(ds.schema()?)?;
                writer.finish()
            })();
            return match result {
                Ok(staged) => job
                    .commit(vec![staged])
                    .with_context(|| format!("writing {}", self.path)),
                Err(e) => {
                    job.abort();
                    Err(e).with_context(|| format!("writing {}", self.path))
                }
            };
        }
        let spec = WriteSpec {
            part: job.remote_part(),
            target: WriteTarget::new(job),
            label,
        };
        let target = Arc::clone(&spec.target);
        let result = (|| {
            let plan = ds
                .with(LogicalOp::Write {
                    input: Arc::clone(&ds.plan),
                    spec,
                })
                .physical()?;
            let stream = StatsStream {
                inner: execute(plan, exec)?,
                sink: Arc::clone(&ds.last_stats),
            };
            for b in stream {
                b?;
            }
            Ok::<_, VolleyError>(())
        })();
        match result {
            Ok(()) => {
                // The schema as planned (nothing runs again for it).
                let schema = ds.plan.schema(ds.ctx.session_state()).ok().flatten();
                target
                    .commit(schema)
                    .with_context(|| format!("writing {}", self.path))
            }
            Err(e) => {
                target.abort();
                Err(e).with_context(|| format!("writing {}", self.path))
            }
        }
    }
}

/// An execution stream that stores its stats in the dataset when it ends.
pub(crate) struct StatsStream {
    inner: ExecutionStream,
    sink: Arc<Mutex<Option<ExecutionStats>>>,
}

impl StatsStream {
    /// The next output block as it is (a remote one stays on its node).
    pub(crate) fn next_block(&mut self) -> Option<Result<Block>> {
        let item = self.inner.next_block();
        self.ended(item.is_none() || matches!(item, Some(Err(_))));
        item
    }

    /// A block's batches (a remote one's fetched from its node).
    pub(crate) fn resolve(&self, block: Block) -> Result<RecordBatch> {
        self.inner.resolve(block)
    }

    fn ended(&mut self, ended: bool) {
        if ended {
            if let Some(s) = self.inner.stats() {
                *self.sink.lock().expect("stats lock") = Some(s.clone());
            }
        }
    }
}

impl Iterator for StatsStream {
    type Item = Result<RecordBatch>;
    fn next(&mut self) -> Option<Self::Item> {
        let item = self.inner.next();
        self.ended(item.is_none() || matches!(item, Some(Err(_))));
        item
    }
}

/// Re-chunks a stream of batches into batches of exactly `n` rows (the last may have
/// fewer).
struct Rebatch<I> {
    inner: I,
    n: usize,
    held: Vec<RecordBatch>,
    held_rows: usize,
    done: bool,
}

impl<I> Rebatch<I> {
    fn new(inner: I, n: usize) -> Self {
        Self {
            inner,
            n,
            held: Vec::new(),
            held_rows: 0,
            done: false,
        }
    }

    fn cut(&mut self) -> Result<RecordBatch> {
        let all = concat_batches(&self.held[0].schema(), &self.held)?;
        let take = self.n.min(all.num_rows());
        let out = all.slice(0, take);
        self.held.clear();
        self.held_rows = 0;
        if take < all.num_rows() {
            self.held.push(all.slice(take, all.num_rows() - take));
            self.held_rows = all.num_rows() - take;
        }
        Ok(out)
    }
}

impl<I: Iterator<Item = Result<RecordBatch>>> Iterator for Rebatch<I> {
    type Item = Result<RecordBatch>;
    fn next(&mut self) -> Option<Self::Item> {
        while !self.done && self.held_rows < self.n {
            match self.inner.next() {
                Some(Ok(b)) => {
                    if b.num_rows() > 0 {
                        self.held_rows += b.num_rows();
                        self.held.push(b);
                    }
                }
                Some(Err(e)) => return Some(Err(e)),
                None => self.done = true,
            }
        }
        if self.held_rows == 0 {
            return None;
        }
        Some(self.cut())
    }
}
