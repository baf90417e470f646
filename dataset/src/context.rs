//! The context a dataset runs in.

use std::sync::{Arc, Mutex, OnceLock};

use datafusion::catalog::TableProvider;

use arrow::array::RecordBatch;
use datafusion::execution::context::SessionState;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::optimizer::OptimizerRule;
use datafusion::prelude::SessionConfig;
use volley_common::{Result, VolleyConfig};
use volley_connectors::{
    BinaryScan, CsvReadOptions, DataSource, FileFormatKind, FileScan, TextScan,
    VolleyObjectStoreRegistry,
};
use volley_exec::{BudgetMemoryPool, ExecContext, MemorySource, RangeSource};
use volley_runtime::{LocalRuntime, MemoryBudget, Runtime};

use crate::dataset::Dataset;
use crate::logical::LogicalOp;
use crate::runner::{ClusterRunner, LocalRunner, Runner};

/// One path or several: `"data/"`, `"data/*.parquet"`, `vec!["a.csv", "b.csv"]`.
#[derive(Debug, Clone)]
pub struct Paths(pub Vec<String>);

impl From<&str> for Paths {
    fn from(p: &str) -> Self {
        Paths(vec![p.to_string()])
    }
}
impl From<String> for Paths {
    fn from(p: String) -> Self {
        Paths(vec![p])
    }
}
impl From<&String> for Paths {
    fn from(p: &String) -> Self {
        Paths(vec![p.clone()])
    }
}
impl From<&std::path::Path> for Paths {
    fn from(p: &std::path::Path) -> Self {
        Paths(vec![p.to_string_lossy().to_string()])
    }
}
impl From<std::path::PathBuf> for Paths {
    fn from(p: std::path::PathBuf) -> Self {
        Paths(vec![p.to_string_lossy().to_string()])
    }
}
impl<S: AsRef<str>> From<Vec<S>> for Paths {
    fn from(p: Vec<S>) -> Self {
        Paths(p.iter().map(|s| s.as_ref().to_string()).collect())
    }
}
impl<S: AsRef<str>, const N: usize> From<[S; N]> for Paths {
    fn from(p: [S; N]) -> Self {
        Paths(p.iter().map(|s| s.as_ref().to_string()).collect())
    }
}

/// A table registered for SQL, by name.
type NamedTable = (String, Arc<dyn TableProvider>);

/// The memory budget per CPU from which a hash join indexes keys that fill as little
/// as 5% of their range in an array (see `Context::with_runtime`): there the array's
/// extra bytes per row are small against what the budget holds.
const SPARSE_KEY_ARRAY_BUDGET_PER_CPU: u64 = 1 << 30;

/// The partitions a plan runs in on `cpus` CPUs unless `volley.exec.target_partitions`
/// says otherwise: one and a half per CPU, rounded up.
///
/// DataFusion runs each partition's pipeline as a task on the I/O runtime, which has
/// one thread per CPU. A pipeline stops now and then: it waits for a read, for rows
/// another partition's task repartitions to it, for a join's build side. With one
/// partition per thread, the thread of a waiting pipeline has nothing else to run.
/// On 2 CPUs the 22 TPC-H queries (SF1) used 1.63 cores on average in 2 partitions,
/// and took 3-8% less time in 3 (4 gained no more). Whole-row sorts and plans that
/// exchange no rows keep one partition per CPU (`PlanSource::local_plan`).
pub(crate) fn default_partitions(cpus: usize) -> usize {
    (cpus * 3).div_ceil(2).max(1)
}

/// The options, runtime and DataFusion session that datasets run with. Cheap to clone.
///
/// [`Context::global`] is the one the free functions (`volley::read_parquet`) use,
/// configured from `VOLLEY_*` environment variables.
#[derive(Clone, Debug)]
pub struct Context {
    pub(crate) exec: ExecContext,
    /// Tables every SQL query of this context sees (`register_files`).
    tables: Arc<Mutex<Vec<NamedTable>>>,
    /// The cluster datasets of this context run on, if any.
    cluster: Option<volley_runtime::cluster::Cluster>,
    /// Where its plans run: in this process, or on the cluster.
    runner: Arc<dyn Runner>,
}

static GLOBAL: OnceLock<std::result::Result<Context, String>> = OnceLock::new();

