//! Filters that test their conditions one after another, each on the rows still in play.
//!
//! DataFusion evaluates `a AND b AND c` as nested binary expressions. Each `AND` that
//! finds few rows left copies the whole input batch (every column, not only those the
//! rest of the filter reads) down to those rows, evaluates its right side there, and
//! scatters the result back one bit at a time. A filter of five conditions over a scan
//! (TPC-H Q06, Q12) spent about a fifth of its query's time in that copying and
//! scattering, and it evaluated the conditions in the order the query was written:
//! Q12 compared the `l_shipmode` strings of all 6 million rows before the date
//! comparisons that leave 3% of them.
//!
//! [`FilterConjunctions`] rewrites the predicate of every `FilterExec` with two or more
//! conditions into a [`Conjunction`]:
//! - the conditions run cheapest first (comparisons of numbers with constants, then of
//!   two numeric columns, then of strings, then `LIKE`); a condition that might fail or
//!   is volatile (arithmetic, casts, functions) keeps its place relative to the others
//!   of its kind, after all the cheap ones;
//! - each condition is evaluated on the rows that passed the ones before, copied (only
//!   the columns the remaining conditions read) once at most half of the rows still
//!   in play pass; and always before a condition that might fail, so that it never
//!   sees a row an earlier condition rejected;
//! - results are combined as bitmaps (a null counts as false, as a filter counts it).
//!
//! The rule runs after DataFusion's rules (and [`DecodeTimeFilters`]), so that they
//! see the plain `AND` of the conditions.
//!
//! [`DecodeTimeFilters`]: crate::decode_filters::DecodeTimeFilters

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{Array, AsArray, BooleanArray};
use arrow::buffer::{BooleanBuffer, MutableBuffer};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::common::{internal_err, Result, ScalarValue};
use datafusion::logical_expr::{ColumnarValue, Operator};
use datafusion::physical_expr::expressions::{
    BinaryExpr, Column, InListExpr, IsNotNullExpr, IsNullExpr, LikeExpr, Literal, NotExpr,
};
use datafusion::physical_expr::split_conjunction;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::filter::{FilterExec, FilterExecBuilder};
use datafusion::physical_plan::{ExecutionPlan, PhysicalExpr};

use crate::view_compare::ViewStringIn;

/// Evaluates the predicate of every `FilterExec` with two or more conditions as a
/// [`Conjunction`] (see the module's documentation).
#[derive(Debug, Default)]
pub(crate) struct FilterConjunctions;

