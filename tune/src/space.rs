//! Search spaces: what a sweep samples its trials' configs from.
//!
//! A [`SearchSpace`] maps names to [`Param`]s: constants, sampled domains
//! ([`uniform`], [`loguniform`], [`choice`], ...), grid axes ([`grid_search`]), nested
//! spaces, and functions of the other sampled values ([`sample_from`]). A sampled
//! config is a JSON object of the same shape.

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::{Map, Value};
use volley_common::{Result, VolleyError};

/// A distribution one value is drawn from (its fields are the bounds each variant's
/// documentation names).
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq)]
pub enum Domain {
    /// Uniform in `[low, high)`.
    Uniform { low: f64, high: f64 },
    /// Uniform in `[low, high]`, rounded to a multiple of `q`.
    QUniform { low: f64, high: f64, q: f64 },
    /// Log-uniform in `[low, high)` (both positive).
    LogUniform { low: f64, high: f64 },
    /// An integer in `[low, high)`.
    RandInt { low: i64, high: i64 },
    /// An integer in `[low, high)`, log-uniform (both positive).
    LogRandInt { low: i64, high: i64 },
    /// Normal with `mean` and standard deviation `sd`.
    Randn { mean: f64, sd: f64 },
    /// One of the values, equally likely.
    Choice(Vec<Value>),
}

/// A function of the values sampled so far (the config built up to this point).
pub type SampleFn = Arc<dyn Fn(&Value) -> Value + Send + Sync>;

/// One entry of a search space.
#[derive(Clone)]
pub enum Param {
    /// The same value in every trial.
    Const(Value),
    /// Drawn per trial.
    Sample(Domain),
    /// Every value, each in its own trials (grids multiply).
    Grid(Vec<Value>),
    /// A space inside the space.
    Nested(SearchSpace),
    /// Computed from the rest of the config after everything else is drawn.
    Func(SampleFn),
}

impl std::fmt::Debug for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Param::Const(v) => write!(f, "Const({v})"),
            Param::Sample(d) => write!(f, "{d:?}"),
            Param::Grid(v) => write!(f, "Grid({v:?})"),
            Param::Nested(s) => write!(f, "{s:?}"),
            Param::Func(_) => write!(f, "Func"),
        }
    }
}

/// `uniform(low, high)`.
pub fn uniform(low: f64, high: f64) -> Param {
    Param::Sample(Domain::Uniform { low, high })
}
/// `quniform(low, high, q)`.
pub fn quniform(low: f64, high: f64, q: f64) -> Param {
    Param::Sample(Domain::QUniform { low, high, q })
}
/// `loguniform(low, high)`.
pub fn loguniform(low: f64, high: f64) -> Param {
    Param::Sample(Domain::LogUniform { low, high })
}
/// `randint(low, high)`: `low..high`.
pub fn randint(low: i64, high: i64) -> Param {
    Param::Sample(Domain::RandInt { low, high })
}
/// `lograndint(low, high)`.
pub fn lograndint(low: i64, high: i64) -> Param {
    Param::Sample(Domain::LogRandInt { low, high })
}
/// `randn(mean, sd)`.
pub fn randn(mean: f64, sd: f64) -> Param {
    Param::Sample(Domain::Randn { mean, sd })
}
/// `choice([...])`.
pub fn choice<T: Into<Value>>(values: impl IntoIterator<Item = T>) -> Param {
    Param::Sample(Domain::Choice(values.into_iter().map(Into::into).collect()))
}
/// `grid_search([...])`: every value in turn.
pub fn grid_search<T: Into<Value>>(values: impl IntoIterator<Item = T>) -> Param {
    Param::Grid(values.into_iter().map(Into::into).collect())
}
/// `sample_from(|config| ...)`: a value computed from the others.
pub fn sample_from(f: impl Fn(&Value) -> Value + Send + Sync + 'static) -> Param {
    Param::Func(Arc::new(f))
}
/// A constant.
pub fn constant(v: impl Into<Value>) -> Param {
    Param::Const(v.into())
}

