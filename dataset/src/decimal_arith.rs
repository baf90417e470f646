//! Decimal `+`, `-` and `*` without 128-bit checked arithmetic where the values fit in
//! 64 bits.
//!
//! Arrow computes every value of a `Decimal128` sum, difference or product with
//! checked 128-bit operations: a product calls the compiler's 128-bit multiply with
//! overflow detection, and a sum of two scales first multiplies each value by a power
//! of ten the same way (for a constant side too, once per row). TPC-H Q01 spent about
//! a fifth of its time there (`l_extendedprice * (1 - l_discount) * (1 + l_tax)` over
//! 6 million rows), where DuckDB computes the same values in 64-bit registers.
//!
//! Decimals read from files are mostly 64-bit values (Parquet's `INT64` decimals of up
//! to 18 digits, widened to `Decimal128` when read). When every value of both sides
//! fits in an `i64`, and a sum's power-of-ten factors do too, no result can overflow
//! 128 bits: a product of two 64-bit values needs at most 127 bits, and so does a sum
//! of two such products. Then one widening multiply per value gives exactly what the
//! checked kernel gives. [`DecimalArith`] checks that per batch and otherwise calls
//! arrow's kernel, so a batch that might overflow still fails as before, with arrow's
//! message. The result type is arrow's (Hive's rules for precision and scale), the same
//! as DataFusion's `BinaryExpr`, which the rule replaces only where the two agree.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Decimal128Array, PrimitiveArray};
use arrow::buffer::{NullBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Decimal128Type, Schema, DECIMAL128_MAX_PRECISION};
use arrow::record_batch::RecordBatch;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::{ColumnarValue, Operator};
use datafusion::physical_expr::expressions::BinaryExpr;
use datafusion::physical_expr_common::datum::apply;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::{ExecutionPlan, PhysicalExpr};

/// Rewrites `Decimal128` additions, subtractions and multiplications in projections,
/// filters and aggregate arguments into [`DecimalArith`] (see the module's
/// documentation).
#[derive(Debug, Default)]
pub(crate) struct DecimalArithmetic;

impl PhysicalOptimizerRule for DecimalArithmetic {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        crate::operator_exprs::rewrite_operator_exprs(plan, rewrite)
    }

    fn name(&self) -> &str {
        "volley_decimal_arithmetic"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// `expr` with its decimal arithmetic as [`DecimalArith`] (over `schema`, the input of
/// the operator evaluating it).
pub(crate) fn rewrite(
    expr: &Arc<dyn PhysicalExpr>,
    schema: &Schema,
) -> Result<Transformed<Arc<dyn PhysicalExpr>>> {
    Arc::clone(expr).transform_up(|e| {
        let Some(b) = e.downcast_ref::<BinaryExpr>() else {
            return Ok(Transformed::no(e));
        };
        let Some(op) = DecimalOp::of(*b.op()) else {
            return Ok(Transformed::no(e));
        };
        let new = DecimalArith::new(op, Arc::clone(b.left()), Arc::clone(b.right()));
        // Only where the result type is the one DataFusion planned for.
        match (new.data_type(schema), e.data_type(schema)) {
            (Ok(mine), Ok(planned)) if mine == planned => Ok(Transformed::yes(Arc::new(new))),
            _ => Ok(Transformed::no(e)),
        }
    })
}

/// An arithmetic operator [`DecimalArith`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum DecimalOp {
    Add,
    Sub,
    Mul,
}

impl DecimalOp {
    fn of(op: Operator) -> Option<Self> {
        match op {
            Operator::Plus => Some(Self::Add),
            Operator::Minus => Some(Self::Sub),
            Operator::Multiply => Some(Self::Mul),
            _ => None,
        }
    }

    fn operator(self) -> Operator {
        match self {
            Self::Add => Operator::Plus,
            Self::Sub => Operator::Minus,
            Self::Mul => Operator::Multiply,
        }
    }

    /// The name it travels under in a stage's plan.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Sub => "sub",
            Self::Mul => "mul",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Self> {
        [Self::Add, Self::Sub, Self::Mul]
            .into_iter()
            .find(|op| op.name() == name)
    }

