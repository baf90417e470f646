//! `volley start | stop | status | job ...`: running a cluster from the command line.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use volley::crates::runtime::cluster::{
    self, auth, run_node_until, HeadOptions, JobClient, JobRequest, JobState, NodeOptions,
    NodeState, Resources, TlsConfig, WorkerOutput,
};
use volley::{Result, VolleyError};

/// `volley start`.
#[derive(Args)]
pub struct StartArgs {
    /// Start the head (node registry, scheduler, job manager).
    #[arg(long)]
    head: bool,
    /// Join the cluster whose head is at HOST:PORT (starts a node agent).
    #[arg(long)]
    address: Option<String>,
    /// Port of the head's gRPC service (0: any free port).
    #[arg(long, conflicts_with = "address", default_value_t = 6380)]
    port: u16,
    /// Port of the head's HTTP/JSON API (0: any free port).
    #[arg(long, conflicts_with = "address", default_value_t = 8265)]
    http_port: u16,
    /// Address to listen on and advertise.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The cluster token (a node reads the head's token file when on the same machine).
    #[arg(long, env = "VOLLEY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CPUs this node offers (default: all).
    #[arg(long, conflicts_with = "head", allow_negative_numbers = true)]
    num_cpus: Option<f64>,
    /// GPUs this node offers (default: those found through the CUDA driver).
    #[arg(long, conflicts_with = "head")]
    num_gpus: Option<u32>,
    /// Memory this node offers, e.g. 16GiB (default: the machine's).
    #[arg(long, conflicts_with = "head")]
    memory: Option<String>,
    /// Custom resources, NAME=AMOUNT (repeatable).
    #[arg(
        long = "resources",
        conflicts_with = "head",
        value_name = "NAME=AMOUNT"
    )]
    resources: Vec<String>,
    /// Memory for objects before they spill to disk (default: 30% of --memory).
    #[arg(long, conflicts_with = "head")]
    object_store_memory: Option<String>,
    /// How a node compresses objects in its files (handed over by workers, spilled)
    /// and on their way to other nodes: auto (LZ4 for objects sent to other hosts
    /// only), none, lz4 or zstd.
    #[arg(long, env = "VOLLEY_OBJECT_COMPRESSION", default_value = "auto")]
    object_compression: String,
    /// Disk for cached job files (binaries, working folders), e.g. 8GiB: a job's files
    /// are uploaded to the head and fetched by a node once per content, and the least
    /// recently used are removed past this size.
    #[arg(long, default_value = "8GiB")]
    package_cache: String,
    /// Seconds a node agent told to stop (SIGTERM, Ctrl-C) waits for its tasks and
    /// drivers to end and its objects to be copied to other nodes before it leaves.
    #[arg(long, conflicts_with = "head", default_value_t = 30.0)]
    drain_timeout: f64,
    /// A node agent serves its own `/metrics` (Prometheus, the token as bearer
    /// credentials) on this port (0: any free port; its address goes to the node's
    /// folder and log). Not served unless given.
    #[arg(long, conflicts_with = "head")]
    metrics_port: Option<u16>,
    /// Seconds a node agent that lost its head keeps trying to rejoin it (a restarted
    /// head on the same address) under its own id, keeping its objects and its jobs'
    /// drivers (its workers stop at once), and then as a new node, before it exits.
    #[arg(long, conflicts_with = "head", default_value_t = 60.0)]
    head_patience: f64,
    /// Seconds of silence after which the head declares a node dead.
    #[arg(long, conflicts_with = "address", default_value_t = 5.0)]
    node_timeout: f64,
    /// Serve with this TLS certificate (PEM); needs --tls-key.
    #[arg(long, env = "VOLLEY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM).
    #[arg(long, env = "VOLLEY_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Trust this CA certificate (PEM) and speak TLS to the head and other nodes.
    #[arg(long, env = "VOLLEY_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Run in the foreground instead of starting a background process.
    #[arg(long)]
    block: bool,
}

