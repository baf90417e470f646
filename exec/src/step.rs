//! Row-local steps that fuse into one task: projections, filters, user transforms.
//!
//! Steps run batch by batch inside whatever task produced the batch (a read task or a
//! map task), so `read → filter → with_column → map_batches` decodes, filters and
//! transforms each batch while it is hot in cache, without a queue between them.

use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, RecordBatchOptions};
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::common::tree_node::Transformed;
use datafusion::common::DFSchema;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::PhysicalExpr;
use volley_common::{Result, ResultExt, VolleyError};

use crate::transform::{PredicateFn, TransformFn};

/// Compiles a logical expression against `schema` (with DataFusion's type coercion, so
/// `col("date") <= lit("1998-09-02")` compares dates; its simplifier does not run, so
/// constants are not folded), then applies the [`ExprRewrites`] the session holds;
/// errors name the expression.
pub fn compile_expr(
    expr: &Expr,
    schema: &SchemaRef,
    state: &SessionState,
) -> Result<Arc<dyn PhysicalExpr>> {
    let df_schema = DFSchema::try_from(Arc::clone(schema))?;
    let mut compiled = state
        .create_physical_expr(expr.clone(), &df_schema)
        .with_context(|| format!("in expression `{expr}`"))?;
    if let Some(rewrites) = state.config().get_extension::<ExprRewrites>() {
        for rewrite in &rewrites.0 {
            compiled = rewrite(&compiled, schema)
                .with_context(|| format!("in expression `{expr}`"))?
                .data;
        }
    }
    Ok(compiled)
}

/// Rewrites a compiled expression into a faster one computing the same values, given
/// the schema of the batches it is evaluated over (for an operator's expression, the
/// schema of its input).
pub type ExprRewrite = fn(
    &Arc<dyn PhysicalExpr>,
    &Schema,
) -> datafusion::common::Result<Transformed<Arc<dyn PhysicalExpr>>>;

/// The expression rewrites a session applies to what [`compile_expr`] compiles (a
/// step's projections and filters, an exchange's keys), held as an extension of
/// DataFusion's session config: the same rules a context's physical optimizer applies
/// to its plans' operators, so a step computes an expression as fast as a plan does.
#[derive(Debug, Clone, Default)]
pub struct ExprRewrites(pub Vec<ExprRewrite>);

/// One fused step.
#[derive(Clone)]
pub enum Step {
    /// Computes the output columns from expressions.
    Project {
        /// `(expression, output name)` per output column.
        exprs: Vec<(Arc<dyn PhysicalExpr>, String)>,
        /// The output schema.
        schema: SchemaRef,
    },
    /// Keeps the rows where the expression is true.
    Filter {
        /// The predicate.
        predicate: Arc<dyn PhysicalExpr>,
        /// As the user wrote it, for errors.
        display: String,
    },
    /// Keeps the rows where a Rust predicate is true.
    FilterFn(PredicateFn),
    /// A step that can only be built once the input schema is seen (it follows a user
    /// transform whose output schema is unknown until it runs).
    Lazy(Arc<LazyStep>),
    /// A user transform, fed batches of `batch_size` rows when set.
    Map {
        /// The transform.
        f: TransformFn,
        /// Rows per call; `None` passes batches as they come.
        batch_size: Option<usize>,
    },
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Project { exprs, .. } => {
                let cols: Vec<String> = exprs
                    .iter()
                    .map(|(e, name)| {
                        let s = e.to_string();
                        let bare = s.split('@').next().unwrap_or(&s);
                        if bare == name {
                            name.clone()
                        } else {
                            format!("{s} AS {name}")
                        }
                    })
                    .collect();
                write!(f, "Project [{}]", cols.join(", "))
            }
            Step::Filter { display, .. } => write!(f, "Filter {display}"),
            Step::FilterFn(p) => write!(f, "Filter fn {}", p.name()),
            Step::Lazy(l) => write!(f, "{} (resolved at run time)", l.display),
            Step::Map { f: t, batch_size } => match batch_size {
                Some(n) => write!(f, "MapBatches {} (batch_size={n})", t.name()),
                None => write!(f, "MapBatches {}", t.name()),
            },
        }
    }
}

