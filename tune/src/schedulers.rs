//! Trial schedulers: what happens to a trial after each result it reports.
//!
//! [`Fifo`] lets every trial run to its end. [`Asha`] (asynchronous successive
//! halving) records a trial's metric at rungs `grace_period * reduction_factor^k` and
//! stops it when it is not in the top `1 / reduction_factor` of the trials recorded at
//! that rung so far. [`MedianStopping`] stops a trial whose best result is worse than
//! the median of the other trials' running means at the same iteration. [`Pbt`]
//! (population-based training) replaces, every `perturbation_interval` iterations, a
//! trial in the bottom quantile by a copy of a top-quantile trial's checkpoint with a
//! perturbed config.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use volley_common::{Result, VolleyError};

use crate::space::{get_path, set_path, Param};
use crate::Mode;

/// Most rungs an ASHA scheduler may have (a reduction factor very near 1 would make
/// endless ones).
const MAX_RUNGS: usize = 1000;

/// What the tuner knows of a trial when a scheduler decides.
#[derive(Debug, Clone)]
pub struct TrialInfo {
    /// Its index (creation order).
    pub index: usize,
    /// Its config.
    pub config: Value,
    /// `(iteration, metric)` of each report, in order.
    pub results: Vec<(u64, f64)>,
    /// The iteration of its latest checkpoint.
    pub checkpoint: Option<u64>,
    /// Whether it is still running.
    pub running: bool,
}

/// A scheduler's answer to a result.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Go on.
    Continue,
    /// Stop the trial (it is done: not an error).
    Stop,
    /// Stop the trial and restart it from trial `donor`'s latest checkpoint with
    /// `config` (PBT's exploit and explore).
    Exploit {
        /// The trial whose checkpoint is copied.
        donor: usize,
        /// The new config.
        config: Value,
    },
}

/// Decides after each result.
pub trait Scheduler: Send {
    /// Trial `trial` reported `value` at `iteration`; `trials` holds every trial (this
    /// one's result already included).
    fn on_result(
        &mut self,
        trial: usize,
        iteration: u64,
        value: f64,
        trials: &[TrialInfo],
    ) -> Decision;
}

fn better(mode: Mode, a: f64, b: f64) -> bool {
    match mode {
        Mode::Min => a < b,
        Mode::Max => a > b,
    }
}

/// The order that puts the best value first.
fn best_first(mode: Mode, a: f64, b: f64) -> std::cmp::Ordering {
    match mode {
        Mode::Min => a.total_cmp(&b),
        Mode::Max => b.total_cmp(&a),
    }
}

/// Every trial runs to its end.
#[derive(Debug, Default)]
pub struct Fifo;

impl Scheduler for Fifo {
    fn on_result(&mut self, _: usize, _: u64, _: f64, _: &[TrialInfo]) -> Decision {
        Decision::Continue
    }
}

/// Settings of [`Asha`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AshaConfig {
    /// Iterations a trial runs at most.
    pub max_t: u64,
    /// Iterations before the first rung.
    pub grace_period: u64,
    /// Each rung keeps `1 / reduction_factor` of the trials.
    pub reduction_factor: f64,
}

impl Default for AshaConfig {
    fn default() -> Self {
        Self {
            max_t: 100,
            grace_period: 1,
            reduction_factor: 4.0,
        }
    }
}

/// Asynchronous successive halving.
#[derive(Debug)]
pub struct Asha {
    config: AshaConfig,
    mode: Mode,
    /// `(milestone, metric by trial)`, largest milestone first.
    rungs: Vec<(u64, BTreeMap<usize, f64>)>,
}