impl Domain {
    /// Checks the bounds.
    pub fn validate(&self, path: &str) -> Result<()> {
        let bad = |why: String| Err(VolleyError::Config(format!("search space `{path}`: {why}")));
        match self {
            Domain::Uniform { low, high } | Domain::QUniform { low, high, .. } => {
                if !(low.is_finite() && high.is_finite() && low < high && (high - low).is_finite())
                {
                    return bad(format!(
                        "needs finite low < high a finite distance apart, got [{low}, {high})"
                    ));
                }
                if let Domain::QUniform { q, .. } = self {
                    if !(*q > 0.0 && q.is_finite()) {
                        return bad(format!("q must be positive, got {q}"));
                    }
                }
            }
            Domain::LogUniform { low, high } => {
                if !(*low > 0.0 && high.is_finite() && low < high) {
                    return bad(format!("needs 0 < low < high, got [{low}, {high})"));
                }
            }
            Domain::RandInt { low, high } => {
                if low >= high {
                    return bad(format!("needs low < high, got [{low}, {high})"));
                }
            }
            Domain::LogRandInt { low, high } => {
                if !(*low > 0 && low < high) {
                    return bad(format!("needs 0 < low < high, got [{low}, {high})"));
                }
            }
            Domain::Randn { mean, sd } => {
                if !(mean.is_finite() && *sd > 0.0 && sd.is_finite()) {
                    return bad(format!("needs a finite mean and sd > 0, got {mean}, {sd}"));
                }
            }
            Domain::Choice(v) => {
                if v.is_empty() {
                    return bad("choice of nothing".into());
                }
            }
        }
        Ok(())
    }

    /// One draw.
    pub fn sample(&self, rng: &mut StdRng) -> Value {
        match self {
            Domain::Uniform { low, high } => Value::from(rng.random_range(*low..*high)),
            Domain::QUniform { low, high, q } => {
                let v = (rng.random_range(*low..=*high) / q).round() * q;
                Value::from(v.clamp(*low, *high))
            }
            Domain::LogUniform { low, high } => {
                Value::from(rng.random_range(low.ln()..high.ln()).exp())
            }
            Domain::RandInt { low, high } => Value::from(rng.random_range(*low..*high)),
            Domain::LogRandInt { low, high } => {
                let v = rng
                    .random_range((*low as f64).ln()..(*high as f64).ln())
                    .exp()
                    .floor() as i64;
                Value::from(v.clamp(*low, *high - 1))
            }
            Domain::Randn { mean, sd } => {
                // Box-Muller.
                let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
                let u2: f64 = rng.random();
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                Value::from(mean + sd * z)
            }
            Domain::Choice(v) => v[rng.random_range(0..v.len())].clone(),
        }
    }
}

/// Names to [`Param`]s.
#[derive(Debug, Clone, Default)]
pub struct SearchSpace {
    params: BTreeMap<String, Param>,
}

impl SearchSpace {
    /// An empty space.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `name`.
    pub fn with(mut self, name: impl Into<String>, param: Param) -> Self {
        self.params.insert(name.into(), param);
        self
    }

    /// Adds a nested space under `name`.
    pub fn nested(self, name: impl Into<String>, space: SearchSpace) -> Self {
        self.with(name, Param::Nested(space))
    }

    /// Checks every domain (before any trial starts).
    pub fn validate(&self) -> Result<()> {
        self.validate_at("")
    }

