//! Join order: the tables of a tree of inner joins joined smallest result first.
//!
//! DataFusion joins tables in the order a query names them (`FROM supplier, lineitem,
//! orders, ...`) and only chooses each join's build side. TPC-H Q07 so joined
//! `supplier` with `lineitem` (1.8 M rows estimated) and built a hash table on the 1.5 M
//! `orders`, before the two nations that keep 8% of the suppliers and of the customers
//! reached either. [`JoinOrder`] takes each region of inner equi-joins (its tables are
//! the leaves: scans, filters, aggregations, other joins) and joins them again greedily:
//! at each step the two connected parts whose join DataFusion's statistics estimate
//! smallest (rows, from the files' row counts, the filters' selectivities and the keys'
//! ranges). Q07 then joins each nation with its suppliers or customers first.
//!
//! The rule runs before DataFusion's `JoinSelection`, which still chooses each new
//! join's build side and partitioning. It changes nothing where a leaf has no row count
//! or where the new plan's schema would differ from the old one.

use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::arrow::datatypes::Schema;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{JoinSide, JoinType, NullEquality, Result};
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::expressions::{BinaryExpr, Column};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::joins::utils::{ColumnIndex, JoinFilter};
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};
use datafusion::physical_plan::ExecutionPlan;

/// Rejoins each region of inner equi-joins smallest result first (module docs).
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

/// A key equality of a join: (the region's edge, left column, right column).
type Key = (usize, Arc<dyn PhysicalExpr>, Arc<dyn PhysicalExpr>);

fn reorder(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    if let Some(mut region) = Region::collect(&plan) {
        if region.leaves.len() >= 3 {
            region.leaves = region
                .leaves
                .into_iter()
                .map(reorder)
                .collect::<Result<_>>()?;
            if let Some(joined) = region.join()? {
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

/// `plan`'s estimated rows (`None`: unknown), from a walk of its own: the walk's cache
/// is keyed by the nodes' addresses, which the candidate joins dropped here reuse.
fn estimated_rows(plan: &Arc<dyn ExecutionPlan>) -> Result<Option<usize>> {
    let stats = StatisticsContext::new().compute(plan.as_ref(), &StatisticsArgs::new())?;
    Ok(stats.num_rows.get_value().copied())
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

    /// The leaves joined again, smallest estimated result first; `None` where a leaf
    /// has no row count or the keys leave the leaves unconnected.
    fn join(mut self) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let mut parts = Vec::with_capacity(self.leaves.len());
        for (i, leaf) in self.leaves.iter().enumerate() {
            if estimated_rows(leaf)?.is_none() {
                return Ok(None);
            }
            parts.push(Part {
                leaves: BTreeSet::from([i]),
                columns: (0..leaf.schema().fields().len()).map(|c| (i, c)).collect(),
                plan: Arc::clone(leaf),
            });
        }
        let mut used = vec![false; self.edges.len()];
        while parts.len() > 1 {
            let mut best: Option<(usize, usize, usize)> = None;
            for a in 0..parts.len() {
                for b in a + 1..parts.len() {
                    let on = self.keys(&parts[a], &parts[b], &used);
                    if on.is_empty() {
                        continue;
                    }
                    let candidate: Arc<dyn ExecutionPlan> = Arc::new(HashJoinExec::try_new(
                        Arc::clone(&parts[a].plan),
                        Arc::clone(&parts[b].plan),
                        on.into_iter().map(|(_, l, r)| (l, r)).collect(),
                        None,
                        &JoinType::Inner,
                        None,
                        self.mode,
                        NullEquality::NullEqualsNothing,
                        false,
                    )?);
                    let estimate = estimated_rows(&candidate)?.unwrap_or(usize::MAX);
                    if best.is_none_or(|(_, _, rows)| estimate < rows) {
                        best = Some((a, b, estimate));
                    }
                }
            }
            let Some((a, b, _)) = best else {
                return Ok(None);
            };
            let second = parts.swap_remove(b);
            let first = parts.swap_remove(a);
            // The smaller side first: DataFusion builds its hash table on the left.
            let rows = |p: &Part| {
                Ok::<_, datafusion::common::DataFusionError>(
                    estimated_rows(&p.plan)?.unwrap_or(usize::MAX),
                )
            };
            let (left, right) = if rows(&second)? < rows(&first)? {
                (second, first)
            } else {
                (first, second)
            };
            let joined = self.join_parts(left, right, &mut used)?;
            parts.push(joined);
        }
        let part = parts.pop().expect("one part left");
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

    /// The unused key equalities between `left` and `right`.
    fn keys(&self, left: &Part, right: &Part, used: &[bool]) -> Vec<Key> {
        let column = |part: &Part, id: ColumnId| {
            let i = part.columns.iter().position(|c| *c == id)?;
            let name = part.plan.schema().field(i).name().clone();
            Some(Arc::new(Column::new(&name, i)) as Arc<dyn PhysicalExpr>)
        };
        let mut keys = Vec::new();
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
            if let (Some(l), Some(r)) = (column(left, a), column(right, b)) {
                keys.push((e, l, r));
            }
        }
        keys
    }

    /// `left` joined with `right` on every key between them, with the filters their
    /// leaves complete, keeping only the columns still needed.
    fn join_parts(&mut self, left: Part, right: Part, used: &mut [bool]) -> Result<Part> {
        let keys = self.keys(&left, &right, used);
        for (e, _, _) in &keys {
            used[*e] = true;
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
        // Still needed: the region's output, keys not yet joined and filters not yet
        // applied.
        let mut needed: BTreeSet<ColumnId> = self.output.iter().copied().collect();
        for (e, (a, b)) in self.edges.iter().enumerate() {
            if !used[e] {
                needed.extend([*a, *b]);
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
                   AND dim_a.a > dim_b.w + 10 AND fact.v % 7 <> dim_b.w";
        let (expected, _, _) = run(&planned, sql);
        let (rows, joins, shown) = run(&reordered, sql);
        assert_eq!(rows, expected);
        // `a` in {50, 51}, and `v % 7` not `w` (0 or 2).
        assert!(rows.len() > 300 && rows.len() < 400, "{}", rows.len());
        assert!(!joins[1].contains("fact"), "{shown}");
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