impl Asha {
    /// A scheduler with `config`.
    pub fn new(config: AshaConfig, mode: Mode) -> Result<Self> {
        if config.grace_period == 0
            || config.max_t < config.grace_period
            || !(config.reduction_factor > 1.0)
        {
            return Err(VolleyError::Config(format!(
                "ASHA needs 0 < grace_period <= max_t and reduction_factor > 1, got {config:?}"
            )));
        }
        // Milestones grace * rf^k below max_t, reached at the first whole iteration at
        // or past them (as Ray compares iterations with them), each once.
        let count = ((config.max_t as f64 / config.grace_period as f64).ln()
            / config.reduction_factor.ln())
        .floor()
            + 1.0;
        if count > MAX_RUNGS as f64 {
            return Err(VolleyError::Config(format!(
                "ASHA with grace_period {}, max_t {} and reduction_factor {} would have {count} \
                 rungs; at most {MAX_RUNGS} (a reduction factor further from 1)",
                config.grace_period, config.max_t, config.reduction_factor
            )));
        }
        let mut rungs: Vec<(u64, BTreeMap<usize, f64>)> = Vec::new();
        let mut m = config.grace_period as f64;
        loop {
            let milestone = m.ceil() as u64;
            if milestone >= config.max_t {
                break;
            }
            if rungs.last().map(|(l, _)| *l) != Some(milestone) {
                rungs.push((milestone, BTreeMap::new()));
            }
            m *= config.reduction_factor;
        }
        rungs.reverse();
        Ok(Self {
            config,
            mode,
            rungs,
        })
    }
}

impl Scheduler for Asha {
    fn on_result(&mut self, trial: usize, iteration: u64, value: f64, _: &[TrialInfo]) -> Decision {
        if iteration >= self.config.max_t {
            return Decision::Stop;
        }
        let rf = self.config.reduction_factor;
        let mode = self.mode;
        for (milestone, recorded) in &mut self.rungs {
            if iteration < *milestone {
                continue;
            }
            // The highest rung reached was decided already: lower rungs are not
            // given this later result (it is not their iteration's).
            if recorded.contains_key(&trial) {
                break;
            }
            recorded.insert(trial, value);
            // The cutoff: the value at the top 1/rf quantile of this rung.
            let mut values: Vec<f64> = recorded.values().copied().collect();
            values.sort_by(|a, b| best_first(mode, *a, *b));
            let keep = ((values.len() as f64 / rf).ceil() as usize).max(1);
            let cutoff = values[keep - 1];
            return if better(mode, cutoff, value) {
                Decision::Stop
            } else {
                Decision::Continue
            };
        }
        Decision::Continue
    }
}

/// Settings of [`MedianStopping`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MedianStoppingConfig {
    /// Iterations before a trial may be stopped.
    pub grace_period: u64,
    /// Other trials needed at an iteration before the median counts.
    pub min_samples_required: usize,
}

impl Default for MedianStoppingConfig {
    fn default() -> Self {
        Self {
            grace_period: 1,
            min_samples_required: 3,
        }
    }
}

/// Median stopping.
#[derive(Debug)]
pub struct MedianStopping {
    config: MedianStoppingConfig,
    mode: Mode,
}

impl MedianStopping {
    /// A scheduler with `config`.
    pub fn new(config: MedianStoppingConfig, mode: Mode) -> Self {
        Self { config, mode }
    }
}

impl Scheduler for MedianStopping {
    fn on_result(
        &mut self,
        trial: usize,
        iteration: u64,
        _: f64,
        trials: &[TrialInfo],
    ) -> Decision {
        if iteration < self.config.grace_period {
            return Decision::Continue;
        }
        let mut means: Vec<f64> = trials
            .iter()
            .filter(|t| t.index != trial)
            .filter_map(|t| {
                let upto: Vec<f64> = t
                    .results
                    .iter()
                    .filter(|(i, _)| *i <= iteration)
                    .map(|(_, v)| *v)
                    .collect();
                // Only trials that got this far.
                (t.results.iter().any(|(i, _)| *i >= iteration) && !upto.is_empty())
                    .then(|| upto.iter().sum::<f64>() / upto.len() as f64)
            })
            .collect();
        // No other trial got this far: no median to compare with (also where no
        // minimum is required).
        if means.is_empty() || means.len() < self.config.min_samples_required {
            return Decision::Continue;
        }
        means.sort_by(f64::total_cmp);
        let half = means.len() / 2;
        let median = if means.len() % 2 == 0 {
            (means[half - 1] + means[half]) / 2.0
        } else {
            means[half]
        };
        let Some(me) = trials.iter().find(|t| t.index == trial) else {
            return Decision::Continue;
        };
        let best = me
            .results
            .iter()
            .map(|(_, v)| *v)
            .reduce(|a, b| if better(self.mode, a, b) { a } else { b })
            .unwrap_or(median);
        if better(self.mode, median, best) {
            Decision::Stop
        } else {
            Decision::Continue
        }
    }
}

