//! Typed configuration with dotted keys (`volley.exec.memory_limit`).

use std::path::PathBuf;

use crate::{parse_bytes, Result, VolleyError};

/// How an execution reports its progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// Progress bars when stderr is a terminal, one summary line per operator otherwise.
    #[default]
    Auto,
    /// Always progress bars.
    Bars,
    /// Always one summary line per operator, at the end.
    Lines,
    /// Nothing.
    Off,
}

/// The most rows per batch a reader or a query makes (`volley.exec.batch_size`,
/// `datafusion.execution.batch_size`). DataFusion's operators reserve room for a whole
/// batch up front (an aggregation's output, a join's indices), outside any budget: a
/// trillion rows asked for 8 TB at once and ended the process.
pub const MAX_BATCH_SIZE: usize = 1 << 20;

/// The most partitions a query plan runs in, in one process
/// (`volley.exec.target_partitions`, `datafusion.execution.target_partitions`). A hash
/// exchange gives each batch it splits a list of row indices per output partition,
/// outside any budget: 100,000 partitions filled this machine's 24 GiB grouping
/// 20,000 rows.
pub const MAX_TARGET_PARTITIONS: usize = 1024;

/// The most partitions (or parts) an exchange or a split makes
/// (`volley.exec.shuffle_partitions`, `repartition(n)`): each holds buffers and
/// bookkeeping of its own (a map task splits its rows into a list per partition, its
/// output's index holds an offset per partition), so more than this is a mistake, not
/// a plan.
pub const MAX_EXCHANGE_PARTITIONS: usize = 1 << 20;

/// Options of the streaming executor (`volley.exec.*`).
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// `volley.exec.memory_limit`: bytes that buffered blocks may take in all. `None`
    /// means a quarter of the machine's memory.
    pub memory_limit: Option<u64>,
    /// `volley.exec.batch_size`: rows per batch produced by readers.
    pub batch_size: usize,
    /// `volley.exec.preserve_order`: deliver blocks in the order of the input (file
    /// order, then row order) instead of the order they finish in.
    pub preserve_order: bool,
    /// `volley.exec.progress`: progress reporting.
    pub progress: ProgressMode,
    /// `volley.exec.max_tasks_per_operator`: tasks of one operator running at once.
    /// `None` means the number of CPUs.
    pub max_tasks_per_operator: Option<usize>,
    /// `volley.exec.spill_dir`: where operators that spill write their files.
    pub spill_dir: Option<PathBuf>,
    /// `volley.exec.object_store_limit`: on a cluster, bytes that one execution's blocks
    /// may fill in the nodes' object stores: blocks queued between stages, waiting for
    /// an actor or read by running work, and room for running work's output. `None`
    /// means half of what the live nodes keep in memory.
    pub object_store_limit: Option<u64>,
    /// `volley.exec.shuffle_partitions`: on a cluster, the partitions (reduce tasks) of
    /// a sort, aggregation, distinct or join. `None` means twice the cluster's CPUs, at
    /// least 8: more partitions make each reduce task's share smaller (it is read into
    /// one worker's memory, and its operator spills past that worker's budget). A SQL
    /// query whose files hold at most 256 MiB per CPU gets one partition per CPU: each
    /// of its stages then runs in one wave of tasks.
    pub shuffle_partitions: Option<usize>,
    /// `volley.exec.broadcast_join_bytes`: on a cluster, an inner, left, semi or anti
    /// join whose right side (measured in the nodes' stores once it is all made) is at
    /// most this big sends the whole right side to one task per left block instead of
    /// partitioning both sides: the left side is not partitioned. In SQL, a join side
    /// estimated below it from the files' statistics (or below one row per 8 bytes of
    /// it, where sizes are unknown) is collected once and read whole by every task of
    /// the join. `0` turns it off.
    pub broadcast_join_bytes: u64,
    /// `volley.exec.target_partitions`: the partitions a query plan runs in, in one
    /// process (each a pipeline the I/O runtime's threads take turns at). `None`
    /// means one and a half per CPU, rounded up: a pipeline waits now and then (for
    /// a read, for another partition's rows, for a join's build side), and a
    /// partition more than there are threads keeps them busy meanwhile.
    pub target_partitions: Option<usize>,
}

