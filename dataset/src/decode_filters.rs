//! Which Parquet scans filter rows while decoding ("late materialization").
//!
//! A Parquet scan can evaluate its filter while it decodes: it decodes the filter's
//! columns, selects the rows that pass, and decodes the other columns for those rows
//! only. Whether that pays depends on the filter, measured on TPC-H SF1 (this
//! project's 2-core machine, whole `volley sql` runs, medians of 3):
//!
//! | query | filtered while decoding | filtered after decoding |
//! | --- | --- | --- |
//! | Q06 (a date range and two numeric ranges on `lineitem`) | 0.33 s | 0.15 s |
//! | Q15 (a date range on `lineitem`) | 0.55 s | 0.22 s |
//! | Q18 (`lineitem` probing the 57 orders a join found) | 0.54 s | 0.84 s |
//! | Q19 (`lineitem` probing the parts a join found) | 0.26 s | 0.48 s |
//!
//! A filter written in the query selects rows scattered over every page, and every later
//! column is then decoded through a fragmented selection: slower than decoding whole
//! columns and filtering them in one vectorized pass. A hash join's dynamic filter
//! (the keys of its build side, pushed into the scan of its probe side) is the opposite
//! case: it usually leaves few rows (a join with a small, filtered side), and they skip
//! the rest of the plan.
//!
//! So plans are made with filtering while decoding off: a query's own filters stay in
//! a `FilterExec` above the scan. [`DecodeTimeFilters`] then turns it on for the scans
//! a dynamic filter reaches (a join's, or a top-k's bound), only while that filter
//! leaves few rows ([`ScanCondition`]). The query's own conditions in such a scan's
//! predicate ([`ScanCondition`]) always skip row groups and pages by their statistics;
//! while decoding, they are tested only once the dynamic filter proved selective, and
//! then after it, on the few rows it left (their columns are decoded for those rows
//! only). The `FilterExec` above tests them in any case.
//! `volley.read.pushdown_filters = false` leaves it off everywhere.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering as AtomicOrdering};
use std::sync::Arc;

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::ColumnarValue;
use datafusion::physical_expr::conjunction;

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::common::Result;
use datafusion::datasource::physical_plan::{
    FileScanConfig, FileScanConfigBuilder, FileSource, ParquetSource,
};
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_expr::expressions::DynamicFilterPhysicalExpr;
use datafusion::physical_expr::split_conjunction;
use datafusion::physical_expr_adapter::{
    DefaultPhysicalExprAdapterFactory, PhysicalExprAdapter, PhysicalExprAdapterFactory,
};
use datafusion::physical_expr_common::physical_expr::snapshot_physical_expr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::HashJoinExec;
use datafusion::physical_plan::{ExecutionPlan, PhysicalExpr};
use volley_connectors::file_scan_config;

/// Turns on filtering while decoding for the Parquet scans whose predicate holds a
/// dynamic filter (see the module's documentation); runs after DataFusion's rules,
/// once filters are pushed down.
#[derive(Debug, Default)]
pub(crate) struct DecodeTimeFilters;

