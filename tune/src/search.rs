//! Searchers: which config the next trial gets.
//!
//! [`BasicVariant`] is grid and random search: every grid combination, `num_samples`
//! times, the sampled domains drawn afresh each time. [`Tpe`] is the tree-structured
//! Parzen estimator (Bergstra et al., 2011): after a few random trials it splits the
//! finished ones into the best quarter and the rest, models each dimension's density in
//! both groups as a Parzen mixture, and takes the candidate (drawn from the good
//! density) that maximizes good/bad. Both are seeded per trial index, so the same seed
//! and results give the same trials.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use volley_common::{Result, VolleyError};

use crate::space::{get_path, Domain, SearchSpace};
use crate::Mode;

/// Suggests configs and learns from results.
pub trait Searcher: Send {
    /// The config of trial `index` (0-based, creation order); `None` when there are no
    /// more (or none until running trials finish).
    fn suggest(&mut self, index: usize) -> Option<Value>;
    /// Trial `index` with `config` finished with metric `value` (`None`: no value).
    fn on_trial_complete(&mut self, index: usize, config: &Value, value: Option<f64>);
    /// Trials it will suggest in all.
    fn total(&self) -> Option<usize>;
}

fn trial_rng(seed: u64, index: usize) -> StdRng {
    StdRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Grid and random search.
pub struct BasicVariant {
    space: SearchSpace,
    axes: Vec<Vec<Value>>,
    combos: usize,
    num_samples: usize,
    seed: u64,
}

impl BasicVariant {
    /// `num_samples` passes over the grid (one pass if the space has no grid).
    pub fn new(space: SearchSpace, num_samples: usize, seed: u64) -> Self {
        let axes: Vec<Vec<Value>> = space.grid_axes().into_iter().map(|(_, v)| v).collect();
        let combos = axes.iter().map(Vec::len).product::<usize>().max(1);
        Self {
            space,
            axes,
            combos,
            num_samples,
            seed,
        }
    }
}

impl Searcher for BasicVariant {
    fn suggest(&mut self, index: usize) -> Option<Value> {
        if index >= self.combos * self.num_samples {
            return None;
        }
        // Grid combination `index % combos`, the last axis fastest.
        let mut rest = index % self.combos;
        let mut grid = vec![Value::Null; self.axes.len()];
        for (i, axis) in self.axes.iter().enumerate().rev() {
            grid[i] = axis[rest % axis.len()].clone();
            rest /= axis.len();
        }
        let mut rng = trial_rng(self.seed, index);
        Some(self.space.resolve(&mut rng, &grid, &BTreeMap::new()))
    }

    fn on_trial_complete(&mut self, _: usize, _: &Value, _: Option<f64>) {}

    fn total(&self) -> Option<usize> {
        Some(self.combos * self.num_samples)
    }
}

/// Settings of [`Tpe`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TpeConfig {
    /// Random trials before the model is used.
    pub n_initial: usize,
    /// Fraction of finished trials counted as good.
    pub gamma: f64,
    /// Candidates drawn from the good density per suggestion.
    pub n_candidates: usize,
}

impl Default for TpeConfig {
    fn default() -> Self {
        Self {
            n_initial: 10,
            gamma: 0.25,
            n_candidates: 24,
        }
    }
}

/// How a domain is modelled: a number on a (possibly log) line, or a category.
#[derive(Debug, Clone)]
enum Dim {
    Numeric { low: f64, high: f64, log: bool },
    Categorical(Vec<Value>),
}

impl Dim {
    fn of(d: &Domain) -> Dim {
        match d {
            Domain::Uniform { low, high } | Domain::QUniform { low, high, .. } => Dim::Numeric {
                low: *low,
                high: *high,
                log: false,
            },
            Domain::LogUniform { low, high } => Dim::Numeric {
                low: low.ln(),
                high: high.ln(),
                log: true,
            },
            Domain::RandInt { low, high } => Dim::Numeric {
                low: *low as f64,
                high: *high as f64,
                log: false,
            },
            Domain::LogRandInt { low, high } => Dim::Numeric {
                low: (*low as f64).ln(),
                high: (*high as f64).ln(),
                log: true,
            },
            Domain::Randn { mean, sd } => Dim::Numeric {
                low: mean - 4.0 * sd,
                high: mean + 4.0 * sd,
                log: false,
            },
            Domain::Choice(v) => Dim::Categorical(v.clone()),
        }
    }
}

/// The tree-structured Parzen estimator.
pub struct Tpe {
    space: SearchSpace,
    dims: Vec<(Vec<String>, Domain, Dim)>,
    num_samples: usize,
    mode: Mode,
    seed: u64,
    config: TpeConfig,
    /// Finished trials: config and loss (smaller is better).
    observed: Vec<(Value, f64)>,
}

