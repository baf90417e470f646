//! Join order: the tables of a tree of inner joins joined in the order of least
//! estimated work.
//!
//! DataFusion joins a query's tables in the order it names them and only chooses each
//! join's build side. TPC-H Q07 so joined `supplier` with `lineitem` (1.8 M rows
//! estimated) and built a hash table on the 1.5 M `orders`, before the two nations that
//! keep 8% of the suppliers and of the customers reached either. [`JoinOrder`] takes
//! each region of inner equi-joins apart (its leaves: scans, filters, aggregations,
//! joins of other kinds) and joins its leaves again in the order whose joins' estimated
//! output rows add up to the least, searched over every split of every connected set
//! of leaves (up to [`MAX_LEAVES`] leaves; a larger region is not searched whole, only
//! its smaller regions below).
//!
//! - Keys make classes of equal columns: `c_nationkey = s_nationkey` and
//!   `s_nationkey = n_nationkey` also join `customer` with `nation` (Q05 joins the
//!   region's nations with their customers, then `orders`, `lineitem` and `supplier`).
//! - Leaves are estimated by DataFusion's statistics: the files' row counts, a filter's
//!   selectivity from min/max ranges (20% where it cannot tell, as for `LIKE`), a
//!   column's distinct values from its range (integers, dates) or rows.
//! - A join's rows: the product of its sides' rows over the larger of their numbers of
//!   distinct keys (several key columns: the product of theirs, at most the side's
//!   rows). A key's distinct values are capped by the rows of the table of the class's
//!   column that looks like a key of its own (the fewest rows, no more than its range
//!   holds): `l_orderkey`'s range counts 6 M values where `orders` has 1.5 M.
//!
//! The rule runs before DataFusion's `JoinSelection`, which still chooses each new
//! join's build side and partitioning. It changes nothing where a leaf has no row
//! count, where the region cannot be rebuilt, or where the new plan's schema would
//! differ from the old one.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use datafusion::arrow::datatypes::Schema;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{ColumnStatistics, JoinSide, JoinType, NullEquality, Result};
use datafusion::datasource::source::DataSourceExec;
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::expressions::{BinaryExpr, Column};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::utils::{ColumnIndex, JoinFilter};
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};
use datafusion::physical_plan::ExecutionPlan;

/// Rejoins each region of inner equi-joins in the order of least estimated work
/// (module docs).
#[derive(Debug, Default)]
pub(crate) struct JoinOrder;