impl PhysicalOptimizerRule for FilterConjunctions {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(filter) = node.downcast_ref::<FilterExec>() else {
                return Ok(Transformed::no(node));
            };
            let predicate = filter.predicate();
            if predicate.downcast_ref::<Conjunction>().is_some() {
                return Ok(Transformed::no(node));
            }
            let conjuncts: Vec<_> = split_conjunction(predicate)
                .into_iter()
                .map(Arc::clone)
                .collect();
            if conjuncts.len() < 2 {
                return Ok(Transformed::no(node));
            }
            let schema = filter.input().schema();
            let predicate = Arc::new(Conjunction::ordered(conjuncts, &schema));
            let rewritten = FilterExecBuilder::from(filter)
                .with_predicate(predicate)
                .build()?;
            Ok(Transformed::yes(
                Arc::new(rewritten) as Arc<dyn ExecutionPlan>
            ))
        })
        .data()
    }

    fn name(&self) -> &str {
        "volley_filter_conjunctions"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// The `AND` of conditions, evaluated one after another on the rows still in play
/// (see the module's documentation). Its result has no nulls: a row whose condition is
/// null does not pass, as in a filter.
#[derive(Debug)]
pub(crate) struct Conjunction {
    conjuncts: Vec<Arc<dyn PhysicalExpr>>,
    /// Per condition: whether it might fail or is volatile (it sees only rows every
    /// earlier condition passed).
    exact: Vec<bool>,
    /// Per condition `i`: the input columns conditions `i..` read, and those
    /// conditions over that projection of the input.
    rest: Vec<Rest>,
}

#[derive(Debug)]
struct Rest {
    columns: Vec<usize>,
    conjuncts: Vec<Arc<dyn PhysicalExpr>>,
}

impl Conjunction {
    /// The conditions, in this order.
    pub(crate) fn new(conjuncts: Vec<Arc<dyn PhysicalExpr>>) -> Result<Self> {
        let exact = conjuncts.iter().map(|c| cost(c, None).is_none()).collect();
        let rest = (0..conjuncts.len())
            .map(|i| Rest::of(&conjuncts[i..]))
            .collect::<Result<_>>()?;
        Ok(Self {
            conjuncts,
            exact,
            rest,
        })
    }

    /// The conditions, cheapest first (over `schema`, the filter's input).
    fn ordered(conjuncts: Vec<Arc<dyn PhysicalExpr>>, schema: &Schema) -> Self {
        Self::new(cheapest_first(conjuncts, Some(schema))).expect("columns of a planned filter")
    }
}

/// `conjuncts` by [`cost`], cheapest first, those that might fail or are volatile last;
/// stable: conditions of one cost (and the ones that might fail) keep their order.
/// Column types come from `schema` (without one, every column counts as numeric).
pub(crate) fn cheapest_first(
    conjuncts: Vec<Arc<dyn PhysicalExpr>>,
    schema: Option<&Schema>,
) -> Vec<Arc<dyn PhysicalExpr>> {
    let mut ranked: Vec<(u8, Arc<dyn PhysicalExpr>)> = conjuncts
        .into_iter()
        .map(|c| (cost(&c, schema).unwrap_or(u8::MAX), c))
        .collect();
    ranked.sort_by_key(|(cost, _)| *cost);
    ranked.into_iter().map(|(_, c)| c).collect()
}

impl Rest {
    fn of(conjuncts: &[Arc<dyn PhysicalExpr>]) -> Result<Self> {
        let mut read = BTreeSet::new();
        for c in conjuncts {
            c.apply(|e| {
                if let Some(col) = e.downcast_ref::<Column>() {
                    read.insert(col.index());
                }
                Ok(TreeNodeRecursion::Continue)
            })?;
        }
        let columns: Vec<usize> = read.into_iter().collect();
        let at: HashMap<usize, usize> = columns.iter().enumerate().map(|(i, c)| (*c, i)).collect();
        let conjuncts = conjuncts
            .iter()
            .map(|c| {
                Arc::clone(c)
                    .transform_up(|e| match e.downcast_ref::<Column>() {
                        Some(col) => Ok(Transformed::yes(Arc::new(Column::new(
                            col.name(),
                            at[&col.index()],
                        ))
                            as Arc<dyn PhysicalExpr>)),
                        None => Ok(Transformed::no(e)),
                    })
                    .data()
            })
            .collect::<Result<_>>()?;
        Ok(Self { columns, conjuncts })
    }
}

/// Whether `expr` can neither fail nor vary between calls (no arithmetic, cast or
/// volatile function): it may run on rows an earlier condition would have dropped.
pub(crate) fn cannot_fail(expr: &Arc<dyn PhysicalExpr>, schema: &Schema) -> bool {
    cost(expr, Some(schema)).is_some()
}

/// How costly `expr` is to evaluate per row, for conditions that cannot fail and are
/// not volatile: 0 compares numbers with constants, 1 compares numeric columns (or
/// view strings with constants, [`ViewStringIn`]), 2 compares strings, 3 matches
/// patterns. `None` for anything else. Column types come
/// from `schema` (without one, every column counts as numeric).
fn cost(expr: &Arc<dyn PhysicalExpr>, schema: Option<&Schema>) -> Option<u8> {
    let column_cost = |c: &Column| {
        let string = schema
            .and_then(|s| s.fields().get(c.index()))
            .is_some_and(|f| {
                matches!(
                    f.data_type(),
                    DataType::Utf8
                        | DataType::LargeUtf8
                        | DataType::Utf8View
                        | DataType::Binary
                        | DataType::LargeBinary
                        | DataType::BinaryView
                        | DataType::Dictionary(_, _)
                )
            });
        if string {
            2
        } else {
            0
        }
    };
    if let Some(c) = expr.downcast_ref::<Column>() {
        return Some(column_cost(c));
    }
    if let Some(v) = expr.downcast_ref::<ViewStringIn>() {
        // About as costly as comparing two numeric columns (one 128-bit comparison
        // per row and constant).
        return cost(v.input(), None).map(|_| 1);
    }
    if expr.downcast_ref::<Literal>().is_some() {
        return Some(0);
    }
    if let Some(b) = expr.downcast_ref::<BinaryExpr>() {
        let comparison = matches!(
            b.op(),
            Operator::Eq
                | Operator::NotEq
                | Operator::Lt
                | Operator::LtEq
                | Operator::Gt
                | Operator::GtEq
                | Operator::IsDistinctFrom
                | Operator::IsNotDistinctFrom
        );
        if !comparison && !matches!(b.op(), Operator::And | Operator::Or) {
            return None;
        }
        let (l, r) = (cost(b.left(), schema)?, cost(b.right(), schema)?);
        let two_columns = comparison
            && b.left().downcast_ref::<Literal>().is_none()
            && b.right().downcast_ref::<Literal>().is_none();
        return Some(l.max(r).max(u8::from(two_columns)));
    }
    if let Some(n) = expr.downcast_ref::<NotExpr>() {
        return cost(n.arg(), schema);
    }
    if let Some(n) = expr.downcast_ref::<IsNullExpr>() {
        return cost(n.arg(), schema);
    }
    if let Some(n) = expr.downcast_ref::<IsNotNullExpr>() {
        return cost(n.arg(), schema);
    }
    if let Some(l) = expr.downcast_ref::<InListExpr>() {
        let mut c = cost(l.expr(), schema)?;
        for item in l.list() {
            item.downcast_ref::<Literal>()?;
        }
        if l.list().len() > 1 {
            c = c.max(1);
        }
        return Some(c);
    }
    if let Some(l) = expr.downcast_ref::<LikeExpr>() {
        cost(l.expr(), schema)?;
        l.pattern().downcast_ref::<Literal>()?;
        return Some(3);
    }
    None
}

/// The rows of `result` that are true (a null is false, as in a filter).
pub(crate) fn passing(result: &BooleanArray) -> BooleanBuffer {
    match result.nulls() {
        Some(nulls) => result.values() & nulls.inner(),
        None => result.values().clone(),
    }
}

/// A bitmap as long as `kept` whose set bits are those of `kept` for which the next
/// bit of `result` (one per set bit of `kept`, in order) is set.
fn scatter(kept: &BooleanBuffer, result: &BooleanBuffer) -> BooleanBuffer {
    let mut bits = MutableBuffer::from_len_zeroed(kept.len().div_ceil(8));
    let out = bits.as_slice_mut();
    for (j, i) in kept.set_indices().enumerate() {
        if result.value(j) {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    BooleanBuffer::new(bits.into(), 0, kept.len())
}

impl PhysicalExpr for Conjunction {
    fn data_type(&self, _input_schema: &Schema) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn nullable(&self, _input_schema: &Schema) -> Result<bool> {
        Ok(false)
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        let rows = batch.num_rows();
        // The rows that passed every condition so far (`None`: all of them).
        let mut passed: Option<BooleanBuffer> = None;
        // The rows conditions now run on, when not the whole batch: cut from the batch
        // by `kept`, projected to what conditions `from..` read.
        let mut cut: Option<(RecordBatch, BooleanBuffer, usize)> = None;
        for (i, conjunct) in self.conjuncts.iter().enumerate() {
            let in_play = cut.as_ref().map_or(rows, |(b, _, _)| b.num_rows());
            let left = passed.as_ref().map_or(rows, |p| p.count_set_bits());
            if left == 0 {
                return Ok(ColumnarValue::Scalar(ScalarValue::Boolean(Some(false))));
            }
            if i > 0 && (2 * left <= in_play || (self.exact[i] && left < in_play)) {
                let rest = &self.rest[i];
                let kept = passed.clone().expect("some rows were rejected");
                let projected = batch.project(&rest.columns)?;
                let rows_kept =
                    filter_record_batch(&projected, &BooleanArray::new(kept.clone(), None))?;
                cut = Some((rows_kept, kept, i));
            }
            let result = match &cut {
                None => conjunct.evaluate(batch)?,
                Some((rows_kept, _, from)) => {
                    self.rest[*from].conjuncts[i - from].evaluate(rows_kept)?
                }
            };
            let result = match result {
                ColumnarValue::Scalar(ScalarValue::Boolean(Some(true))) => continue,
                ColumnarValue::Scalar(ScalarValue::Boolean(_)) => {
                    return Ok(ColumnarValue::Scalar(ScalarValue::Boolean(Some(false))))
                }
                ColumnarValue::Scalar(other) => {
                    return internal_err!("a filter condition returned {other:?}, not a boolean")
                }
                ColumnarValue::Array(a) => {
                    let Some(b) = a.as_boolean_opt() else {
                        return internal_err!(
                            "a filter condition returned {}, not booleans",
                            a.data_type()
                        );
                    };
                    passing(b)
                }
            };
            let result = match &cut {
                None => result,
                Some((_, kept, _)) => scatter(kept, &result),
            };
            passed = Some(match passed {
                None => result,
                Some(p) => &p & &result,
            });
        }
        Ok(match passed {
            None => ColumnarValue::Scalar(ScalarValue::Boolean(Some(true))),
            Some(p) => ColumnarValue::Array(Arc::new(BooleanArray::new(p, None))),
        })
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        self.conjuncts.iter().collect()
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        Ok(Arc::new(Self::new(children)?))
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.conjuncts.iter().enumerate() {
            if i > 0 {
                write!(f, " AND ")?;
            }
            c.fmt_sql(f)?;
        }
        Ok(())
    }
}

impl fmt::Display for Conjunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.conjuncts.iter().enumerate() {
            if i > 0 {
                write!(f, " AND ")?;
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

impl PartialEq for Conjunction {
    fn eq(&self, other: &Self) -> bool {
        self.conjuncts == other.conjuncts
    }
}

impl Eq for Conjunction {}

impl Hash for Conjunction {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.conjuncts.hash(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int32Array, Int64Array, StringArray};
    use arrow::datatypes::Field;
    use datafusion::physical_expr::conjunction;
    use datafusion::physical_expr::expressions::{binary, col, in_list, lit};

    fn schema() -> Schema {
        Schema::new(vec![
            Field::new("x", DataType::Int64, true),
            Field::new("s", DataType::Utf8, true),
            Field::new("d", DataType::Int32, false),
        ])
    }

    /// `rows` rows of pseudo-random `x` (some null, some 0), `s` (a..e, some null), `d`.
    fn batch(rows: usize, seed: u64) -> RecordBatch {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut x = Vec::new();
        let mut s = Vec::new();
        let mut d = Vec::new();
        for _ in 0..rows {
            let r = next();
            x.push((r % 11 != 0).then_some((r >> 8) as i64 % 50));
            s.push((r % 13 != 0).then(|| ["a", "b", "c", "d", "e"][(r >> 20) as usize % 5]));
            d.push((r >> 32) as i32 % 100);
        }
        RecordBatch::try_new(
            Arc::new(schema()),
            vec![
                Arc::new(Int64Array::from(x)) as ArrayRef,
                Arc::new(StringArray::from(s)),
                Arc::new(Int32Array::from(d)),
            ],
        )
        .unwrap()
    }

    fn cmp(name: &str, op: Operator, value: ScalarValue) -> Arc<dyn PhysicalExpr> {
        let s = schema();
        binary(col(name, &s).unwrap(), op, lit(value), &s).unwrap()
    }

    /// Which rows pass, by DataFusion's own evaluation of the plain `AND`.
    fn oracle(conjuncts: &[Arc<dyn PhysicalExpr>], batch: &RecordBatch) -> Vec<bool> {
        let plain = conjunction(conjuncts.iter().cloned());
        let result = plain
            .evaluate(batch)
            .unwrap()
            .into_array(batch.num_rows())
            .unwrap();
        let result = result.as_boolean();
        (0..result.len())
            .map(|i| result.is_valid(i) && result.value(i))
            .collect()
    }

    fn passes(c: &Conjunction, batch: &RecordBatch) -> Vec<bool> {
        let result = c
            .evaluate(batch)
            .unwrap()
            .into_array(batch.num_rows())
            .unwrap();
        let result = result.as_boolean();
        assert_eq!(result.null_count(), 0);
        (0..result.len()).map(|i| result.value(i)).collect()
    }

    #[test]
    fn rows_that_pass_are_those_of_the_plain_and_whatever_the_selectivity() {
        let s = schema();
        let s_in = |items: &[&str]| {
            let list = items.iter().map(|v| lit(*v)).collect();
            in_list(col("s", &s).unwrap(), list, &false, &s).unwrap()
        };
        let cases: Vec<Vec<Arc<dyn PhysicalExpr>>> = vec![
            // Selective first: later conditions run on a few rows copied out.
            vec![
                cmp("d", Operator::Lt, ScalarValue::Int32(Some(3))),
                s_in(&["a", "b"]),
                cmp("x", Operator::Gt, ScalarValue::Int64(Some(10))),
            ],
            // Nothing selective: every condition runs on the whole batch.
            vec![
                cmp("d", Operator::GtEq, ScalarValue::Int32(Some(1))),
                cmp("x", Operator::NotEq, ScalarValue::Int64(Some(7))),
                s_in(&["a", "b", "c", "d"]),
            ],
            // Halving each time: a new cut after every condition; nulls in `x`, `s`.
            vec![
                cmp("d", Operator::Lt, ScalarValue::Int32(Some(50))),
                cmp("x", Operator::Lt, ScalarValue::Int64(Some(25))),
                cmp("s", Operator::Lt, ScalarValue::Utf8(Some("c".into()))),
                cmp("d", Operator::Lt, ScalarValue::Int32(Some(12))),
            ],
            // No row passes.
            vec![
                cmp("d", Operator::Gt, ScalarValue::Int32(Some(1000))),
                s_in(&["a"]),
            ],
            // A constant condition.
            vec![
                lit(true),
                cmp("x", Operator::Lt, ScalarValue::Int64(Some(5))),
            ],
        ];
        for (k, conjuncts) in cases.into_iter().enumerate() {
            for (rows, seed) in [(0, 1), (1, 2), (100, 3), (8192, 4), (10_001, 5)] {
                let batch = batch(rows, seed);
                let ordered = Conjunction::ordered(conjuncts.clone(), &s);
                let written = Conjunction::new(conjuncts.clone()).unwrap();
                let want = oracle(&conjuncts, &batch);
                assert_eq!(passes(&ordered, &batch), want, "case {k}, {rows} rows");
                assert_eq!(passes(&written, &batch), want, "case {k}, {rows} rows");
            }
        }
    }

    #[test]
    fn conditions_run_cheapest_first_and_one_that_might_fail_runs_last_on_passing_rows() {
        let s = schema();
        let list = vec![lit("a"), lit("b")];
        let s_in = in_list(col("s", &s).unwrap(), list, &false, &s).unwrap();
        // `100 / x` fails where `x` is 0: written first, it would run on every row.
        let divide = binary(
            binary(lit(100i64), Operator::Divide, col("x", &s).unwrap(), &s).unwrap(),
            Operator::Gt,
            lit(1i64),
            &s,
        )
        .unwrap();
        let plus_one = binary(
            binary(col("x", &s).unwrap(), Operator::Plus, lit(1i64), &s).unwrap(),
            Operator::Lt,
            lit(40i64),
            &s,
        )
        .unwrap();
        let written = vec![
            divide,
            s_in,
            cmp("d", Operator::Gt, ScalarValue::Int32(Some(5))),
            cmp("x", Operator::NotEq, ScalarValue::Int64(Some(0))),
            plus_one,
        ];
        let c = Conjunction::ordered(written.clone(), &s);
        let order: Vec<String> = c.conjuncts.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            order,
            [
                "d@2 > 5",
                "x@0 != 0",
                "s@1 IN (SET) ([a, b])",
                "100 / x@0 > 1",
                "x@0 + 1 < 40",
            ],
            "{order:?}"
        );
        assert_eq!(c.exact, [false, false, false, true, true]);
        let batch = batch(10_000, 9);
        let zeros = batch
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .iter()
            .filter(|v| *v == Some(0))
            .count();
        assert!(zeros > 50, "{zeros}");
        // The division never sees a zero: every row with one was rejected before it.
        let got = passes(&c, &batch);
        let want: Vec<bool> = (0..batch.num_rows())
            .map(|i| {
                let x = batch
                    .column(0)
                    .as_primitive::<arrow::datatypes::Int64Type>();
                let s = batch.column(1).as_string::<i32>();
                let d = batch
                    .column(2)
                    .as_primitive::<arrow::datatypes::Int32Type>()
                    .value(i);
                x.is_valid(i)
                    && s.is_valid(i)
                    && d > 5
                    && x.value(i) != 0
                    && ["a", "b"].contains(&s.value(i))
                    && 100 / x.value(i) > 1
                    && x.value(i) + 1 < 40
            })
            .collect();
        assert_eq!(got, want);
        assert!(got.iter().any(|p| *p));
    }
}