    /// The precision and scale of the result of two decimals, as arrow's kernels make
    /// it; `None` where this module leaves the work to them (negative scales, a
    /// product's scale over the maximum, which arrow reports as an error).
    fn result(self, (p1, s1): (u8, i8), (p2, s2): (u8, i8)) -> Option<(u8, i8)> {
        if s1 < 0 || s2 < 0 {
            return None;
        }
        match self {
            Self::Add | Self::Sub => {
                let scale = s1.max(s2);
                let integer = (p1 as i8 - s1).max(p2 as i8 - s2);
                let precision = (scale.saturating_add(integer) as u8)
                    .saturating_add(1)
                    .min(DECIMAL128_MAX_PRECISION);
                Some((precision, scale))
            }
            Self::Mul => {
                let scale = s1.checked_add(s2).filter(|s| *s <= 38)?;
                let precision = p1.saturating_add(p2 + 1).min(DECIMAL128_MAX_PRECISION);
                Some((precision, scale))
            }
        }
    }

    /// Arrow's kernel for this operator (the one `BinaryExpr` calls).
    fn arrow_kernel(
        self,
    ) -> fn(
        &dyn arrow::array::Datum,
        &dyn arrow::array::Datum,
    ) -> Result<ArrayRef, arrow::error::ArrowError> {
        use arrow::compute::kernels::numeric;
        match self {
            Self::Add => numeric::add_wrapping,
            Self::Sub => numeric::sub_wrapping,
            Self::Mul => numeric::mul_wrapping,
        }
    }
}

/// `left op right` over two `Decimal128` operands, with the values arrow's checked
/// kernels give (see the module's documentation).
#[derive(Debug)]
pub(crate) struct DecimalArith {
    op: DecimalOp,
    left: Arc<dyn PhysicalExpr>,
    right: Arc<dyn PhysicalExpr>,
}

impl DecimalArith {
    pub(crate) fn new(
        op: DecimalOp,
        left: Arc<dyn PhysicalExpr>,
        right: Arc<dyn PhysicalExpr>,
    ) -> Self {
        Self { op, left, right }
    }

    pub(crate) fn op(&self) -> DecimalOp {
        self.op
    }
}

/// The precision and scale of a `Decimal128` type.
fn decimal128(t: &DataType) -> Option<(u8, i8)> {
    match t {
        DataType::Decimal128(p, s) => Some((*p, *s)),
        _ => None,
    }
}

/// One side of the operation: a batch's values, or one value for every row.
enum Side<'a> {
    Values(&'a Decimal128Array),
    Constant(i128),
}

impl Side<'_> {
    /// Whether every value (nulls' slots too) fits in an `i64`.
    fn fits_i64(&self) -> bool {
        match self {
            Side::Values(a) => a.values().iter().all(|v| fits_i64(*v)),
            Side::Constant(v) => fits_i64(*v),
        }
    }
}

fn fits_i64(v: i128) -> bool {
    v as i64 as i128 == v
}

/// `10^exp` if it fits in an `i64`.
fn power_of_ten(exp: i8) -> Option<i128> {
    (0..=18).contains(&exp).then(|| 10i128.pow(exp as u32))
}

impl PhysicalExpr for DecimalArith {
    fn data_type(&self, input_schema: &Schema) -> Result<DataType> {
        let l = self.left.data_type(input_schema)?;
        let r = self.right.data_type(input_schema)?;
        match decimal128(&l)
            .zip(decimal128(&r))
            .and_then(|(l, r)| self.op.result(l, r))
        {
            Some((p, s)) => Ok(DataType::Decimal128(p, s)),
            None => datafusion::common::plan_err!(
                "decimal arithmetic over {l} and {r}: expected two decimals"
            ),
        }
    }

