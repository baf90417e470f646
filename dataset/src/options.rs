//! Options of Dataset operations. They live below [`Dataset`](crate::Dataset) (the
//! logical plan and the runners use them without depending on the API type).

use std::collections::BTreeMap;
use std::fmt;

use datafusion::common::JoinType;
use datafusion::logical_expr::{Expr, SortExpr};
use volley_common::{Result, VolleyError};

use crate::col;

/// How many workers a stateful stage runs: a fixed number, or a range the pool moves in
/// (it grows while blocks wait for a free worker and every worker is busy, and lets idle
/// workers go down to the minimum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    /// Exactly this many.
    Fixed(usize),
    /// Between `min` (started at once) and `max`.
    Range {
        /// At least (and at the start).
        min: usize,
        /// At most.
        max: usize,
    },
}

impl Concurrency {
    /// `(min, max)`.
    pub fn bounds(&self) -> (usize, usize) {
        match *self {
            Concurrency::Fixed(n) => (n, n),
            Concurrency::Range { min, max } => (min, max),
        }
    }
}

/// Options of `map_batches` and `map_batches_stateful`: rows per call, what each task or
/// worker holds, and how many run.
#[derive(Debug, Clone)]
pub struct MapOptions {
    /// Rows per call: every call gets this many but a task's last; a stateful
    /// worker's calls carry rows over from block to block, so only the stream's last
    /// is short (on a cluster, the last of each bundle of blocks a worker is sent).
    /// `None` passes blocks as they come.
    pub batch_size: Option<usize>,
    /// CPUs each task (or worker) holds.
    pub num_cpus: f64,
    /// GPUs each task or worker holds; below 1 several share a GPU. A worker holding
    /// GPUs sees them as its only devices (`CUDA_VISIBLE_DEVICES`). Only a cluster has
    /// GPUs to give.
    pub num_gpus: f64,
    /// Bytes of memory each task or worker reserves (on a cluster: accounted, not
    /// enforced).
    pub memory: u64,
    /// Custom resources each task or worker holds (a cluster node's `--resource`).
    pub custom: BTreeMap<String, f64>,
    /// Tasks at once (stateless) or workers (stateful); `None`: as many as fit
    /// (stateless), 1 (stateful).
    pub concurrency: Option<Concurrency>,
    /// Blocks a stateful worker on a cluster holds at once (the next ones arrive while
    /// it works on the current one).
    pub max_calls_in_flight: usize,
}

impl Default for MapOptions {
    fn default() -> Self {
        Self {
            batch_size: None,
            num_cpus: 1.0,
            num_gpus: 0.0,
            memory: 0,
            custom: BTreeMap::new(),
            concurrency: None,
            max_calls_in_flight: 2,
        }
    }
}

impl MapOptions {
    /// Rows per call.
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = Some(n.max(1));
        self
    }
    /// CPUs per task or worker.
    pub fn with_num_cpus(mut self, n: f64) -> Self {
        self.num_cpus = n;
        self
    }
    /// GPUs per task or worker (fractions share a GPU).
    pub fn with_num_gpus(mut self, n: f64) -> Self {
        self.num_gpus = n;
        self
    }
    /// Memory per task or worker.
    pub fn with_memory(mut self, bytes: u64) -> Self {
        self.memory = bytes;
        self
    }
    /// A custom resource per task or worker.
    pub fn with_resource(mut self, name: impl Into<String>, amount: f64) -> Self {
        self.custom.insert(name.into(), amount);
        self
    }
    /// `n` workers of a stateful stage; for a stateless one, at most `n` tasks at once
    /// (and at most `volley.exec.max_tasks_per_operator`, by default the CPUs).
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = Some(Concurrency::Fixed(n.max(1)));
        self
    }
    /// Between `min` and `max` workers (a stateful stage's pool scales in this range).
    pub fn with_concurrency_range(mut self, min: usize, max: usize) -> Self {
        let min = min.max(1);
        self.concurrency = Some(Concurrency::Range {
            min,
            max: max.max(min),
        });
        self
    }
    /// Blocks a stateful worker on a cluster holds at once.
    pub fn with_max_calls_in_flight(mut self, n: usize) -> Self {
        self.max_calls_in_flight = n.max(1);
        self
    }

    /// Whether it asks for more than CPUs and memory (what only a cluster gives).
    pub(crate) fn wants_cluster_resources(&self) -> bool {
        self.num_gpus > 0.0 || !self.custom.is_empty()
    }
}