    fn validate_at(&self, prefix: &str) -> Result<()> {
        for (name, p) in &self.params {
            let path = join(prefix, name);
            match p {
                Param::Sample(d) => d.validate(&path)?,
                Param::Grid(v) if v.is_empty() => {
                    return Err(VolleyError::Config(format!(
                        "search space `{path}`: grid_search of nothing"
                    )))
                }
                Param::Nested(s) => s.validate_at(&path)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// The grid axes, as (path, values), in a fixed order.
    pub fn grid_axes(&self) -> Vec<(Vec<String>, Vec<Value>)> {
        let mut out = Vec::new();
        self.collect_grid(&mut Vec::new(), &mut out);
        out
    }

    fn collect_grid(&self, at: &mut Vec<String>, out: &mut Vec<(Vec<String>, Vec<Value>)>) {
        for (name, p) in &self.params {
            at.push(name.clone());
            match p {
                Param::Grid(v) => out.push((at.clone(), v.clone())),
                Param::Nested(s) => s.collect_grid(at, out),
                _ => {}
            }
            at.pop();
        }
    }

    /// The sampled domains, as (path, domain), in a fixed order.
    pub fn domains(&self) -> Vec<(Vec<String>, Domain)> {
        let mut out = Vec::new();
        self.collect_domains(&mut Vec::new(), &mut out);
        out
    }

    fn collect_domains(&self, at: &mut Vec<String>, out: &mut Vec<(Vec<String>, Domain)>) {
        for (name, p) in &self.params {
            at.push(name.clone());
            match p {
                Param::Sample(d) => out.push((at.clone(), d.clone())),
                Param::Nested(s) => s.collect_domains(at, out),
                _ => {}
            }
            at.pop();
        }
    }

    /// A config: grid axes take `grid` (one value per axis, in [`SearchSpace::grid_axes`]
    /// order), sampled domains take `chosen` where given (by path) and a draw from
    /// `rng` otherwise; then functions run on the result.
    pub fn resolve(
        &self,
        rng: &mut StdRng,
        grid: &[Value],
        chosen: &BTreeMap<Vec<String>, Value>,
    ) -> Value {
        let mut grid_iter = grid.iter();
        let mut config = self.fill(rng, &mut grid_iter, chosen, &mut Vec::new());
        let snapshot = config.clone();
        self.run_funcs(&mut config, &snapshot);
        config
    }

    fn fill<'a>(
        &self,
        rng: &mut StdRng,
        grid: &mut impl Iterator<Item = &'a Value>,
        chosen: &BTreeMap<Vec<String>, Value>,
        at: &mut Vec<String>,
    ) -> Value {
        let mut obj = Map::new();
        for (name, p) in &self.params {
            at.push(name.clone());
            let v = match p {
                Param::Const(v) => v.clone(),
                Param::Sample(d) => match chosen.get(at) {
                    Some(v) => v.clone(),
                    None => d.sample(rng),
                },
                Param::Grid(values) => grid.next().cloned().unwrap_or_else(|| values[0].clone()),
                Param::Nested(s) => s.fill(rng, grid, chosen, at),
                Param::Func(_) => Value::Null,
            };
            obj.insert(name.clone(), v);
            at.pop();
        }
        Value::Object(obj)
    }

    fn run_funcs(&self, config: &mut Value, whole: &Value) {
        for (name, p) in &self.params {
            match p {
                Param::Func(f) => {
                    config[name.as_str()] = f(whole);
                }
                Param::Nested(s) => s.run_funcs(&mut config[name.as_str()], whole),
                _ => {}
            }
        }
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}

/// The value at `path` in a config.
pub fn get_path<'a>(config: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(config, |v, k| v.get(k))
}

/// Sets the value at `path` in a config, making the objects on the way that are
/// missing; `false` (and no change) where a value on the way is not an object.
pub fn set_path(config: &mut Value, path: &[String], value: Value) -> bool {
    let Some((last, ancestors)) = path.split_last() else {
        return false;
    };
    let mut at = config;
    for k in ancestors {
        if at.is_null() {
            *at = Value::Object(Default::default());
        }
        let Some(object) = at.as_object_mut() else {
            return false;
        };
        at = object.entry(k.as_str()).or_insert(Value::Null);
    }
    if at.is_null() {
        *at = Value::Object(Default::default());
    }
    match at.as_object_mut() {
        Some(object) => {
            object.insert(last.clone(), value);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn samples_stay_in_their_domains_and_funcs_see_them() {
        let space = SearchSpace::new()
            .with("lr", loguniform(1e-4, 1e-1))
            .with("layers", randint(1, 4))
            .with("act", choice(["relu", "gelu"]))
            .with("q", quniform(0.0, 1.0, 0.25))
            .with("width", lograndint(8, 512))
            .with("noise", randn(0.0, 1.0))
            .nested(
                "opt",
                SearchSpace::new().with("beta", uniform(0.8, 0.99)).with(
                    "double_lr",
                    sample_from(|c| Value::from(c["lr"].as_f64().unwrap() * 2.0)),
                ),
            );
        space.validate().unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..200 {
            let c = space.resolve(&mut rng, &[], &BTreeMap::new());
            let lr = c["lr"].as_f64().unwrap();
            assert!((1e-4..1e-1).contains(&lr));
            assert!((1..4).contains(&c["layers"].as_i64().unwrap()));
            assert!(["relu", "gelu"].contains(&c["act"].as_str().unwrap()));
            let q = c["q"].as_f64().unwrap();
            assert_eq!((q * 4.0).fract(), 0.0);
            assert!((8..512).contains(&c["width"].as_i64().unwrap()));
            let b = c["opt"]["beta"].as_f64().unwrap();
            assert!((0.8..0.99).contains(&b));
            assert_eq!(c["opt"]["double_lr"].as_f64().unwrap(), lr * 2.0);
        }
        // Seeded: the same seed, the same configs.
        let a = space.resolve(&mut StdRng::seed_from_u64(9), &[], &BTreeMap::new());
        let b = space.resolve(&mut StdRng::seed_from_u64(9), &[], &BTreeMap::new());
        assert_eq!(a, b);
    }

    #[test]
    fn bad_domains_are_named() {
        for (space, needle) in [
            (SearchSpace::new().with("lr", loguniform(0.0, 1.0)), "`lr`"),
            (SearchSpace::new().with("n", randint(5, 5)), "`n`"),
            (
                SearchSpace::new()
                    .nested("o", SearchSpace::new().with("c", choice(Vec::<i64>::new()))),
                "`o/c`",
            ),
            (
                SearchSpace::new().with("g", grid_search(Vec::<i64>::new())),
                "`g`",
            ),
            (SearchSpace::new().with("s", randn(0.0, -1.0)), "`s`"),
        ] {
            let e = space.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