impl Tpe {
    /// TPE over `space` for `num_samples` trials. Grid axes are not supported (they
    /// fix values instead of searching them): use `choice`.
    pub fn new(
        space: SearchSpace,
        num_samples: usize,
        mode: Mode,
        seed: u64,
        config: TpeConfig,
    ) -> Result<Self> {
        if !space.grid_axes().is_empty() {
            return Err(VolleyError::Config(
                "TPE searches sampled domains; the space has grid_search axes (use choice)".into(),
            ));
        }
        if !(config.gamma > 0.0 && config.gamma < 1.0) || config.n_candidates == 0 {
            return Err(VolleyError::Config(format!(
                "TPE: gamma must be in (0, 1) and n_candidates at least 1, got {config:?}"
            )));
        }
        let dims = space
            .domains()
            .into_iter()
            .map(|(p, d)| {
                let dim = Dim::of(&d);
                (p, d, dim)
            })
            .collect();
        Ok(Self {
            space,
            dims,
            num_samples,
            mode,
            seed,
            config,
            observed: Vec::new(),
        })
    }

    /// Where `v` (a config value) sits on the dimension's line.
    fn coordinate(dim: &Dim, v: &Value) -> Option<f64> {
        match dim {
            Dim::Numeric { log, .. } => {
                let x = v.as_f64()?;
                Some(if *log { x.ln() } else { x })
            }
            Dim::Categorical(values) => values.iter().position(|c| c == v).map(|i| i as f64),
        }
    }

    fn to_value(domain: &Domain, x: f64) -> Value {
        match domain {
            Domain::Uniform { low, high } => Value::from(x.clamp(*low, *high)),
            Domain::QUniform { low, high, q } => {
                Value::from(((x / q).round() * q).clamp(*low, *high))
            }
            Domain::LogUniform { low, high } => Value::from(x.exp().clamp(*low, *high)),
            Domain::RandInt { low, high } => Value::from((x.floor() as i64).clamp(*low, high - 1)),
            Domain::LogRandInt { low, high } => {
                Value::from((x.exp().floor() as i64).clamp(*low, high - 1))
            }
            Domain::Randn { .. } => Value::from(x),
            Domain::Choice(v) => v[(x as usize).min(v.len() - 1)].clone(),
        }
    }
}

/// A Parzen density on `[low, high]`: a Gaussian per point plus a uniform prior.
struct Parzen {
    centers: Vec<f64>,
    sigmas: Vec<f64>,
    low: f64,
    high: f64,
}

impl Parzen {
    fn new(points: &[f64], low: f64, high: f64) -> Self {
        let mut sorted: Vec<f64> = points.to_vec();
        sorted.sort_by(f64::total_cmp);
        let span = high - low;
        let n = sorted.len();
        let min_sigma = span / (n as f64 + 1.0).min(100.0);
        let sigmas = (0..n)
            .map(|i| {
                let left = if i > 0 {
                    sorted[i] - sorted[i - 1]
                } else {
                    sorted[i] - low
                };
                let right = if i + 1 < n {
                    sorted[i + 1] - sorted[i]
                } else {
                    high - sorted[i]
                };
                left.max(right).clamp(min_sigma, span)
            })
            .collect();
        Self {
            centers: sorted,
            sigmas,
            low,
            high,
        }
    }

    fn weight(&self) -> f64 {
        1.0 / (self.centers.len() as f64 + 1.0)
    }

    fn density(&self, x: f64) -> f64 {
        let w = self.weight();
        let prior = w / (self.high - self.low);
        let mix: f64 = self
            .centers
            .iter()
            .zip(&self.sigmas)
            .map(|(c, s)| {
                let z = (x - c) / s;
                (-0.5 * z * z).exp() / (s * (2.0 * std::f64::consts::PI).sqrt())
            })
            .sum();
        prior + w * mix
    }

    fn sample(&self, rng: &mut StdRng) -> f64 {
        let k = rng.random_range(0..=self.centers.len());
        if k == self.centers.len() {
            return rng.random_range(self.low..=self.high);
        }
        for _ in 0..16 {
            let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            let u2: f64 = rng.random();
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            let x = self.centers[k] + self.sigmas[k] * z;
            if (self.low..=self.high).contains(&x) {
                return x;
            }
        }
        self.centers[k]
    }
}