impl PhysicalOptimizerRule for DecodeTimeFilters {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let selective = selective_scans(&plan)?;
        plan.transform_up(|node| {
            let Some(config) = file_scan_config(node.as_ref()) else {
                return Ok(Transformed::no(node));
            };
            let Some(parquet) = config.file_source().downcast_ref::<ParquetSource>() else {
                return Ok(Transformed::no(node));
            };
            let dynamic = match parquet.filter() {
                Some(p) => holds_dynamic_filter(&p)?,
                None => false,
            };
            let Some(max_passing) = selective.get(&address(&node)).copied() else {
                return Ok(Transformed::no(node));
            };
            if !dynamic {
                return Ok(Transformed::no(node));
            }
            let adapter = config
                .expr_adapter_factory
                .clone()
                .unwrap_or_else(|| Arc::new(DefaultPhysicalExprAdapterFactory));
            let config = FileScanConfigBuilder::from(config.clone())
                .with_source(Arc::new(decoding_by_join_keys(parquet, max_passing)?))
                .with_expr_adapter(Some(Arc::new(StoppedConditions { inner: adapter })))
                .build();
            Ok(match filtering_while_decoding(&config) {
                Some(config) => Transformed::yes(
                    DataSourceExec::from_data_source(config) as Arc<dyn ExecutionPlan>
                ),
                None => Transformed::no(node),
            })
        })
        .data()
    }

    fn name(&self) -> &str {
        "volley_decode_time_filters"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// Whether `expr` holds a dynamic filter (a join's or a top-k's, set as the plan runs).
pub(crate) fn holds_dynamic_filter(expr: &Arc<dyn PhysicalExpr>) -> Result<bool> {
    expr.exists(|e| Ok(e.is::<DynamicFilterPhysicalExpr>()))
}

/// `config` with its Parquet scan filtering while decoding; `None` if it is not a
/// Parquet scan with a filter, or already does. A scan that runs on a cluster's node
/// while the rest of its plan runs in the driver filters so too: what its filter
/// drops does not travel.
pub(crate) fn filtering_while_decoding(config: &FileScanConfig) -> Option<FileScanConfig> {
    let parquet = config.file_source().downcast_ref::<ParquetSource>()?;
    if parquet.filter().is_none() || parquet.table_parquet_options().global.pushdown_filters {
        return None;
    }
    let source = parquet.clone().with_pushdown_filters(true);
    Some(
        FileScanConfigBuilder::from(config.clone())
            .with_source(Arc::new(source))
            .build(),
    )
}

/// `parquet` with the conditions of its predicate wrapped in [`ScanCondition`]s: those
/// that hold a dynamic filter each with a sample of its own (kept while at most
/// `max_passing` of the sampled rows pass), the others (the query's own, which the
/// `FilterExec` above the scan evaluates) following those samples.
fn decoding_by_join_keys(parquet: &ParquetSource, max_passing: f64) -> Result<ParquetSource> {
    let Some(predicate) = parquet.filter() else {
        return Ok(parquet.clone());
    };
    // The dynamic filters first: a scan tests its conditions one after the other, each
    // decoding its columns for the rows the ones before left. Once a join's keys proved
    // selective they leave few rows, and the query's conditions (often on strings,
    // costlier to decode than keys) are decoded for those alone. Ordering by the
    // columns' compressed sizes (DataFusion's `reorder_filters`) put the query's
    // conditions first: TPC-H Q19 decoded `l_shipmode`, `l_shipinstruct` and
    // `l_quantity` for all 6 M rows of `lineitem` to keep 7% for the keys of 485 parts
    // (0.21 s against 0.16-0.17 s in whole `volley sql` runs, medians of 3; Q18 and
    // Q20 no different). Then the query's conditions as the filter above the scan
    // orders them (`Conjunction`): one that might fail (a division, a cast) after
    // those that cannot, which it then never sees a rejected row of (`d <> 0` before
    // `10 / d > 0`, wherever the query wrote it). Columns count as numeric here.
    let mut keys = Vec::new();
    let mut query = Vec::new();
    for c in split_conjunction(&predicate) {
        if holds_dynamic_filter(c)? {
            keys.push(Arc::clone(c));
        } else {
            query.push(Arc::clone(c));
        }
    }
    // A sample per dynamic filter (a scan may have several, as the probe side of two
    // joins: one selective, one not).
    let samples: Vec<Arc<Sample>> = keys
        .iter()
        .map(|_| Arc::new(Sample::new(max_passing)))
        .collect();
    let ordered: Vec<Arc<dyn PhysicalExpr>> = keys
        .into_iter()
        .zip(&samples)
        .map(|(c, sample)| {
            Arc::new(ScanCondition::join_keys(c, Arc::clone(sample))) as Arc<dyn PhysicalExpr>
        })
        .chain(
            crate::conjunction::cheapest_first(query, None)
                .into_iter()
                .map(|c| Arc::new(ScanCondition::query(c, samples.clone())) as _),
        )
        .collect();
    Ok(parquet
        .clone()
        .with_reorder_filters(false)
        .with_predicate(conjunction(ordered)))
}

/// How many rows a [`ScanCondition`] tests before it decides.
const SAMPLE_ROWS: u64 = 65_536;

/// The share of sampled rows above which a [`ScanCondition`] stops filtering, in a scan
/// whose rows go (filtered, projected) to the join that made the filter.
pub(crate) const MAX_PASSING: f64 = 0.01;

/// The share of sampled rows above which a [`ScanCondition`] stops filtering, in a scan
/// whose rows are grouped by an aggregation before they reach the join that made the
/// filter (the filter passed through the aggregation, on its grouping keys). A row
/// the filter drops there is not hashed into the aggregation's groups, which costs more
/// than decoding through a scattered selection. TPC-H Q20 at SF10: `lineitem`'s rows
/// of 1994 grouped by part and supplier before joining the 1.06% of the pairs whose
/// parts are named `forest%`; at [`MAX_PASSING`] the filter stopped and 9 M rows were
/// grouped into 5.4 M groups (1.70 s for the query against DuckDB's 0.89 s).
const MAX_PASSING_GROUPED: f64 = 0.1;

/// What a scan's dynamic filters passed of the rows they were tested on, and the
/// verdict once [`SAMPLE_ROWS`] were.
#[derive(Debug)]
pub(crate) struct Sample {
    seen: AtomicU64,
    passed: AtomicU64,
    /// 0 while sampling, [`KEEP`] or [`SKIP`] once decided.
    verdict: AtomicU8,
    /// The share of sampled rows above which the verdict is [`SKIP`].
    max_passing: f64,
}

const KEEP: u8 = 1;
const SKIP: u8 = 2;

/// A condition of a Parquet scan's predicate that filters while decoding only while it
/// pays; pruning by statistics always reads the condition itself (its snapshot).
#[derive(Debug)]
pub(crate) struct ScanCondition {
    inner: Arc<dyn PhysicalExpr>,
    role: Role,
}

#[derive(Debug, Clone)]
enum Role {
    /// A scan's dynamic filter (a join's keys), tested while decoding only while it pays.
    ///
    /// Whether a join's keys leave few probe rows is known only once its build side is
    /// read. Measured on TPC-H SF1 (2 cores, whole `volley sql` runs): with a join's keys
    /// tested while decoding `lineitem`, Q18 (57 orders' keys) took 0.63 s instead of 0.90
    /// s, but Q09 (the keys of 5% of the parts, which leave 5% of `lineitem`) took 1.11 s
    /// instead of 0.61 s: a hash lookup per row, and the rest of every page decoded through
    /// a scattered selection anyway. So the scan tests the filter on its first
    /// [`SAMPLE_ROWS`] rows (all of its files and partitions together), and if more than
    /// [`MAX_PASSING`] of them pass ([`MAX_PASSING_GROUPED`] where an aggregation
    /// groups the scan's rows on their way to the join), lets every row pass from then
    /// on: the join still
    /// drops the rows its keys do not match. Row-group and page pruning by the filter's
    /// bounds are unchanged (they use the filter's snapshot, not this wrapper). Once it
    /// proved selective, the query's own conditions in the scan (`Query`) are
    /// tested while decoding too, after it, on the rows its keys left.
    JoinKeys(Arc<Sample>),
    /// A condition of the query's own in a scan's predicate, tested while decoding
    /// only once one of the scan's dynamic filters (these samples) proved selective;
    /// until then, and if none did, it passes every row there, and the `FilterExec`
    /// above the scan tests it in one vectorized pass over whole columns.
    Query(Vec<Arc<Sample>>),
}

impl ScanCondition {
    /// A dynamic filter, sampled into `sample`.
    pub(crate) fn join_keys(inner: Arc<dyn PhysicalExpr>, sample: Arc<Sample>) -> Self {
        Self {
            inner,
            role: Role::JoinKeys(sample),
        }
    }

    /// A condition of the query's own, following `samples`.
    pub(crate) fn query(inner: Arc<dyn PhysicalExpr>, samples: Vec<Arc<Sample>>) -> Self {
        Self {
            inner,
            role: Role::Query(samples),
        }
    }

    /// Whether it is a dynamic filter (or a condition of the query's own).
    pub(crate) fn is_join_keys(&self) -> bool {
        matches!(self.role, Role::JoinKeys(_))
    }

    /// The condition it wraps.
    pub(crate) fn inner(&self) -> &Arc<dyn PhysicalExpr> {
        &self.inner
    }

    /// Whether it passes every row from now on: a dynamic filter whose sample found it
    /// not selective, or a condition of the query's own whose samples all did.
    fn stopped(&self) -> bool {
        match &self.role {
            Role::JoinKeys(sample) => sample.verdict() == SKIP,
            Role::Query(samples) => samples.iter().all(|s| s.verdict() == SKIP),
        }
    }
}

impl Sample {
    /// A sample that skips the filter when more than `max_passing` of its rows pass.
    pub(crate) fn new(max_passing: f64) -> Self {
        Self {
            seen: AtomicU64::new(0),
            passed: AtomicU64::new(0),
            verdict: AtomicU8::new(0),
            max_passing,
        }
    }

    /// Counts what a dynamic filter answered for a batch, and decides once
    /// [`SAMPLE_ROWS`] were seen.
    fn count(&self, result: &ColumnarValue) {
        // A dynamic filter is a constant until its join's build side is read: only a
        // per-row answer counts.
        let ColumnarValue::Array(a) = result else {
            return;
        };
        let Some(b) = a.as_boolean_opt() else {
            return;
        };
        let (rows, passed) = (
            b.len() as u64,
            crate::conjunction::passing(b).count_set_bits() as u64,
        );
        let seen = self.seen.fetch_add(rows, AtomicOrdering::Relaxed) + rows;
        let passed = self.passed.fetch_add(passed, AtomicOrdering::Relaxed) + passed;
        if seen >= SAMPLE_ROWS {
            let verdict = if passed as f64 > self.max_passing * seen as f64 {
                SKIP
            } else {
                KEEP
            };
            let _ = self.verdict.compare_exchange(
                0,
                verdict,
                AtomicOrdering::Relaxed,
                AtomicOrdering::Relaxed,
            );
        }
    }

    fn verdict(&self) -> u8 {
        self.verdict.load(AtomicOrdering::Relaxed)
    }
}

impl PhysicalExpr for ScanCondition {
    fn data_type(&self, input_schema: &Schema) -> Result<DataType> {
        self.inner.data_type(input_schema)
    }

    fn nullable(&self, input_schema: &Schema) -> Result<bool> {
        self.inner.nullable(input_schema)
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        let pass_all = || Ok(ColumnarValue::Scalar(ScalarValue::Boolean(Some(true))));
        match &self.role {
            Role::JoinKeys(sample) => match sample.verdict() {
                SKIP => pass_all(),
                KEEP => self.inner.evaluate(batch),
                _ => {
                    let result = self.inner.evaluate(batch)?;
                    sample.count(&result);
                    Ok(result)
                }
            },
            Role::Query(samples) if samples.iter().any(|s| s.verdict() == KEEP) => {
                self.inner.evaluate(batch)
            }
            Role::Query(_) => pass_all(),
        }
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        vec![&self.inner]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        match (children.pop(), children.is_empty()) {
            // The same samples: the files a scan opens rewrite their copy.
            (Some(inner), true) => Ok(Arc::new(Self {
                inner,
                role: self.role.clone(),
            })),
            _ => datafusion::common::internal_err!("a scan condition wraps one expression"),
        }
    }

    /// Pruning by statistics reads the condition itself.
    fn snapshot(&self) -> Result<Option<Arc<dyn PhysicalExpr>>> {
        Ok(Some(Arc::clone(&self.inner)))
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt_sql(f)
    }
}

impl fmt::Display for ScanCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.role {
            Role::JoinKeys(_) => write!(f, "Sampled [ {} ]", self.inner),
            Role::Query(_) => write!(f, "QueryCondition [ {} ]", self.inner),
        }
    }
}