impl Default for ExecOptions {
    fn default() -> Self {
        Self {
            memory_limit: None,
            batch_size: 8192,
            preserve_order: false,
            progress: ProgressMode::Auto,
            max_tasks_per_operator: None,
            spill_dir: None,
            object_store_limit: None,
            shuffle_partitions: None,
            broadcast_join_bytes: 10 << 20,
            target_partitions: None,
        }
    }
}

/// Options of file readers (`volley.read.*`).
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// `volley.read.split_bytes`: target bytes of one read task; larger Parquet files are
    /// split by row groups into several tasks.
    pub split_bytes: u64,
    /// `volley.read.pushdown_filters`: let a Parquet scan that a join's or a top-k's
    /// dynamic filter reaches test that filter while decoding (late materialization),
    /// for as long as it leaves few rows; the query's own filters run after decoding. `false`: every scan filters after
    /// decoding, except a scan on a cluster's node whose plan runs in the driver (what
    /// its filter drops would travel).
    pub pushdown_filters: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            split_bytes: 64 << 20,
            pushdown_filters: true,
        }
    }
}

/// Options of query planning (`volley.plan.*`).
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// `volley.plan.reorder_joins`: join the tables of a query's inner joins in the
    /// order of least estimated work (the rows each join makes, estimated from the
    /// files' statistics). `false` joins them in the order the query names them, as
    /// DataFusion does; each join's build side is still chosen by size.
    pub reorder_joins: bool,
    /// `volley.plan.gather_sorts`: a whole-row sort by one key of a fixed-width type
    /// keeps its rows in memory and builds each output batch from them once
    /// (falling back to DataFusion's spilling sort where the budget runs out).
    /// `false` sorts with DataFusion's sort and merge.
    pub gather_sorts: bool,
    /// `volley.plan.cache_sized_aggregations`: an aggregation of many groups keeps
    /// them in hash tables small enough for the CPU's caches: its partial phase runs
    /// afresh over chunks of its input where its rows' groups come together, and its
    /// final phase runs in finer hash partitions, one after another. `false` runs
    /// DataFusion's aggregation as planned. Not used on a cluster.
    pub cache_sized_aggregations: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            reorder_joins: true,
            gather_sorts: true,
            cache_sized_aggregations: true,
        }
    }
}

/// Resources of the local runtime (`volley.runtime.*`).
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    /// `volley.runtime.num_cpus`: CPUs tasks may use. `None` means all of the machine's.
    pub num_cpus: Option<f64>,
    /// `volley.runtime.memory`: memory tasks may reserve. `None` means the machine's.
    pub memory: Option<u64>,
}

/// All of volley's options.
///
/// ```
/// use volley_common::VolleyConfig;
/// let mut config = VolleyConfig::default();
/// config.set("volley.exec.memory_limit", "512MiB").unwrap();
/// assert_eq!(config.exec.memory_limit, Some(512 << 20));
/// assert!(config.set("volley.exec.nope", "1").is_err());
/// ```
#[derive(Debug, Clone, Default)]
pub struct VolleyConfig {
    /// Executor options.
    pub exec: ExecOptions,
    /// Reader options.
    pub read: ReadOptions,
    /// Planning options.
    pub plan: PlanOptions,
    /// Runtime options.
    pub runtime: RuntimeOptions,
}

/// The value of the environment variable `name`: `None` when it is unset or empty (an
/// empty variable means unset, as a shell's `VAR=` intends), an error naming it when its
/// value is not Unicode.
pub fn env_var(name: &str) -> Result<Option<String>> {
    match std::env::var(name) {
        Ok(v) if v.is_empty() => Ok(None),
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(VolleyError::Config(format!(
            "the environment variable {name} is not valid Unicode"
        ))),
    }
}

