//! Resources as the cluster schedules them: CPUs, GPUs (fractions allowed), memory and
//! named custom resources.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use volley_common::{Result, VolleyError};

use super::proto;

/// What a task, actor, bundle or job holds while it runs, or what a node has.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
// Fields left out of a JSON body (`{"num_cpus": 2}`) are none.
#[serde(default)]
pub struct Resources {
    /// CPUs; `0.5` lets two such tasks share a core.
    pub num_cpus: f64,
    /// GPUs; below 1 a task shares one GPU, from 1 up it must be a whole number.
    pub num_gpus: f64,
    /// Bytes of memory (accounting only: nothing enforces it).
    pub memory: u64,
    /// Named resources, e.g. `{"accelerator": 1}`.
    pub custom: BTreeMap<String, f64>,
}

const EPS: f64 = 1e-9;

impl Resources {
    /// `n` CPUs and nothing else.
    pub fn cpus(n: f64) -> Self {
        Self {
            num_cpus: n,
            ..Self::default()
        }
    }

    /// Adds `n` GPUs.
    pub fn with_gpus(mut self, n: f64) -> Self {
        self.num_gpus = n;
        self
    }

    /// Adds `bytes` of memory.
    pub fn with_memory(mut self, bytes: u64) -> Self {
        self.memory = bytes;
        self
    }

    /// Adds `amount` of the custom resource `name`.
    pub fn with_custom(mut self, name: impl Into<String>, amount: f64) -> Self {
        self.custom.insert(name.into(), amount);
        self
    }

    /// Whether this fits in `available`.
    pub fn fits_in(&self, available: &Resources) -> bool {
        self.num_cpus <= available.num_cpus + EPS
            && self.num_gpus <= available.num_gpus + EPS
            && self.memory <= available.memory
            && self
                .custom
                .iter()
                .all(|(k, v)| *v <= available.custom.get(k).copied().unwrap_or(0.0) + EPS)
    }

    /// How many of `each` fit in `self` at once, and (when that is none) the resource
    /// that is short. Fractional GPUs pack several to a GPU; whole ones count whole.
    pub fn how_many(&self, each: &Resources) -> (usize, Option<String>) {
        let mut n = usize::MAX;
        let mut short = None;
        let mut limit = |name: String, have: f64, need: f64| {
            if need <= EPS {
                return;
            }
            let k = ((have + EPS) / need).floor().max(0.0) as usize;
            if k < n {
                n = k;
                short = Some(name);
            }
        };
        limit("CPUs".into(), self.num_cpus, each.num_cpus);
        let gpus = if each.num_gpus > 1.0 {
            self.num_gpus.floor()
        } else {
            self.num_gpus
        };
        limit("GPUs".into(), gpus, each.num_gpus);
        limit("memory".into(), self.memory as f64, each.memory as f64);
        for (k, v) in &each.custom {
            limit(
                format!("resource `{k}`"),
                self.custom.get(k).copied().unwrap_or(0.0),
                *v,
            );
        }
        if n == usize::MAX {
            // Asks for nothing: as many as wanted.
            return (usize::MAX, None);
        }
        (n, if n == 0 { short } else { None })
    }