impl PartialEq for ScanCondition {
    fn eq(&self, other: &Self) -> bool {
        self.is_join_keys() == other.is_join_keys() && self.inner.as_ref() == other.inner.as_ref()
    }
}

impl Eq for ScanCondition {}

impl Hash for ScanCondition {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.is_join_keys().hash(state);
        self.inner.hash(state);
    }
}

/// Opens each file of a scan with the [`ScanCondition`]s that stopped filtering (their
/// samples said so) as [`Stopped`]: left out of filtering while decoding, kept for
/// pruning by statistics. A condition that passes every row still made the scan decode
/// through Parquet's row filter (its columns first, then the rest through a selection),
/// 8-17% of the CPU of TPC-H Q02, Q03, Q04, Q07, Q10, Q13 and Q21 at SF1, whose scans
/// stop after their samples. A file opened before its scan's samples decided keeps its
/// conditions as they were.
#[derive(Debug)]
struct StoppedConditions {
    /// The scan's own adapter (to the files' schemas), applied first.
    inner: Arc<dyn PhysicalExprAdapterFactory>,
}

impl PhysicalExprAdapterFactory for StoppedConditions {
    fn create(
        &self,
        logical_file_schema: SchemaRef,
        physical_file_schema: SchemaRef,
    ) -> Result<Arc<dyn PhysicalExprAdapter>> {
        Ok(Arc::new(WithoutStopped {
            inner: self
                .inner
                .create(logical_file_schema, physical_file_schema)?,
        }))
    }
}