    fn nullable(&self, input_schema: &Schema) -> Result<bool> {
        Ok(self.left.nullable(input_schema)? || self.right.nullable(input_schema)?)
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        let lhs = self.left.evaluate(batch)?;
        let rhs = self.right.evaluate(batch)?;
        if let Some(array) = self.fast(&lhs, &rhs)? {
            return Ok(ColumnarValue::Array(array));
        }
        apply(&lhs, &rhs, self.op.arrow_kernel())
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        vec![&self.left, &self.right]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        match <[_; 2]>::try_from(children) {
            Ok([left, right]) => Ok(Arc::new(Self::new(self.op, left, right))),
            Err(c) => datafusion::common::internal_err!(
                "decimal arithmetic takes two inputs, not {}",
                c.len()
            ),
        }
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, |f, e| e.fmt_sql(f))
    }
}

impl DecimalArith {
    /// The result computed with 64-bit multiplies, or `None` where arrow's kernel must
    /// compute it (two constants, a null constant, a value over 64 bits, a type this
    /// module leaves to arrow).
    fn fast(&self, lhs: &ColumnarValue, rhs: &ColumnarValue) -> Result<Option<ArrayRef>> {
        fn side(v: &ColumnarValue) -> Option<(Side<'_>, (u8, i8))> {
            match v {
                ColumnarValue::Array(a) => {
                    let t = decimal128(a.data_type())?;
                    Some((Side::Values(a.as_primitive_opt::<Decimal128Type>()?), t))
                }
                ColumnarValue::Scalar(ScalarValue::Decimal128(Some(v), p, s)) => {
                    Some((Side::Constant(*v), (*p, *s)))
                }
                ColumnarValue::Scalar(_) => None,
            }
        }
        let (Some((l, lt)), Some((r, rt))) = (side(lhs), side(rhs)) else {
            return Ok(None);
        };
        let rows = match (&l, &r) {
            (Side::Values(a), Side::Values(b)) if a.len() == b.len() => a.len(),
            (Side::Values(a), Side::Constant(_)) | (Side::Constant(_), Side::Values(a)) => a.len(),
            _ => return Ok(None),
        };
        let Some((precision, scale)) = self.op.result(lt, rt) else {
            return Ok(None);
        };
        if !l.fits_i64() || !r.fits_i64() {
            return Ok(None);
        }
        // Every value fits in 64 bits, and so do the factors: a product of two such
        // values needs at most 127 bits, and a sum of two at most 128 (signed: no
        // overflow either).
        let values: ScalarBuffer<i128> = match self.op {
            DecimalOp::Mul => combine(&l, &r, rows, |a, b| a * b),
            DecimalOp::Add | DecimalOp::Sub => {
                let (Some(lf), Some(rf)) = (power_of_ten(scale - lt.1), power_of_ten(scale - rt.1))
                else {
                    return Ok(None);
                };
                match (self.op, lf, rf) {
                    (DecimalOp::Add, 1, 1) => combine(&l, &r, rows, |a, b| a + b),
                    (DecimalOp::Sub, 1, 1) => combine(&l, &r, rows, |a, b| a - b),
                    (DecimalOp::Add, _, _) => combine(&l, &r, rows, |a, b| a * lf + b * rf),
                    _ => combine(&l, &r, rows, |a, b| a * lf - b * rf),
                }
            }
        };
        let nulls = match (&l, &r) {
            (Side::Values(a), Side::Values(b)) => NullBuffer::union(a.nulls(), b.nulls()),
            (Side::Values(a), _) | (_, Side::Values(a)) => a.nulls().cloned(),
            _ => None,
        };
        let array = PrimitiveArray::<Decimal128Type>::new(values, nulls)
            .with_precision_and_scale(precision, scale)?;
        Ok(Some(Arc::new(array)))
    }

    /// Writes `(left op right)`, with a binary operand in parentheses too. In
    /// parentheses itself: a `BinaryExpr` above it puts only `BinaryExpr` operands in
    /// parentheses.
    fn write(
        &self,
        f: &mut fmt::Formatter<'_>,
        each: impl Fn(&mut fmt::Formatter<'_>, &Arc<dyn PhysicalExpr>) -> fmt::Result,
    ) -> fmt::Result {
        let operand = |f: &mut fmt::Formatter<'_>, e: &Arc<dyn PhysicalExpr>| {
            if e.downcast_ref::<BinaryExpr>().is_some() {
                write!(f, "(")?;
                each(f, e)?;
                write!(f, ")")
            } else {
                each(f, e)
            }
        };
        write!(f, "(")?;
        operand(f, &self.left)?;
        write!(f, " {} ", self.op.operator())?;
        operand(f, &self.right)?;
        write!(f, ")")
    }
}