/// `volley job ...`.
#[derive(Subcommand)]
pub enum JobCommand {
    /// Upload a program (and a working folder) and run it as the job's driver.
    Submit {
        #[command(flatten)]
        conn: Conn,
        /// A folder uploaded with the job; the driver runs inside it.
        #[arg(long)]
        working_dir: Option<PathBuf>,
        /// Environment for the driver and its workers, K=V (repeatable).
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// CPUs held by the driver.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        num_cpus: f64,
        /// GPUs held by the driver.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        num_gpus: f64,
        /// A name for the job.
        #[arg(long, default_value = "")]
        name: String,
        /// Wait for the job to end, printing its log; exit 0 if it succeeded, else with its
        /// driver's exit code (1 where it has none).
        #[arg(long)]
        wait: bool,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        entrypoint: Vec<String>,
    },
    /// Show a job.
    Status {
        #[command(flatten)]
        conn: Conn,
        /// The job id.
        id: String,
    },
    /// Print a job's driver log.
    Logs {
        #[command(flatten)]
        conn: Conn,
        /// The job id.
        id: String,
        /// Keep printing until the job ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Stop a job: its driver, tasks and actors.
    Stop {
        #[command(flatten)]
        conn: Conn,
        /// The job id.
        id: String,
    },
    /// List jobs.
    List {
        #[command(flatten)]
        conn: Conn,
    },
}

/// `volley logs`.
#[derive(Args)]
pub struct LogsArgs {
    #[command(flatten)]
    conn: Conn,
    /// The job id.
    #[arg(long)]
    job: String,
    /// A task's output: its id (or the part after the job, `t-...`), or its name (every
    /// task of that name), each attempt on the node that ran it.
    #[arg(long, conflicts_with_all = ["actor", "workers"])]
    task: Option<String>,
    /// An actor's output, every incarnation.
    #[arg(long, conflicts_with = "workers")]
    actor: Option<String>,
    /// The output of every worker of the job.
    #[arg(long)]
    workers: bool,
    /// List the tasks, actors and workers that have output, with its size.
    #[arg(long, conflicts_with = "follow")]
    list: bool,
    /// Keep printing new output until what is shown has ended (or the job has).
    #[arg(long, short)]
    follow: bool,
}

/// `volley logs`: the driver's log by default, else the selected worker output.
pub fn logs(a: LogsArgs) -> Result<()> {
    let client = a.conn.client()?;
    let which = match (&a.task, &a.actor) {
        (Some(t), _) => Some(WorkerOutput::Task(t.clone())),
        (_, Some(actor)) => Some(WorkerOutput::Actor(actor.clone())),
        _ if a.workers || a.list => Some(WorkerOutput::AllWorkers),
        _ => None,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match which {
        None => client.logs(&a.job, a.follow, &mut out),
        Some(which) if a.list => {
            for s in client.worker_output_sections(&a.job, &which)? {
                let state = if s.running { "running" } else { "ended" };
                writeln!(
                    out,
                    "{:>10}  {state:<7}  {}",
                    volley::crates::common::format_bytes(s.bytes),
                    s.title
                )?;
            }
            Ok(())
        }
        Some(which) => {
            // A task or actor with no output yet (not started, or a name the job never
            // uses) is waited for while the job runs: said, not silent.
            let named = match &which {
                WorkerOutput::Task(t) => Some(format!("task {t}")),
                WorkerOutput::Actor(actor) => Some(format!("actor {actor}")),
                WorkerOutput::AllWorkers => None,
            };
            if let Some(what) = named.filter(|_| a.follow) {
                if client.worker_output_sections(&a.job, &which)?.is_empty() {
                    eprintln!(
                        "volley: no output of {what} on any node yet: waiting while job {} \
                         runs (`volley logs --job {0} --list` lists what there is)",
                        a.job
                    );
                }
            }
            client.worker_output(&a.job, &which, a.follow, &mut out)
        }
    }
}

/// Where the head is and the token to use.
#[derive(Args)]
pub struct Conn {
    /// The head, HOST:PORT (default: VOLLEY_ADDRESS, or the head started on this
    /// machine; `volley sql` and `volley llm` run on a cluster only when it is named
    /// here or in VOLLEY_ADDRESS, and on this machine otherwise).
    #[arg(long)]
    address: Option<String>,
    /// The cluster token (default: VOLLEY_TOKEN, or the head's token file on this machine).
    #[arg(long, env = "VOLLEY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Trust this CA certificate (PEM) and speak TLS to the head.
    #[arg(long, env = "VOLLEY_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

/// The folder for this machine's cluster state: `VOLLEY_HOME`, else `~/.volley`.
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VOLLEY_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".volley")
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The token of the head this machine runs (its state folder's `token` file), if
/// `address` is that head: the head's recorded address, or its port on an address of
/// this machine; with no head listening here now (one may be starting), any address of
/// this machine. A head elsewhere is not sent this cluster's token.
fn local_token(dir: &Path, address: &str) -> Option<String> {
    let ours = match read_trimmed(&dir.join("head_address")) {
        Some(recorded) => {
            address == recorded || (port(address) == port(&recorded) && is_local(address))
        }
        None => is_local(address),
    };
    if !ours {
        return None;
    }
    auth::read_token(&dir.join("token")).ok()
}

/// The port of a `HOST:PORT` address.
fn port(address: &str) -> Option<&str> {
    address.rsplit_once(':').map(|(_, p)| p)
}

/// Whether `address` names this machine: a loopback address, or one an interface here
/// has (binding to it works).
fn is_local(address: &str) -> bool {
    use std::net::ToSocketAddrs;
    let Ok(resolved) = address.to_socket_addrs() else {
        return false;
    };
    resolved
        .into_iter()
        .any(|a| a.ip().is_loopback() || std::net::UdpSocket::bind((a.ip(), 0)).is_ok())
}

/// Ends the attached job of a command that ran on `cluster` with the command's result,
/// whatever threads still hold the cluster.
pub fn end_attached_job(cluster: Option<&cluster::Cluster>, ran: &Result<()>) {
    if let Some(cluster) = cluster {
        match ran {
            Ok(()) => cluster.end_attached_job(0, ""),
            Err(e) => cluster.end_attached_job(1, &e.to_string()),
        }
    }
}
impl Conn {
    fn resolve(&self) -> Result<(String, String)> {
        let dir = state_dir();
        let address = self
            .address
            .clone()
            .filter(|a| !a.is_empty())
            .or(volley_common::env_var("VOLLEY_ADDRESS")?)
            .or_else(|| read_trimmed(&dir.join("head_address")))
            .ok_or_else(|| {
                VolleyError::Config(
                    "no cluster address: give --address HOST:PORT or set VOLLEY_ADDRESS".into(),
                )
            })?;
        let token = match &self.token {
            Some(t) => t.clone(),
            None => local_token(&dir, &address).ok_or_else(|| {
                VolleyError::Config(format!(
                    "no cluster token for {address}: give --token or set VOLLEY_TOKEN (a head \
                     on this machine writes it to its state folder's `token` file, used \
                     without asking only for that head)"
                ))
            })?,
        };
        Ok((address, token))
    }

    /// The cluster to run on when one is named (`--address` or `VOLLEY_ADDRESS`);
    /// `None` runs in this process. Inside a job, it is the job's cluster; otherwise
    /// this program joins as a job of its own, whose workers are shared with later
    /// such jobs if `share_workers` (see [`cluster::ConnectOptions`]).
    pub fn cluster_if_named(&self, share_workers: bool) -> Result<Option<cluster::Cluster>> {
        let named = self.address.as_deref().is_some_and(|a| !a.is_empty())
            || volley_common::env_var("VOLLEY_ADDRESS")?.is_some();
        if !named {
            return Ok(None);
        }
        let (address, token) = self.resolve()?;
        let tls = TlsConfig::from_files(self.tls_ca.as_deref(), None, None)?;
        let options = cluster::ConnectOptions { tls, share_workers };
        Ok(Some(cluster::Cluster::connect_with(
            &address, &token, &options,
        )?))
    }

    fn client(&self) -> Result<JobClient> {
        let (address, token) = self.resolve()?;
        let tls = TlsConfig::from_files(self.tls_ca.as_deref(), None, None)?;
        JobClient::connect_with(&address, &token, &tls)
    }
}

fn io_runtime() -> Result<tokio::runtime::Runtime> {
    runtime_with(None)
}

/// A runtime with `threads` worker threads (`None`: one per CPU).
fn runtime_with(threads: Option<usize>) -> Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .build()
        .map_err(|e| VolleyError::internal(format!("cannot start a runtime: {e}")))
}

/// Starts this program again in the background with `args` (this `volley start`'s own,
/// less `--block`), its output going to `log`. A token given with `--token` travels in
/// the child's environment, never on its command line, where `ps` shows it to every
/// local user. Returns the child, to watch whether it still runs.
fn daemonize(args: &[String], token: Option<&str>, log: &Path) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    if let Some(d) = log.parent() {
        std::fs::create_dir_all(d)
            .map_err(|e| VolleyError::from(e).context(format!("creating {}", d.display())))?;
    }
    let out = std::fs::File::create(log)
        .map_err(|e| VolleyError::from(e).context(format!("creating {}", log.display())))?;
    let mut command = std::process::Command::new(exe);
    if let Some(t) = token {
        command.env("VOLLEY_TOKEN", t);
    }
    let child = command
        .args(background_args(args))
        .arg("--block")
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()?;
    Ok(child)
}

/// Whether `child` still runs (one that ended is reaped, not left a zombie).
fn running(child: &mut std::process::Child) -> bool {
    matches!(child.try_wait(), Ok(None))
}

/// `args` without `--block` and without the token (`--token T` or `--token=T`).
fn background_args(args: &[String]) -> Vec<String> {
    let mut out = auth::without_token(args);
    out.retain(|a| a != "--block");
    out
}

/// What a background process wrote for `volley start` to read.
enum Waited {
    /// The file's content.
    Written(String),
    /// The process ended first.
    Exited,
    /// Neither, in the time given.
    TimedOut,
}

/// Waits up to `polls` times 50 ms for `path` to hold something, while `child` runs.
fn wait_for_file(path: &Path, child: &mut std::process::Child, polls: u32) -> Waited {
    for _ in 0..polls {
        if let Some(s) = read_trimmed(path).filter(|s| !s.is_empty()) {
            return Waited::Written(s);
        }
        if !running(child) {
            return Waited::Exited;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Waited::TimedOut
}

/// `what` ended or did not start: the error, with its log.
fn stopped_with_log(what: &str, log: &Path) -> VolleyError {
    VolleyError::execution(format!(
        "{what}; its log ({}):\n{}",
        log.display(),
        std::fs::read_to_string(log).unwrap_or_default()
    ))
}

/// `volley start`.
pub fn start(a: StartArgs) -> Result<()> {
    let dir = state_dir();
    if a.block {
        // The head's and agents' events (nodes joining and dying, retries) go to stderr,
        // which `volley start` points at the process's log file.
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_target(false)
            .with_writer(std::io::stderr)
            .try_init();
    }
    match (a.head, &a.address) {
        (true, Some(_)) => Err(VolleyError::Config(
            "give --head or --address, not both".into(),
        )),
        (false, None) => Err(VolleyError::Config(
            "give --head to start a head, or --address HOST:PORT to join one".into(),
        )),
        (true, None) => start_head(a, &dir),
        (false, Some(addr)) => {
            let addr = addr.clone();
            start_node(a, &dir, addr)
        }
    }
}

/// Whether process `pid` is one that `volley start` put in the background (it runs
/// `volley start ... --block`): a pid file left by a process that ended may name
/// another program by now.
/// Whether something listens at `address` (HOST:PORT) on this machine's view of the
/// network, within a second.
fn answers(address: &str) -> bool {
    use std::net::ToSocketAddrs;
    address.to_socket_addrs().is_ok_and(|mut addrs| {
        addrs.any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
    })
}

fn started_in_background(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
        args.contains(&&b"start"[..]) && args.contains(&&b"--block"[..])
    })
}

fn start_head(a: StartArgs, dir: &Path) -> Result<()> {
    // Checked before a background head starts: a bad value is said here.
    let package_cache_bytes = volley::crates::common::parse_bytes(&a.package_cache)
        .map_err(|e| e.context("--package-cache"))?;
    let node_timeout = seconds("node-timeout", a.node_timeout, 0.2)?;
    // For this user only: the head keeps the token, jobs' environments and logs here.
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let failed =
            |e: std::io::Error| VolleyError::from(e).context(format!("creating {}", dir.display()));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(failed)?;
        // A folder made by an older version is closed too.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(failed)?;
    }
    if !a.block {
        // A head already running on this state folder keeps its files and its log.
        if let Some(pid) = read_trimmed(&dir.join("head.pid"))
            .and_then(|p| p.parse::<i32>().ok())
            .filter(|p| started_in_background(*p))
        {
            return Err(VolleyError::Config(format!(
                "a head already runs with the state folder {} (pid {pid}, address {}): \
                 `volley stop` stops it, or set VOLLEY_HOME to another folder",
                dir.display(),
                read_trimmed(&dir.join("head_address")).unwrap_or_default()
            )));
        }
        // One started in the foreground (`--block`) writes no pid file: its address
        // answers.
        if let Some(address) = read_trimmed(&dir.join("head_address")).filter(|a| answers(a)) {
            return Err(VolleyError::Config(format!(
                "a head already runs with the state folder {} (address {address}): stop \
                 it, or set VOLLEY_HOME to another folder",
                dir.display()
            )));
        }
        let _ = std::fs::remove_file(dir.join("head_address"));
        let log = dir.join("logs").join("head.log");
        let args = auth::program_args()?;
        let mut child = daemonize(&args, a.token.as_deref(), &log)?;
        let pid = child.id();
        std::fs::write(dir.join("head.pid"), pid.to_string())?;
        let address = match wait_for_file(&dir.join("head_address"), &mut child, 300) {
            Waited::Written(address) => address,
            // Still starting (a large state store): it stays `volley stop`'s to stop.
            Waited::TimedOut => {
                println!(
                    "volley head started (pid {pid}, log {}); it is not listening yet: see \
                     its log, and {} once it is",
                    log.display(),
                    dir.join("head_address").display()
                );
                return Ok(());
            }
            Waited::Exited => {
                let _ = std::fs::remove_file(dir.join("head.pid"));
                return Err(stopped_with_log("the process did not start", &log));
            }
        };
        println!(
            "volley head started at {address} (pid {pid}, log {})",
            log.display()
        );
        println!(
            "HTTP API: http://{}",
            read_trimmed(&dir.join("http_address")).unwrap_or_default()
        );
        println!("token: {}", dir.join("token").display());
        println!("join another machine with:");
        println!(
            "  VOLLEY_TOKEN=$(cat {}) volley start --address {address}",
            dir.join("token").display()
        );
        return Ok(());
    }
    // A head restarted on the same state folder keeps its token: its nodes rejoin.
    // A new token is written once the head has started (its store opened, its port
    // bound): a head that fails to start, as beside another on this folder, leaves
    // the running head's token as it is.
    let (token, write) = match (&a.token, auth::read_token(&dir.join("token"))) {
        (Some(t), Ok(kept)) if *t == kept => (kept, false),
        // The token given is the one this machine's commands find for this head.
        (Some(t), _) => (t.clone(), true),
        (None, Ok(t)) => (t, false),
        (None, Err(_)) => (auth::new_token(), true),
    };
    let mut options = HeadOptions::new(dir.join("head"), token.clone());
    options.package_cache_bytes = package_cache_bytes;
    options.node_timeout = node_timeout;
    options.heartbeat_interval = (options.node_timeout / 10).min(Duration::from_millis(500));
    let tls = TlsConfig::from_files(None, a.tls_cert.as_deref(), a.tls_key.as_deref())?;
    // One thread serves every call: the head's state is behind one lock anyway, and a
    // second thread only added wake-ups between the two (a head scheduling 10,000 tiny
    // tasks spent ~38% of a core with two threads, ~30% with one, at the same rate).
    let rt = runtime_with(Some(1))?;
    rt.block_on(async move {
        let (core, addrs) =
            cluster::start_head(options, &a.host, a.port, Some(a.http_port), &tls).await?;
        if write {
            auth::write_token(&dir.join("token"), &token)?;
        }
        write_whole(
            &dir.join("http_address"),
            &addrs.http.clone().unwrap_or_default(),
        )?;
        write_whole(&dir.join("head_address"), &addrs.grpc)?;
        eprintln!(
            "volley head listening on {} (HTTP {})",
            addrs.grpc,
            addrs.http.unwrap_or_default()
        );
        wait_for_signal().await;
        let _ = std::fs::remove_file(dir.join("head_address"));
        // What changed since the last write (a job that just ended) outlives the head.
        core.flush()
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// What a node agent offers, from `volley start`'s options, checked: a background
/// `volley start` says what is wrong before an agent starts.
struct NodeCapacity {
    resources: Resources,
    gpus: u32,
    object_store_memory: u64,
    object_compression: volley::crates::runtime::cluster::ObjectCompression,
    package_cache_bytes: u64,
    drain_timeout: Duration,
    head_patience: Duration,
}

/// The most GPUs a node may offer (each gets an id): more than any machine holds.
const MAX_GPUS: u32 = 1024;

/// Waits given in seconds are at most a year: deadlines are this much past now, and
/// one past what the clock can hold would fail where it is computed.
const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// `--FLAG SECONDS` as a duration of at least `min` seconds and at most a year: a
/// number outside that, or not a number, is refused with the flag named.
fn seconds(flag: &str, value: f64, min: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|_| value >= min && value <= MAX_SECONDS)
        .ok_or_else(|| {
            VolleyError::Config(format!(
                "--{flag} {value}: give a number of seconds from {min} to {MAX_SECONDS} (a year)"
            ))
        })
}

fn node_capacity(a: &StartArgs) -> Result<NodeCapacity> {
    use volley::crates::common::{format_bytes, parse_bytes};
    let object_compression = a
        .object_compression
        .parse()
        .map_err(|e: VolleyError| e.context("--object-compression"))?;
    let cpus = match a.num_cpus {
        Some(n) if !(n.is_finite() && n >= 0.0) => {
            return Err(VolleyError::Config(format!(
                "--num-cpus {n}: give the CPUs the node offers, 0 or more"
            )))
        }
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as f64,
    };
    let memory = match &a.memory {
        Some(m) => parse_bytes(m).map_err(|e| e.context("--memory"))?,
        None => volley::crates::runtime::machine_memory(),
    };
    if memory == 0 {
        return Err(VolleyError::Config(
            "--memory 0: a node needs memory for its workers and objects".into(),
        ));
    }
    let object_store_memory = match &a.object_store_memory {
        Some(m) => parse_bytes(m).map_err(|e| e.context("--object-store-memory"))?,
        None => memory / 10 * 3,
    };
    if object_store_memory > memory {
        return Err(VolleyError::Config(format!(
            "--object-store-memory {} is more than the node's memory ({})",
            format_bytes(object_store_memory),
            format_bytes(memory)
        )));
    }
    let gpus = match a.num_gpus {
        Some(n) if n > MAX_GPUS => {
            return Err(VolleyError::Config(format!(
                "--num-gpus {n}: a node offers at most {MAX_GPUS} GPUs"
            )))
        }
        Some(n) => n,
        None => cluster::gpus::detect(),
    };
    let mut resources = Resources::cpus(cpus)
        .with_gpus(gpus as f64)
        .with_memory(memory);
    for r in &a.resources {
        let (k, v) = Resources::parse_custom(r)?;
        resources = resources.with_custom(k, v);
    }
    let package_cache_bytes =
        parse_bytes(&a.package_cache).map_err(|e| e.context("--package-cache"))?;
    Ok(NodeCapacity {
        resources,
        gpus,
        object_store_memory,
        object_compression,
        package_cache_bytes,
        drain_timeout: seconds("drain-timeout", a.drain_timeout, 0.0)?,
        head_patience: seconds("head-patience", a.head_patience, 0.0)?,
    })
}

fn start_node(a: StartArgs, dir: &Path, address: String) -> Result<()> {
    // Checked before a background agent starts: a bad value is said here.
    let capacity = node_capacity(&a)?;
    if !a.block {
        let log = dir
            .join("logs")
            .join(format!("node-{}.log", std::process::id()));
        let args = auth::program_args()?;
        let mut child = daemonize(&args, a.token.as_deref(), &log)?;
        let pid = child.id();
        let nodes = dir.join("nodes");
        std::fs::create_dir_all(&nodes)?;
        std::fs::write(nodes.join(format!("{pid}.pid")), pid.to_string())?;
        // The agent writes its id once the head took it (a wrong token or address
        // ends it, or keeps it trying).
        let joined = nodes.join(pid.to_string()).join("node_id");
        match wait_for_file(&joined, &mut child, 200) {
            Waited::Written(id) => println!(
                "volley node agent started (pid {pid}, log {}): joined {address} as {id}",
                log.display()
            ),
            Waited::Exited => {
                let _ = std::fs::remove_file(nodes.join(format!("{pid}.pid")));
                return Err(stopped_with_log("the node agent stopped", &log));
            }
            Waited::TimedOut => println!(
                "volley node agent started (pid {pid}, log {}); it has not joined {address} \
                 yet: see its log",
                log.display()
            ),
        }
        return Ok(());
    }
    let token = match &a.token {
        Some(t) => t.clone(),
        None => local_token(dir, &address).ok_or_else(|| {
            VolleyError::Config(format!(
                "no cluster token for {address}: give --token or set VOLLEY_TOKEN"
            ))
        })?,
    };
    let NodeCapacity {
        resources,
        gpus,
        object_store_memory,
        object_compression,
        package_cache_bytes,
        drain_timeout,
        head_patience,
    } = capacity;
    let options = NodeOptions {
        head_address: address,
        token,
        host: a.host.clone(),
        port: 0,
        resources,
        gpu_ids: (0..gpus).collect(),
        object_store_memory,
        object_compression,
        dir: dir.join("nodes").join(std::process::id().to_string()),
        // One cache for the agents of this machine.
        package_cache: dir.join("package-cache"),
        package_cache_bytes,
        drain_timeout,
        head_patience,
        metrics_port: a.metrics_port,
        tls: TlsConfig::from_files(
            a.tls_ca.as_deref(),
            a.tls_cert.as_deref(),
            a.tls_key.as_deref(),
        )?,
    };
    let rt = io_runtime()?;
    let patience = head_patience;
    rt.block_on(async move {
        // A stop signal drains the node: it leaves once its work is done or copied.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            let _ = stop_tx.send(true);
        });
        let stopping = |rx: &tokio::sync::watch::Receiver<bool>| *rx.borrow();
        // When the agent last lost its head; it rejoins as a new node for `patience`.
        let mut lost: Option<std::time::Instant> = None;
        loop {
            let mut rx = stop_rx.clone();
            let leave = async move {
                let _ = rx.wait_for(|stop| *stop).await;
            };
            match run_node_until(options.clone(), leave).await {
                Ok(why) if why.ends_with("left the cluster") || stopping(&stop_rx) => {
                    eprintln!("{why}");
                    return Ok(());
                }
                Ok(why) => {
                    eprintln!(
                        "{why}; trying to rejoin {} for {patience:?}",
                        options.head_address
                    );
                    lost = Some(std::time::Instant::now());
                }
                Err(e) => match lost {
                    Some(at) if at.elapsed() < patience && !stopping(&stop_rx) => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    _ => return Err(e),
                },
            }
        }
    })
}