/// A file's adapter of [`StoppedConditions`].
#[derive(Debug)]
struct WithoutStopped {
    inner: Arc<dyn PhysicalExprAdapter>,
}

impl PhysicalExprAdapter for WithoutStopped {
    fn rewrite(&self, expr: Arc<dyn PhysicalExpr>) -> Result<Arc<dyn PhysicalExpr>> {
        self.inner
            .rewrite(expr)?
            .transform_down(|e| match e.downcast_ref::<ScanCondition>() {
                Some(c) if c.stopped() => Ok(Transformed::new(
                    Arc::new(Stopped(Arc::clone(&c.inner))) as Arc<dyn PhysicalExpr>,
                    true,
                    TreeNodeRecursion::Jump,
                )),
                _ => Ok(Transformed::no(e)),
            })
            .data()
    }
}

/// A [`ScanCondition`] that stopped filtering, in a file opened after it did: it
/// passes every row and shows no columns, so that the scan's row filter reads none for
/// it; its snapshot is the condition's, which pruning by statistics reads.
#[derive(Debug)]
struct Stopped(Arc<dyn PhysicalExpr>);

impl PhysicalExpr for Stopped {
    fn data_type(&self, _input_schema: &Schema) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn nullable(&self, _input_schema: &Schema) -> Result<bool> {
        Ok(false)
    }

    fn evaluate(&self, _batch: &RecordBatch) -> Result<ColumnarValue> {
        Ok(ColumnarValue::Scalar(ScalarValue::Boolean(Some(true))))
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        vec![]
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        Ok(self)
    }

    fn snapshot(&self) -> Result<Option<Arc<dyn PhysicalExpr>>> {
        Ok(Some(snapshot_physical_expr(Arc::clone(&self.0))?))
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt_sql(f)
    }
}

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Stopped [ {} ]", self.0)
    }
}

impl PartialEq for Stopped {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_ref() == other.0.as_ref()
    }
}

impl Eq for Stopped {}

impl Hash for Stopped {
    fn hash<H: Hasher>(&self, state: &mut H) {
        "stopped".hash(state);
        self.0.hash(state);
    }
}

/// Where a scan sits relative to the hash joins that push a dynamic filter into it.
#[derive(Clone, Copy, Default)]
struct Probed {
    /// On the probe side of such a join.
    by_any: bool,
    /// On the probe side of such a join whose build side something filters.
    by_filtered: bool,
    /// Below an aggregation that is on the probe side of such a join.
    grouped: bool,
}

