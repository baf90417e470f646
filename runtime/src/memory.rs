//! The execution memory budget.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// A byte budget shared by everything one execution buffers.
///
/// Holders take a [`MemoryReservation`] (RAII: dropping it gives the bytes back).
/// [`try_reserve`](MemoryBudget::try_reserve) fails when the budget is full;
/// [`reserve`](MemoryBudget::reserve) always succeeds and is for the one block a
/// stream must be allowed to hold so that it can make progress (the executor allows one
/// block past the limit per queue, never more). The peak is recorded for stats and tests.
pub struct MemoryBudget {
    limit: u64,
    state: Mutex<State>,
    freed: Condvar,
}

#[derive(Default)]
struct State {
    used: u64,
    peak: u64,
}

impl fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.state.lock().expect("budget lock");
        f.debug_struct("MemoryBudget")
            .field("limit", &self.limit)
            .field("used", &s.used)
            .field("peak", &s.peak)
            .finish()
    }
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            state: Mutex::new(State::default()),
            freed: Condvar::new(),
        })
    }

    /// The limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.state.lock().expect("budget lock").used
    }

    /// The most bytes ever reserved at once.
    pub fn peak(&self) -> u64 {
        self.state.lock().expect("budget lock").peak
    }

    /// Whether `bytes` more would stay within the limit.
    pub fn has_room(&self, bytes: u64) -> bool {
        self.used() + bytes <= self.limit
    }

    /// Reserves `bytes` if they fit.
    pub fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<MemoryReservation> {
        let mut s = self.state.lock().expect("budget lock");
        if s.used + bytes > self.limit && bytes > 0 {
            return None;
        }
        s.used += bytes;
        s.peak = s.peak.max(s.used);
        Some(MemoryReservation {
            budget: Arc::clone(self),
            bytes,
        })
    }

    /// Reserves `bytes` if the budget's use stays at or under `ceiling` (a share of the
    /// limit that one kind of holder may fill).
    pub fn try_reserve_under(
        self: &Arc<Self>,
        bytes: u64,
        ceiling: u64,
    ) -> Option<MemoryReservation> {
        let mut s = self.state.lock().expect("budget lock");
        if s.used + bytes > ceiling.min(self.limit) && bytes > 0 {
            return None;
        }
        s.used += bytes;
        s.peak = s.peak.max(s.used);
        Some(MemoryReservation {
            budget: Arc::clone(self),
            bytes,
        })
    }

    /// Reserves `bytes` whether or not they fit.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> MemoryReservation {
        let mut s = self.state.lock().expect("budget lock");
        s.used += bytes;
        s.peak = s.peak.max(s.used);
        MemoryReservation {
            budget: Arc::clone(self),
            bytes,
        }
    }

    /// Takes `bytes` without a [`MemoryReservation`] if they fit: for pools that keep
    /// their own books over this budget (DataFusion's operators). Give them back with
    /// [`release`](MemoryBudget::release).
    pub fn try_acquire(&self, bytes: u64) -> bool {
        let mut s = self.state.lock().expect("budget lock");
        if s.used + bytes > self.limit && bytes > 0 {
            return false;
        }
        s.used += bytes;
        s.peak = s.peak.max(s.used);
        true
    }

    /// Takes `bytes` whether or not they fit, without a [`MemoryReservation`].
    pub fn acquire(&self, bytes: u64) {
        let mut s = self.state.lock().expect("budget lock");
        s.used += bytes;
        s.peak = s.peak.max(s.used);
    }

    /// Waits until some memory is given back, or `timeout` passes.
    pub fn wait_for_release(&self, timeout: Duration) {
        let s = self.state.lock().expect("budget lock");
        let _unused = self.freed.wait_timeout(s, timeout);
    }

    /// Gives back bytes taken with [`acquire`](MemoryBudget::acquire) or
    /// [`try_acquire`](MemoryBudget::try_acquire).
    pub fn release(&self, bytes: u64) {
        let mut s = self.state.lock().expect("budget lock");
        s.used = s.used.saturating_sub(bytes);
        drop(s);
        self.freed.notify_all();
    }
}

/// Bytes held against a [`MemoryBudget`]; given back on drop.
pub struct MemoryReservation {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl MemoryReservation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl fmt::Debug for MemoryReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemoryReservation({} bytes)", self.bytes)
    }
}

impl Drop for MemoryReservation {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_release_peak() {
        let b = MemoryBudget::new(100);
        let r1 = b.try_reserve(60).unwrap();
        assert!(b.try_reserve(50).is_none());
        let r2 = b.reserve(50);
        assert_eq!(b.used(), 110);
        drop(r1);
        drop(r2);
        assert_eq!(b.used(), 0);
        assert_eq!(b.peak(), 110);
        assert!(b.try_reserve(100).is_some());
    }
}