impl Searcher for Tpe {
    fn suggest(&mut self, index: usize) -> Option<Value> {
        if index >= self.num_samples {
            return None;
        }
        let mut rng = trial_rng(self.seed, index);
        if self.observed.len() < self.config.n_initial.max(2) {
            return Some(self.space.resolve(&mut rng, &[], &BTreeMap::new()));
        }
        let mut ranked: Vec<&(Value, f64)> = self.observed.iter().collect();
        ranked.sort_by(|a, b| a.1.total_cmp(&b.1));
        let n_good = ((self.config.gamma * ranked.len() as f64).ceil() as usize).max(1);
        let (good, bad) = ranked.split_at(n_good);
        let mut chosen = BTreeMap::new();
        for (path, domain, dim) in &self.dims {
            let coords = |group: &[&(Value, f64)]| -> Vec<f64> {
                group
                    .iter()
                    .filter_map(|(c, _)| get_path(c, path).and_then(|v| Self::coordinate(dim, v)))
                    .collect()
            };
            let (g, b) = (coords(good), coords(bad));
            let x = match dim {
                Dim::Numeric { low, high, .. } => {
                    let (lg, lb) = (Parzen::new(&g, *low, *high), Parzen::new(&b, *low, *high));
                    (0..self.config.n_candidates)
                        .map(|_| lg.sample(&mut rng))
                        .max_by(|x, y| {
                            let s = |x: f64| lg.density(x).ln() - lb.density(x).ln();
                            s(*x).total_cmp(&s(*y))
                        })
                        .unwrap_or(*low)
                }
                Dim::Categorical(values) => {
                    let k = values.len();
                    let p = |pts: &[f64], i: usize| {
                        (pts.iter().filter(|&&x| x as usize == i).count() as f64 + 1.0)
                            / (pts.len() + k) as f64
                    };
                    let weights: Vec<f64> = (0..k).map(|i| p(&g, i)).collect();
                    (0..self.config.n_candidates)
                        .map(|_| {
                            let mut u = rng.random::<f64>() * weights.iter().sum::<f64>();
                            let mut pick = k - 1;
                            for (i, w) in weights.iter().enumerate() {
                                if u < *w {
                                    pick = i;
                                    break;
                                }
                                u -= w;
                            }
                            pick
                        })
                        .max_by(|&x, &y| {
                            let s = |i: usize| p(&g, i) / p(&b, i);
                            s(x).total_cmp(&s(y))
                        })
                        .unwrap_or(0) as f64
                }
            };
            chosen.insert(path.clone(), Self::to_value(domain, x));
        }
        Some(self.space.resolve(&mut rng, &[], &chosen))
    }

    fn on_trial_complete(&mut self, _: usize, config: &Value, value: Option<f64>) {
        if let Some(v) = value.filter(|v| v.is_finite()) {
            let loss = match self.mode {
                Mode::Min => v,
                Mode::Max => -v,
            };
            self.observed.push((config.clone(), loss));
        }
    }

    fn total(&self) -> Option<usize> {
        Some(self.num_samples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::{choice, grid_search, loguniform, uniform};

    fn objective(c: &Value) -> f64 {
        let x = c["x"].as_f64().unwrap();
        let y = c["y"].as_f64().unwrap();
        let lr = c["lr"].as_f64().unwrap();
        let act = if c["act"] == "gelu" { 0.0 } else { 0.3 };
        (x - 0.3).powi(2) + (y + 0.6).powi(2) + (lr.log10() + 2.5).powi(2) * 0.2 + act
    }

    fn space() -> SearchSpace {
        SearchSpace::new()
            .with("x", uniform(-2.0, 2.0))
            .with("y", uniform(-2.0, 2.0))
            .with("lr", loguniform(1e-5, 1.0))
            .with("act", choice(["relu", "gelu", "tanh"]))
    }

    fn best_after(s: &mut dyn Searcher, n: usize) -> f64 {
        let mut best = f64::INFINITY;
        for i in 0..n {
            let c = s.suggest(i).unwrap();
            let v = objective(&c);
            best = best.min(v);
            s.on_trial_complete(i, &c, Some(v));
        }
        best
    }

    #[test]
    fn grid_times_samples_and_seeded() {
        let space = SearchSpace::new()
            .with("a", grid_search([1, 2, 3]))
            .with("b", grid_search(["x", "y"]))
            .with("c", uniform(0.0, 1.0));
        let mut s = BasicVariant::new(space.clone(), 2, 5);
        assert_eq!(s.total(), Some(12));
        let all: Vec<Value> = (0..12).map(|i| s.suggest(i).unwrap()).collect();
        assert!(s.suggest(12).is_none());
        let pairs: std::collections::BTreeSet<String> = all
            .iter()
            .map(|c| format!("{}{}", c["a"], c["b"]))
            .collect();
        assert_eq!(pairs.len(), 6, "every grid combination");
        let again = BasicVariant::new(space, 2, 5).suggest(7).unwrap();
        assert_eq!(again, all[7]);
    }

    /// On a 4-dimensional objective (minimum 0), TPE gets closer than random search in
    /// the same number of trials, over several seeds; both reach the optimum's region.
    #[test]
    fn tpe_beats_random_on_the_same_budget() {
        let (mut tpe_total, mut random_total) = (0.0, 0.0);
        for seed in 0..8 {
            let mut r = BasicVariant::new(space(), 60, seed);
            let mut t = Tpe::new(space(), 60, Mode::Min, seed, TpeConfig::default()).unwrap();
            let (br, bt) = (best_after(&mut r, 60), best_after(&mut t, 60));
            random_total += br;
            tpe_total += bt;
            assert!(bt < br, "seed {seed}: TPE best {bt} vs random {br}");
        }
        // Measured: TPE mean best 0.17, random 0.42 (the optimum is 0).
        assert!(tpe_total / 8.0 < 0.25, "TPE reaches the optimum's region");
        assert!(
            tpe_total < random_total * 0.7,
            "TPE mean best {} vs random {}",
            tpe_total / 8.0,
            random_total / 8.0
        );
        // And random search needs many more trials for what TPE reaches in 60.
        let mut r = BasicVariant::new(space(), 300, 0);
        assert!(best_after(&mut r, 300) < 0.5);
    }
}