/// `volley stop`: stops what `volley start` started on this machine.
pub fn stop() -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let dir = state_dir();
    let mut pids = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir.join("nodes")) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "pid") {
                pids.push(e.path());
            }
        }
    }
    pids.push(dir.join("head.pid"));
    let mut stopped = 0;
    for p in pids {
        if let Some(pid) = read_trimmed(&p)
            .and_then(|s| s.parse::<i32>().ok())
            .filter(|p| started_in_background(*p))
        {
            if kill(Pid::from_raw(pid), Signal::SIGTERM).is_ok() {
                stopped += 1;
            }
        }
        let _ = std::fs::remove_file(&p);
    }
    let _ = std::fs::remove_file(dir.join("head_address"));
    println!("stopped {stopped} volley process(es)");
    Ok(())
}

/// `volley status`: the nodes, the load, and the jobs that wait (and what for).
pub fn status(conn: Conn) -> Result<()> {
    let client = conn.client()?;
    let s = client.cluster_status()?;
    println!(
        "{:<10} {:<6} {:<18} {:<34} {:<34} {:>7} {:>10} {:>10}",
        "NODE", "ALIVE", "ADDRESS", "TOTAL", "AVAILABLE", "TASKS", "OBJECTS", "SPILLED"
    );
    for n in &s.nodes {
        let (total, avail) = (&n.total, &n.available);
        println!(
            "{:<10} {:<6} {:<18} {:<34} {:<34} {:>7} {:>10} {:>10}",
            n.node_id,
            match n.state {
                NodeState::Alive => "yes",
                NodeState::Draining => "drain",
                NodeState::Left => "left",
                NodeState::Dead => "DEAD",
            },
            n.object_address,
            total.to_string(),
            avail.to_string(),
            n.running_tasks,
            volley::crates::common::format_bytes(n.object_store_bytes),
            volley::crates::common::format_bytes(n.spilled_total)
        );
    }
    println!(
        "{} task(s) running, {} pending; {} job(s) running; {} object(s)",
        s.running_tasks, s.pending_tasks, s.running_jobs, s.objects
    );
    for j in client.list()? {
        if !j.waiting.is_empty() && !j.state.is_final() {
            println!("job {} waits: {}", j.job_id, j.waiting);
        }
    }
    Ok(())
}

