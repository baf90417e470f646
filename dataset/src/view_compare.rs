//! Comparing view strings with constants by their 16-byte views.
//!
//! Scans read strings as views (`Utf8View`): per row 16 bytes holding the length and,
//! for a string of up to 12 bytes, the string itself (a longer one keeps its first 4
//! bytes there and the rest in a data buffer). Arrow's `=` against a constant tests
//! each row through a chain of branches (no data buffers? the same view? the same
//! length? the same prefix?) whose outcome changes row by row wherever the column
//! holds a few distinct values, as TPC-H's flags and modes do; `IN` hashes every row.
//! `l_returnflag = 'R'` took about a tenth of a scan of four `lineitem` columns.
//!
//! [`ViewStringIn`] answers `s = 'c'`, `s <> 'c'`, `s IN (...)` and `s NOT IN (...)`
//! where `s` is a `Utf8View` and every constant a non-null string: a constant of up to
//! 12 bytes matches a row exactly when the row's view, masked to the length and that
//! many bytes, equals the constant's view (one comparison of two 128-bit integers, no
//! branch); a longer constant matches where the length and the 4-byte prefix do and
//! then the bytes in the data buffer. [`ViewComparisons`] puts it in place of
//! DataFusion's `BinaryExpr` and `InListExpr` in projections, filters and aggregate
//! arguments.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::builder::make_view;
use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, StringViewArray};
use arrow::buffer::{BooleanBuffer, MutableBuffer};
use arrow::compute::kernels::cmp;
use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{internal_err, Result, ScalarValue};
use datafusion::logical_expr::{ColumnarValue, Operator};
use datafusion::physical_expr::expressions::{BinaryExpr, CastExpr, InListExpr, Literal};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::{ExecutionPlan, PhysicalExpr};

/// Rewrites comparisons of view strings with string constants into [`ViewStringIn`]
/// (see the module's documentation).
#[derive(Debug, Default)]
pub(crate) struct ViewComparisons;