impl PhysicalOptimizerRule for JoinOrder {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        reorder(plan)
    }

    fn name(&self) -> &str {
        "volley_join_order"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// A column of a region's leaf: (leaf, column index in the leaf's schema).
type ColumnId = (usize, usize);

/// A key equality of a join: (the region's edge, if it is one, left column, right
/// column).
type Key = (Option<usize>, Arc<dyn PhysicalExpr>, Arc<dyn PhysicalExpr>);

/// The most leaves a region is reordered with: the search below takes 3^n steps.
const MAX_LEAVES: usize = 12;

fn reorder(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    if let Some(mut region) = Region::collect(&plan) {
        // A condition that is not a key moves to the first join that has its columns,
        // where it sees rows a join below it used to drop: one that might fail there
        // (`10 / b.w > 0` guarded by the join that keeps `w <> 0`) keeps the order.
        let movable = region
            .filters
            .iter()
            .all(|r| crate::conjunction::cannot_fail(r.filter.expression(), r.filter.schema()));
        // Larger regions are not searched: their leaves are reordered below, as the
        // leaves of the smaller regions inside them.
        if movable && (3..=MAX_LEAVES).contains(&region.leaves.len()) {
            region.leaves = region
                .leaves
                .into_iter()
                .map(reorder)
                .collect::<Result<_>>()?;
            // An optimization: where it cannot rebuild the region (an error included),
            // the plan keeps the order it had.
            if let Ok(Some(joined)) = region.join() {
                if joined.schema() == plan.schema() {
                    return Ok(joined);
                }
            }
        }
    }
    let children: Vec<_> = plan.children().into_iter().cloned().collect();
    if children.is_empty() {
        return Ok(plan);
    }
    let new: Vec<_> = children
        .iter()
        .map(|c| reorder(Arc::clone(c)))
        .collect::<Result<_>>()?;
    if new.iter().zip(&children).all(|(a, b)| Arc::ptr_eq(a, b)) {
        return Ok(plan);
    }
    plan.replace_children(
        new,
        ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
    )
}

/// A join filter that is not a key equality, with the leaf columns it reads (in the
/// order of its own schema).
struct Residual {
    filter: JoinFilter,
    columns: Vec<ColumnId>,
    applied: bool,
}

impl Residual {
    fn leaves(&self) -> BTreeSet<usize> {
        self.columns.iter().map(|c| c.0).collect()
    }
}

/// A tree of inner hash joins on column keys, taken apart.
struct Region {
    leaves: Vec<Arc<dyn ExecutionPlan>>,
    /// Key equalities between two leaves' columns.
    edges: Vec<(ColumnId, ColumnId)>,
    filters: Vec<Residual>,
    /// The tree's output columns, in order.
    output: Vec<ColumnId>,
    /// The tree's output field names, in order.
    names: Vec<String>,
    mode: PartitionMode,
}

/// `plan` as a join this rule may move: inner, on plain columns, nulls never equal, no
/// projection or limit of its own.
fn movable_join(plan: &Arc<dyn ExecutionPlan>) -> Option<&HashJoinExec> {
    let join = plan.downcast_ref::<HashJoinExec>()?;
    let plain = join.join_type() == &JoinType::Inner
        && join.null_equality() == NullEquality::NullEqualsNothing
        && !join.null_aware
        && join.projection.is_none()
        && join.fetch().is_none()
        && matches!(
            join.partition_mode(),
            PartitionMode::Auto | PartitionMode::CollectLeft
        )
        && join.on().iter().all(|(l, r)| {
            l.downcast_ref::<Column>().is_some() && r.downcast_ref::<Column>().is_some()
        })
        && join.filter().is_none_or(|f| {
            f.column_indices()
                .iter()
                .all(|c| matches!(c.side, JoinSide::Left | JoinSide::Right))
        });
    plain.then_some(join)
}

/// `plan` as a projection that only selects columns (keeping their names) of a join
/// this rule may move, or of another such projection.
fn column_selection(plan: &Arc<dyn ExecutionPlan>) -> Option<(&ProjectionExec, Vec<usize>)> {
    let projection = plan.downcast_ref::<ProjectionExec>()?;
    let input = projection.input();
    if movable_join(input).is_none() && column_selection(input).is_none() {
        return None;
    }
    let schema = input.schema();
    projection
        .expr()
        .iter()
        .map(|e| {
            let column = e.expr.downcast_ref::<Column>()?;
            (schema.field(column.index()).name() == &e.alias).then_some(column.index())
        })
        .collect::<Option<Vec<_>>>()
        .map(|indices| (projection, indices))
}

fn column_index(expr: &Arc<dyn PhysicalExpr>) -> usize {
    expr.downcast_ref::<Column>()
        .map(Column::index)
        .expect("movable_join checked that keys are columns")
}

impl Region {
    /// The region rooted at `plan`, where `plan` is a join this rule may move.
    fn collect(plan: &Arc<dyn ExecutionPlan>) -> Option<Self> {
        let join = movable_join(plan)?;
        let mut region = Region {
            leaves: Vec::new(),
            edges: Vec::new(),
            filters: Vec::new(),
            output: Vec::new(),
            names: plan
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect(),
            mode: *join.partition_mode(),
        };
        region.output = region.visit(plan);
        Some(region)
    }

    /// Adds `plan`'s joins and leaves; returns its output columns.
    fn visit(&mut self, plan: &Arc<dyn ExecutionPlan>) -> Vec<ColumnId> {
        if let Some(join) = movable_join(plan) {
            let left = self.visit(join.left());
            let right = self.visit(join.right());
            for (l, r) in join.on() {
                self.edges
                    .push((left[column_index(l)], right[column_index(r)]));
            }
            if let Some(filter) = join.filter() {
                let columns = filter
                    .column_indices()
                    .iter()
                    .map(|c| match c.side {
                        JoinSide::Left => left[c.index],
                        _ => right[c.index],
                    })
                    .collect();
                self.filters.push(Residual {
                    filter: filter.clone(),
                    columns,
                    applied: false,
                });
            }
            return left.into_iter().chain(right).collect();
        }
        if let Some((projection, indices)) = column_selection(plan) {
            let input = self.visit(projection.input());
            return indices.into_iter().map(|i| input[i]).collect();
        }
        let leaf = self.leaves.len();
        self.leaves.push(Arc::clone(plan));
        (0..plan.schema().fields().len())
            .map(|c| (leaf, c))
            .collect()
    }

    /// The leaves (at most [`MAX_LEAVES`]) joined again in the order of least
    /// estimated work; `None` where a leaf has no row count.
    fn join(mut self) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let n = self.leaves.len();
        let Some(estimates) = Estimates::new(&self.leaves, &self.edges)? else {
            return Ok(None);
        };
        let Some(order) = estimates.best_order() else {
            return Ok(None);
        };
        let mut used = vec![false; self.edges.len()];
        let full = (1usize << n) - 1;
        let part = self.build(full, &order, &estimates, &mut used)?;
        if part.columns == self.output {
            return Ok(Some(part.plan));
        }
        let exprs = self
            .output
            .iter()
            .zip(&self.names)
            .map(|(id, name)| {
                let i = part
                    .columns
                    .iter()
                    .position(|c| c == id)
                    .expect("the last join keeps the output columns");
                ProjectionExpr {
                    expr: Arc::new(Column::new(name, i)) as Arc<dyn PhysicalExpr>,
                    alias: name.clone(),
                }
            })
            .collect::<Vec<_>>();
        Ok(Some(Arc::new(ProjectionExec::try_new(exprs, part.plan)?)))
    }

    /// The leaves of `set` (a bit per leaf) joined as `order` splits them, the side
    /// estimated smaller on the left (DataFusion builds its hash table on the left).
    fn build(
        &mut self,
        set: usize,
        order: &Order,
        estimates: &Estimates,
        used: &mut [bool],
    ) -> Result<Part> {
        if set.count_ones() == 1 {
            let i = set.trailing_zeros() as usize;
            let leaf = Arc::clone(&self.leaves[i]);
            return Ok(Part {
                leaves: BTreeSet::from([i]),
                columns: (0..leaf.schema().fields().len()).map(|c| (i, c)).collect(),
                plan: leaf,
            });
        }
        let a = order.split[set];
        let b = set ^ a;
        let (a, b) = if order.rows[b] < order.rows[a] {
            (b, a)
        } else {
            (a, b)
        };
        let left = self.build(a, order, estimates, used)?;
        let right = self.build(b, order, estimates, used)?;
        self.join_parts(left, right, estimates, used)
    }

    /// The key equalities to join `left` and `right` on: every unused edge between
    /// them, and for a class of equal columns that spans them through other leaves
    /// only (`a = b` and `b = c` join `a`'s and `c`'s leaves), one of its pairs.
    fn keys(
        &self,
        left: &Part,
        right: &Part,
        estimates: &Estimates,
        used: &[bool],
    ) -> Result<Vec<Key>> {
        let column = |part: &Part, id: ColumnId| {
            let i = part.columns.iter().position(|c| *c == id)?;
            let name = part.plan.schema().field(i).name().clone();
            Some(Arc::new(Column::new(&name, i)) as Arc<dyn PhysicalExpr>)
        };
        let mut keys = Vec::new();
        let mut joined_classes = BTreeSet::new();
        for (e, (a, b)) in self.edges.iter().enumerate() {
            if used[e] {
                continue;
            }
            let (a, b) = if left.leaves.contains(&a.0) && right.leaves.contains(&b.0) {
                (*a, *b)
            } else if left.leaves.contains(&b.0) && right.leaves.contains(&a.0) {
                (*b, *a)
            } else {
                continue;
            };
            // Every join keeps the columns of the keys not yet joined.
            let (Some(l), Some(r)) = (column(left, a), column(right, b)) else {
                return datafusion::common::internal_err!("a join key's column was dropped");
            };
            keys.push((Some(e), l, r));
            joined_classes.insert(estimates.class_of[&a]);
        }
        for (class, members) in estimates.classes.iter().enumerate() {
            if joined_classes.contains(&class) {
                continue;
            }
            let on = |part: &Part| {
                members
                    .iter()
                    .find(|m| part.leaves.contains(&m.0))
                    .and_then(|m| column(part, *m))
            };
            if let (Some(l), Some(r)) = (on(left), on(right)) {
                keys.push((None, l, r));
            }
        }
        Ok(keys)
    }

    /// `left` joined with `right` on every key between them, with the filters their
    /// leaves complete, keeping only the columns still needed.
    fn join_parts(
        &mut self,
        left: Part,
        right: Part,
        estimates: &Estimates,
        used: &mut [bool],
    ) -> Result<Part> {
        let keys = self.keys(&left, &right, estimates, used)?;
        for (e, _, _) in &keys {
            if let Some(e) = e {
                used[*e] = true;
            }
        }
        let leaves: BTreeSet<usize> = left.leaves.union(&right.leaves).copied().collect();
        let columns: Vec<ColumnId> = left.columns.iter().chain(&right.columns).copied().collect();
        let mut filters = Vec::new();
        for residual in &mut self.filters {
            if !residual.applied && residual.leaves().is_subset(&leaves) {
                residual.applied = true;
                filters.push(residual);
            }
        }
        let filter = if filters.is_empty() {
            None
        } else {
            // One filter of the conditions these leaves complete (several where the
            // original joins applied them at different joins), over their columns.
            let mut expression: Option<Arc<dyn PhysicalExpr>> = None;
            let mut fields = Vec::new();
            let mut ids = Vec::new();
            for residual in filters {
                let offset = fields.len();
                let shifted = Arc::clone(residual.filter.expression())
                    .transform(|e| match e.downcast_ref::<Column>() {
                        Some(c) => Ok(Transformed::yes(Arc::new(Column::new(
                            c.name(),
                            c.index() + offset,
                        )) as _)),
                        None => Ok(Transformed::no(e)),
                    })?
                    .data;
                expression = Some(match expression {
                    None => shifted,
                    Some(e) => Arc::new(BinaryExpr::new(e, Operator::And, shifted)),
                });
                fields.extend(residual.filter.schema().fields().iter().cloned());
                ids.extend(residual.columns.iter().copied());
            }
            let indices = ids
                .iter()
                .map(|id| match left.columns.iter().position(|c| c == id) {
                    Some(index) => ColumnIndex {
                        index,
                        side: JoinSide::Left,
                    },
                    None => ColumnIndex {
                        index: right
                            .columns
                            .iter()
                            .position(|c| c == id)
                            .expect("the filter's leaves are joined here"),
                        side: JoinSide::Right,
                    },
                })
                .collect();
            Some(JoinFilter::new(
                expression.expect("at least one filter"),
                indices,
                Arc::new(Schema::new(fields)),
            ))
        };
        // Still needed: the region's output, keys not yet joined (and the columns of
        // their classes, which later joins may join on) and filters not yet applied.
        let mut needed: BTreeSet<ColumnId> = self.output.iter().copied().collect();
        for (e, (a, b)) in self.edges.iter().enumerate() {
            if !used[e] {
                needed.extend([*a, *b]);
            }
        }
        for members in &estimates.classes {
            if !members.iter().all(|m| leaves.contains(&m.0)) {
                needed.extend(members.iter().copied());
            }
        }
        for residual in self.filters.iter().filter(|r| !r.applied) {
            needed.extend(residual.columns.iter().copied());
        }
        let mut projection: Vec<usize> = (0..columns.len())
            .filter(|i| needed.contains(&columns[*i]))
            .collect();
        if projection.is_empty() {
            projection.push(0);
        }
        let kept = projection.iter().map(|i| columns[*i]).collect();
        let plan = HashJoinExec::try_new(
            left.plan,
            right.plan,
            keys.into_iter().map(|(_, l, r)| (l, r)).collect(),
            filter,
            &JoinType::Inner,
            Some(projection),
            self.mode,
            NullEquality::NullEqualsNothing,
            false,
        )?;
        Ok(Part {
            leaves,
            columns: kept,
            plan: Arc::new(plan),
        })
    }
}