/// Settings of [`Pbt`].
#[derive(Debug, Clone)]
pub struct PbtConfig {
    /// Iterations between a trial's perturbations.
    pub perturbation_interval: u64,
    /// The bottom and top fractions of the population.
    pub quantile_fraction: f64,
    /// Chance that a mutated value is drawn afresh instead of scaled.
    pub resample_probability: f64,
    /// Paths (`a/b` for nested) of the config values to mutate, with the space to
    /// resample them from (a domain, or a `choice`/`grid_search` list walked by one step).
    pub hyperparam_mutations: BTreeMap<String, Param>,
    /// Seed of the perturbations.
    pub seed: u64,
}

impl Default for PbtConfig {
    fn default() -> Self {
        Self {
            perturbation_interval: 4,
            quantile_fraction: 0.25,
            resample_probability: 0.25,
            hyperparam_mutations: BTreeMap::new(),
            seed: 0,
        }
    }
}

/// Population-based training.
#[derive(Debug)]
pub struct Pbt {
    config: PbtConfig,
    mode: Mode,
    last_perturbation: BTreeMap<usize, u64>,
    rng: StdRng,
}

impl Pbt {
    /// A scheduler with `config`.
    pub fn new(config: PbtConfig, mode: Mode) -> Result<Self> {
        if config.perturbation_interval == 0
            || !(config.quantile_fraction > 0.0 && config.quantile_fraction <= 0.5)
        {
            return Err(VolleyError::Config(format!(
                "PBT needs perturbation_interval > 0 and 0 < quantile_fraction <= 0.5, got {} and {}",
                config.perturbation_interval, config.quantile_fraction
            )));
        }
        if config.hyperparam_mutations.is_empty() {
            return Err(VolleyError::Config(
                "PBT needs at least one entry in hyperparam_mutations".into(),
            ));
        }
        for (path, p) in &config.hyperparam_mutations {
            match p {
                Param::Sample(d) => d.validate(path)?,
                Param::Grid(v) if !v.is_empty() => {}
                _ => {
                    return Err(VolleyError::Config(format!(
                        "PBT mutation `{path}` must be a domain or a non-empty list"
                    )))
                }
            }
        }
        let rng = StdRng::seed_from_u64(config.seed);
        Ok(Self {
            config,
            mode,
            last_perturbation: BTreeMap::new(),
            rng,
        })
    }

    fn explore(&mut self, config: &Value) -> Value {
        let mut out = config.clone();
        for (path, p) in &self.config.hyperparam_mutations {
            let path: Vec<String> = path.split('/').map(str::to_string).collect();
            let current = get_path(config, &path).cloned().unwrap_or(Value::Null);
            let resample = self.rng.random::<f64>() < self.config.resample_probability;
            let new = match p {
                Param::Sample(crate::space::Domain::Choice(values)) | Param::Grid(values) => {
                    let at = values.iter().position(|v| *v == current);
                    match at {
                        Some(i) if !resample => {
                            let up = self.rng.random::<bool>();
                            let j = if up {
                                (i + 1).min(values.len() - 1)
                            } else {
                                i.saturating_sub(1)
                            };
                            values[j].clone()
                        }
                        _ => values[self.rng.random_range(0..values.len())].clone(),
                    }
                }
                Param::Sample(d) => match current.as_f64() {
                    Some(x) if !resample => {
                        let up = self.rng.random::<bool>();
                        let f = if up { 1.2 } else { 0.8 };
                        if current.is_i64() || current.is_u64() {
                            // Small integers move by at least one (1 * 1.2 rounds to 1).
                            let moved = (x * f).round();
                            let moved = if moved == x.round() {
                                if up {
                                    x + 1.0
                                } else {
                                    x - 1.0
                                }
                            } else {
                                moved
                            };
                            Value::from(clamp_to(d, moved).round() as i64)
                        } else {
                            Value::from(clamp_to(d, x * f))
                        }
                    }
                    _ => d.sample(&mut self.rng),
                },
                _ => current,
            };
            // A path through a value that is not an object keeps the config as it is.
            set_path(&mut out, &path, new);
        }
        out
    }
}

