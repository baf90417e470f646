//! Physical operators and the streaming executor.
//!
//! A [`PhysicalPlan`] is a tree of operators: [`ReadExec`] (read tasks with fused
//! steps), [`MapExec`] (a task pool over bundles of blocks), [`ActorMapExec`] (stateful
//! workers), [`LimitExec`] and [`UnionExec`]. [`execute`] runs it with one scheduling
//! loop over bounded, memory-budgeted queues and returns an [`ExecutionStream`] of
//! Arrow batches.

mod driver;
mod exchange;
mod input_source;
mod memory_pool;
mod memory_source;
mod operator;
mod plan;
mod pool_worker;
mod progress;
mod queue;
mod stats;
mod step;
mod store_budget;
mod transform;
mod watch;

pub use driver::{execute, ExecContext, ExecutionStream};
pub use exchange::{
    group_by_partition, hash_partitions, partition_order, random_partitions, shuffle_partition,
    ExchangeStore, FrozenStore, Partitioning,
};
pub use input_source::{InputStreamPartition, InputStreamSource};
pub use memory_pool::BudgetMemoryPool;
pub use memory_source::{project_batch, MemorySource, RangeSource};
pub use plan::{
    bundle_sequence, bundle_task_name, ActorMapExec, ClusterActorPoolExec, ClusterExchangeExec,
    ClusterMapExec, ClusterReadExec, ClusterRows, ClusterRowsExec, ExchangeWork, LimitExec,
    MapExec, PhysicalPlan, PoolSize, ReadExec, ReadTasks, RowsPiece, SampledTasks, UnionExec,
    WriteTarget,
};
pub use pool_worker::PoolWorker;
pub use queue::{Block, RemoteBlock};
pub use stats::{ExecutionStats, OperatorStats};
pub use step::{
    compile_expr, output_schema, ExprRewrite, ExprRewrites, LazyStep, Step, StepRunner,
};
pub use transform::{
    guard, Bundles, NamedTransform, NamedTransformFactory, PredicateFn, StatefulTransform,
    TransformFactory, TransformFn,
};

/// Re-exported for `#[typetag::serde]` on user transforms.
pub use typetag;