/// What the search knows of a region: each leaf's estimated rows, each key column's
/// estimated distinct values, and the classes of columns the keys make equal.
struct Estimates {
    rows: Vec<f64>,
    distinct: HashMap<ColumnId, f64>,
    /// Columns equal to each other through the keys (`a = b` and `b = c`).
    classes: Vec<Vec<ColumnId>>,
    class_of: HashMap<ColumnId, usize>,
}

/// The best way found to join each connected set of leaves (a bit per leaf).
struct Order {
    /// The subset joined with the rest of the set.
    split: Vec<usize>,
    /// The set's estimated rows.
    rows: Vec<f64>,
}

impl Estimates {
    /// DataFusion's statistics of each leaf (from the files' row counts and min/max
    /// values, through its filters); `None` where a leaf has no row count.
    fn new(
        leaves: &[Arc<dyn ExecutionPlan>],
        edges: &[(ColumnId, ColumnId)],
    ) -> Result<Option<Self>> {
        let mut class_of: HashMap<ColumnId, usize> = HashMap::new();
        let mut classes: Vec<Vec<ColumnId>> = Vec::new();
        for (a, b) in edges {
            match (class_of.get(a).copied(), class_of.get(b).copied()) {
                (Some(x), Some(y)) if x != y => {
                    let moved = std::mem::take(&mut classes[y]);
                    for m in &moved {
                        class_of.insert(*m, x);
                    }
                    classes[x].extend(moved);
                }
                (Some(_), Some(_)) => {}
                (Some(x), None) => {
                    class_of.insert(*b, x);
                    classes[x].push(*b);
                }
                (None, Some(y)) => {
                    class_of.insert(*a, y);
                    classes[y].push(*a);
                }
                (None, None) => {
                    class_of.insert(*a, classes.len());
                    class_of.insert(*b, classes.len());
                    classes.push(vec![*a, *b]);
                }
            }
        }
        // Drop the classes emptied by merges, renumbering the rest.
        let classes: Vec<Vec<ColumnId>> = classes.into_iter().filter(|c| !c.is_empty()).collect();
        let class_of = classes
            .iter()
            .enumerate()
            .flat_map(|(i, c)| c.iter().map(move |m| (*m, i)))
            .collect();
        let mut rows = Vec::with_capacity(leaves.len());
        let mut table_rows = Vec::with_capacity(leaves.len());
        let mut distinct = HashMap::new();
        let mut range = HashMap::new();
        for (i, leaf) in leaves.iter().enumerate() {
            let stats = StatisticsContext::new().compute(leaf.as_ref(), &StatisticsArgs::new())?;
            let Some(n) = stats.num_rows.get_value().map(|n| (*n).max(1) as f64) else {
                return Ok(None);
            };
            rows.push(n);
            table_rows.push(scanned_rows(leaf)?);
            for (c, column) in stats.column_statistics.iter().enumerate() {
                distinct.insert((i, c), distinct_values(n, column));
                if let Some(r) = range_size(column) {
                    range.insert((i, c), r);
                }
            }
        }
        // A key's values are taken to be among those of the class's column whose table
        // has the fewest rows, where that table has no more rows than its range has
        // values (a key of its own, as `orders.o_orderkey` for `lineitem.l_orderkey`):
        // a column's range overstates its distinct values when each repeats
        // (`l_orderkey` spans 6 M values in 6 M rows, but holds 1.5 M), and the join of
        // `orders` with `lineitem` would look as small as `orders`.
        for class in &classes {
            let key = class
                .iter()
                .filter_map(|m| {
                    let rows = table_rows[m.0]?;
                    (rows <= *range.get(m)?).then_some((m, rows))
                })
                .min_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((key, rows)) = key {
                for m in class.iter().filter(|m| *m != key) {
                    if let Some(d) = distinct.get_mut(m) {
                        *d = d.min(rows);
                    }
                }
            }
        }
        Ok(Some(Self {
            rows,
            distinct,
            classes,
            class_of,
        }))
    }