/// Every key [`VolleyConfig::set`] takes, with the environment variable that sets it.
const KEYS: &[(&str, &str)] = &[
    ("volley.exec.memory_limit", "VOLLEY_EXEC_MEMORY_LIMIT"),
    ("volley.exec.batch_size", "VOLLEY_EXEC_BATCH_SIZE"),
    ("volley.exec.preserve_order", "VOLLEY_EXEC_PRESERVE_ORDER"),
    ("volley.exec.progress", "VOLLEY_EXEC_PROGRESS"),
    (
        "volley.exec.max_tasks_per_operator",
        "VOLLEY_EXEC_MAX_TASKS_PER_OPERATOR",
    ),
    ("volley.exec.spill_dir", "VOLLEY_EXEC_SPILL_DIR"),
    (
        "volley.exec.object_store_limit",
        "VOLLEY_EXEC_OBJECT_STORE_LIMIT",
    ),
    (
        "volley.exec.shuffle_partitions",
        "VOLLEY_EXEC_SHUFFLE_PARTITIONS",
    ),
    (
        "volley.exec.broadcast_join_bytes",
        "VOLLEY_EXEC_BROADCAST_JOIN_BYTES",
    ),
    (
        "volley.exec.target_partitions",
        "VOLLEY_EXEC_TARGET_PARTITIONS",
    ),
    ("volley.read.split_bytes", "VOLLEY_READ_SPLIT_BYTES"),
    (
        "volley.read.pushdown_filters",
        "VOLLEY_READ_PUSHDOWN_FILTERS",
    ),
    ("volley.plan.reorder_joins", "VOLLEY_PLAN_REORDER_JOINS"),
    ("volley.plan.gather_sorts", "VOLLEY_PLAN_GATHER_SORTS"),
    (
        "volley.plan.cache_sized_aggregations",
        "VOLLEY_PLAN_CACHE_SIZED_AGGREGATIONS",
    ),
    ("volley.runtime.num_cpus", "VOLLEY_RUNTIME_NUM_CPUS"),
    ("volley.runtime.memory", "VOLLEY_RUNTIME_MEMORY"),
];

/// The most CPUs a process's runtime may be given (`volley.runtime.num_cpus`): more
/// than any machine has, few enough to size thread pools with.
const MAX_CPUS: f64 = 65536.0;

impl VolleyConfig {
    /// The defaults, overridden by any `VOLLEY_*` environment variable set (the key in
    /// upper case with dots as underscores: `VOLLEY_EXEC_MEMORY_LIMIT=1GiB`).
    pub fn from_env() -> Result<Self> {
        let mut config = Self::default();
        for (key, var) in KEYS {
            if let Some(value) = env_var(var)? {
                config.set(key, &value).map_err(|e| e.context(var))?;
            }
        }
        Ok(config)
    }

    /// Checks the counts a struct literal may set past what [`set`](Self::set) accepts
    /// (rows per batch, target and shuffle partitions), with `set`'s errors.
    pub fn validate(&self) -> Result<()> {
        let mut checked = Self::default();
        checked.set("volley.exec.batch_size", &self.exec.batch_size.to_string())?;
        if let Some(n) = self.exec.target_partitions {
            checked.set("volley.exec.target_partitions", &n.to_string())?;
        }
        if let Some(n) = self.exec.shuffle_partitions {
            checked.set("volley.exec.shuffle_partitions", &n.to_string())?;
        }
        Ok(())
    }