/// `f(left[i], right[i])` for each row, both sides' values read as `i64` (they fit)
/// and widened.
fn combine(
    left: &Side<'_>,
    right: &Side<'_>,
    rows: usize,
    f: impl Fn(i128, i128) -> i128,
) -> ScalarBuffer<i128> {
    let wide = |v: i128| v as i64 as i128;
    match (left, right) {
        (Side::Values(a), Side::Values(b)) => a
            .values()
            .iter()
            .zip(b.values().iter())
            .map(|(x, y)| f(wide(*x), wide(*y)))
            .collect(),
        (Side::Values(a), Side::Constant(c)) => {
            let c = wide(*c);
            a.values().iter().map(|x| f(wide(*x), c)).collect()
        }
        (Side::Constant(c), Side::Values(b)) => {
            let c = wide(*c);
            b.values().iter().map(|y| f(c, wide(*y))).collect()
        }
        (Side::Constant(x), Side::Constant(y)) => {
            std::iter::repeat_n(f(wide(*x), wide(*y)), rows).collect()
        }
    }
}

impl PartialEq for DecimalArith {
    fn eq(&self, other: &Self) -> bool {
        self.op == other.op && self.left.eq(&other.left) && self.right.eq(&other.right)
    }
}

impl Eq for DecimalArith {}

impl Hash for DecimalArith {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.op.hash(state);
        self.left.hash(state);
        self.right.hash(state);
    }
}