    /// The cheapest order of joins by the total of their estimated output rows (the
    /// rows each join builds, probes with and passes on), searched over every split of
    /// every connected set of leaves; `None` if the keys leave the leaves unconnected.
    ///
    /// A join of two sets is estimated as the product of their rows over the larger of
    /// their numbers of distinct keys (a key of several columns: the product of its
    /// columns' distinct values, at most the side's rows, so that `partsupp`'s
    /// (part, supplier) pairs count as its rows).
    fn best_order(&self) -> Option<Order> {
        let n = self.rows.len();
        let full = (1usize << n) - 1;
        let masks: Vec<usize> = self
            .classes
            .iter()
            .map(|c| c.iter().fold(0, |m, (leaf, _)| m | 1 << leaf))
            .collect();
        let mut cost = vec![f64::INFINITY; full + 1];
        let mut rows = vec![0.0; full + 1];
        let mut split = vec![0; full + 1];
        for i in 0..n {
            cost[1 << i] = 0.0;
            rows[1 << i] = self.rows[i];
        }
        for set in 1..=full {
            if set.count_ones() < 2 {
                continue;
            }
            let lowest = set & set.wrapping_neg();
            let mut a = (set - 1) & set;
            while a > 0 {
                let b = set ^ a;
                if a & lowest != 0 && cost[a].is_finite() && cost[b].is_finite() {
                    if let Some(joined) = self.join_rows(a, b, rows[a], rows[b], &masks) {
                        let total = cost[a] + cost[b] + joined;
                        if total < cost[set] {
                            cost[set] = total;
                            rows[set] = joined;
                            split[set] = a;
                        }
                    }
                }
                a = (a - 1) & set;
            }
        }
        cost[full].is_finite().then_some(Order { split, rows })
    }