/// `x` moved into the values `domain` can sample (a perturbed value stays in its space).
fn clamp_to(domain: &crate::space::Domain, x: f64) -> f64 {
    use crate::space::Domain;
    let (low, high) = match domain {
        Domain::Uniform { low, high }
        | Domain::QUniform { low, high, .. }
        | Domain::LogUniform { low, high } => (*low, *high),
        // Integers below `high`.
        Domain::RandInt { low, high } | Domain::LogRandInt { low, high } => {
            (*low as f64, (*high - 1) as f64)
        }
        Domain::Randn { .. } | Domain::Choice(_) => return x,
    };
    x.max(low).min(high)
}

impl Scheduler for Pbt {
    fn on_result(
        &mut self,
        trial: usize,
        iteration: u64,
        _: f64,
        trials: &[TrialInfo],
    ) -> Decision {
        let last = self.last_perturbation.get(&trial).copied().unwrap_or(0);
        if iteration < last + self.config.perturbation_interval {
            return Decision::Continue;
        }
        self.last_perturbation.insert(trial, iteration);
        // Rank the population by each trial's latest result.
        let mut ranked: Vec<(usize, f64, bool)> = trials
            .iter()
            .filter_map(|t| {
                t.results
                    .last()
                    .map(|(_, v)| (t.index, *v, t.checkpoint.is_some()))
            })
            .collect();
        if ranked.len() < 2 {
            return Decision::Continue;
        }
        ranked.sort_by(|a, b| best_first(self.mode, a.1, b.1));
        // At most half the population, so that no trial is both below and above (as
        // in Ray's PBT).
        let n = ((ranked.len() as f64 * self.config.quantile_fraction).ceil() as usize)
            .min(ranked.len() / 2);
        let in_bottom = ranked[ranked.len() - n..]
            .iter()
            .any(|(i, _, _)| *i == trial);
        if !in_bottom {
            return Decision::Continue;
        }
        let donors: Vec<usize> = ranked[..n]
            .iter()
            .filter(|(i, _, ckpt)| *i != trial && *ckpt)
            .map(|(i, _, _)| *i)
            .collect();
        if donors.is_empty() {
            return Decision::Continue;
        }
        let donor = donors[self.rng.random_range(0..donors.len())];
        let Some(d) = trials.iter().find(|t| t.index == donor) else {
            return Decision::Continue;
        };
        let config = self.explore(&d.config);
        Decision::Exploit { donor, config }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::{choice, loguniform};

    fn info(index: usize, results: &[(u64, f64)]) -> TrialInfo {
        TrialInfo {
            index,
            config: serde_json::json!({"lr": 0.1, "opt": "sgd"}),
            results: results.to_vec(),
            checkpoint: Some(results.last().map_or(0, |r| r.0)),
            running: true,
        }
    }

    #[test]
    fn asha_stops_the_worse_at_each_rung() {
        let mut a = Asha::new(
            AshaConfig {
                max_t: 16,
                grace_period: 1,
                reduction_factor: 2.0,
            },
            Mode::Min,
        )
        .unwrap();
        // The first trial at a rung always goes on; a worse second one is stopped at
        // rung 1, a better one continues.
        assert_eq!(a.on_result(0, 1, 0.5, &[]), Decision::Continue);
        assert_eq!(a.on_result(1, 1, 0.9, &[]), Decision::Stop);
        assert_eq!(a.on_result(2, 1, 0.1, &[]), Decision::Continue);
        assert_eq!(a.on_result(2, 2, 0.1, &[]), Decision::Continue);
        assert_eq!(a.on_result(2, 16, 0.1, &[]), Decision::Stop, "max_t");
        assert!(Asha::new(
            AshaConfig {
                max_t: 0,
                ..Default::default()
            },
            Mode::Min
        )
        .is_err());
        // Milestones are whole iterations, each once: 1, 1.5, 2.25, 3.4, 5.1 reach rungs
        // at iterations 1, 2, 3, 4 and 6.
        let b = Asha::new(
            AshaConfig {
                max_t: 8,
                grace_period: 1,
                reduction_factor: 1.5,
            },
            Mode::Min,
        )
        .unwrap();
        let milestones: Vec<u64> = b.rungs.iter().rev().map(|(m, _)| *m).collect();
        assert_eq!(milestones, vec![1, 2, 3, 4, 6]);
        // A trial reporting every 5 iterations: its result at 10 is not given to the
        // rung of iteration 2 after it was judged at the rung of 4.
        let mut c = Asha::new(
            AshaConfig {
                max_t: 64,
                grace_period: 1,
                reduction_factor: 2.0,
            },
            Mode::Min,
        )
        .unwrap();
        c.on_result(0, 5, 0.5, &[]);
        c.on_result(0, 10, 0.4, &[]);
        c.on_result(0, 15, 0.3, &[]);
        let at = |m: u64| {
            c.rungs
                .iter()
                .find(|(x, _)| *x == m)
                .map(|(_, r)| r.get(&0).copied())
                .unwrap()
        };
        assert_eq!(
            (at(4), at(8), at(2), at(1)),
            (Some(0.5), Some(0.4), None, None)
        );
        // A reduction factor barely above 1 would make rungs without end.
        assert!(Asha::new(
            AshaConfig {
                max_t: 1 << 40,
                grace_period: 1,
                reduction_factor: 1.0 + 1e-12,
            },
            Mode::Min
        )
        .is_err());
        // A reduction factor that is not a number would make rungs without end.
        assert!(Asha::new(
            AshaConfig {
                reduction_factor: f64::NAN,
                ..Default::default()
            },
            Mode::Min
        )
        .is_err());
    }

    #[test]
    fn median_stopping_needs_samples_then_stops_the_worse() {
        let mut m = MedianStopping::new(MedianStoppingConfig::default(), Mode::Max);
        let mut trials: Vec<TrialInfo> = (0..3).map(|i| info(i, &[(1, 0.8), (2, 0.9)])).collect();
        trials.push(info(3, &[(1, 0.2), (2, 0.3)]));
        assert_eq!(
            m.on_result(3, 2, 0.3, &trials[2..]),
            Decision::Continue,
            "too few others"
        );
        assert_eq!(m.on_result(3, 2, 0.3, &trials), Decision::Stop);
        assert_eq!(m.on_result(0, 2, 0.9, &trials), Decision::Continue);
        // No minimum: the first trial to report has no median to meet.
        let mut none = MedianStopping::new(
            MedianStoppingConfig {
                min_samples_required: 0,
                ..Default::default()
            },
            Mode::Max,
        );
        assert_eq!(none.on_result(3, 2, 0.3, &trials[3..]), Decision::Continue);
        // Of an even number of others the median is the mean of the middle two: 0.5 of
        // 0.1, 0.2, 0.8, 0.9, which a trial whose best is 0.6 passes.
        let mut even = MedianStopping::new(
            MedianStoppingConfig {
                min_samples_required: 1,
                ..Default::default()
            },
            Mode::Max,
        );
        let mut others: Vec<TrialInfo> = [0.1, 0.2, 0.8, 0.9]
            .iter()
            .enumerate()
            .map(|(i, v)| info(i, &[(1, *v)]))
            .collect();
        others.push(info(4, &[(1, 0.6)]));
        assert_eq!(even.on_result(4, 1, 0.6, &others), Decision::Continue);
    }

    #[test]
    fn pbt_quantiles_do_not_overlap_and_explored_values_stay_in_their_space() {
        let mut mutations = BTreeMap::new();
        mutations.insert("lr".to_string(), crate::space::uniform(0.0, 1.0));
        mutations.insert("layers".to_string(), crate::space::randint(1, 4));
        let mut p = Pbt::new(
            PbtConfig {
                perturbation_interval: 1,
                quantile_fraction: 0.5,
                resample_probability: 0.0,
                hyperparam_mutations: mutations,
                ..Default::default()
            },
            Mode::Max,
        )
        .unwrap();
        // Three trials: one at the bottom, one at the top; the middle one is neither.
        let trials: Vec<TrialInfo> = (0..3).map(|i| info(i, &[(1, i as f64)])).collect();
        assert_eq!(
            p.on_result(1, 1, 1.0, &trials),
            Decision::Continue,
            "middle"
        );
        let mut trials = trials;
        trials[2].config = serde_json::json!({"lr": 0.95, "layers": 1});
        let mut layers_seen = std::collections::BTreeSet::new();
        for round in 2..100u64 {
            match p.on_result(0, round, 0.0, &trials) {
                Decision::Exploit { donor, config } => {
                    assert_eq!(donor, 2);
                    let lr = config["lr"].as_f64().unwrap();
                    assert!((0.0..=1.0).contains(&lr), "{config}");
                    layers_seen.insert(config["layers"].as_i64().unwrap());
                }
                d => panic!("expected an exploit, got {d:?}"),
            }
        }
        // 1 moves up to 2 (1 * 1.2 rounds back to 1), and never below 1.
        assert_eq!(layers_seen, [1, 2].into_iter().collect(), "{layers_seen:?}");
        // A mutation whose path runs through a value that is not an object leaves
        // the config as it was instead of failing.
        let mut config = serde_json::json!({"optimizer": "adam"});
        assert!(!set_path(
            &mut config,
            &["optimizer".to_string(), "lr".to_string()],
            serde_json::json!(0.1)
        ));
        assert_eq!(config, serde_json::json!({"optimizer": "adam"}));
        assert!(set_path(
            &mut config,
            &["sched".to_string(), "gamma".to_string()],
            serde_json::json!(0.5)
        ));
        assert_eq!(config["sched"]["gamma"], 0.5);
    }

    #[test]
    fn pbt_replaces_the_bottom_with_a_perturbed_top() {
        let mut mutations = BTreeMap::new();
        mutations.insert("lr".to_string(), loguniform(1e-3, 1.0));
        mutations.insert("opt".to_string(), choice(["sgd", "adam"]));
        let mut p = Pbt::new(
            PbtConfig {
                perturbation_interval: 2,
                hyperparam_mutations: mutations,
                ..Default::default()
            },
            Mode::Max,
        )
        .unwrap();
        let trials: Vec<TrialInfo> = (0..4).map(|i| info(i, &[(2, i as f64)])).collect();
        assert_eq!(p.on_result(3, 2, 3.0, &trials), Decision::Continue, "top");
        match p.on_result(0, 2, 0.0, &trials) {
            Decision::Exploit { donor, config } => {
                assert_eq!(donor, 3);
                let lr = config["lr"].as_f64().unwrap();
                assert!(lr != 0.1 || config["opt"] != "sgd", "explored: {config}");
            }
            d => panic!("expected an exploit, got {d:?}"),
        }
        // Not again before the interval passes.
        assert_eq!(p.on_result(0, 3, 0.0, &trials), Decision::Continue);
    }
}