impl Context {
    /// A context with `config` on a local runtime.
    pub fn try_new(config: VolleyConfig) -> Result<Self> {
        let runtime = LocalRuntime::try_new(&config.runtime)?;
        Self::with_runtime(config, runtime)
    }

    /// A context with the default configuration, overridden by `VOLLEY_*` variables.
    pub fn try_default() -> Result<Self> {
        Self::try_new(VolleyConfig::from_env()?)
    }

    /// The process-wide context (made on first use from the environment), or why it
    /// cannot be made: an invalid `VOLLEY_*` variable, or a cluster named by
    /// `VOLLEY_ADDRESS` that cannot be joined. The answer is made once and kept.
    ///
    /// With `VOLLEY_ADDRESS` set (and not in a cluster worker, which runs its tasks
    /// locally), the context joins that cluster: datasets whose shape allows it run as
    /// cluster tasks. An empty variable is unset.
    pub fn global() -> Result<Context> {
        GLOBAL
            .get_or_init(|| {
                let ctx = Context::try_default().map_err(|e| e.to_string())?;
                if volley_runtime::cluster::is_worker() {
                    return Ok(ctx);
                }
                let Some(address) =
                    volley_common::env_var("VOLLEY_ADDRESS").map_err(|e| e.to_string())?
                else {
                    return Ok(ctx);
                };
                let token = volley_runtime::cluster::client::token_from_env()
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| {
                        format!(
                            "VOLLEY_ADDRESS is {address} but no cluster token is set \
                             (VOLLEY_TOKEN or VOLLEY_TOKEN_FILE)"
                        )
                    })?;
                let cluster = volley_runtime::cluster::Cluster::connect(&address, &token)
                    .map_err(|e| e.to_string())?;
                Ok(ctx.with_cluster(cluster))
            })
            .clone()
            .map_err(volley_common::VolleyError::Config)
    }

    /// This context, running its datasets on `cluster`.
    pub fn with_cluster(mut self, cluster: volley_runtime::cluster::Cluster) -> Context {
        // A cluster's SQL stages exchange what a partial aggregation makes: plain
        // strings, as measured (no view strings read by `ViewStringScans`).
        let rules = self
            .exec
            .session
            .optimizer()
            .rules
            .iter()
            .filter(|rule| rule.name() != crate::view_strings::ViewStringScans.name())
            .cloned()
            .collect();
        self.exec.session = SessionStateBuilder::new_from_existing(self.exec.session.clone())
            .with_optimizer_rules(rules)
            .build();
        self.runner = Arc::new(ClusterRunner::new(cluster.clone()));
        self.cluster = Some(cluster);
        self
    }

    /// Where this context's plans run.
    pub fn runner(&self) -> &Arc<dyn Runner> {
        &self.runner
    }

    /// The cluster this context runs on, if any.
    pub fn cluster(&self) -> Option<&volley_runtime::cluster::Cluster> {
        self.cluster.as_ref()
    }

    /// A context with `config` on `runtime`.
    pub fn with_runtime(config: VolleyConfig, runtime: Arc<dyn Runtime>) -> Result<Self> {
        config.validate()?;
        let cpus = runtime.total().num_cpus.ceil().max(1.0) as usize;
        let limit = config
            .exec
            .memory_limit
            .unwrap_or_else(|| runtime.total().memory / 4)
            .max(1);
        let budget = MemoryBudget::new(limit);
        keep_freed_memory(limit);
        let mut env = RuntimeEnvBuilder::new()
            .with_object_store_registry(Arc::new(VolleyObjectStoreRegistry::new()))
            .with_memory_pool(Arc::new(BudgetMemoryPool::new(Arc::clone(&budget))));
        // Every read lists its files as they are now, and reads those files only
        // (DataFusion's own listing cache keeps listings for the session's life).
        env = volley_connectors::with_scan_listings(env);
        // A merge of spill files reserves one buffer per file, as many files as the
        // pool allows: bound the fan-in so that one partition's merge leaves room for
        // the others' (about a quarter of the budget per CPU, at least 2 files).
        let fan_in = (limit / (cpus as u64 * 4 * (1 << 20))).clamp(2, 64) as usize;
        let mut disk = DiskManagerBuilder::default().with_max_spill_merge_fan_in(fan_in);
        if let Some(dir) = &config.exec.spill_dir {
            disk = disk.with_mode(DiskManagerMode::Directories(vec![dir.into()]));
        }
        env = env.with_disk_manager_builder(disk);
        let env = env.build_arc().map_err(|e| match &config.exec.spill_dir {
            Some(dir) => volley_common::VolleyError::from(e)
                .context(format!("the spill folder {}", dir.display())),
            None => volley_common::VolleyError::from(e),
        })?;
        let mut session = SessionConfig::new()
            .with_target_partitions(
                config
                    .exec
                    .target_partitions
                    .unwrap_or_else(|| default_partitions(cpus)),
            )
            .with_batch_size(config.exec.batch_size)
            .with_information_schema(true)
            // A step's expressions get the rewrites the physical optimizer gives a
            // plan's operators (below): a Dataset's `l_extendedprice * (1 -
            // l_discount)` or `l_shipmode = 'MAIL'` runs as fast as the same in SQL.
            .with_extension(Arc::new(volley_exec::ExprRewrites(vec![
                crate::decimal_arith::rewrite,
                crate::view_compare::rewrite,
            ])));
        {
            let opts = session.options_mut();
            // Filters are evaluated after decoding, except in the scans a join's or a
            // top-k's dynamic filter reaches (`DecodeTimeFilters`, added below).
            opts.execution.parquet.pushdown_filters = false;
            opts.execution.parquet.reorder_filters = true;
            opts.execution.parquet.schema_force_view_types = false;
            // Volley gives every read task its own file split (so errors name the
            // file and ordered reads keep file order) and balances tasks itself.
            opts.execution.enable_file_stream_work_stealing = false;
            // A CSV value in quotes may hold line breaks: files are read whole, never
            // from a byte range that could start inside a quoted value (DataFusion's
            // default splits files over 10 MiB there, and infers schemas line by line).
            opts.catalog.newlines_in_values = true;
            // A union of hash-partitioned inputs stays a union: DataFusion would make it
            // an `InterleaveExec`, whose inputs must report the same hash partitioning,
            // and a cluster stage reads its inputs without it (each task one partition).
            opts.optimizer.prefer_existing_union = true;
            // What a sort keeps back for merging its spill files: at most a sixteenth of
            // the budget (DataFusion's 10 MiB default would not fit small budgets).
            let reserve = (limit / 16).clamp(64 * 1024, 10 * 1024 * 1024) as usize;
            opts.execution.sort_spill_reservation_bytes = reserve;
            // A sort's partition concatenates its batches into runs of up to this size,
            // sorts each run and merges the runs (one sorted batch per run). Below 1 MiB,
            // every batch of a wide table was a run: a full sort of `lineitem` on two
            // cores merged ~370 runs per partition, where the merge's comparisons and
            // per-run bookkeeping cost more than the concatenation saves; at 64 MiB
            // ~8 runs (W4 ~2-4% less time and CPU). A concatenation holds a run twice for a moment,
            // outside the budget's count: at most a sixteenth of the budget across
            // all CPUs' partitions.
            opts.execution.sort_in_place_threshold_bytes =
                (limit / (16 * cpus as u64)).clamp(64 * 1024, 64 * 1024 * 1024) as usize;
            // A hash join indexes its build side by key in an array instead of a hash
            // table where the keys fill enough of their range (DataFusion's perfect hash
            // join; the array costs 4 bytes per key in the range). In a partitioned join
            // each partition builds from 1/N of the rows over the whole range, so
            // DataFusion's 0.15 keeps it off for keys as dense as TPC-H's order keys (a
            // quarter of their range, an eighth per partition on two cores). At 0.05 the
            // array costs at most 84 bytes per build row (4 per key in the range and 4
            // per row), against ~18 for the table, and a build side cannot spill: one
            // that fits the budget as a table could fail as an array (DataFusion does
            // not fall back; a join of 1 M build rows whose keys fill a sixteenth of
            // their range failed under 64 MiB). So only budgets of at least
            // [`SPARSE_KEY_ARRAY_BUDGET_PER_CPU`] per CPU get 0.05; smaller ones keep
            // DataFusion's 0.15 (at most ~31 bytes per row).
            if limit / cpus as u64 >= SPARSE_KEY_ARRAY_BUDGET_PER_CPU {
                opts.execution.perfect_hash_join_min_key_density = 0.05;
            }
            // A hash join builds a side estimated (from the files' statistics) below
            // this limit once and shares it with every partition's probe
            // (`CollectLeft`) instead of hash-partitioning both sides. Partitioning
            // costs a pass over both sides' rows (hash, then copy into partitions) to
            // build on every core; collecting costs a build on one core. On few cores
            // the pass costs more: under DataFusion's defaults (1 MiB or 128 Ki rows)
            // `lineitem` joined with `orders` was partitioned, and collected it is ~25%
            // faster on two cores (TPC-H SF1). The limit shrinks as cores grow (a build
            // on one core leaves more of them idle) and stays within a quarter of the
            // budget.
            let collect =
                ((256usize << 20) / cpus).min(usize::try_from(limit / 4).unwrap_or(usize::MAX));
            opts.optimizer.hash_join_single_partition_threshold = collect;
            opts.optimizer.hash_join_single_partition_threshold_rows = collect / 32;
        }
        // DataFusion's physical rules, with volley's join order before DataFusion
        // chooses each join's build side, and volley's rewrites after them all.
        let mut rules = datafusion::physical_optimizer::optimizer::PhysicalOptimizer::new().rules;
        let join_selection = rules
            .iter()
            .position(|rule| rule.name() == "join_selection")
            .unwrap_or(0);
        if config.plan.reorder_joins {
            rules.insert(join_selection, Arc::new(crate::join_order::JoinOrder));
        }
        if config.read.pushdown_filters {
            rules.push(Arc::new(crate::decode_filters::DecodeTimeFilters));
        }
        // Last: the rules before it see a filter's conditions as a plain `AND`.
        rules.extend([
            Arc::new(crate::decimal_arith::DecimalArithmetic) as _,
            Arc::new(crate::view_compare::ViewComparisons) as _,
            Arc::new(crate::conjunction::FilterConjunctions) as _,
            Arc::new(crate::shared_subplans::SharedSubplans) as _,
        ]);
        let state = SessionStateBuilder::new()
            .with_config(session)
            .with_runtime_env(env)
            .with_default_features()
            .with_optimizer_rule(Arc::new(crate::view_strings::ViewStringScans))
            .with_physical_optimizer_rules(rules)
            .build();
        Ok(Self {
            exec: ExecContext {
                config: Arc::new(config),
                runtime,
                session: state,
                budget,
                cluster: None,
            },
            tables: Arc::new(Mutex::new(Vec::new())),
            cluster: None,
            runner: Arc::new(LocalRunner),
        })
    }

    /// The options.
    pub fn config(&self) -> &VolleyConfig {
        &self.exec.config
    }

    /// DataFusion's session state (object stores, functions).
    pub fn session_state(&self) -> &SessionState {
        &self.exec.session
    }

    /// The runtime tasks run on.
    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.exec.runtime
    }

    /// The CPUs of the runtime tasks run on, rounded up.
    pub(crate) fn cpus(&self) -> usize {
        self.exec.runtime.total().num_cpus.ceil().max(1.0) as usize
    }

    /// The execution context for the executor.
    pub fn exec_context(&self) -> &ExecContext {
        &self.exec
    }

    pub(crate) fn source(&self, source: Arc<dyn DataSource>) -> Dataset {
        Dataset::new(self.clone(), LogicalOp::source(source))
    }

    fn files(&self, format: FileFormatKind, paths: Paths) -> Result<Dataset> {
        let state = &self.exec.session;
        let split = self.exec.config.read.split_bytes;
        let scan = self
            .exec
            .block_on(FileScan::try_new(state, format, &paths.0, split))?;
        Ok(self.source(Arc::new(scan)))
    }

    /// Parquet files. Lists the files and reads their footers now; reads data only when
    /// the dataset is consumed.
    pub fn read_parquet(&self, paths: impl Into<Paths>) -> Result<Dataset> {
        self.files(FileFormatKind::Parquet, paths.into())
    }

    /// CSV files with a header line, types inferred.
    pub fn read_csv(&self, paths: impl Into<Paths>) -> Result<Dataset> {
        self.read_csv_with(paths, CsvReadOptions::default())
    }

    /// CSV files with options.
    pub fn read_csv_with(
        &self,
        paths: impl Into<Paths>,
        options: CsvReadOptions,
    ) -> Result<Dataset> {
        self.files(FileFormatKind::Csv(options), paths.into())
    }

    /// Newline-delimited JSON files.
    pub fn read_json(&self, paths: impl Into<Paths>) -> Result<Dataset> {
        self.files(FileFormatKind::Json, paths.into())
    }

    /// Arrow IPC files.
    pub fn read_ipc(&self, paths: impl Into<Paths>) -> Result<Dataset> {
        self.files(FileFormatKind::Ipc, paths.into())
    }

    /// Text files, one row per line in a column `text`.
    pub fn read_text(&self, paths: impl Into<Paths>) -> Result<Dataset> {
        let paths = paths.into();
        let scan = self.exec.block_on(TextScan::try_new(
            &self.exec.session,
            &paths.0,
            self.exec.config.exec.batch_size,
        ))?;
        Ok(self.source(Arc::new(scan)))
    }

    /// Whole files as rows of `path` and `bytes`.
    pub fn read_binary_files(&self, paths: impl Into<Paths>) -> Result<Dataset> {
        let paths = paths.into();
        let scan = self
            .exec
            .block_on(BinaryScan::try_new(&self.exec.session, &paths.0))?;
        Ok(self.source(Arc::new(scan)))
    }

    /// Batches already in memory (they must share one schema).
    pub fn from_batches(&self, batches: Vec<RecordBatch>) -> Result<Dataset> {
        Ok(self.source(Arc::new(MemorySource::try_new(batches)?)))
    }

    /// The integers `0..n` in an Int64 column `id`.
    pub fn range(&self, n: u64) -> Dataset {
        let cpus = self.exec.runtime.total().num_cpus.ceil().max(1.0) as u64;
        let per_task = 1_000_000u64;
        let tasks = n.div_ceil(per_task).clamp(1, cpus * 4) as usize;
        self.source(Arc::new(RangeSource::new(
            n,
            tasks,
            self.exec.config.exec.batch_size,
        )))
    }

    pub(crate) fn registered_tables(&self) -> Vec<(String, Arc<dyn TableProvider>)> {
        self.tables.lock().expect("tables lock").clone()
    }

    /// Registers `table` as `name` for later SQL (replacing one of that name).
    pub(crate) fn register_table(&self, name: &str, table: Arc<dyn TableProvider>) {
        let mut tables = self.tables.lock().expect("tables lock");
        tables.retain(|(n, _)| n != name);
        tables.push((name.to_string(), table));
    }
}