    /// The estimated rows of joining sets `a` and `b`; `None` if no key joins them.
    fn join_rows(
        &self,
        a: usize,
        b: usize,
        rows_a: f64,
        rows_b: f64,
        masks: &[usize],
    ) -> Option<f64> {
        // Each side's distinct values of the key: the product over its columns of each
        // one's fewest distinct values there (the columns of a class are equal there),
        // at most the side's rows.
        let (mut keys_a, mut keys_b) = (1.0f64, 1.0f64);
        let mut joined = false;
        for (class, mask) in self.classes.iter().zip(masks) {
            if mask & a == 0 || mask & b == 0 {
                continue;
            }
            joined = true;
            let side = |set: usize| {
                class
                    .iter()
                    .filter(|(leaf, _)| set & (1 << leaf) != 0)
                    .map(|m| self.distinct.get(m).copied().unwrap_or(self.rows[m.0]))
                    .fold(f64::INFINITY, f64::min)
            };
            keys_a *= side(a);
            keys_b *= side(b);
        }
        let larger = keys_a.min(rows_a).max(keys_b.min(rows_b)).max(1.0);
        joined.then(|| (rows_a * rows_b / larger).max(1.0))
    }
}

/// A column's estimated distinct values in `rows` rows: its distinct count where the
/// statistics have one, else the size of its range for integers and dates, else `rows`.
fn distinct_values(rows: f64, column: &ColumnStatistics) -> f64 {
    if let Some(d) = column.distinct_count.get_value() {
        return (*d as f64).clamp(1.0, rows);
    }
    range_size(column).unwrap_or(rows).clamp(1.0, rows)
}