impl Step {
    /// A projection of `(expr, name)` pairs over `input`.
    pub fn project(
        exprs: &[(Expr, String)],
        input: &SchemaRef,
        state: &SessionState,
    ) -> Result<Self> {
        let mut compiled = Vec::with_capacity(exprs.len());
        let mut fields = Vec::with_capacity(exprs.len());
        for (expr, name) in exprs {
            let phys = compile_expr(expr, input, state)?;
            let field = phys
                .return_field(input)
                .with_context(|| format!("in expression `{expr}`"))?;
            fields.push(
                Field::new(name, field.data_type().clone(), field.is_nullable())
                    .with_metadata(field.metadata().clone()),
            );
            compiled.push((phys, name.clone()));
        }
        Ok(Step::Project {
            exprs: compiled,
            schema: Arc::new(Schema::new(fields)),
        })
    }

    /// A filter by `expr` over `input`; the expression must be boolean.
    pub fn filter(expr: &Expr, input: &SchemaRef, state: &SessionState) -> Result<Self> {
        let predicate = compile_expr(expr, input, state)?;
        let dt = predicate
            .data_type(input)
            .with_context(|| format!("in filter `{expr}`"))?;
        if dt != arrow::datatypes::DataType::Boolean && dt != arrow::datatypes::DataType::Null {
            return Err(VolleyError::plan(format!(
                "filter `{expr}` is of type {dt}, not a boolean"
            )));
        }
        Ok(Step::Filter {
            predicate,
            display: expr.to_string(),
        })
    }
}

type Resolver = Box<dyn Fn(&SchemaRef) -> Result<Step> + Send + Sync>;

/// A step built from the first batch's schema, then reused while the schema stays.
pub struct LazyStep {
    display: String,
    resolve: Resolver,
    cache: std::sync::Mutex<Option<(SchemaRef, Step)>>,
}

impl LazyStep {
    /// A step that `resolve` builds for a given input schema.
    pub fn new(
        display: impl Into<String>,
        resolve: impl Fn(&SchemaRef) -> Result<Step> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            display: display.into(),
            resolve: Box::new(resolve),
            cache: std::sync::Mutex::new(None),
        })
    }

    fn get(&self, schema: &SchemaRef) -> Result<Step> {
        let mut cache = self.cache.lock().expect("lazy step lock");
        if let Some((s, step)) = cache.as_ref() {
            if s == schema {
                return Ok(step.clone());
            }
        }
        let step = (self.resolve)(schema)?;
        *cache = Some((Arc::clone(schema), step.clone()));
        Ok(step)
    }
}

/// Runs a chain of steps over a stream of batches, keeping the partial batches that a
/// `batch_size` asks to be gathered.
pub struct StepRunner {
    steps: Vec<Step>,
    /// Rows waiting before each step that has a batch size.
    pending: Vec<Vec<RecordBatch>>,
}

impl StepRunner {
    /// A runner for `steps`.
    pub fn new(steps: Vec<Step>) -> Self {
        let n = steps.len();
        Self {
            steps,
            pending: vec![Vec::new(); n],
        }
    }

    /// Pushes one batch through; returns what came out the end.
    pub fn push(&mut self, batch: RecordBatch, out: &mut Vec<RecordBatch>) -> Result<()> {
        self.run_from(0, batch, out)
    }

    /// Flushes the partial batches held for `batch_size`.
    pub fn finish(&mut self, out: &mut Vec<RecordBatch>) -> Result<()> {
        for i in 0..self.steps.len() {
            let held = std::mem::take(&mut self.pending[i]);
            if held.is_empty() {
                continue;
            }
            let batch = concat(&held)?;
            if batch.num_rows() > 0 {
                let result = self.apply(i, batch)?;
                if let Some(b) = result {
                    self.run_from(i + 1, b, out)?;
                }
            }
        }
        Ok(())
    }