/// `volley job ...`.
pub fn job(cmd: JobCommand) -> Result<()> {
    match cmd {
        JobCommand::Submit {
            conn,
            working_dir,
            env,
            num_cpus,
            num_gpus,
            name,
            wait,
            entrypoint,
        } => {
            let client = conn.client()?;
            let mut vars = HashMap::new();
            for kv in env {
                let (k, v) = kv
                    .split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| VolleyError::Config(format!("--env {kv}: expected K=V")))?;
                vars.insert(k.to_string(), v.to_string());
            }
            let id = client.submit(&JobRequest {
                entrypoint,
                working_dir,
                env: vars,
                resources: Resources::cpus(num_cpus).with_gpus(num_gpus),
                name,
            })?;
            if !wait {
                println!("{id}");
                return Ok(());
            }
            eprintln!("submitted {id}");
            let stdout = std::io::stdout();
            client.logs(&id, true, &mut stdout.lock())?;
            let info = client.wait(&id, Duration::from_secs(u64::MAX / 4))?;
            eprintln!("job {id}: {} {}", info.state, info.error);
            match info.state {
                JobState::Succeeded => Ok(()),
                // The driver's own exit code, where it gave one.
                JobState::Failed if (1..=255).contains(&info.exit_code) => {
                    std::process::exit(info.exit_code)
                }
                state => Err(VolleyError::execution(format!("job {id} {state}"))),
            }
        }
        JobCommand::Status { conn, id } => {
            let client = conn.client()?;
            let j = client.status(&id)?;
            println!("job:        {}", j.job_id);
            if !j.name.is_empty() {
                println!("name:       {}", j.name);
            }
            println!("state:      {}", j.state);
            println!("entrypoint: {}", j.entrypoint.join(" "));
            if !j.node_id.is_empty() {
                println!("driver on:  {}", j.node_id);
            }
            println!("retries:    {}", j.task_retries);
            if !j.error.is_empty() {
                println!("error:      {}", j.error);
            }
            if !j.waiting.is_empty() {
                println!("waiting:    {}", j.waiting);
            }
            let bytes = volley::crates::common::format_bytes;
            for e in client.executions(&id)? {
                println!(
                    "execution {} ({}):",
                    e.id,
                    if e.finished { "finished" } else { "running" }
                );
                for (i, o) in e.operators.iter().enumerate() {
                    println!(
                        "  {i} {:<40} {:>5}/{:<5} tasks {:>3} running {:>12} rows {:>10} queued {:>10}{}",
                        o.name,
                        o.tasks_done,
                        o.tasks_total,
                        o.tasks_running,
                        o.rows,
                        bytes(o.bytes),
                        bytes(o.queued_bytes),
                        if o.spilled_bytes > 0 {
                            format!(" spilled {}", bytes(o.spilled_bytes))
                        } else {
                            String::new()
                        }
                    );
                }
            }
            Ok(())
        }
        JobCommand::Logs { conn, id, follow } => {
            let stdout = std::io::stdout();
            conn.client()?.logs(&id, follow, &mut stdout.lock())
        }
        JobCommand::Stop { conn, id } => {
            let j = conn.client()?.stop(&id)?;
            println!("{} {}", j.job_id, j.state);
            Ok(())
        }
        JobCommand::List { conn } => {
            for j in conn.client()?.list()? {
                let name = if j.name.is_empty() {
                    String::new()
                } else {
                    format!("[{}] ", j.name)
                };
                println!(
                    "{:<20} {:<10} {name}{}",
                    j.job_id,
                    j.state,
                    j.entrypoint.join(" ")
                );
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{auth, background_args, local_token, seconds, JobCommand};

    #[test]
    fn the_local_heads_token_goes_to_that_head_only() {
        let dir = tempfile::tempdir().unwrap();
        let token = auth::new_token();
        auth::write_token(&dir.path().join("token"), &token).unwrap();
        // No head listening here yet: an address of this machine gets it, another not.
        assert_eq!(
            local_token(dir.path(), "127.0.0.1:6380"),
            Some(token.clone())
        );
        assert_eq!(local_token(dir.path(), "203.0.113.9:6380"), None);
        std::fs::write(dir.path().join("head_address"), "0.0.0.0:6380").unwrap();
        assert_eq!(local_token(dir.path(), "0.0.0.0:6380"), Some(token.clone()));
        assert_eq!(
            local_token(dir.path(), "127.0.0.1:6380"),
            Some(token.clone())
        );
        assert_eq!(
            local_token(dir.path(), "127.0.0.1:7000"),
            None,
            "another port"
        );
        // An address no interface here has (TEST-NET-3): another machine.
        assert_eq!(local_token(dir.path(), "203.0.113.9:6380"), None);
    }

    #[test]
    fn a_negative_resource_reaches_the_check_that_names_it() {
        // Parsed, not taken for an option: the resource check then says what is wrong.
        #[derive(clap::Parser)]
        struct Job {
            #[command(subcommand)]
            command: JobCommand,
        }
        let job = <Job as clap::Parser>::try_parse_from([
            "job",
            "submit",
            "--num-cpus",
            "-1",
            "--",
            "true",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let JobCommand::Submit { num_cpus, .. } = job.command else {
            panic!("not a submission");
        };
        assert_eq!(num_cpus, -1.0);
    }

    #[test]
    fn the_token_never_reaches_a_background_command_line() {
        let args: Vec<String> = [
            "start",
            "--address",
            "h:1",
            "--token",
            "s3cret",
            "--block",
            "--num-cpus",
            "2",
            "--token=other",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = background_args(&args);
        assert_eq!(out, ["start", "--address", "h:1", "--num-cpus", "2"]);
    }

    /// A flag that means something only to a head, or only to a node agent, is refused
    /// where it would be ignored.
    #[test]
    fn start_refuses_flags_of_the_other_role() {
        use clap::Parser;
        #[derive(Parser)]
        struct Start {
            #[command(flatten)]
            args: super::StartArgs,
        }
        let parse = |args: &[&str]| {
            Start::try_parse_from(std::iter::once("start").chain(args.iter().copied()))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        parse(&["--head", "--port", "0", "--node-timeout", "2"]).unwrap();
        parse(&["--address", "h:1", "--num-cpus", "2", "--metrics-port", "0"]).unwrap();
        for (args, flag) in [
            (&["--head", "--num-cpus", "4"][..], "--num-cpus"),
            (&["--head", "--metrics-port", "9100"][..], "--metrics-port"),
            (&["--address", "h:1", "--port", "7000"][..], "--port"),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(flag) && e.contains("cannot be used with"), "{e}");
        }
    }

    #[test]
    fn waits_are_at_most_a_year() {
        assert_eq!(
            seconds("drain-timeout", 2.5, 0.0).unwrap(),
            std::time::Duration::from_millis(2500)
        );
        for bad in [1e19, f64::INFINITY, f64::NAN, -1.0, 0.1] {
            let e = seconds("head-patience", bad, 0.2).unwrap_err().to_string();
            assert!(
                e.contains("--head-patience") && e.contains("(a year)"),
                "{e}"
            );
        }
    }
}

/// Writes `text` to `path` through a temporary file and a rename, so that whoever sees
/// the file (a node agent or client started next to the head, waiting for it) never
/// reads it half written.
fn write_whole(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