/// How many values an integer or date column's range holds.
fn range_size(column: &ColumnStatistics) -> Option<f64> {
    let (min, max) = (column.min_value.get_value()?, column.max_value.get_value()?);
    let interval = Interval::try_new(min.clone(), max.clone()).ok()?;
    interval.cardinality().map(|c| c as f64)
}

/// The rows of the table a leaf reads, before its filters: the row count of the file
/// scan under a chain of filters, projections and repartitions; `None` for other
/// leaves (an aggregation, a join of another kind).
fn scanned_rows(leaf: &Arc<dyn ExecutionPlan>) -> Result<Option<f64>> {
    let mut node = Arc::clone(leaf);
    loop {
        if node.is::<DataSourceExec>() {
            let stats = StatisticsContext::new().compute(node.as_ref(), &StatisticsArgs::new())?;
            return Ok(stats.num_rows.get_value().map(|n| *n as f64));
        }
        let passes_rows = node.is::<FilterExec>()
            || node.is::<ProjectionExec>()
            || node.is::<RepartitionExec>()
            || node.is::<CoalescePartitionsExec>();
        match node.children().as_slice() {
            [child] if passes_rows => node = Arc::clone(child),
            _ => return Ok(None),
        }
    }
}

/// Leaves joined so far.
struct Part {
    leaves: BTreeSet<usize>,
    /// `plan`'s output columns.
    columns: Vec<ColumnId>,
    plan: Arc<dyn ExecutionPlan>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use datafusion::common::tree_node::TreeNodeRecursion;
    use datafusion::execution::SessionStateBuilder;
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
    use datafusion::prelude::{SessionConfig, SessionContext};