    /// What of this request none of `offers` has: each resource asked beyond the most
    /// any one of them offers, as `64 CPU (the most on one node is 1)`. Empty when each
    /// resource alone fits somewhere (then no single one has all of it at once).
    pub(crate) fn beyond<'a>(
        &self,
        offers: impl Iterator<Item = &'a Resources> + Clone,
    ) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |amount: f64, unit: &str, most: f64, show: &dyn Fn(f64) -> String| {
            if amount > most + EPS {
                out.push(if most <= EPS {
                    format!("{} {unit} (none has any)", show(amount))
                } else {
                    format!(
                        "{} {unit} (the most on one node is {})",
                        show(amount),
                        show(most)
                    )
                });
            }
        };
        let max = |f: &dyn Fn(&Resources) -> f64| offers.clone().map(f).fold(0.0, f64::max);
        check(self.num_cpus, "CPU", max(&|r| r.num_cpus), &|v| trim(v));
        check(self.num_gpus, "GPU", max(&|r| r.num_gpus), &|v| trim(v));
        check(
            self.memory as f64,
            "memory",
            max(&|r| r.memory as f64),
            &|v| volley_common::format_bytes(v as u64),
        );
        for (k, v) in &self.custom {
            let most = max(&|r| r.custom.get(k).copied().unwrap_or(0.0));
            check(*v, &format!("`{k}`"), most, &|v| trim(v));
        }
        out
    }

    /// Takes `other` out of `self` (never below zero).
    pub fn subtract(&mut self, other: &Resources) {
        self.num_cpus = (self.num_cpus - other.num_cpus).max(0.0);
        self.num_gpus = (self.num_gpus - other.num_gpus).max(0.0);
        self.memory = self.memory.saturating_sub(other.memory);
        for (k, v) in &other.custom {
            let e = self.custom.entry(k.clone()).or_insert(0.0);
            *e = (*e - v).max(0.0);
        }
    }

    /// Gives `other` back to `self`.
    pub fn add(&mut self, other: &Resources) {
        self.num_cpus += other.num_cpus;
        self.num_gpus += other.num_gpus;
        self.memory += other.memory;
        for (k, v) in &other.custom {
            *self.custom.entry(k.clone()).or_insert(0.0) += v;
        }
    }

    /// Checks that the request is well formed: no negative amounts, whole GPUs above one.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f64| {
            VolleyError::Config(format!("{what} = {v}: resources must be finite and >= 0"))
        };
        if !self.num_cpus.is_finite() || self.num_cpus < 0.0 {
            return Err(bad("num_cpus", self.num_cpus));
        }
        if !self.num_gpus.is_finite() || self.num_gpus < 0.0 {
            return Err(bad("num_gpus", self.num_gpus));
        }
        if self.num_gpus > 1.0 && self.num_gpus.fract() != 0.0 {
            return Err(VolleyError::Config(format!(
                "num_gpus = {}: more than one GPU must be a whole number",
                self.num_gpus
            )));
        }
        for (k, v) in &self.custom {
            if !v.is_finite() || *v < 0.0 {
                return Err(bad(k, *v));
            }
        }
        Ok(())
    }

    /// Parses `name=amount`.
    pub fn parse_custom(spec: &str) -> Result<(String, f64)> {
        let (k, v) = spec.split_once('=').ok_or_else(|| {
            VolleyError::Config(format!("resource {spec:?}: expected NAME=AMOUNT"))
        })?;
        let v: f64 = v.trim().parse().map_err(|_| {
            VolleyError::Config(format!("resource {spec:?}: {v:?} is not a number"))
        })?;
        Ok((k.trim().to_string(), v))
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} CPU", trim(self.num_cpus))?;
        if self.num_gpus > 0.0 {
            write!(f, ", {} GPU", trim(self.num_gpus))?;
        }
        if self.memory > 0 {
            write!(f, ", {} memory", volley_common::format_bytes(self.memory))?;
        }
        for (k, v) in &self.custom {
            write!(f, ", {} {k}", trim(*v))?;
        }
        Ok(())
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl From<&Resources> for proto::Resources {
    fn from(r: &Resources) -> Self {
        proto::Resources {
            num_cpus: r.num_cpus,
            num_gpus: r.num_gpus,
            memory: r.memory,
            custom: r.custom.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }
}

impl From<&proto::Resources> for Resources {
    fn from(r: &proto::Resources) -> Self {
        Resources {
            num_cpus: r.num_cpus,
            num_gpus: r.num_gpus,
            memory: r.memory,
            custom: r.custom.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }
}

impl From<Option<proto::Resources>> for Resources {
    fn from(r: Option<proto::Resources>) -> Self {
        r.as_ref().map(Resources::from).unwrap_or_default()
    }
}

/// The GPUs of a node and how much of each is handed out.
#[derive(Debug, Clone, Default)]
pub(crate) struct GpuSlots {
    /// `(gpu id, free fraction)`.
    slots: Vec<(u32, f64)>,
}

impl GpuSlots {
    pub(crate) fn new(ids: &[u32]) -> Self {
        Self {
            slots: ids.iter().map(|&i| (i, 1.0)).collect(),
        }
    }

    /// Picks GPUs for a request of `n` (fraction of one, or whole ones), or `None`.
    pub(crate) fn take(&mut self, n: f64) -> Option<Vec<u32>> {
        if n <= 0.0 {
            return Some(vec![]);
        }
        if n < 1.0 {
            // Best fit: the most used GPU that still has room, so whole GPUs stay free.
            let slot = self
                .slots
                .iter_mut()
                .filter(|(_, free)| *free + EPS >= n)
                .min_by(|a, b| a.1.total_cmp(&b.1))?;
            slot.1 -= n;
            return Some(vec![slot.0]);
        }
        let want = n.round() as usize;
        let free: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].1 >= 1.0 - EPS)
            .take(want)
            .collect();
        if free.len() < want {
            return None;
        }
        Some(
            free.into_iter()
                .map(|i| {
                    self.slots[i].1 = 0.0;
                    self.slots[i].0
                })
                .collect(),
        )
    }

    /// Takes exactly GPUs `ids` for a request of `n` (what [`take`](Self::take)
    /// handed out for it before), as far as they are free.
    pub(crate) fn hold(&mut self, ids: &[u32], n: f64) {
        let per = if n < 1.0 { n } else { 1.0 };
        for id in ids {
            if let Some(s) = self.slots.iter_mut().find(|(i, _)| i == id) {
                s.1 = (s.1 - per).max(0.0);
            }
        }
    }

    /// The GPUs with room, with how much of each is free.
    pub(crate) fn free_parts(&self) -> Vec<(u32, f64)> {
        self.slots
            .iter()
            .filter(|(_, free)| *free > EPS)
            .copied()
            .collect()
    }

    /// Gives back what [`take`](Self::take) handed out.
    pub(crate) fn give(&mut self, ids: &[u32], n: f64) {
        let per = if n < 1.0 { n } else { 1.0 };
        for id in ids {
            if let Some(s) = self.slots.iter_mut().find(|(i, _)| i == id) {
                s.1 = (s.1 + per).min(1.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_and_accounting() {
        let mut node = Resources::cpus(4.0).with_gpus(1.0).with_custom("ssd", 1.0);
        let task = Resources::cpus(2.0).with_custom("ssd", 1.0);
        assert!(task.fits_in(&node));
        node.subtract(&task);
        assert!(!task.fits_in(&node));
        assert!(!Resources::cpus(0.0).with_gpus(2.0).fits_in(&node));
        node.add(&task);
        assert!(task.fits_in(&node));
        assert!(Resources::cpus(1.0).with_gpus(1.5).validate().is_err());
        assert!(Resources::cpus(-1.0).validate().is_err());
    }

    #[test]
    fn beyond_names_each_resource_no_node_has() {
        let nodes = [
            Resources::cpus(1.0).with_memory(4 << 30),
            Resources::cpus(4.0)
                .with_memory(1 << 30)
                .with_custom("ssd", 2.0),
        ];
        let asks = |r: Resources| r.beyond(nodes.iter());
        assert!(asks(Resources::cpus(4.0)).is_empty());
        // Each fits somewhere, though no node has both: nothing is beyond.
        assert!(asks(Resources::cpus(4.0).with_memory(2 << 30)).is_empty());
        assert_eq!(
            asks(Resources::cpus(64.0)),
            vec!["64 CPU (the most on one node is 4)".to_string()]
        );
        assert_eq!(
            asks(
                Resources::cpus(1.0)
                    .with_gpus(0.5)
                    .with_custom("ssd", 3.0)
                    .with_custom("tpu", 1.0)
            ),
            vec![
                "0.5 GPU (none has any)".to_string(),
                "3 `ssd` (the most on one node is 2)".to_string(),
                "1 `tpu` (none has any)".to_string(),
            ]
        );
        assert_eq!(
            asks(Resources::cpus(1.0).with_memory(8 << 30)),
            vec![format!(
                "{} memory (the most on one node is {})",
                volley_common::format_bytes(8 << 30),
                volley_common::format_bytes(4 << 30)
            )]
        );
    }

    #[test]
    fn gpu_fractions_pack_and_whole_gpus_stay_whole() {
        let mut g = GpuSlots::new(&[0, 1]);
        assert_eq!(g.take(0.5), Some(vec![0]));
        assert_eq!(g.take(0.5), Some(vec![0]));
        assert_eq!(g.take(1.0), Some(vec![1]));
        assert_eq!(g.take(0.25), None);
        g.give(&[0], 0.5);
        assert_eq!(g.take(2.0), None);
        assert_eq!(g.take(0.25), Some(vec![0]));
    }
}