impl fmt::Display for MapOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "(cpus={}", self.num_cpus)?;
        if self.num_gpus > 0.0 {
            write!(f, ", gpus={}", self.num_gpus)?;
        }
        if self.memory > 0 {
            write!(f, ", memory={}", volley_common::format_bytes(self.memory))?;
        }
        for (k, v) in &self.custom {
            write!(f, ", {k}={v}")?;
        }
        if let Some(b) = self.batch_size {
            write!(f, ", batch_size={b}")?;
        }
        match self.concurrency {
            Some(Concurrency::Fixed(c)) => write!(f, ", concurrency={c}")?,
            Some(Concurrency::Range { min, max }) => write!(f, ", concurrency={min}..{max}")?,
            None => {}
        }
        write!(f, ")")
    }
}

/// Options of [`Dataset::iter_batches_with`](crate::Dataset::iter_batches_with).
#[derive(Debug, Clone, Default)]
pub struct IterOptions {
    /// Rows per batch (the last may have fewer); `None` yields blocks as they come.
    pub batch_size: Option<usize>,
    /// Batches a background thread prepares ahead of the consumer (0: none; at most
    /// 4,096).
    pub prefetch: usize,
}

/// One key of [`Dataset::sort`](crate::Dataset::sort): a column, its direction and where nulls go.
///
/// Ascending with nulls last unless told otherwise (DuckDB's and DataFusion's SQL
/// default for `ORDER BY x`). A `&str` converts to an ascending key.
#[derive(Debug, Clone)]
pub struct SortKey {
    /// What to sort by: a column or any expression over the columns.
    pub expr: Expr,
    /// Largest first.
    pub descending: bool,
    /// Nulls before every value.
    pub nulls_first: bool,
}

impl SortKey {
    /// Ascending by `column`, nulls last.
    pub fn asc(column: &str) -> Self {
        Self {
            expr: col(column),
            descending: false,
            nulls_first: false,
        }
    }

    /// Descending by `column`, nulls last.
    pub fn desc(column: &str) -> Self {
        Self {
            descending: true,
            ..Self::asc(column)
        }
    }

    /// By an expression, ascending, nulls last.
    pub fn expr(expr: Expr) -> Self {
        Self {
            expr,
            descending: false,
            nulls_first: false,
        }
    }

    /// Puts nulls first.
    pub fn nulls_first(mut self) -> Self {
        self.nulls_first = true;
        self
    }

    /// Puts nulls last.
    pub fn nulls_last(mut self) -> Self {
        self.nulls_first = false;
        self
    }

    pub(crate) fn to_sort_expr(&self) -> SortExpr {
        SortExpr::new(self.expr.clone(), !self.descending, self.nulls_first)
    }
}

impl From<&str> for SortKey {
    fn from(column: &str) -> Self {
        SortKey::asc(column)
    }
}

impl From<String> for SortKey {
    fn from(column: String) -> Self {
        SortKey::asc(&column)
    }
}

/// How [`Dataset::join`](crate::Dataset::join) matches rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum JoinHow {
    /// Matching pairs only.
    Inner,
    /// Every left row; right columns null where nothing matched.
    Left,
    /// Every right row; left columns null where nothing matched.
    Right,
    /// Every row of both sides.
    Full,
    /// Left rows that have a match (left columns only).
    Semi,
    /// Left rows that have no match (left columns only).
    Anti,
}

impl fmt::Display for JoinHow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            JoinHow::Inner => "inner",
            JoinHow::Left => "left",
            JoinHow::Right => "right",
            JoinHow::Full => "full",
            JoinHow::Semi => "semi",
            JoinHow::Anti => "anti",
        };
        f.write_str(s)
    }
}

impl std::str::FromStr for JoinHow {
    type Err = VolleyError;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "inner" => JoinHow::Inner,
            "left" | "left_outer" => JoinHow::Left,
            "right" | "right_outer" => JoinHow::Right,
            "full" | "outer" | "full_outer" => JoinHow::Full,
            "semi" | "left_semi" => JoinHow::Semi,
            "anti" | "left_anti" => JoinHow::Anti,
            other => {
                return Err(VolleyError::plan(format!(
                    "unknown join type `{other}` (inner, left, right, full, semi, anti)"
                )))
            }
        })
    }
}

impl JoinHow {
    pub(crate) fn join_type(self) -> JoinType {
        match self {
            JoinHow::Inner => JoinType::Inner,
            JoinHow::Left => JoinType::Left,
            JoinHow::Right => JoinType::Right,
            JoinHow::Full => JoinType::Full,
            JoinHow::Semi => JoinType::LeftSemi,
            JoinHow::Anti => JoinType::LeftAnti,
        }
    }
}