    /// `fact` (`a`: `i % 100`, `v`: `i`, 20,000 rows), `dim_a` (`a` 0..100, `b`: `a % 50`)
    /// and `dim_b` (`b` 0..50, `w`: `2 * b`, `tag`) as Parquet files, planned with or
    /// without [`JoinOrder`].
    fn context(dir: &std::path::Path, reorder: bool) -> SessionContext {
        let rows = 20_000i64;
        let tables: [(&str, Vec<(&str, arrow::array::ArrayRef)>); 3] = [
            (
                "fact",
                vec![
                    (
                        "a",
                        Arc::new(Int64Array::from_iter_values((0..rows).map(|i| i % 100))),
                    ),
                    ("v", Arc::new(Int64Array::from_iter_values(0..rows))),
                ],
            ),
            (
                "dim_a",
                vec![
                    ("a", Arc::new(Int64Array::from_iter_values(0..100))),
                    (
                        "b",
                        Arc::new(Int64Array::from_iter_values((0..100).map(|a| a % 50))),
                    ),
                ],
            ),
            (
                "dim_b",
                vec![
                    ("b", Arc::new(Int64Array::from_iter_values(0..50))),
                    (
                        "w",
                        Arc::new(Int64Array::from_iter_values((0..50).map(|b| 2 * b))),
                    ),
                    (
                        "tag",
                        Arc::new(StringArray::from_iter_values(
                            (0..50).map(|b| format!("t{b}")),
                        )),
                    ),
                ],
            ),
        ];
        for (table, columns) in tables {
            std::fs::create_dir_all(dir.join(table)).unwrap();
            let batch = RecordBatch::try_from_iter(columns).unwrap();
            let file = std::fs::File::create(dir.join(format!("{table}/0.parquet"))).unwrap();
            let mut w = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
        }
        let mut rules = PhysicalOptimizer::new().rules;
        if reorder {
            let at = rules
                .iter()
                .position(|r| r.name() == "join_selection")
                .unwrap();
            rules.insert(at, Arc::new(JoinOrder));
        }
        let state = SessionStateBuilder::new()
            .with_config(SessionConfig::new().with_target_partitions(2))
            .with_default_features()
            .with_physical_optimizer_rules(rules)
            .build();
        let ctx = SessionContext::new_with_state(state);
        let rt = tokio::runtime::Runtime::new().unwrap();
        for t in ["fact", "dim_a", "dim_b"] {
            let path = format!("{}/{t}/", dir.display());
            rt.block_on(ctx.register_parquet(t, &path, Default::default()))
                .unwrap();
        }
        ctx
    }