/// The Parquet scans (by address) whose dynamic filter is likely to leave few rows,
/// each with the share of passing rows above which its filter stops
/// ([`MAX_PASSING`], or [`MAX_PASSING_GROUPED`] below an aggregation on a join's probe
/// side): those on the probe side of a hash join whose build side is filtered, and
/// those reached by no join's filter (a top-k's bound). The keys of a whole table (a
/// dimension as `supplier` in TPC-H Q15) are likely to match every probe row, and
/// filtering by them while decoding only adds work.
fn selective_scans(plan: &Arc<dyn ExecutionPlan>) -> Result<HashMap<usize, f64>> {
    fn walk(
        node: &Arc<dyn ExecutionPlan>,
        probed: Probed,
        out: &mut HashMap<usize, f64>,
    ) -> Result<()> {
        if node.is::<DataSourceExec>() {
            if probed.by_filtered || !probed.by_any {
                let max = if probed.grouped {
                    MAX_PASSING_GROUPED
                } else {
                    MAX_PASSING
                };
                out.insert(address(node), max);
            }
            return Ok(());
        }
        if let Some(join) = node.downcast_ref::<HashJoinExec>() {
            if !join.dynamic_expressions_produced().is_empty() {
                let filtered = join.left().exists(|n| {
                    Ok(n.is::<FilterExec>()
                        || file_scan_config(n.as_ref())
                            .is_some_and(|c| c.file_source().filter().is_some()))
                })?;
                walk(join.left(), probed, out)?;
                // Grouped: below an aggregation under this join's probe side, whose
                // filter is the one nearest the scan.
                let right = Probed {
                    by_any: true,
                    by_filtered: probed.by_filtered || filtered,
                    grouped: false,
                };
                return walk(join.right(), right, out);
            }
        }
        let probed = Probed {
            grouped: probed.grouped || (probed.by_any && node.is::<AggregateExec>()),
            ..probed
        };
        for child in node.children() {
            walk(child, probed, out)?;
        }
        Ok(())
    }
    let mut out = HashMap::new();
    walk(plan, Probed::default(), &mut out)?;
    Ok(out)
}