/// Lets glibc's allocator keep freed memory for reuse, in proportion to the memory
/// budget: buffers up to a sixty-fourth of it (at most 32 MiB, glibc's ceiling before
/// 2.35) come from the heap rather than their own mappings, and a heap keeps up to a
/// sixteenth (at most 256 MiB) free at its top. With glibc's defaults, operators' batch-sized buffers were
/// mapped and unmapped again and again: each new page a fault and a zeroed page, about
/// 6% of the 22 TPC-H queries' time at SF1. Small budgets keep close to glibc's own
/// behaviour. Set once per process, by its first context; not where `GLIBC_TUNABLES`
/// already sets the allocator (a cluster's workers: see the node agent).
fn keep_freed_memory(limit: u64) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            if std::env::var_os("GLIBC_TUNABLES").is_some() {
                return;
            }
            let mmap = (limit / 64).clamp(128 << 10, 32 << 20) as libc::c_int;
            let trim = (limit / 16).clamp(128 << 10, 256 << 20) as libc::c_int;
            // SAFETY: mallopt only changes the allocator's parameters (under its own
            // lock); memory already handed out is unaffected.
            #[allow(unsafe_code)]
            unsafe {
                // Where glibc refuses the first, it keeps its own adaptive thresholds
                // (setting the second would fix them).
                if libc::mallopt(libc::M_MMAP_THRESHOLD, mmap) == 1 {
                    libc::mallopt(libc::M_TRIM_THRESHOLD, trim);
                }
            }
        });
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = limit;
}
