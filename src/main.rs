//! The `volley` command.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod cli_cluster;
#[cfg(feature = "llm")]
mod cli_llm;
use volley::{Context, Result, VolleyConfig, VolleyError};

/// The head and the node agents make and free many small objects per task (the
/// messages, their ids, the task and object entries): with jemalloc the head spends
/// about a seventh less CPU per task than with the system allocator, and `volley sql`
/// runs as fast (see `bench/results/operate-2core.md`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "volley", version, about = "volley: dataflow on Apache Arrow")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, ValueEnum)]
enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run SQL over Parquet, CSV, JSON and Arrow files.
    ///
    /// Files are read by path in quotes: `SELECT count(*) FROM 'data/*.parquet'`, or
    /// registered as tables with --table.
    Sql {
        /// The query; or use -f. Several statements separated by `;` run in order
        /// (CREATE, INSERT, COPY take effect), and the last one's rows are the result.
        query: Option<String>,
        /// Read the query from a file.
        #[arg(short = 'f', long = "file")]
        file: Option<String>,
        /// Register files as a table: NAME=PATH (repeatable).
        #[arg(long = "table", value_name = "NAME=PATH")]
        tables: Vec<String>,
        /// Output format on stdout.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Write the result to a file instead (.parquet, .csv, .json; atomic).
        #[arg(short, long)]
        output: Option<String>,
        /// Memory budget, e.g. 1GiB.
        #[arg(long)]
        memory_limit: Option<String>,
        /// Folder for spill files (default: the system's temporary folder).
        #[arg(long)]
        spill_dir: Option<String>,
        /// Print the plan instead of running it.
        #[arg(long)]
        explain: bool,
        /// After running, print per-operator statistics (time, rows, memory, bytes
        /// spilled) and the process's peak resident memory to stderr.
        #[arg(long)]
        stats: bool,
        /// Run on a cluster (its file scans on the nodes): --address HOST:PORT, or
        /// VOLLEY_ADDRESS.
        #[command(flatten)]
        conn: cli_cluster::Conn,
    },
    /// Start a cluster head (--head) or a node agent joining one (--address).
    Start(cli_cluster::StartArgs),
    /// Stop the volley processes `volley start` started on this machine.
    Stop,
    /// Show the cluster's nodes, resources and load.
    Status {
        #[command(flatten)]
        conn: cli_cluster::Conn,
    },
    /// Submit and manage jobs.
    #[command(subcommand)]
    Job(cli_cluster::JobCommand),
    /// Print a job's output: its driver's, or its workers' (a task's, an actor's).
    Logs(cli_cluster::LogsArgs),
    /// Batch LLM inference.
    #[cfg(feature = "llm")]
    #[command(subcommand)]
    Llm(cli_llm::LlmCommand),
}

fn main() -> ExitCode {
    // A cluster runs copies of this program as its workers (a `volley sql` or
    // `volley llm generate` on a cluster): they run tasks, not the command line.
    if volley::crates::runtime::cluster::is_worker() {
        volley::crates::runtime::cluster::run_worker();
    }
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Start(_)) {
        volley::log_warnings();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("volley: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Start(a) => cli_cluster::start(a),
        Command::Stop => cli_cluster::stop(),
        Command::Status { conn } => cli_cluster::status(conn),
        Command::Job(j) => cli_cluster::job(j),
        Command::Logs(a) => cli_cluster::logs(a),
        #[cfg(feature = "llm")]
        Command::Llm(c) => cli_llm::run(c),
        Command::Sql {
            query,
            file,
            tables,
            format,
            output,
            memory_limit,
            spill_dir,
            explain,
            stats,
            conn,
        } => {
            let query = match (query, file) {
                (Some(q), None) => q,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .map_err(|e| VolleyError::plan(format!("cannot read {f}: {e}")))?,
                (Some(_), Some(_)) => {
                    return Err(VolleyError::plan("give the query or -f FILE, not both"))
                }
                (None, None) => {
                    return Err(VolleyError::plan(
                        "no query given (volley sql \"SELECT ...\" or -f FILE)",
                    ))
                }
            };
            let mut config = VolleyConfig::from_env()?;
            if config.exec.progress == volley_common_progress_auto() {
                config.set("volley.exec.progress", "off")?;
            }
            if let Some(m) = memory_limit {
                config
                    .set("volley.exec.memory_limit", &m)
                    .map_err(|e| e.context("--memory-limit"))?;
            }
            if let Some(d) = spill_dir {
                config.set("volley.exec.spill_dir", &d)?;
            }
            config.set("volley.exec.preserve_order", "true")?;
            let mut ctx = Context::try_new(config)?;
            // A query's workers keep nothing of it: the next query's job may use them.
            let cluster = conn.cluster_if_named(true)?;
            let ran = (|| {
                if let Some(cluster) = &cluster {
                    // Its tasks wait for a node: say so rather than seem to hang.
                    if !cluster.status()?.nodes.iter().any(|n| n.alive()) {
                        eprintln!(
                            "volley: the cluster at {} has no node yet: the query's work \
                             for the nodes waits until one joins (volley start --address {0})",
                            cluster.address()
                        );
                    }
                    ctx = ctx.with_cluster(cluster.clone());
                }
                run_sql(&ctx, &query, &tables, format, output, explain, stats)
            })();
            cli_cluster::end_attached_job(cluster.as_ref(), &ran);
            ran
        }
    }
}