/// A node's identity while the plan is rewritten: the address it is shared at.
fn address(node: &Arc<dyn ExecutionPlan>) -> usize {
    Arc::as_ptr(node) as *const () as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch};
    use datafusion::execution::SessionStateBuilder;
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::prelude::{SessionConfig, SessionContext};

    /// `big` (`k` 0..4000, in 4 files) and `small` (`k` 0..10), planned as volley plans.
    fn context(dir: &std::path::Path) -> SessionContext {
        for (table, files, rows) in [("big", 4, 1000), ("small", 1, 10)] {
            std::fs::create_dir_all(dir.join(table)).unwrap();
            for f in 0..files {
                let k = Int64Array::from_iter_values(f * rows..(f + 1) * rows);
                let batch = RecordBatch::try_from_iter([("k", Arc::new(k) as _)]).unwrap();
                let file = std::fs::File::create(dir.join(format!("{table}/{f}.parquet")));
                let mut w = ArrowWriter::try_new(file.unwrap(), batch.schema(), None).unwrap();
                w.write(&batch).unwrap();
                w.close().unwrap();
            }
        }
        let mut config = SessionConfig::new().with_target_partitions(2);
        config.options_mut().execution.parquet.pushdown_filters = false;
        // As volley's sessions set it: scans that filter while decoding turn it off.
        config.options_mut().execution.parquet.reorder_filters = true;
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(DecodeTimeFilters))
            .build();
        let ctx = SessionContext::new_with_state(state);
        let rt = tokio::runtime::Runtime::new().unwrap();
        for t in ["big", "small"] {
            let path = format!("{}/{t}/", dir.display());
            rt.block_on(ctx.register_parquet(t, &path, Default::default()))
                .unwrap();
        }
        ctx
    }

    /// Each Parquet scan's table (by its first file's folder) and whether it filters
    /// while decoding.
    fn scans(plan: &Arc<dyn ExecutionPlan>) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        let _ = plan.apply(|node| {
            if let Some(c) = file_scan_config(node.as_ref()) {
                let parquet = c.file_source().downcast_ref::<ParquetSource>().unwrap();
                let file = c.file_groups[0].files()[0].object_meta.location.to_string();
                let table = if file.contains("/big/") {
                    "big"
                } else {
                    "small"
                };
                out.push((
                    table.to_string(),
                    parquet.table_parquet_options().global.pushdown_filters,
                ));
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        });
        out.sort();
        out
    }

    /// Whether a Parquet scan of `plan` that filters while decoding lets DataFusion
    /// reorder its conditions.
    fn reorders_while_decoding(plan: &Arc<dyn ExecutionPlan>) -> bool {
        plan.exists(|node| {
            Ok(file_scan_config(node.as_ref()).is_some_and(|c| {
                let options = &c
                    .file_source()
                    .downcast_ref::<ParquetSource>()
                    .unwrap()
                    .table_parquet_options()
                    .global;
                options.pushdown_filters && options.reorder_filters
            }))
        })
        .unwrap()
    }

    #[test]
    fn only_scans_a_dynamic_filter_reaches_filter_while_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let run = |sql: &str| {
            rt.block_on(async {
                let df = ctx.sql(sql).await.unwrap();
                let plan = df.clone().create_physical_plan().await.unwrap();
                let rows: usize = df
                    .collect()
                    .await
                    .unwrap()
                    .iter()
                    .map(|b| b.num_rows())
                    .sum();
                let shown = datafusion::physical_plan::displayable(plan.as_ref())
                    .indent(true)
                    .to_string();
                assert!(!reorders_while_decoding(&plan), "{shown}");
                (scans(&plan), rows, shown)
            })
        };
        // The probe side of a join filters by the keys of a filtered build side while
        // decoding.
        let (scans, rows, shown) =
            run("SELECT big.k FROM small JOIN big ON small.k = big.k WHERE small.k % 2 = 0");
        assert_eq!(
            scans,
            vec![("big".into(), true), ("small".into(), false)],
            "{shown}"
        );
        assert_eq!(rows, 5);
        assert!(shown.contains("Sampled [ DynamicFilter"), "{shown}");
        // Its own filter prunes there by statistics, and is tested above it.
        let (scans, rows, shown) = run(
            "SELECT big.k FROM small JOIN big ON small.k = big.k WHERE small.k % 2 = 0 AND big.k < 8",
        );
        assert_eq!(
            scans,
            vec![("big".into(), true), ("small".into(), false)],
            "{shown}"
        );
        assert_eq!(shown.matches("FilterExec").count(), 2, "{shown}");
        assert!(shown.contains("QueryCondition [ k@0 < 8 ]"), "{shown}");
        // Tested after the join's keys, on the rows they leave.
        let scan = shown.lines().find(|l| l.contains("Sampled [")).unwrap();
        assert!(
            scan.find("Sampled [") < scan.find("QueryCondition ["),
            "{shown}"
        );
        assert_eq!(rows, 4);
        // Not by the keys of a whole table: most probe rows would pass.
        let (scans, rows, shown) = run("SELECT big.k FROM small JOIN big ON small.k = big.k");
        assert_eq!(
            scans,
            vec![("big".into(), false), ("small".into(), false)],
            "{shown}"
        );
        assert_eq!(rows, 10);
        // A filter of the query's own is evaluated after decoding, above the scan.
        let (scans, rows, shown) = run("SELECT k FROM big WHERE k % 7 = 3 AND k < 2000");
        assert_eq!(scans, vec![("big".into(), false)], "{shown}");
        assert!(shown.contains("FilterExec"), "{shown}");
        assert_eq!(rows, 286);
    }

    /// Once a scan's join keys proved selective, the query's own conditions are tested
    /// while decoding, each on the rows the ones before it passed: one that might fail
    /// (a division) comes after the ones that cannot, wherever the query wrote it, as
    /// in the filter above the scan.
    #[test]
    fn a_condition_that_might_fail_is_tested_after_the_others_while_decoding() {
        let dir = tempfile::tempdir().unwrap();
        // `big` is long enough for the scan to sample its join keys (0.5% of its rows,
        // spread over its whole range) and keep them; `d` is 0 at one of those keys,
        // after the sample.
        let big = RecordBatch::try_from_iter([
            ("k", Arc::new(Int64Array::from_iter_values(0..200_000)) as _),
            (
                "d",
                Arc::new(Int64Array::from_iter_values(-190_004..9_996)) as _,
            ),
        ])
        .unwrap();
        let keys = (0..200_000).step_by(200).chain([190_004, 190_006, 190_008]);
        let small =
            RecordBatch::try_from_iter([("k", Arc::new(Int64Array::from_iter_values(keys)) as _)])
                .unwrap();
        for (table, batch) in [("big", big), ("small", small)] {
            std::fs::create_dir_all(dir.path().join(table)).unwrap();
            let file = std::fs::File::create(dir.path().join(format!("{table}/0.parquet")));
            let mut w = ArrowWriter::try_new(file.unwrap(), batch.schema(), None).unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
        }
        let mut config = volley_common::VolleyConfig::default();
        config.set("volley.exec.progress", "off").unwrap();
        let c = crate::Context::try_new(config).unwrap();
        for t in ["big", "small"] {
            c.register_files(t, &format!("{}/{t}/", dir.path().display()))
                .unwrap();
        }
        let rows: usize = c
            .sql(
                "SELECT big.k FROM small JOIN big ON small.k = big.k \
                 WHERE small.k % 2 = 0 AND 10 / big.d > 0 AND big.d <> 0",
                &[],
            )
            .unwrap()
            .collect()
            .unwrap()
            .iter()
            .map(|b| b.num_rows())
            .sum();
        // `d` 2 and 4 (10 / d is 5 and 2); -4 and 0 fail, and 10 / d rounds to 0 for
        // the other keys.
        assert_eq!(rows, 2);
        // Unguarded, the division fails there, and the error says which one.
        let e = c
            .sql(
                "SELECT big.k FROM small JOIN big ON small.k = big.k \
                 WHERE small.k % 2 = 0 AND 10 / big.d > 0",
                &[],
            )
            .unwrap()
            .collect()
            .unwrap_err()
            .to_string();
        assert!(e.contains("dividing by zero in `Int64(10) / big.d`"), "{e}");
    }

    #[test]
    fn a_scan_grouped_before_its_join_keeps_a_looser_filter() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let limits_of = |sql: &str| {
            rt.block_on(async {
                let plan = ctx
                    .sql(sql)
                    .await
                    .unwrap()
                    .create_physical_plan()
                    .await
                    .unwrap();
                let shown = datafusion::physical_plan::displayable(plan.as_ref())
                    .indent(true)
                    .to_string();
                let mut limits: Vec<f64> = selective_scans(&plan).unwrap().into_values().collect();
                limits.sort_by(f64::total_cmp);
                (limits, shown)
            })
        };
        // `big` joined as it is read: its filter stops above 1% passing.
        let (limits, shown) =
            limits_of("SELECT big.k FROM small JOIN big ON small.k = big.k WHERE small.k % 2 = 0");
        assert_eq!(limits, [MAX_PASSING, MAX_PASSING], "{shown}");
        // `big` grouped by the join's key first: the join's filter reaches its scan
        // through the aggregation, and stops only above 10% passing.
        let (limits, shown) = limits_of(
            "SELECT g.k, g.n FROM small JOIN (SELECT k, count(*) AS n FROM big GROUP BY k) g \
             ON small.k = g.k WHERE small.k % 2 = 0",
        );
        assert!(shown.contains("Sampled [ DynamicFilter"), "{shown}");
        assert_eq!(limits, [MAX_PASSING, MAX_PASSING_GROUPED], "{shown}");
        // 5% of the rows pass: a grouped scan's sample keeps filtering, another skips.
        let batch = 8192;
        for (sample, verdict) in [
            (Sample::new(MAX_PASSING_GROUPED), KEEP),
            (Sample::new(MAX_PASSING), SKIP),
        ] {
            let sample = Arc::new(sample);
            let keys = ScanCondition::join_keys(k_below(410), Arc::clone(&sample));
            for _ in 0..(SAMPLE_ROWS as i64 / batch) {
                assert_eq!(passing(keys.evaluate(&ks(0, batch)).unwrap(), 8192), 410);
            }
            assert_eq!(sample.verdict(), verdict);
        }
    }

    /// `rows` rows of `k` from `from`.
    fn ks(from: i64, rows: i64) -> RecordBatch {
        RecordBatch::try_from_iter([(
            "k",
            Arc::new(Int64Array::from_iter_values(from..from + rows)) as _,
        )])
        .unwrap()
    }

    fn k_below(n: i64) -> Arc<dyn PhysicalExpr> {
        use datafusion::physical_expr::expressions::{binary, col, lit};
        let schema = ks(0, 1).schema();
        binary(
            col("k", &schema).unwrap(),
            datafusion::logical_expr::Operator::Lt,
            lit(n),
            &schema,
        )
        .unwrap()
    }

    fn passing(result: ColumnarValue, rows: usize) -> usize {
        let a = result.into_array(rows).unwrap();
        a.as_boolean().true_count()
    }

    #[test]
    fn a_sampled_filter_stops_filtering_once_too_many_rows_pass_and_keeps_a_selective_one() {
        let batch = 8192;
        // Half of the rows pass: after the sample, every row passes.
        let loose_sample = Arc::new(Sample::new(MAX_PASSING));
        let loose = Arc::new(ScanCondition::join_keys(
            k_below(4096),
            Arc::clone(&loose_sample),
        ));
        let mut from = 0;
        while (from as u64) < SAMPLE_ROWS {
            assert_eq!(passing(loose.evaluate(&ks(0, batch)).unwrap(), 8192), 4096);
            from += batch;
        }
        assert_eq!(passing(loose.evaluate(&ks(0, batch)).unwrap(), 8192), 8192);
        // A copy made for another file shares the verdict.
        let copy = Arc::clone(&loose)
            .with_new_children(vec![k_below(4096)])
            .unwrap();
        assert_eq!(passing(copy.evaluate(&ks(0, batch)).unwrap(), 8192), 8192);
        // 10 rows in 8192 pass: it goes on filtering, and the query's own conditions
        // in the scan join in once that is known.
        let sample = Arc::new(Sample::new(MAX_PASSING));
        let tight = ScanCondition::join_keys(k_below(10), Arc::clone(&sample));
        let own = ScanCondition::query(
            k_below(5),
            vec![Arc::clone(&loose_sample), Arc::clone(&sample)],
        );
        assert_eq!(passing(own.evaluate(&ks(0, batch)).unwrap(), 8192), 8192);
        for _ in 0..(2 * SAMPLE_ROWS as i64 / batch) {
            assert_eq!(passing(tight.evaluate(&ks(0, batch)).unwrap(), 8192), 10);
        }
        assert_eq!(sample.verdict(), KEEP);
        assert_eq!(passing(own.evaluate(&ks(0, batch)).unwrap(), 8192), 5);
        // Where the join's filter is not selective, they pass every row.
        let own_loose = ScanCondition::query(k_below(5), vec![Arc::clone(&loose_sample)]);
        assert_eq!(
            passing(own_loose.evaluate(&ks(0, batch)).unwrap(), 8192),
            8192
        );
        // A constant answer (a join's filter before its build side is read) is not
        // counted.
        let waiting_sample = Arc::new(Sample::new(MAX_PASSING));
        let waiting = ScanCondition::join_keys(
            datafusion::physical_expr::expressions::lit(true),
            Arc::clone(&waiting_sample),
        );
        for _ in 0..(2 * SAMPLE_ROWS as i64 / batch) {
            waiting.evaluate(&ks(0, batch)).unwrap();
        }
        assert_eq!(waiting_sample.seen.load(AtomicOrdering::Relaxed), 0);
        // Pruning by statistics sees the filter itself.
        let snapshot = tight.snapshot().unwrap().unwrap();
        assert_eq!(snapshot.to_string(), "k@0 < 10");
    }

    #[test]
    fn a_file_opened_after_its_conditions_stopped_filters_by_none_of_them_while_decoding() {
        let batch = 8192;
        // Half of the rows pass the loose filter (it stops), 10 the tight one (kept).
        let loose_sample = Arc::new(Sample::new(MAX_PASSING));
        let loose = ScanCondition::join_keys(k_below(4096), Arc::clone(&loose_sample));
        let tight_sample = Arc::new(Sample::new(MAX_PASSING));
        let tight = ScanCondition::join_keys(k_below(10), Arc::clone(&tight_sample));
        for _ in 0..(2 * SAMPLE_ROWS as i64 / batch) {
            loose.evaluate(&ks(0, batch)).unwrap();
            tight.evaluate(&ks(0, batch)).unwrap();
        }
        assert_eq!(loose_sample.verdict(), SKIP);
        assert_eq!(tight_sample.verdict(), KEEP);
        let own_loose = ScanCondition::query(k_below(6), vec![Arc::clone(&loose_sample)]);
        let own_either = ScanCondition::query(
            k_below(5),
            vec![Arc::clone(&loose_sample), Arc::clone(&tight_sample)],
        );
        let predicate = conjunction(
            [loose, tight, own_loose, own_either]
                .into_iter()
                .map(|c| Arc::new(c) as Arc<dyn PhysicalExpr>),
        );
        let schema = ks(0, 1).schema();
        let adapter = StoppedConditions {
            inner: Arc::new(DefaultPhysicalExprAdapterFactory),
        }
        .create(Arc::clone(&schema), schema)
        .unwrap();
        let opened = adapter.rewrite(predicate).unwrap();
        assert_eq!(
            opened.to_string(),
            "Stopped [ k@0 < 4096 ] AND Sampled [ k@0 < 10 ] AND Stopped [ k@0 < 6 ] \
             AND QueryCondition [ k@0 < 5 ]"
        );
        // The stopped conditions read no column (the scan's row filter decodes none
        // for them) and pass every row; the others filter.
        let stopped = split_conjunction(&opened)
            .into_iter()
            .filter(|c| c.is::<Stopped>())
            .collect::<Vec<_>>();
        assert_eq!(stopped.len(), 2);
        assert!(stopped
            .iter()
            .all(|c| datafusion::physical_expr::utils::collect_columns(c).is_empty()));
        assert_eq!(passing(opened.evaluate(&ks(0, batch)).unwrap(), 8192), 5);
        // Pruning by statistics still sees every condition.
        let pruned_by = snapshot_physical_expr(opened).unwrap().to_string();
        assert_eq!(pruned_by, "k@0 < 4096 AND k@0 < 10 AND k@0 < 6 AND k@0 < 5");
    }

    #[test]
    fn the_querys_own_condition_still_prunes_by_statistics_in_a_scan_that_decodes_by_join_keys() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let rt = tokio::runtime::Runtime::new().unwrap();
        // The join's keys bound `big.k % 10`, which no statistics hold: only the
        // query's own `big.k < 8` can skip files.
        let sql = "SELECT big.k FROM small JOIN big ON small.k = big.k % 10 \
                   WHERE small.k % 2 = 0 AND big.k < 8";
        let (plan, rows) = rt.block_on(async {
            let plan = ctx
                .sql(sql)
                .await
                .unwrap()
                .create_physical_plan()
                .await
                .unwrap();
            let out = datafusion::physical_plan::collect(Arc::clone(&plan), ctx.task_ctx())
                .await
                .unwrap();
            (plan, out.iter().map(|b| b.num_rows()).sum::<usize>())
        });
        assert_eq!(rows, 4);
        let mut pruning = Vec::new();
        let _ = plan.apply(|node| {
            let shown = datafusion::physical_plan::displayable(node.as_ref())
                .one_line()
                .to_string();
            if node.is::<DataSourceExec>() && shown.contains("QueryCondition") {
                let metrics = node.metrics().unwrap().aggregate_by_name();
                for m in metrics.iter() {
                    if m.value().name().ends_with("pruned_statistics") {
                        pruning.push(format!("{}={}", m.value().name(), m.value()));
                    }
                }
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        });
        // 4 files of one row group each, `k` 0..4000: only the first can hold `k < 8`.
        assert!(
            pruning.contains(&"files_ranges_pruned_statistics=4 total → 1 matched".to_string()),
            "{pruning:?}"
        );
    }
}
