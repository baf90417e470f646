//! Placement groups: bundles of resources reserved together, by strategy.

use std::collections::BTreeMap;

use tracing::info;

use super::*;

impl State {
    /// Why work asking for `resources` in `choice` could never run there (the group is
    /// unknown, it has no such bundle, or the bundle, or every bundle for any, is too
    /// small); `None` if it can.
    pub(super) fn bundle_refusal(
        &self,
        choice: &BundleChoice,
        resources: &Resources,
    ) -> Option<String> {
        let Some(g) = self.groups.get(&choice.group) else {
            return Some(format!("no placement group {}", choice.group));
        };
        match choice.index {
            Some(i) if i >= g.bundles.len() => Some(format!(
                "placement group {} has {} bundle(s): there is no bundle {i}",
                choice.group,
                g.bundles.len()
            )),
            Some(i) if !resources.fits_in(&g.bundles[i].total) => Some(format!(
                "asks for {resources}, more than bundle {i} of placement group {} holds ({})",
                choice.group, g.bundles[i].total
            )),
            None if !g.bundles.iter().any(|b| resources.fits_in(&b.total)) => Some(format!(
                "asks for {resources}, more than any bundle of placement group {} holds",
                choice.group
            )),
            _ => None,
        }
    }

    /// A driver asks for a placement group; it is placed (all bundles or none) as
    /// soon as the nodes have room.
    pub fn create_group(
        &mut self,
        job: &str,
        id: &str,
        strategy: Strategy,
        bundles: Vec<Resources>,
    ) -> Result<(), Refusal> {
        if bundles.is_empty() {
            return Err(Refusal::Invalid("a placement group needs bundles".into()));
        }
        for b in &bundles {
            b.validate().map_err(|e| Refusal::Invalid(e.to_string()))?;
        }
        self.require_running(job)?;
        if self.groups.contains_key(id) {
            // A driver creates a group again only to replay what a head before this
            // one knew: it is known here already.
            return Ok(());
        }
        self.groups.insert(
            id.to_string(),
            Group {
                job: job.to_string(),
                strategy,
                bundles: bundles
                    .into_iter()
                    .map(|total| BundleState {
                        available: Resources::default(),
                        total,
                        node: None,
                        gpus: GpuSlots::default(),
                        gpu_ids: vec![],
                    })
                    .collect(),
                ready: false,
                generation: 0,
            },
        );
        Ok(())
    }

    /// Where placement group `id` stands.
    pub fn group_status(&self, id: &str) -> Result<GroupStatus, Refusal> {
        let g = self
            .groups
            .get(id)
            .ok_or_else(|| Refusal::NotFound(format!("no placement group {id}")))?;
        Ok(GroupStatus {
            ready: g.ready,
            bundle_nodes: g.bundles.iter().map(|b| b.node.clone()).collect(),
        })
    }