/// `volley sql` after its context is made: runs the query, prints or writes its result.
fn run_sql(
    ctx: &Context,
    query: &str,
    tables: &[String],
    format: Format,
    output: Option<String>,
    explain: bool,
    stats: bool,
) -> Result<()> {
    let mut files = Vec::new();
    for t in tables {
        let (name, path) = t
            .split_once('=')
            .filter(|(name, path)| !name.trim().is_empty() && !path.trim().is_empty())
            .ok_or_else(|| VolleyError::plan(format!("--table {t}: expected NAME=PATH")))?;
        files.push((name.to_string(), path.to_string()));
    }
    let files_ref: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    if explain {
        println!("{}", ctx.explain_sql(query, &files_ref)?);
        return Ok(());
    }
    let ds = ctx.sql_with_files(query, &files_ref)?;
    if let Some(path) = output {
        let (fmt, compression) = volley::crates::connectors::WriteFormat::from_path(&path)
            .ok_or_else(|| {
                VolleyError::plan(format!(
                    "--output {path}: use a .parquet, .csv or .json file name"
                ))
            })?;
        let summary = ds
            .write(&path, fmt)
            .compression(compression)
            .mode(volley::WriteMode::Overwrite)
            .single_file()
            .run()?;
        eprintln!("wrote {} rows to {path}", summary.rows);
        if stats {
            print_stats(&ds);
        }
        return Ok(());
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // The result's columns: a result without rows still shows them.
    let schema = ds.schema()?;
    match format {
        Format::Table => {
            let batches = ds.collect()?;
            let text =
                volley::arrow::util::pretty::pretty_format_batches_with_schema(schema, &batches)?;
            writeln!(out, "{text}")?;
        }
        Format::Csv => {
            volley::crates::connectors::csv_can_hold(&schema)
                .map_err(|e| e.context("--format csv"))?;
            let mut w = volley::arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            let mut wrote = false;
            for b in ds.iter_batches()? {
                w.write(&b?)?;
                wrote = true;
            }
            if !wrote {
                // The header line of a result without rows.
                w.write(&volley::arrow::array::RecordBatch::new_empty(schema))?;
            }
        }
        Format::Json => {
            let mut w = volley::arrow::json::LineDelimitedWriter::new(&mut out);
            for b in ds.iter_batches()? {
                w.write(&b?)?;
            }
            w.finish()?;
        }
    }
    if stats {
        print_stats(&ds);
    }
    Ok(())
}

/// Statistics of the last execution and the peak RSS, on stderr.
fn print_stats(ds: &volley::Dataset) {
    if let Some(s) = ds.stats() {
        eprintln!("{s}");
    }
    // Linux reports the high-water mark of resident memory in /proc.
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:")) {
            let kib: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            eprintln!(
                "peak RSS: {} ({kib} KiB)",
                volley::crates::common::format_bytes(kib * 1024)
            );
        }
    }
}

/// The CLI's stdout is the result: progress goes off unless asked for.
fn volley_common_progress_auto() -> volley::crates::common::ProgressMode {
    volley::crates::common::ProgressMode::Auto
}