    /// Sets one option by its dotted key.
    ///
    /// Every value is checked here, so an error names the option and the value.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let bad = |what: &str| VolleyError::Config(format!("{key} = `{value}`: expected {what}"));
        let parse_bool = |v: &str| match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(bad("true or false")),
        };
        // A byte size above 0 (`512MiB`): a budget or size of 0 would make every
        // query crawl or fail without saying why.
        let positive_bytes = || match parse_bytes(value) {
            Ok(0) => Err(bad("a byte size above 0")),
            Ok(n) => Ok(n),
            Err(_) => Err(bad("a byte size (like 512MiB)")),
        };
        // A count from 1 to `most` (rows, partitions): more would size buffers past
        // memory.
        let count = |what: &str, most: usize| {
            value
                .parse()
                .ok()
                .filter(|n| (1..=most).contains(n))
                .ok_or_else(|| bad(&format!("a {what} from 1 to {most}")))
        };
        match key {
            "volley.exec.memory_limit" => {
                self.exec.memory_limit = Some(positive_bytes()?);
            }
            "volley.exec.batch_size" => {
                self.exec.batch_size = count("row count", MAX_BATCH_SIZE)?;
            }
            "volley.exec.preserve_order" => self.exec.preserve_order = parse_bool(value)?,
            "volley.exec.progress" => {
                self.exec.progress = match value.to_ascii_lowercase().as_str() {
                    "auto" => ProgressMode::Auto,
                    "bars" => ProgressMode::Bars,
                    "lines" => ProgressMode::Lines,
                    "off" | "none" => ProgressMode::Off,
                    _ => return Err(bad("auto, bars, lines or off")),
                }
            }
            "volley.exec.max_tasks_per_operator" => {
                let n: usize = value.parse().map_err(|_| bad("a task count"))?;
                if n == 0 {
                    return Err(bad("a task count above 0"));
                }
                self.exec.max_tasks_per_operator = Some(n);
            }
            "volley.exec.spill_dir" => self.exec.spill_dir = Some(PathBuf::from(value)),
            "volley.exec.object_store_limit" => {
                self.exec.object_store_limit = Some(positive_bytes()?)
            }
            "volley.exec.shuffle_partitions" => {
                self.exec.shuffle_partitions =
                    Some(count("partition count", MAX_EXCHANGE_PARTITIONS)?);
            }
            "volley.exec.broadcast_join_bytes" => {
                self.exec.broadcast_join_bytes =
                    parse_bytes(value).map_err(|_| bad("a byte size (like 64MiB)"))?
            }
            "volley.exec.target_partitions" => {
                self.exec.target_partitions =
                    Some(count("partition count", MAX_TARGET_PARTITIONS)?);
            }
            "volley.read.split_bytes" => self.read.split_bytes = positive_bytes()?,
            "volley.read.pushdown_filters" => self.read.pushdown_filters = parse_bool(value)?,
            "volley.plan.reorder_joins" => self.plan.reorder_joins = parse_bool(value)?,
            "volley.plan.gather_sorts" => self.plan.gather_sorts = parse_bool(value)?,
            "volley.plan.cache_sized_aggregations" => {
                self.plan.cache_sized_aggregations = parse_bool(value)?
            }
            "volley.runtime.num_cpus" => {
                let n: f64 = value.parse().map_err(|_| bad("a number of CPUs"))?;
                if !(n > 0.0 && n <= MAX_CPUS) {
                    return Err(bad(&format!(
                        "a number of CPUs above 0, at most {MAX_CPUS}"
                    )));
                }
                self.runtime.num_cpus = Some(n);
            }
            "volley.runtime.memory" => self.runtime.memory = Some(positive_bytes()?),
            _ => {
                let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
                return Err(VolleyError::Config(format!(
                    "unknown option `{key}`; known options: {}",
                    known.join(", ")
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_reject() {
        let mut c = VolleyConfig::default();
        c.set("volley.exec.preserve_order", "true").unwrap();
        assert!(c.exec.preserve_order);
        c.set("volley.exec.progress", "off").unwrap();
        assert_eq!(c.exec.progress, ProgressMode::Off);
        let err = c.set("volley.exec.batch_size", "zero").unwrap_err();
        assert!(err.to_string().contains("volley.exec.batch_size"));
        assert!(c.set("volley.runtime.num_cpus", "-1").is_err());
        c.set("volley.exec.target_partitions", "6").unwrap();
        assert_eq!(c.exec.target_partitions, Some(6));
        let err = c.set("volley.exec.target_partitions", "0").unwrap_err();
        assert!(err.to_string().contains("from 1 to 1024"), "{err}");
        // Values that would size a thread pool past memory, or a budget of nothing.
        for (key, value) in [
            ("volley.runtime.num_cpus", "inf"),
            ("volley.runtime.num_cpus", "1e300"),
            ("volley.runtime.num_cpus", "NaN"),
            ("volley.runtime.memory", "0"),
            ("volley.exec.object_store_limit", "0"),
            ("volley.read.split_bytes", "0"),
            ("volley.exec.max_tasks_per_operator", "0"),
            ("volley.exec.memory_limit", "lots"),
            // Room reserved by them outside the budget: 8 TB, 24 GiB.
            ("volley.exec.batch_size", "1000000000000"),
            ("volley.exec.target_partitions", "100000"),
            ("volley.exec.shuffle_partitions", "1000000000"),
        ] {
            let err = c.set(key, value).unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains(value),
                "{key} = {value}: {err}"
            );
        }
        // Set in a struct literal: the same checks.
        c.exec.batch_size = MAX_BATCH_SIZE + 1;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("volley.exec.batch_size = `1048577`"), "{err}");
        c.exec.batch_size = MAX_BATCH_SIZE;
        c.exec.target_partitions = Some(MAX_TARGET_PARTITIONS);
        c.validate().unwrap();
    }
}
