//! DataFusion's operators (sort, aggregation, join) on volley's memory budget.
//!
//! One budget covers an execution: the blocks queued between volley's operators and
//! the buffers of DataFusion's operators take bytes from the same [`MemoryBudget`], so
//! a sort that runs while a scan is filling its queues spills earlier instead of the
//! two together going past the limit.

use std::fmt;
use std::sync::{Arc, Mutex};

use datafusion::common::{DataFusionError, Result};
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use volley_common::format_bytes;
use volley_runtime::MemoryBudget;

/// A DataFusion [`MemoryPool`] that takes its bytes from a volley [`MemoryBudget`].
///
/// Spilling consumers (external sort, spilling aggregation) share what the budget has
/// left fairly, as DataFusion's `FairSpillPool` does: each may hold at most its share of
/// three quarters of the budget minus what non-spilling holders (volley's queues,
/// hash-join build sides, merge buffers) have taken, and is refused (so it spills)
/// before the budget is full. Non-spilling consumers are refused only when the budget
/// itself is full.
pub struct BudgetMemoryPool {
    budget: Arc<MemoryBudget>,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    spillers: usize,
    spillable: u64,
    unspillable: u64,
}

impl BudgetMemoryPool {
    /// A pool over `budget`.
    pub fn new(budget: Arc<MemoryBudget>) -> Self {
        Self {
            budget,
            state: Mutex::new(PoolState::default()),
        }
    }

    fn refuse(
        &self,
        s: &PoolState,
        reservation: &MemoryReservation,
        additional: usize,
        available: u64,
    ) -> DataFusionError {
        let used = self.budget.used();
        DataFusionError::ResourcesExhausted(format!(
            "{} could not take {} more (holds {}); {} available of the {} memory budget, \
             which holds {}: {} in spilling operators, {} in other operators, {} in queued \
             blocks (set volley.exec.memory_limit or --memory-limit to raise it)",
            reservation.consumer().name(),
            format_bytes(additional as u64),
            format_bytes(reservation.size() as u64),
            format_bytes(available),
            format_bytes(self.budget.limit()),
            format_bytes(used),
            format_bytes(s.spillable),
            format_bytes(s.unspillable),
            format_bytes(used.saturating_sub(s.spillable + s.unspillable)),
        ))
    }
}

impl fmt::Debug for BudgetMemoryPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BudgetMemoryPool")
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for BudgetMemoryPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "volley budget ({} limit)",
            format_bytes(self.budget.limit())
        )
    }
}

impl MemoryPool for BudgetMemoryPool {
    fn name(&self) -> &str {
        "volley-budget"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        if consumer.can_spill() {
            self.state.lock().expect("pool lock").spillers += 1;
        }
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        if consumer.can_spill() {
            let mut s = self.state.lock().expect("pool lock");
            s.spillers = s.spillers.saturating_sub(1);
        }
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        let mut s = self.state.lock().expect("pool lock");
        if reservation.consumer().can_spill() {
            s.spillable += additional as u64;
        } else {
            s.unspillable += additional as u64;
        }
        self.budget.acquire(additional as u64);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        let mut s = self.state.lock().expect("pool lock");
        if reservation.consumer().can_spill() {
            s.spillable = s.spillable.saturating_sub(shrink as u64);
        } else {
            s.unspillable = s.unspillable.saturating_sub(shrink as u64);
        }
        self.budget.release(shrink as u64);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let mut s = self.state.lock().expect("pool lock");
        let add = additional as u64;
        if reservation.consumer().can_spill() {
            // Everything in the budget that is not a spiller's is fixed for now.
            let fixed = self.budget.used().saturating_sub(s.spillable);
            // Spillers share half of what is left, which keeps room for the
            // working memory of their own merges (unspillable, taken as they go).
            let spillable_room = self.budget.limit().saturating_sub(fixed) / 2;
            let share = spillable_room / s.spillers.max(1) as u64;
            // A spiller that holds nothing may take what it asks while the budget has
            // room: it cannot spill its way out of needing one batch.
            let over_share = reservation.size() > 0 && reservation.size() as u64 + add > share;
            if over_share || !self.budget.try_acquire(add) {
                return Err(self.refuse(
                    &s,
                    reservation,
                    additional,
                    share.saturating_sub(reservation.size() as u64),
                ));
            }
            s.spillable += add;
        } else {
            if !self.budget.try_acquire(add) {
                let free = self.budget.limit().saturating_sub(self.budget.used());
                return Err(self.refuse(&s, reservation, additional, free));
            }
            s.unspillable += add;
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        let s = self.state.lock().expect("pool lock");
        (s.spillable + s.unspillable) as usize
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.budget.limit() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spillers_share_what_the_queues_leave() {
        let budget = MemoryBudget::new(1000);
        let pool: Arc<dyn MemoryPool> = Arc::new(BudgetMemoryPool::new(Arc::clone(&budget)));
        let queued = budget.reserve(400); // a volley queue holds 400
        let a = MemoryConsumer::new("sort a")
            .with_can_spill(true)
            .register(&pool);
        let b = MemoryConsumer::new("sort b")
            .with_can_spill(true)
            .register(&pool);
        // two spillers share half of the 600 left: 150 each
        a.try_grow(150).unwrap();
        assert!(a.try_grow(1).is_err());
        b.try_grow(100).unwrap();
        assert_eq!(budget.used(), 650);
        drop(queued);
        // the queue gave its bytes back: shares are 1000 / 2 / 2 = 250
        a.try_grow(100).unwrap();
        assert!(a.try_grow(1).is_err());
        let build = MemoryConsumer::new("hash join").register(&pool);
        assert!(build.try_grow(700).is_err(), "only 650 are left");
        build.try_grow(650).unwrap();
        assert_eq!(budget.used(), 1000);
        // a spiller holding nothing gets one batch while the budget has room
        drop(build);
        let c = MemoryConsumer::new("sort c")
            .with_can_spill(true)
            .register(&pool);
        c.try_grow(400).unwrap();
        drop(a);
        drop(b);
        drop(c);
        assert_eq!(budget.used(), 0);
        assert_eq!(pool.reserved(), 0);
    }
}
