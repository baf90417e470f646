//! Data-parallel training for volley.
//!
//! What is here so far are two pieces the trainer will stand on:
//! - the collective layer its ranks use to keep their gradients in step: the
//!   [`Collective`] trait and [`TcpRing`], a bucketed ring all-reduce over TCP between
//!   rank processes, and [`all_reduce_gradients`], which averages a Burn model's
//!   gradients over the group;
//! - [`CheckpointStore`]: a run's checkpoints in a local folder or an object store,
//!   committed by a manifest written last, pruned to the best `num_to_keep` and the
//!   latest.
//!
//! The trainer itself (rank actors in a placement group, dataset shards, the Burn
//! training loop, recovery) is not built yet.

mod checkpoint;
mod collective;
mod grads;

pub use checkpoint::{Checkpoint, CheckpointConfig, CheckpointStore, Order};
pub use collective::{Collective, RingConfig, TcpRing};
pub use grads::all_reduce_gradients;