impl PhysicalOptimizerRule for ViewComparisons {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        crate::operator_exprs::rewrite_operator_exprs(plan, rewrite)
    }

    fn name(&self) -> &str {
        "volley_view_comparisons"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// `expr` with its comparisons of view strings with constants as [`ViewStringIn`]
/// (over `schema`, the input of the operator evaluating it).
pub(crate) fn rewrite(
    expr: &Arc<dyn PhysicalExpr>,
    schema: &Schema,
) -> Result<Transformed<Arc<dyn PhysicalExpr>>> {
    Arc::clone(expr).transform_up(|e| {
        let views = |x: &Arc<dyn PhysicalExpr>| {
            matches!(x.data_type(schema), Ok(DataType::Utf8View))
                && x.downcast_ref::<Literal>().is_none()
        };
        let new = if let Some(b) = e.downcast_ref::<BinaryExpr>() {
            if let Some(merged) = merged(b) {
                return Ok(Transformed::yes(Arc::new(merged) as Arc<dyn PhysicalExpr>));
            }
            let negated = match b.op() {
                Operator::Eq => false,
                Operator::NotEq => true,
                _ => return Ok(Transformed::no(e)),
            };
            let (input, constant) = if views(b.left()) {
                (b.left(), b.right())
            } else if views(b.right()) {
                (b.right(), b.left())
            } else {
                return Ok(Transformed::no(e));
            };
            string_constant(constant)
                .map(|c| ViewStringIn::new(Arc::clone(input), vec![c], negated))
        } else if let Some(l) = e.downcast_ref::<InListExpr>() {
            if !views(l.expr()) || l.list().is_empty() {
                return Ok(Transformed::no(e));
            }
            let constants: Option<Vec<String>> = l.list().iter().map(string_constant).collect();
            constants.map(|c| ViewStringIn::new(Arc::clone(l.expr()), c, l.negated()))
        } else {
            None
        };
        Ok(match new {
            Some(new) => Transformed::yes(Arc::new(new) as Arc<dyn PhysicalExpr>),
            None => Transformed::no(e),
        })
    })
}

/// `s IN (a) OR s IN (b)` as `s IN (a, b)`, and `s NOT IN (a) AND s NOT IN (b)` as
/// `s NOT IN (a, b)` (DataFusion writes a short `IN` list as `=`s joined by `OR`): one
/// pass over the views instead of one per constant and one per `OR`.
fn merged(b: &BinaryExpr) -> Option<ViewStringIn> {
    let (l, r) = (
        b.left().downcast_ref::<ViewStringIn>()?,
        b.right().downcast_ref::<ViewStringIn>()?,
    );
    let negated = match b.op() {
        Operator::Or => false,
        Operator::And => true,
        _ => return None,
    };
    if l.negated != negated || r.negated != negated || !l.input.eq(&r.input) {
        return None;
    }
    let mut constants = l.constants.clone();
    for c in &r.constants {
        if !constants.contains(c) {
            constants.push(c.clone());
        }
    }
    Some(ViewStringIn::new(Arc::clone(&l.input), constants, negated))
}

/// The string of a non-null string constant.
fn string_constant(e: &Arc<dyn PhysicalExpr>) -> Option<String> {
    // A string constant cast to a string type is the same string: a Dataset step's
    // `col("m").eq(lit("MAIL"))` compiles to `m = CAST('MAIL' AS Utf8View)` (steps are
    // coerced, not simplified).
    if let Some(c) = e.downcast_ref::<CastExpr>() {
        return match c.cast_type() {
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => string_constant(c.expr()),
            _ => None,
        };
    }
    match e.downcast_ref::<Literal>()?.value() {
        ScalarValue::Utf8(Some(s))
        | ScalarValue::Utf8View(Some(s))
        | ScalarValue::LargeUtf8(Some(s)) => Some(s.clone()),
        _ => None,
    }
}

/// `input IN (constants)` (`NOT IN` when negated) over a `Utf8View` input, by views;
/// `=` and `<>` are the case of one constant. A null input gives null; the constants
/// are never null.
#[derive(Debug)]
pub(crate) struct ViewStringIn {
    input: Arc<dyn PhysicalExpr>,
    constants: Vec<String>,
    negated: bool,
    /// Per constant of up to 12 bytes: (mask, view) such that a row matches where its
    /// view masked equals the view.
    short: Vec<(u128, u128)>,
    /// Per longer constant: its length and prefix (a view's low 64 bits), and its bytes.
    long: Vec<(u64, Vec<u8>)>,
}

impl ViewStringIn {
    pub(crate) fn new(input: Arc<dyn PhysicalExpr>, constants: Vec<String>, negated: bool) -> Self {
        let (mut short, mut long) = (Vec::new(), Vec::new());
        for c in &constants {
            let bytes = c.as_bytes();
            let view = make_view(bytes, 0, 0);
            if bytes.len() <= 12 {
                // The length (4 bytes) and the string's own bytes; whatever follows them
                // in a row's view is not compared.
                let bits = 32 + 8 * bytes.len() as u32;
                let mask = if bits == 128 {
                    u128::MAX
                } else {
                    (1u128 << bits) - 1
                };
                short.push((mask, view));
            } else {
                long.push((view as u64, bytes.to_vec()));
            }
        }
        Self {
            input,
            constants,
            negated,
            short,
            long,
        }
    }

    /// The strings compared.
    pub(crate) fn input(&self) -> &Arc<dyn PhysicalExpr> {
        &self.input
    }

    pub(crate) fn constants(&self) -> &[String] {
        &self.constants
    }

    pub(crate) fn negated(&self) -> bool {
        self.negated
    }

    /// The rows of `array` whose value is one of the constants (nulls' slots
    /// included, as whatever their views hold).
    fn matches(&self, array: &StringViewArray) -> BooleanBuffer {
        let views = array.views();
        let buffers = array.data_buffers();
        let long_matches = |v: u128| {
            self.long.iter().any(|(key, bytes)| {
                v as u64 == *key && {
                    let (buffer, offset) = ((v >> 64) as u32 as usize, (v >> 96) as u32 as usize);
                    buffers
                        .get(buffer)
                        .and_then(|b| b.get(offset..offset + bytes.len()))
                        .is_some_and(|s| s == bytes.as_slice())
                }
            })
        };
        match (self.short.as_slice(), self.long.is_empty()) {
            ([(mask, view)], true) => bits(views, |v| v & mask == *view),
            ([(m1, v1), (m2, v2)], true) => bits(views, |v| (v & m1 == *v1) | (v & m2 == *v2)),
            (short, true) => bits(views, |v| short.iter().any(|(m, s)| v & m == *s)),
            (short, false) => bits(views, |v| {
                short.iter().any(|(m, s)| v & m == *s) || long_matches(v)
            }),
        }
    }

    /// The answer for strings that are not views, by arrow's `=` per constant.
    fn by_arrow(&self, array: &ArrayRef) -> Result<ArrayRef> {
        let mut any: Option<BooleanArray> = None;
        for c in &self.constants {
            let constant = ScalarValue::Utf8(Some(c.clone())).cast_to(array.data_type())?;
            let eq = cmp::eq(array, &constant.to_scalar()?)?;
            any = Some(match any {
                Some(a) => arrow::compute::kernels::boolean::or(&a, &eq)?,
                None => eq,
            });
        }
        let any = any.unwrap_or_else(|| BooleanArray::from(vec![false; array.len()]));
        Ok(Arc::new(match self.negated {
            true => arrow::compute::kernels::boolean::not(&any)?,
            false => any,
        }))
    }
}

/// A bitmap of `test` over `views`, 64 views per word (no index checks, so that the
/// comparisons of a word compile to straight-line code).
fn bits(views: &[u128], test: impl Fn(u128) -> bool) -> BooleanBuffer {
    let word = |chunk: &[u128]| {
        chunk
            .iter()
            .enumerate()
            .fold(0u64, |w, (j, v)| w | (u64::from(test(*v)) << j))
    };
    let chunks = views.chunks_exact(64);
    let rest = chunks.remainder();
    let mut out = MutableBuffer::new(views.len().div_ceil(64) * 8);
    for chunk in chunks {
        out.push(word(chunk));
    }
    if !rest.is_empty() {
        out.push(word(rest));
    }
    BooleanBuffer::new(out.into(), 0, views.len())
}

impl PhysicalExpr for ViewStringIn {
    fn data_type(&self, _input_schema: &Schema) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn nullable(&self, input_schema: &Schema) -> Result<bool> {
        self.input.nullable(input_schema)
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        match self.input.evaluate(batch)? {
            ColumnarValue::Array(a) => {
                let Some(strings) = a.as_string_view_opt() else {
                    // Strings of another type than planned (as a scan may give where
                    // its table's schema has views): arrow's `=`s.
                    return self.by_arrow(&a).map(ColumnarValue::Array);
                };
                let mut bits = self.matches(strings);
                if self.negated {
                    bits = !&bits;
                }
                Ok(ColumnarValue::Array(Arc::new(BooleanArray::new(
                    bits,
                    strings.nulls().cloned(),
                ))))
            }
            ColumnarValue::Scalar(s) => {
                let value = match s {
                    ScalarValue::Utf8View(v) | ScalarValue::Utf8(v) | ScalarValue::LargeUtf8(v) => {
                        v
                    }
                    other => {
                        return internal_err!(
                            "a view string comparison over {}: expected a string",
                            other.data_type()
                        )
                    }
                };
                let answer = value.map(|v| self.constants.contains(&v) != self.negated);
                Ok(ColumnarValue::Scalar(ScalarValue::Boolean(answer)))
            }
        }
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        vec![&self.input]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        match <[_; 1]>::try_from(children) {
            Ok([input]) => Ok(Arc::new(Self::new(
                input,
                self.constants.clone(),
                self.negated,
            ))),
            Err(c) => internal_err!("a view string comparison takes one input, not {}", c.len()),
        }
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, |f, e| e.fmt_sql(f))
    }
}