    /// `sql`'s sorted rows, and its plan's joins from the top down, each as the tables
    /// of its two sides.
    fn run(ctx: &SessionContext, sql: &str) -> (Vec<String>, Vec<String>, String) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let df = ctx.sql(sql).await.unwrap();
            let plan = df.clone().create_physical_plan().await.unwrap();
            let batches = df.collect().await.unwrap();
            let mut rows: Vec<String> = arrow::util::pretty::pretty_format_batches(&batches)
                .unwrap()
                .to_string()
                .lines()
                .filter(|l| l.starts_with('|'))
                .skip(1)
                .map(String::from)
                .collect();
            rows.sort();
            let tables = |node: &Arc<dyn ExecutionPlan>| {
                let mut names = BTreeSet::new();
                node.apply(|n| {
                    if n.children().is_empty() {
                        let shown = datafusion::physical_plan::displayable(n.as_ref())
                            .one_line()
                            .to_string();
                        for t in ["fact", "dim_a", "dim_b"] {
                            if shown.contains(&format!("/{t}/")) {
                                names.insert(t);
                            }
                        }
                    }
                    Ok(TreeNodeRecursion::Continue)
                })
                .unwrap();
                names.into_iter().collect::<Vec<_>>().join("+")
            };
            let mut joins = Vec::new();
            plan.apply(|n| {
                if let Some(j) = n.downcast_ref::<HashJoinExec>() {
                    joins.push(format!("{} | {}", tables(j.left()), tables(j.right())));
                }
                Ok(TreeNodeRecursion::Continue)
            })
            .unwrap();
            let shown = datafusion::physical_plan::displayable(plan.as_ref())
                .indent(true)
                .to_string();
            (rows, joins, shown)
        })
    }

    #[test]
    fn a_filtered_chain_of_small_tables_is_joined_before_the_large_one() {
        let dir = tempfile::tempdir().unwrap();
        let planned = context(dir.path(), false);
        let reordered = context(dir.path(), true);
        // Written `fact` first: DataFusion joins `fact` with `dim_a` (20,000 rows), then
        // with the 2 rows of `dim_b` that the filter keeps.
        let sql = "SELECT v, dim_b.tag FROM fact, dim_a, dim_b \
                   WHERE fact.a = dim_a.a AND dim_a.b = dim_b.b AND dim_b.b < 2";
        let (expected, joins, shown) = run(&planned, sql);
        assert!(joins[1].contains("fact"), "{shown}");
        let (rows, joins, shown) = run(&reordered, sql);
        // `a % 50` in {0, 1}: `a` in {0, 1, 50, 51}, 4 of every 100 rows.
        assert_eq!(rows.len(), 800);
        assert_eq!(rows, expected);
        // `dim_a` with `dim_b` first (4 rows), then `fact`.
        assert_eq!(joins.len(), 2, "{shown}");
        assert!(joins[0].contains("fact"), "{shown}");
        assert!(
            joins[1] == "dim_a | dim_b" || joins[1] == "dim_b | dim_a",
            "{shown}"
        );

        // Conditions that are not keys stay with the join that has their columns,
        // whichever join that now is.
        let sql = "SELECT v, dim_b.tag FROM fact, dim_a, dim_b \
                   WHERE fact.a = dim_a.a AND dim_a.b = dim_b.b AND dim_b.b < 2 \
                   AND dim_a.a <> dim_b.w AND fact.v > dim_b.w";
        let (expected, _, _) = run(&planned, sql);
        let (rows, joins, shown) = run(&reordered, sql);
        assert_eq!(rows, expected);
        // `a` in {1, 50, 51} (`w` is 0 for `a` 0), less `v` 1 (`w` 2).
        assert_eq!(rows.len(), 599);
        assert!(!joins[1].contains("fact"), "{shown}");
    }

    #[test]
    fn a_region_with_a_condition_that_might_fail_keeps_its_order() {
        let dir = tempfile::tempdir().unwrap();
        let planned = context(dir.path(), false);
        let reordered = context(dir.path(), true);
        // As the first test's query, which is reordered, with a division between `fact`
        // and `dim_b`: moved down it would see rows the join with `dim_a` used to drop.
        let sql = "SELECT v, dim_b.tag FROM fact, dim_a, dim_b \
                   WHERE fact.a = dim_a.a AND dim_a.b = dim_b.b AND dim_b.b < 2 \
                   AND dim_b.w / (fact.v + 1) >= 0";
        let (expected, planned_joins, _) = run(&planned, sql);
        let (rows, joins, shown) = run(&reordered, sql);
        assert_eq!(rows.len(), 800);
        assert_eq!(rows, expected);
        assert_eq!(joins, planned_joins, "{shown}");
    }

    #[test]
    fn a_table_joined_twice_keeps_each_column_in_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let planned = context(dir.path(), false);
        let reordered = context(dir.path(), true);
        let sql = "SELECT v, b1.tag, b2.w, b1.w + 1 AS w1 FROM fact, dim_a, dim_b b1, dim_b b2 \
                   WHERE fact.a = dim_a.a AND dim_a.b = b1.b AND b1.b < 2 \
                   AND dim_a.b = b2.b AND b2.w > 0";
        let (expected, planned_joins, _) = run(&planned, sql);
        let (rows, joins, shown) = run(&reordered, sql);
        // `b` 1 only (`w` 2): `a` in {1, 51}.
        assert_eq!(rows.len(), 400);
        assert!(
            rows[0].contains("| t1  | 2 ") && rows[0].ends_with("| 3  |"),
            "{}",
            rows[0]
        );
        assert_eq!(rows, expected);
        assert_ne!(joins, planned_joins, "{shown}");
        assert!(joins[0].contains("fact"), "{shown}");
    }
}
