//! The lazy [`Dataset`] API.
//!
//! A [`Dataset`] is a logical plan ([`LogicalOp`]) and the [`Context`] it will run in.
//! Building one reads at most metadata (file listings and schemas); nothing runs until
//! it is consumed (`iter_batches`, `collect`, `count`, `write_parquet`...). Then the
//! optimizer pushes projections, filters and limits into the sources, the planner fuses
//! neighbouring row-local steps into one task, and the streaming executor runs it.
//!
//! ```
//! use volley_dataset::{Context, col, lit};
//! let ctx = Context::try_default().unwrap();
//! let ds = ctx.range(1000).filter(col("id").lt(lit(10i64))).unwrap();
//! assert_eq!(ds.count().unwrap(), 10);
//! ```

mod cache_sized_aggregation;
mod conjunction;
mod context;
mod dataset;
mod decimal_arith;
mod decode_filters;
mod exchange;
mod gather_sort;
mod handover;
mod join_order;
mod logical;
mod lower;
mod operator_exprs;
mod optimizer;
mod options;
mod planner;
mod relational;
mod runner;
mod shared_subplans;
mod sql;
mod streaming_split;
mod view_compare;
mod view_strings;

pub use context::{Context, Paths};
pub use dataset::{Dataset, WriteBuilder};
pub use exchange::{SplitOutput, SHUFFLE_PARTITIONS};
pub use logical::{LogicalOp, WriteSpec};
pub use options::{Concurrency, IterOptions, JoinHow, MapOptions, SortKey};
pub use relational::{agg, GroupedDataset};
pub use runner::{ClusterRunner, LocalRunner, Runner, StageTask};
pub use sql::DatasetTable;
pub use streaming_split::{RemoteRows, SplitIterator, SplitPart};

pub use datafusion::prelude::{lit, Expr};
pub use volley_connectors::{Compression, CsvReadOptions, WriteFormat, WriteMode, WriteSummary};
pub use volley_exec::{
    ExecutionStats, NamedTransform, NamedTransformFactory, OperatorStats, StatefulTransform,
    TransformFactory, TransformFn,
};

/// A column by name. Unlike DataFusion's `col`, a dot is part of the name, not a
/// table qualifier.
pub fn col(name: impl Into<String>) -> Expr {
    Expr::Column(datafusion::common::Column::new_unqualified(name))
}