impl ViewStringIn {
    fn write(
        &self,
        f: &mut fmt::Formatter<'_>,
        input: impl Fn(&mut fmt::Formatter<'_>, &Arc<dyn PhysicalExpr>) -> fmt::Result,
    ) -> fmt::Result {
        input(f, &self.input)?;
        match (self.constants.as_slice(), self.negated) {
            ([c], false) => write!(f, " = {c}"),
            ([c], true) => write!(f, " != {c}"),
            (cs, negated) => {
                write!(f, "{} (", if negated { " NOT IN" } else { " IN" })?;
                for (i, c) in cs.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{c}")?;
                }
                write!(f, ")")
            }
        }
    }
}

impl fmt::Display for ViewStringIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, |f, e| write!(f, "{e}"))
    }
}

impl PartialEq for ViewStringIn {
    fn eq(&self, other: &Self) -> bool {
        self.negated == other.negated
            && self.constants == other.constants
            && self.input.eq(&other.input)
    }
}

impl Eq for ViewStringIn {}

impl Hash for ViewStringIn {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.input.hash(state);
        self.constants.hash(state);
        self.negated.hash(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringViewBuilder;
    use arrow::datatypes::Field;
    use datafusion::physical_expr::expressions::{col, in_list, lit};

    /// Strings of every length from 0 to 20 over a few letters, some null, some sharing
    /// a long string's prefix; views built in blocks of a small size, so that long
    /// strings land in several buffers.
    fn strings(rows: usize) -> StringViewArray {
        let mut b = StringViewBuilder::new().with_fixed_block_size(64);
        let mut state = 0x9e3779b97f4a7c15u64;
        for _ in 0..rows {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if state.is_multiple_of(11) {
                b.append_null();
                continue;
            }
            let len = (state >> 8) as usize % 21;
            let s: String = (0..len)
                .map(|i| [b'A', b'B', b'C'][((state >> (16 + (i % 40))) % 3) as usize] as char)
                .collect();
            b.append_value(&s);
        }
        // Values the constants below name, so that each matches somewhere.
        for s in [
            "R",
            "DELIVER IN PERSON",
            "DELIVER IN PERSOX",
            "AIR REG",
            "",
            "ABCABCABCABC",
        ] {
            b.append_value(s);
        }
        b.finish()
    }

    /// Arrow's answer for `input IN (constants)`: `=` per constant, ORed (negated for
    /// `NOT IN`), nulls where the input is null.
    fn arrow_answer(input: &StringViewArray, constants: &[&str], negated: bool) -> BooleanArray {
        let mut any = BooleanArray::from(vec![false; input.len()]);
        for c in constants {
            let eq = cmp::eq(input, &StringViewArray::new_scalar(c)).unwrap();
            any = arrow::compute::or(&any, &eq).unwrap();
        }
        if negated {
            any = arrow::compute::not(&any).unwrap();
        }
        BooleanArray::new(any.values().clone(), input.nulls().cloned())
    }

    /// What `e` answers for each row of `batch`.
    fn answer(e: &ViewStringIn, batch: &RecordBatch) -> ArrayRef {
        e.evaluate(batch)
            .unwrap()
            .into_array(batch.num_rows())
            .unwrap()
    }

    #[test]
    fn matches_arrow_for_short_and_long_constants() {
        let input = strings(5000);
        let schema = Schema::new(vec![Field::new("s", DataType::Utf8View, true)]);
        let batch = RecordBatch::try_new(
            Arc::new(schema.clone()),
            vec![Arc::new(input.clone()) as ArrayRef],
        )
        .unwrap();
        let cases: &[&[&str]] = &[
            &["R"],
            &[""],
            &["ABCABCABCABC"],
            &["DELIVER IN PERSON"],
            &["AIR REG", "R"],
            &["AIR REG", "DELIVER IN PERSON", "AB"],
            &["DELIVER IN PERSON", "DELIVER IN PERSOX"],
        ];
        for constants in cases {
            for negated in [false, true] {
                let e = ViewStringIn::new(
                    col("s", &schema).unwrap(),
                    constants.iter().map(|c| c.to_string()).collect(),
                    negated,
                );
                let got = answer(&e, &batch);
                let want = arrow_answer(&input, constants, negated);
                assert_eq!(got.as_boolean(), &want, "{constants:?} negated={negated}");
                assert!(want.true_count() > 0, "{constants:?} matched nothing");
            }
        }
    }

    #[test]
    fn rewrites_comparisons_with_constants_only() {
        let schema = Schema::new(vec![
            Field::new("s", DataType::Utf8View, true),
            Field::new("u", DataType::Utf8, true),
        ]);
        let s = col("s", &schema).unwrap();
        let eq = Arc::new(BinaryExpr::new(
            lit(ScalarValue::Utf8View(Some("R".into()))),
            Operator::Eq,
            Arc::clone(&s),
        )) as Arc<dyn PhysicalExpr>;
        let got = rewrite(&eq, &schema).unwrap().data;
        assert_eq!(got.to_string(), "s@0 = R");
        assert!(got.downcast_ref::<ViewStringIn>().is_some());

        let list = in_list(
            Arc::clone(&s),
            vec![lit("MAIL"), lit("SHIP")],
            &true,
            &schema,
        )
        .unwrap();
        let got = rewrite(&list, &schema).unwrap().data;
        assert_eq!(got.to_string(), "s@0 NOT IN (MAIL, SHIP)");

        // `=`s joined by `OR` (as DataFusion writes a short `IN`), `<>`s by `AND`.
        let eq = |c: &str, op| {
            Arc::new(BinaryExpr::new(Arc::clone(&s), op, lit(c))) as Arc<dyn PhysicalExpr>
        };
        let or = |a, b| Arc::new(BinaryExpr::new(a, Operator::Or, b)) as Arc<dyn PhysicalExpr>;
        let and = |a, b| Arc::new(BinaryExpr::new(a, Operator::And, b)) as Arc<dyn PhysicalExpr>;
        let any = or(
            or(eq("MAIL", Operator::Eq), eq("SHIP", Operator::Eq)),
            eq("AIR", Operator::Eq),
        );
        assert_eq!(
            rewrite(&any, &schema).unwrap().data.to_string(),
            "s@0 IN (MAIL, SHIP, AIR)"
        );
        let none = and(eq("MAIL", Operator::NotEq), eq("SHIP", Operator::NotEq));
        assert_eq!(
            rewrite(&none, &schema).unwrap().data.to_string(),
            "s@0 NOT IN (MAIL, SHIP)"
        );
        // Mixed: each comparison rewritten, not merged.
        let mixed = or(eq("MAIL", Operator::Eq), eq("SHIP", Operator::NotEq));
        assert_eq!(
            rewrite(&mixed, &schema).unwrap().data.to_string(),
            "s@0 = MAIL OR s@0 != SHIP"
        );

        // A null constant, a comparison of two columns, a `Utf8` column, `<`: kept.
        let kept = [
            in_list(
                Arc::clone(&s),
                vec![lit("MAIL"), lit(ScalarValue::Utf8(None))],
                &false,
                &schema,
            )
            .unwrap(),
            Arc::new(BinaryExpr::new(
                Arc::clone(&s),
                Operator::Eq,
                Arc::clone(&s),
            )) as _,
            Arc::new(BinaryExpr::new(
                col("u", &schema).unwrap(),
                Operator::Eq,
                lit("R"),
            )) as _,
            Arc::new(BinaryExpr::new(Arc::clone(&s), Operator::Lt, lit("R"))) as _,
        ];
        for e in kept {
            assert!(!rewrite(&e, &schema).unwrap().transformed, "{e}");
        }
    }

    #[test]
    fn strings_that_are_not_views_get_arrows_answer() {
        let input = strings(3000);
        let plain = arrow::compute::cast(&input, &DataType::Utf8).unwrap();
        let schema = Schema::new(vec![Field::new("s", DataType::Utf8, true)]);
        let batch = RecordBatch::try_new(Arc::new(schema.clone()), vec![plain]).unwrap();
        for negated in [false, true] {
            let e = ViewStringIn::new(
                col("s", &schema).unwrap(),
                vec!["AIR REG".into(), "DELIVER IN PERSON".into()],
                negated,
            );
            let got = answer(&e, &batch);
            let want = arrow_answer(&input, &["AIR REG", "DELIVER IN PERSON"], negated);
            assert_eq!(got.as_boolean(), &want);
        }
    }

    #[test]
    fn a_constant_input_is_answered_as_a_constant() {
        let schema = Schema::new(vec![Field::new("s", DataType::Utf8View, true)]);
        let batch = RecordBatch::new_empty(Arc::new(schema));
        for (value, negated, want) in [
            (Some("R"), false, Some(true)),
            (Some("A"), false, Some(false)),
            (Some("A"), true, Some(true)),
            (None, false, None),
        ] {
            let e = ViewStringIn::new(
                lit(ScalarValue::Utf8View(value.map(str::to_string))),
                vec!["R".into()],
                negated,
            );
            match e.evaluate(&batch).unwrap() {
                ColumnarValue::Scalar(ScalarValue::Boolean(got)) => assert_eq!(got, want),
                other => panic!("{other:?}"),
            }
        }
    }
}