    /// Removes placement group `id`: its actors are killed and its reservations
    /// given back.
    pub fn remove_group(&mut self, id: &str) {
        let actors: Vec<String> = self
            .actors
            .iter()
            .filter(|(_, a)| a.spec.bundle.as_ref().is_some_and(|b| b.group == id))
            .map(|(a, _)| a.clone())
            .collect();
        for a in actors {
            self.kill_actor(&a, &format!("placement group {id} was removed"));
        }
        // Its tasks not done end too: those waiting would wait for it for ever.
        let tasks: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, t)| {
                t.spec.bundle.as_ref().is_some_and(|b| b.group == id)
                    && matches!(t.state, TaskState::Pending | TaskState::Running { .. })
            })
            .map(|(t, _)| t.clone())
            .collect();
        for t in tasks {
            let report = execution_report(format!("placement group {id} was removed"));
            self.stop_task(&t, report, TaskEnd::Failed);
        }
        self.unplace_group(id);
        self.groups.remove(id);
    }

    pub(super) fn place_groups(&mut self) {
        let pending: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| !g.ready && self.job_active(&g.job))
            .map(|(id, _)| id.clone())
            .collect();
        for id in pending {
            self.try_place_group(&id);
        }
    }

    /// All bundles at once or none: simulates on a copy of what nodes have free.
    pub(super) fn try_place_group(&mut self, id: &str) {
        let g = &self.groups[id];
        let strategy = g.strategy;
        let mut free: BTreeMap<String, (Resources, GpuSlots)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.takes_work())
            .map(|(id, n)| (id.clone(), (n.available.clone(), n.gpus.clone())))
            .collect();
        let mut used: BTreeMap<String, usize> = BTreeMap::new();
        let mut placed: Vec<(String, Vec<u32>)> = Vec::new();
        let bundles: Vec<Resources> = g.bundles.iter().map(|b| b.total.clone()).collect();
        let strict_pack_node = if strategy == Strategy::StrictPack {
            let mut sum = Resources::default();
            for b in &bundles {
                sum.add(b);
            }
            match free
                .iter()
                .find(|(_, (r, gp))| sum.fits_in(r) && gpu_fit_all(gp, &bundles))
            {
                Some((n, _)) => Some(n.clone()),
                None => return,
            }
        } else {
            None
        };
        for b in &bundles {
            let mut candidates: Vec<(&String, usize)> = free
                .iter()
                .filter(|(n, (r, gp))| {
                    b.fits_in(r)
                        && gp.clone().take(b.num_gpus).is_some()
                        && strict_pack_node.as_ref().is_none_or(|s| s == *n)
                        && (strategy != Strategy::StrictSpread || !used.contains_key(*n))
                })
                .map(|(n, _)| (n, used.get(n).copied().unwrap_or(0)))
                .collect();
            match strategy {
                Strategy::Spread | Strategy::StrictSpread => candidates.sort_by_key(|(_, c)| *c),
                _ => candidates.sort_by_key(|(_, c)| std::cmp::Reverse(*c)),
            }
            let Some((node, _)) = candidates.first() else {
                return;
            };
            let node = (*node).clone();
            let (r, gp) = free.get_mut(&node).expect("candidate exists");
            r.subtract(b);
            let gpus = gp.take(b.num_gpus).expect("checked");
            *used.entry(node.clone()).or_insert(0) += 1;
            placed.push((node, gpus));
        }
        // Commit.
        let g = self.groups.get_mut(id).expect("group exists");
        for (b, (node, gpus)) in g.bundles.iter_mut().zip(placed) {
            let n = self.nodes.get_mut(&node).expect("placed on a known node");
            n.available.subtract(&b.total);
            let taken = n.gpus.take(b.total.num_gpus).unwrap_or_default();
            debug_assert_eq!(taken, gpus);
            b.node = Some(node);
            b.available = b.total.clone();
            b.gpus = GpuSlots::new(&taken);
            b.gpu_ids = taken;
        }
        g.ready = true;
        info!("placement group {id} placed");
    }

    /// Returns a group's reservations (a node of it died, or it is removed): it is
    /// placed again whole. Each node gets back what its bundle had free; what the
    /// bundle's running tasks and actors hold goes back to the node when they end (a
    /// release into a bundle of an older generation goes to the node: see
    /// [`release`](State::release)), not now, while they still use it.
    pub(super) fn unplace_group(&mut self, id: &str) {
        let Some(g) = self.groups.get_mut(id) else {
            return;
        };
        g.ready = false;
        g.generation += 1;
        let mut back = Vec::new();
        for b in &mut g.bundles {
            if let Some(node) = b.node.take() {
                let ids = std::mem::take(&mut b.gpu_ids);
                // GPUs with room: a fractional bundle's share is what it has free; a
                // whole one's, each GPU's free part.
                let gpus: Vec<(u32, f64)> = if b.total.num_gpus < 1.0 {
                    ids.iter()
                        .map(|&i| (i, b.available.num_gpus))
                        .filter(|(_, f)| *f > 0.0)
                        .collect()
                } else {
                    b.gpus.free_parts()
                };
                back.push((node, b.available.clone(), gpus));
            }
        }
        for (node, free, gpus) in back {
            if let Some(n) = self.nodes.get_mut(&node) {
                n.available.add(&free);
                for (gpu, part) in gpus {
                    n.gpus.give(&[gpu], part);
                }
            }
        }
    }
}

fn gpu_fit_all(slots: &GpuSlots, bundles: &[Resources]) -> bool {
    let mut s = slots.clone();
    bundles.iter().all(|b| s.take(b.num_gpus).is_some())
}
