//! Data-parallel training for volley.
//!
//! What is here so far is the collective layer the trainer's ranks will use to keep
//! their gradients in step: the [`Collective`] trait and [`TcpRing`], a bucketed ring
//! all-reduce over TCP between rank processes. The trainer itself (rank actors in a
//! placement group, dataset shards, checkpoints, recovery) is not built yet.

mod collective;

pub use collective::{Collective, RingConfig, TcpRing};