    fn run_from(
        &mut self,
        start: usize,
        batch: RecordBatch,
        out: &mut Vec<RecordBatch>,
    ) -> Result<()> {
        let mut current = vec![batch];
        for i in start..self.steps.len() {
            let mut next = Vec::new();
            for b in current {
                if let Step::Map {
                    batch_size: Some(size),
                    ..
                } = &self.steps[i]
                {
                    // At least a row: a size of 0 (set in `MapOptions` directly) would
                    // never move past the first row.
                    let size = (*size).max(1);
                    self.pending[i].push(b);
                    let held: usize = self.pending[i].iter().map(|b| b.num_rows()).sum();
                    if held >= size {
                        let all = concat(&std::mem::take(&mut self.pending[i]))?;
                        let mut offset = 0;
                        while all.num_rows() - offset >= size {
                            if let Some(r) = self.apply(i, all.slice(offset, size))? {
                                next.push(r);
                            }
                            offset += size;
                        }
                        if offset < all.num_rows() {
                            self.pending[i].push(all.slice(offset, all.num_rows() - offset));
                        }
                    }
                } else if let Some(r) = self.apply(i, b)? {
                    next.push(r);
                }
            }
            if next.is_empty() {
                return Ok(());
            }
            current = next;
        }
        out.extend(current);
        Ok(())
    }

    /// Applies step `i`; `None` when nothing is left (all rows filtered out).
    fn apply(&self, i: usize, batch: RecordBatch) -> Result<Option<RecordBatch>> {
        apply_step(&self.steps[i], batch)
    }
}

fn apply_step(step: &Step, batch: RecordBatch) -> Result<Option<RecordBatch>> {
    {
        let out = match step {
            Step::Lazy(l) => {
                let resolved = l.get(&batch.schema())?;
                return apply_step(&resolved, batch);
            }
            Step::Project { exprs, schema } => {
                let cols = exprs
                    .iter()
                    .map(|(e, name)| {
                        e.evaluate(&batch)
                            .and_then(|v| v.into_array(batch.num_rows()))
                            .with_context(|| format!("computing column `{name}`"))
                    })
                    .collect::<Result<Vec<ArrayRef>>>()?;
                let opts = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
                RecordBatch::try_new_with_options(Arc::clone(schema), cols, &opts)?
            }
            Step::Filter { predicate, display } => {
                let mask = predicate
                    .evaluate(&batch)
                    .and_then(|v| v.into_array(batch.num_rows()))
                    .with_context(|| format!("evaluating filter `{display}`"))?;
                let mask = mask
                    .as_any()
                    .downcast_ref::<BooleanArray>()
                    .ok_or_else(|| {
                        VolleyError::plan(format!("filter `{display}` is not boolean"))
                    })?;
                filter_batch(&batch, mask)?
            }
            Step::FilterFn(p) => {
                let mask = p.call(&batch)?;
                filter_batch(&batch, &mask)?
            }
            Step::Map { f, .. } => f.call(batch)?,
        };
        Ok(Some(out).filter(|b| b.num_rows() > 0))
    }
}

fn filter_batch(batch: &RecordBatch, mask: &BooleanArray) -> Result<RecordBatch> {
    if mask.null_count() == 0 && mask.true_count() == mask.len() {
        return Ok(batch.clone());
    }
    Ok(filter_record_batch(batch, mask)?)
}

fn concat(batches: &[RecordBatch]) -> Result<RecordBatch> {
    if batches.len() == 1 {
        return Ok(batches[0].clone());
    }
    Ok(concat_batches(&batches[0].schema(), batches)?)
}

/// The schema after `steps`, where it can be known without running user code.
pub fn output_schema(input: &SchemaRef, steps: &[Step]) -> Option<SchemaRef> {
    let mut schema = Arc::clone(input);
    for s in steps {
        match s {
            Step::Project { schema: out, .. } => schema = Arc::clone(out),
            Step::Filter { .. } | Step::FilterFn(_) => {}
            Step::Map { .. } | Step::Lazy(_) => return None,
        }
    }
    Some(schema)
}