impl fmt::Display for DecimalArith {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, |f, e| write!(f, "{e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::Field;
    use datafusion::physical_expr::expressions::{binary, col, lit};

    /// Pseudo-random decimals: most fit in 64 bits, some are null; with `wide`, every
    /// 97th is just over 64 bits.
    fn decimals(rows: usize, seed: u64, (p, s): (u8, i8), wide: bool) -> Decimal128Array {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let limit = 10i128.pow(p.min(18) as u32);
        (0..rows)
            .map(|i| {
                let r = next();
                let v = (r as i128 >> 3) % limit * if r & 4 == 0 { 1 } else { -1 };
                match r % 17 {
                    0 => None,
                    _ if wide && i % 97 == 0 => Some(i64::MAX as i128 + v.abs() % 1000 + 1),
                    _ => Some(v),
                }
            })
            .collect::<Decimal128Array>()
            .with_precision_and_scale(p, s)
            .unwrap()
    }

    fn check(op: Operator, l: (u8, i8), r: (u8, i8), wide: bool) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Decimal128(l.0, l.1), true),
            Field::new("b", DataType::Decimal128(r.0, r.1), true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(decimals(5000, 1, l, wide)),
                Arc::new(decimals(5000, 2, r, wide)),
            ],
        )
        .unwrap();
        let a = col("a", &schema).unwrap();
        let b = col("b", &schema).unwrap();
        let constant = lit(ScalarValue::Decimal128(Some(100), 20, 0));
        for (left, right) in [
            (Arc::clone(&a), Arc::clone(&b)),
            (Arc::clone(&constant), Arc::clone(&a)),
            (Arc::clone(&b), Arc::clone(&constant)),
        ] {
            let planned = binary(Arc::clone(&left), op, Arc::clone(&right), &schema).unwrap();
            let mine = DecimalArith::new(
                DecimalOp::of(op).unwrap(),
                Arc::clone(&left),
                Arc::clone(&right),
            );
            assert_eq!(
                mine.data_type(&schema).unwrap(),
                planned.data_type(&schema).unwrap()
            );
            // Computed here without arrow's kernel exactly when every value fits.
            let operands = (
                left.evaluate(&batch).unwrap(),
                right.evaluate(&batch).unwrap(),
            );
            let mine_alone = mine.fast(&operands.0, &operands.1).unwrap();
            assert_eq!(mine_alone.is_some(), !wide, "{op} {l:?} {r:?}");
            let expected = planned.evaluate(&batch).unwrap().to_array(5000).unwrap();
            let got = mine.evaluate(&batch).unwrap().to_array(5000).unwrap();
            assert_eq!(got.data_type(), expected.data_type(), "{op} {l:?} {r:?}");
            assert_eq!(&got, &expected, "{op} {l:?} {r:?} wide={wide}");
        }
    }

    #[test]
    fn results_equal_arrows_kernels() {
        for op in [Operator::Plus, Operator::Minus, Operator::Multiply] {
            for (l, r) in [
                ((15, 2), (15, 2)),
                ((15, 2), (12, 0)),
                ((18, 4), (10, 1)),
                ((38, 4), (23, 2)),
                ((30, 10), (18, 0)),
            ] {
                check(op, l, r, false);
                check(op, l, r, true);
            }
        }
    }

    #[test]
    fn overflow_fails_as_arrow_fails() {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "a",
            DataType::Decimal128(38, 0),
            false,
        )]));
        let big = Decimal128Array::from(vec![1, i128::MAX / 3])
            .with_precision_and_scale(38, 0)
            .unwrap();
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(big)]).unwrap();
        let a = col("a", &schema).unwrap();
        let mine = DecimalArith::new(DecimalOp::Mul, Arc::clone(&a), Arc::clone(&a));
        let planned = binary(Arc::clone(&a), Operator::Multiply, a, &schema).unwrap();
        let e1 = mine.evaluate(&batch).unwrap_err().to_string();
        let e2 = planned.evaluate(&batch).unwrap_err().to_string();
        assert_eq!(e1, e2);
        assert!(e1.contains("Overflow"), "{e1}");
    }

    /// Queries over a table of decimals give the same rows with the rule as without,
    /// ordered aggregates (which the rule leaves alone) among them.
    #[test]
    fn plans_with_the_rule_give_the_same_answers() {
        use datafusion::physical_optimizer::PhysicalOptimizerRule;
        use datafusion::prelude::SessionContext;
        let rt = tokio::runtime::Runtime::new().unwrap();
        let ctx = SessionContext::new();
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("p", DataType::Decimal128(15, 2), true),
            Field::new("d", DataType::Decimal128(15, 2), true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(arrow::array::Int64Array::from_iter_values(0..3000)),
                Arc::new(decimals(3000, 3, (15, 2), false)),
                Arc::new(decimals(3000, 4, (15, 2), false)),
            ],
        )
        .unwrap();
        ctx.register_batch("t", batch).unwrap();
        for sql in [
            "SELECT k % 7 AS g, sum(p * (1 - d)), avg(p + d) FROM t GROUP BY k % 7 ORDER BY g",
            "SELECT k, p * d - p FROM t WHERE p * 2 > d ORDER BY k",
            "SELECT array_agg(p * 2 ORDER BY k DESC) FROM t WHERE k < 20",
            "SELECT first_value(p - d ORDER BY k DESC), last_value(p * d ORDER BY k) FROM t",
            "SELECT nth_value(p + 1, 2 ORDER BY k DESC) FROM t",
        ] {
            let run = |rewrite: bool| {
                rt.block_on(async {
                    let df = ctx.sql(sql).await.unwrap();
                    let mut plan = df.create_physical_plan().await.unwrap();
                    if rewrite {
                        plan = DecimalArithmetic
                            .optimize(plan, &Default::default())
                            .unwrap();
                    }
                    let batches = datafusion::physical_plan::collect(plan, ctx.task_ctx())
                        .await
                        .unwrap();
                    arrow::util::pretty::pretty_format_batches(&batches)
                        .unwrap()
                        .to_string()
                })
            };
            assert_eq!(run(true), run(false), "{sql}");
        }
    }

    #[test]
    fn displays_as_the_expression_it_computes() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("p", DataType::Decimal128(15, 2), true),
            Field::new("d", DataType::Decimal128(15, 2), true),
        ]));
        let p = col("p", &schema).unwrap();
        let d = col("d", &schema).unwrap();
        let one = lit(ScalarValue::Decimal128(Some(1), 20, 0));
        let inner = binary(one, Operator::Minus, d, &schema).unwrap();
        let expr = binary(p, Operator::Multiply, inner, &schema).unwrap();
        let rewritten = rewrite(&expr, &schema).unwrap();
        assert!(rewritten.transformed);
        assert_eq!(rewritten.data.to_string(), format!("({expr})"));
        // Under an operator left as it was, still in parentheses.
        let two = lit(ScalarValue::Decimal128(Some(2), 20, 0));
        let quotient = binary(
            Arc::clone(&rewritten.data),
            Operator::Divide,
            Arc::clone(&two),
            &schema,
        )
        .unwrap();
        assert_eq!(quotient.to_string(), format!("({expr}) / {two}"));
        assert_eq!(
            rewritten.data.data_type(&schema).unwrap(),
            expr.data_type(&schema).unwrap()
        );
    }

    /// A Dataset's steps compute decimal arithmetic and view-string comparisons with
    /// volley's expressions, as a SQL plan does, and give DataFusion's answers.
    #[test]
    fn dataset_steps_use_the_rewrites() {
        use arrow::array::StringViewArray;
        use datafusion::prelude::{col as df_col, lit as df_lit, SessionContext};
        let schema = Arc::new(Schema::new(vec![
            Field::new("p", DataType::Decimal128(15, 2), true),
            Field::new("d", DataType::Decimal128(15, 2), true),
            Field::new("m", DataType::Utf8View, true),
        ]));
        let modes = [
            "MAIL",
            "SHIP",
            "AIR",
            "TRUCK",
            "a mode longer than twelve bytes",
        ];
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(decimals(5000, 5, (15, 2), false)),
                Arc::new(decimals(5000, 6, (15, 2), true)),
                Arc::new(StringViewArray::from_iter(
                    (0..5000).map(|i| (i % 13 != 0).then_some(modes[i % modes.len()])),
                )),
            ],
        )
        .unwrap();
        let filter = df_col("m")
            .eq(df_lit("MAIL"))
            .or(df_col("m").eq(df_lit("a mode longer than twelve bytes")));
        let price = (df_col("p") * (df_lit(1) - df_col("d"))).alias("price");

        let ctx = crate::Context::try_default().unwrap();
        let state = ctx.session_state();
        let step = volley_exec::Step::filter(&filter, &schema, state).unwrap();
        let volley_exec::Step::Filter { predicate, .. } = step else {
            panic!("not a filter: {step:?}");
        };
        assert!(
            predicate
                .downcast_ref::<crate::view_compare::ViewStringIn>()
                .is_some(),
            "{predicate}"
        );
        let step =
            volley_exec::Step::project(&[(price.clone(), "price".into())], &schema, state).unwrap();
        let volley_exec::Step::Project { exprs, .. } = step else {
            panic!("not a projection: {step:?}");
        };
        assert!(
            exprs[0].0.downcast_ref::<DecimalArith>().is_some(),
            "{}",
            exprs[0].0
        );

        let got = ctx
            .from_batches(vec![batch.clone()])
            .unwrap()
            .filter(filter.clone())
            .unwrap()
            .select_exprs(vec![price.clone()])
            .unwrap()
            .collect()
            .unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let want = rt.block_on(async {
            let df = SessionContext::new().read_batch(batch).unwrap();
            df.filter(filter)
                .unwrap()
                .select(vec![price])
                .unwrap()
                .collect()
                .await
                .unwrap()
        });
        let show = |b: &[RecordBatch]| {
            arrow::util::pretty::pretty_format_batches(b)
                .unwrap()
                .to_string()
        };
        assert_eq!(show(&got), show(&want));
        assert!(got.iter().map(RecordBatch::num_rows).sum::<usize>() > 1000);
    }
}
