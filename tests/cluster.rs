//! Multi-process cluster tests: a real head and node agents on 127.0.0.1 ports, jobs
//! submitted with `volley job submit`, worker processes, and the faults the cluster
//! must survive (a node agent or a worker killed with SIGKILL mid-job).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use volley::arrow::array::{ArrayRef, Int64Array, RecordBatch};
use volley::datafusion::parquet::arrow::ArrowWriter;

#[path = "support/tpch.rs"]
mod tpch;

fn volley_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_volley"))
}

fn example(name: &str) -> PathBuf {
    volley_bin()
        .parent()
        .expect("target folder")
        .join("examples")
        .join(name)
}

/// A head and node agents started for one test; everything is killed on drop.
struct TestCluster {
    home: tempfile::TempDir,
    /// `VOLLEY_TLS_*` variables every process of the cluster gets.
    tls: Vec<(String, String)>,
    head: Child,
    /// The head's command line, for a restart.
    head_args: Vec<String>,
    nodes: Vec<Child>,
    address: String,
    http: String,
    token: String,
}

impl TestCluster {
    fn start(node_timeout_s: f64) -> Self {
        Self::start_with_tls(node_timeout_s, vec![])
    }

    fn start_with_tls(node_timeout_s: f64, tls: Vec<(String, String)>) -> Self {
        Self::start_on("127.0.0.1", node_timeout_s, tls)
    }

    /// A head listening on `host`.
    fn start_on(host: &str, node_timeout_s: f64, tls: Vec<(String, String)>) -> Self {
        Self::start_with_args(host, node_timeout_s, tls, &[])
    }

    /// A head listening on `host`, started with `extra` arguments.
    fn start_with_args(
        host: &str,
        node_timeout_s: f64,
        tls: Vec<(String, String)>,
        extra: &[&str],
    ) -> Self {
        let home = tempfile::tempdir().unwrap();
        let mut head_args: Vec<String> = ["start", "--head", "--block", "--http-port", "0"]
            .into_iter()
            .map(String::from)
            .collect();
        if !extra.contains(&"--port") {
            head_args.extend(["--port".to_string(), "0".to_string()]);
        }
        head_args.extend(["--host".to_string(), host.to_string()]);
        head_args.extend(["--node-timeout".to_string(), node_timeout_s.to_string()]);
        head_args.extend(extra.iter().map(|a| a.to_string()));
        let (head, address, http) = Self::spawn_head(home.path(), &tls, &head_args, "head.log");
        let token = std::fs::read_to_string(home.path().join("token")).unwrap();
        let mode = std::fs::metadata(home.path().join("token")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            mode.permissions().mode() & 0o777,
            0o600,
            "token file must be owner-only"
        );
        Self {
            home,
            tls,
            head,
            head_args,
            nodes: vec![],
            address,
            http,
            token,
        }
    }

    /// Kills the head (`kill -9`) and waits for it to be gone.
    fn kill_head(&mut self) {
        kill9(self.head.id() as i32);
        let _ = self.head.wait();
    }

    /// Starts the head again on its state folder, as it was first started, its log in
    /// `log`; the address it listens on.
    fn start_head_again(&mut self, log: &str) -> String {
        let (head, address, http) =
            Self::spawn_head(self.home.path(), &self.tls, &self.head_args, log);
        self.head = head;
        self.http = http;
        address
    }

    /// Starts a head with `args` in `home`, its log in `log`; waits for its address.
    fn spawn_head(
        home: &Path,
        tls: &[(String, String)],
        args: &[String],
        log: &str,
    ) -> (Child, String, String) {
        let _ = std::fs::remove_file(home.join("head_address"));
        let head = Command::new(volley_bin())
            .envs(tls.iter().map(|(k, v)| (k, v)))
            .args(args)
            .env("VOLLEY_HOME", home)
            .env_remove("VOLLEY_TOKEN")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(home.join(log)).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let address = loop {
            if let Ok(a) = std::fs::read_to_string(home.join("head_address")) {
                if !a.is_empty() {
                    break a;
                }
            }
            assert!(Instant::now() < deadline, "the head did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        let http = std::fs::read_to_string(home.join("http_address")).unwrap();
        (head, address, http)
    }

    fn volley(&self) -> Command {
        let mut c = Command::new(volley_bin());
        c.env("VOLLEY_HOME", self.home.path())
            .envs(self.tls.iter().map(|(k, v)| (k, v)))
            .env("VOLLEY_ADDRESS", &self.address)
            .env("VOLLEY_TOKEN", &self.token);
        c
    }

    /// Runs `volley sql QUERY --format csv` on the cluster; its output (it must succeed).
    fn sql_csv(&self, query: &str) -> String {
        stdout_of(self.volley().args(["sql", query, "--format", "csv"]))
    }

    /// Starts a node agent and waits until the head lists it.
    fn add_node(&mut self, cpus: u32, gpus: u32) -> usize {
        self.add_node_with_store(cpus, gpus, "64MiB")
    }

    /// Starts a node agent whose object store keeps `store` in memory before spilling.
    fn add_node_with_store(&mut self, cpus: u32, gpus: u32, store: &str) -> usize {
        let before = self.node_count();
        let child = self
            .volley()
            .args(["start", "--block", "--address", &self.address])
            .args([
                "--num-cpus",
                &cpus.to_string(),
                "--num-gpus",
                &gpus.to_string(),
            ])
            .args(["--object-store-memory", store])
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(
                    self.home
                        .path()
                        .join(format!("agent-{}.log", self.nodes.len())),
                )
                .unwrap(),
            )
            .spawn()
            .unwrap();
        self.nodes.push(child);
        self.wait_for_nodes(before + 1, Duration::from_secs(30), "the node did not join");
        self.nodes.len() - 1
    }

    /// Waits until the head lists `n` live nodes, for at most `within`; panics saying
    /// `what` did not happen, with the cluster's status.
    fn wait_for_nodes(&self, n: usize, within: Duration, what: &str) {
        let deadline = Instant::now() + within;
        while self.node_count() < n {
            assert!(Instant::now() < deadline, "{what}:\n{}", self.status());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until job `job` has `n` processes (its driver and workers) on the nodes.
    fn wait_for_job_processes(&self, job: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.processes(&format!("VOLLEY_JOB_ID={job}")).len() < n {
            assert!(
                Instant::now() < deadline,
                "the job's processes did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until a task of `job` that started while this watched is seen running
    /// twice, 100 ms apart: it is under way and has run for at most ~200 ms, so a task
    /// of seconds still has most of its time ahead.
    fn wait_for_a_long_task(&self, job: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        // Running in the poll before the last one (`None` until there was one), and in
        // the last one.
        let mut before: Option<Vec<String>> = None;
        let mut seen: Vec<String> = Vec::new();
        let mut polls = 0;
        loop {
            let (code, body) = self.http_get(&format!("/api/jobs/{job}/tasks"), Some(&self.token));
            assert_eq!(code, 200, "{body}");
            let tasks: serde_json::Value = serde_json::from_str(&body).unwrap();
            let running: Vec<String> = tasks
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["state"] == "RUNNING")
                .filter_map(|t| t["task_id"].as_str().map(String::from))
                .collect();
            let fresh = |t: &String| before.as_ref().is_some_and(|b| !b.contains(t));
            if running.iter().any(|t| seen.contains(t) && fresh(t)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no task of {job} was seen starting and running for 100 ms: {body}"
            );
            polls += 1;
            before = (polls > 1).then(|| std::mem::take(&mut seen));
            seen = running;
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn status(&self) -> String {
        stdout_of(self.volley().arg("status"))
    }

    fn node_count(&self) -> usize {
        self.status()
            .lines()
            .filter(|l| l.contains(" yes "))
            .count()
    }

    fn submit(&self, args: &[&str]) -> String {
        self.submit_with_env(&[], args)
    }

    /// Submits a job whose processes get `env` (`K=V`) on top of the nodes'.
    fn submit_with_env(&self, env: &[&str], args: &[&str]) -> String {
        let options: Vec<&str> = env.iter().flat_map(|e| ["--env", e]).collect();
        self.submit_with_options(&options, args)
    }

    /// Submits a job with `options` for `volley job submit` (`--num-cpus 2`).
    fn submit_with_options(&self, options: &[&str], args: &[&str]) -> String {
        let mut submit = self.volley();
        submit
            .args(["job", "submit"])
            .args(options)
            .arg("--")
            .args(args);
        stdout_of(&mut submit).trim().to_string()
    }

    fn job_state(&self, id: &str) -> String {
        let out = self.volley().args(["job", "status", id]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .find_map(|l| l.strip_prefix("state:"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    fn retries(&self, id: &str) -> u32 {
        let out = self.volley().args(["job", "status", id]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("retries:"))
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The job's record and log, for failure messages.
    fn describe(&self, id: &str) -> String {
        let out = self.volley().args(["job", "status", id]).output().unwrap();
        format!(
            "{}\nlog:\n{}",
            String::from_utf8_lossy(&out.stdout),
            self.logs(id)
        )
    }

    fn logs(&self, id: &str) -> String {
        let out = self.volley().args(["job", "logs", id]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Waits (two minutes at most) until job `id`'s log contains `text`.
    fn wait_log(&self, id: &str, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.logs(id).contains(text) {
            assert!(
                Instant::now() < deadline,
                "no `{text}` in\n{}",
                self.logs(id)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_job(&self, id: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.job_state(id);
            if ["SUCCEEDED", "FAILED", "STOPPED"].contains(&s.as_str()) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} still {s} after {timeout:?}; log:\n{}",
                self.logs(id)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Pids of processes started for this cluster (workers, drivers) that match `extra`.
    /// Workers now running a task of `job` (of any job if `None`), by the index each
    /// node keeps of its workers' tasks (`workers.tsv`: a task taken, a task ended).
    /// Workers started with a job idle until a task comes: killing one of those
    /// would not touch the job's work.
    fn task_workers(&self, job: Option<&str>) -> Vec<String> {
        let mut running = std::collections::BTreeMap::new();
        let nodes = self.home.path().join("nodes");
        for node in std::fs::read_dir(nodes).into_iter().flatten().flatten() {
            for dir in std::fs::read_dir(node.path().join("jobs"))
                .into_iter()
                .flatten()
                .flatten()
            {
                if job.is_some_and(|j| dir.file_name().to_string_lossy() != j) {
                    continue;
                }
                let index = std::fs::read_to_string(dir.path().join("workers.tsv"));
                for line in index.unwrap_or_default().lines() {
                    let f: Vec<&str> = line.split('\t').collect();
                    match f.as_slice() {
                        ["T", task, attempt, _, worker, ..] => {
                            running.insert(format!("{task}\t{attempt}"), worker.to_string());
                        }
                        ["E", task, attempt, ..] => {
                            running.remove(&format!("{task}\t{attempt}"));
                        }
                        _ => {}
                    }
                }
            }
        }
        running.into_values().collect()
    }

    fn processes(&self, extra: &str) -> Vec<i32> {
        let needle = format!("VOLLEY_ADDRESS={}", self.address);
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(env) = std::fs::read(e.path().join("environ")) else {
                continue;
            };
            let env = String::from_utf8_lossy(&env);
            let vars: Vec<&str> = env.split('\0').collect();
            if vars.contains(&needle.as_str()) && vars.iter().any(|v| v.starts_with(extra)) {
                out.push(pid);
            }
        }
        out
    }

    fn http_get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(&self.http).unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\n{auth}Connection: close\r\n\r\n",
            self.http
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let code = resp[9..12].parse().unwrap();
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // A failing test shows what the head said last (and whether it still runs).
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.home.path().join("head.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let state = match self.head.try_wait() {
                Ok(Some(status)) => format!("exited: {status}"),
                _ => "running".to_string(),
            };
            eprintln!(
                "head ({state}), last lines of its log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        for n in &mut self.nodes {
            let _ = n.kill();
            let _ = n.wait();
        }
        let _ = self.head.kill();
        let _ = self.head.wait();
    }
}

/// What `command` prints on stdout; it must succeed (its stderr says why not).
fn stdout_of(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Starts `cluster_tasks ARGS` as a program of its own joined to `c` (an attached job);
/// its stderr comes line by line.
fn attached_program(
    c: &TestCluster,
    args: &[&str],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut program = Command::new(example("cluster_tasks"))
        .args(args)
        .envs(c.tls.iter().map(|(k, v)| (k, v)))
        .env("VOLLEY_ADDRESS", &c.address)
        .env("VOLLEY_TOKEN", &c.token)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = program.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (program, rx)
}

/// Runs `cluster_tasks ARGS` as a program of its own joined to `c` (an attached job),
/// until it says on stderr what its work waits for; returns that line, once the
/// program is killed and its job stopped.
fn attached_program_warning(c: &TestCluster, args: &[&str]) -> String {
    let (mut program, rx) = attached_program(c, args);
    let line = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.starts_with("[volley] job ") => break Ok(line),
            Ok(_) => {}
            Err(e) => break Err(e),
        }
    };
    let _ = program.kill();
    let _ = program.wait();
    let line = line.expect("the program said nothing of what it waits for");
    let job = line["[volley] job ".len()..].split(':').next().unwrap();
    let stop = c.volley().args(["job", "stop", job]).output().unwrap();
    assert!(stop.status.success(), "{line}");
    line
}

/// A program that joined the cluster itself learns that its job was stopped
/// (`volley job stop`): it says so, its calls to the cluster fail at once with that
/// reason, and it ends instead of waiting on.
#[test]
fn an_attached_program_learns_its_job_was_stopped() {
    let mut c = TestCluster::start(5.0);
    c.add_node(2, 0);
    let (mut program, rx) = attached_program(&c, &["--wait-for-resources"]);
    let mut seen = Vec::new();
    let job = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the program said nothing of its job: {seen:?}"));
        if let Some(rest) = line.strip_prefix("[volley] job ") {
            break rest.split(':').next().unwrap().to_string();
        }
        seen.push(line);
    };
    let stop = c.volley().args(["job", "stop", &job]).output().unwrap();
    assert!(stop.status.success(), "{stop:?}");
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = program.try_wait().unwrap() {
            break status;
        }
        if stopped.elapsed() > Duration::from_secs(30) {
            let _ = program.kill();
            panic!("the program went on after its job was stopped");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let said: Vec<String> = rx.try_iter().collect();
    assert!(!status.success(), "{said:?}");
    let said = said.join("\n");
    assert!(
        said.contains(&format!("job {job} no longer runs on the cluster")),
        "{said}"
    );
}

fn kill9(pid: i32) {
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -9 {pid}");
}

/// `files` Parquet files of `rows` rows each, column `x` counting up across them.
fn input(dir: &Path, files: usize, rows: i64) -> PathBuf {
    let path = dir.join("input");
    std::fs::create_dir_all(&path).unwrap();
    for f in 0..files {
        let start = f as i64 * rows;
        let batch = RecordBatch::try_from_iter([(
            "x",
            Arc::new(Int64Array::from_iter_values(start..start + rows)) as ArrayRef,
        )])
        .unwrap();
        let file = std::fs::File::create(path.join(format!("part-{f:03}.parquet"))).unwrap();
        let props = volley::datafusion::parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_row_count(Some(8_192))
            .build();
        let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }
    path
}

fn run_local(input: &Path, output: &Path) -> Output {
    let out = Command::new(example("cluster_pipeline"))
        .arg(input)
        .arg(output)
        .env_remove("VOLLEY_ADDRESS")
        .env_remove("VOLLEY_WORKER_ID")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A port free on `host` now: a head started again on its state folder comes back on
/// the port it was first given, where its nodes look for it.
fn free_port(host: &str) -> String {
    let l = std::net::TcpListener::bind((host, 0)).unwrap();
    l.local_addr().unwrap().port().to_string()
}

/// How many nodes computed the rows of a `--tag-node` pipeline's output.
fn distinct_nodes(output: &Path) -> i64 {
    let b = volley::Context::try_default()
        .unwrap()
        .sql_with_files(
            "SELECT count(DISTINCT node) FROM t",
            &[("t", output.to_str().unwrap())],
        )
        .unwrap()
        .collect_batch()
        .unwrap();
    b.column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0)
}

/// `(rows, distinct x, sum x, sum score)` of a pipeline's output, read locally.
fn checksum(output: &Path) -> (i64, i64, i64, String) {
    let ctx = volley::Context::try_default().unwrap();
    let ds = ctx
        .sql_with_files(
            "SELECT count(*) AS n, count(DISTINCT x) AS d, sum(x) AS sx, \
             round(sum(score), 3) AS ss FROM t",
            &[("t", output.to_str().unwrap())],
        )
        .unwrap();
    let b = ds.collect_batch().unwrap();
    let int = |i: usize| {
        b.column(i)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0)
    };
    let score = volley::arrow::util::display::array_value_to_string(b.column(3), 0).unwrap();
    (int(0), int(1), int(2), score)
}

#[test]
fn jobs_tasks_resources_tokens_and_http_on_a_three_node_cluster() {
    let mut c = TestCluster::start(5.0);
    c.add_node(1, 0);
    c.add_node(2, 1);
    c.add_node(1, 1);
    let status = c.status();
    assert_eq!(
        status.lines().filter(|l| l.starts_with("node-")).count(),
        3,
        "{status}"
    );

    // The token is required everywhere.
    let wrong = c
        .volley()
        .args(["status", "--token", "nope"])
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("wrong cluster token"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    let join = c
        .volley()
        .args([
            "start",
            "--block",
            "--address",
            &c.address,
            "--token",
            "nope",
        ])
        .output()
        .unwrap();
    assert!(!join.status.success());
    assert!(String::from_utf8_lossy(&join.stderr).contains("wrong cluster token"));
    assert_eq!(c.http_get("/api/jobs", None).0, 401);
    assert_eq!(c.http_get("/api/jobs", Some("nope")).0, 401);

    // A Dataset job spreads over every node and writes what a local run writes.
    let dir = tempfile::tempdir().unwrap();
    let data = input(dir.path(), 12, 20_000);
    let local = dir.path().join("local");
    run_local(&data, &local);
    let out = dir.path().join("cluster");
    let job = c.submit(&[
        example("cluster_pipeline").to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        "--tag-node",
    ]);
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(180)),
        "SUCCEEDED",
        "{}",
        c.describe(&job)
    );
    assert!(
        c.logs(&job).contains("wrote 240000 rows"),
        "{}",
        c.logs(&job)
    );
    assert_eq!(checksum(&out), checksum(&local));
    let nodes = distinct_nodes(&out);
    assert_eq!(nodes, 3, "every node computes part of the job");
    // Its execution's statistics count the rows its tasks wrote on the nodes.
    let status = c.volley().args(["job", "status", &job]).output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    let read = status
        .lines()
        .find(|l| l.starts_with("  0 ReadParquet"))
        .unwrap_or_else(|| panic!("{status}"));
    assert!(read.contains(" 240000 rows "), "{status}");

    // `/metrics`: refused without the token; read by Prometheus' own parser; its
    // values are those `volley status` shows.
    assert_eq!(c.http_get("/metrics", None).0, 401);
    assert_eq!(c.http_get("/healthz", None), (200, "ok".to_string()));
    let (code, text) = c.http_get("/metrics", Some(&c.token));
    assert_eq!(code, 200, "{text}");
    let samples = prometheus_samples(&text);
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.2)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
    };
    let status = c.status();
    let nodes: Vec<&str> = status.lines().filter(|l| l.starts_with("node-")).collect();
    assert_eq!(
        value("volley_nodes", &[("state", "alive")]),
        nodes.len() as f64
    );
    for line in &nodes {
        let id = line.split_whitespace().next().unwrap();
        // TOTAL reads `2 CPU, 1 GPU, ...`.
        let cpus: f64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
        assert_eq!(
            value("volley_node_cpus", &[("node", id), ("kind", "total")]),
            cpus,
            "{line}"
        );
    }
    let succeeded = value("volley_tasks_ended_total", &[("outcome", "succeeded")]);
    assert!(succeeded >= 12.0, "the job's tasks: {succeeded}\n{text}");
    assert_eq!(value("volley_task_duration_seconds_count", &[]), succeeded);
    assert!(value("volley_jobs", &[("state", "SUCCEEDED")]) >= 1.0);

    // A job asking more than any node has waits, and says why: in its record, over
    // HTTP, and in its log (where `volley job submit --wait` shows it).
    let big = c.submit_with_options(&["--num-cpus", "64"], &["true"]);
    let why = "its driver asks for 64 CPU: no node has 64 CPU (the most on one node is 2); \
               it waits until a node with enough joins";
    c.wait_log(&big, &format!("[volley] {why}"));
    let record = c.describe(&big);
    assert!(record.contains("state:      PENDING"), "{record}");
    let status = c.status();
    assert!(
        status.contains(&format!("job {big} waits: {why}")),
        "{status}"
    );
    assert!(record.contains(&format!("waiting:    {why}")), "{record}");
    // `/metrics` counts it, for an alert.
    let (code, text) = c.http_get("/metrics", Some(&c.token));
    assert_eq!(code, 200, "{text}");
    let beyond = prometheus_samples(&text)
        .into_iter()
        .find(|(n, l, _)| {
            n == "volley_jobs_waiting"
                && l.get("reason").map(String::as_str) == Some("beyond_nodes")
        })
        .unwrap_or_else(|| {
            panic!(
                "no jobs waiting in
{text}"
            )
        });
    assert_eq!(beyond.2, 1.0, "{text}");
    let (code, json) = c.http_get(&format!("/api/jobs/{big}"), Some(&c.token));
    assert_eq!(code, 200, "{json}");
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["waiting"], why, "{json}");
    let stop = c.volley().args(["job", "stop", &big]).output().unwrap();
    assert!(stop.status.success());
    assert_eq!(c.job_state(&big), "STOPPED");
    assert!(!c.describe(&big).contains("waiting:"));

    // Tasks, actors and placement groups.
    let tasks = c.submit(&[example("cluster_tasks").to_str().unwrap(), "6"]);
    assert_eq!(
        c.wait_job(&tasks, Duration::from_secs(120)),
        "SUCCEEDED",
        "{}",
        c.describe(&tasks)
    );
    let logs = c.logs(&tasks);
    assert!(logs.contains("OK"), "{logs}");
    // A task of 6 MiB (past gRPC's default limit) reached its worker.
    assert!(logs.contains("a task of 6291456 bytes ran: true"), "{logs}");
    // Failed tasks' errors keep their category across the wire.
    for kind in ["UserFunction", "Cancelled", "ResourcesExhausted", "Plan"] {
        assert!(
            logs.contains(&format!("a {kind} error arrives as one")),
            "{logs}"
        );
    }
    // The error names the node the task failed on.
    assert!(
        logs.contains("task FailAs failed on node-")
            && logs.contains(": in FailAs: user function `score` failed: division by zero"),
        "{logs}"
    );
    assert!(
        logs.contains("a cancelled task stops:") && logs.contains("its driver cancelled it"),
        "{logs}"
    );

    // A job whose workers exit as they start: its task fails with what they printed,
    // and each node starts only a few of them (it once started hundreds a second).
    let broken = c.submit(&[
        example("cluster_tasks").to_str().unwrap(),
        "--broken-workers",
    ]);
    assert_eq!(
        c.wait_job(&broken, Duration::from_secs(120)),
        "SUCCEEDED",
        "{}",
        c.describe(&broken)
    );
    let logs = c.logs(&broken);
    assert!(
        logs.contains("OK") && logs.contains("exited before they asked for work"),
        "{logs}"
    );
    let mut started = 0;
    for node in std::fs::read_dir(c.home.path().join("nodes"))
        .unwrap()
        .flatten()
    {
        let dir = node.path().join("jobs").join(&broken);
        started += std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|f| f.file_name().to_string_lossy().ends_with(".log"))
            .count();
    }
    assert!(started <= 12, "{started} workers started for {broken}");
    // Once every node has failed to start them, the task fails with all their reasons.
    assert!(
        logs.contains("no node can start its job's workers"),
        "{logs}"
    );

    // Workers that cannot start on one node only: that node hands its tasks back, the
    // head keeps the job's tasks off it, and every task succeeds on the other two.
    let one_broken = c.submit(&[
        example("cluster_tasks").to_str().unwrap(),
        "12",
        "--broken-workers",
        "--broken-node",
        "node-1",
    ]);
    assert_eq!(
        c.wait_job(&one_broken, Duration::from_secs(120)),
        "SUCCEEDED",
        "{}",
        c.describe(&one_broken)
    );
    let logs = c.logs(&one_broken);
    assert!(
        logs.contains("12 tasks ran") && logs.contains("OK"),
        "{logs}"
    );
    // node-1 did get tasks, and handed them back.
    let status = c.describe(&one_broken);
    let retries: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("retries:"))
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or_else(|| panic!("no retries in:\n{status}"));
    assert!(retries >= 1, "{status}");

    // Workers' output stays on their nodes, and `volley logs` fetches it through the
    // head: a listing, one task's output by name or id, an actor's.
    let volley_logs = |args: &[&str]| -> (bool, String, String) {
        let out = c
            .volley()
            .args(["logs", "--job", &tasks])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, listing, err) = volley_logs(&["--list"]);
    assert!(ok, "{err}");
    let numbers_tasks: Vec<&str> = listing
        .lines()
        .filter(|l| l.contains("  task Numbers "))
        .collect();
    // Six blocks and one task in a placement group.
    assert_eq!(numbers_tasks.len(), 7, "{listing}");
    let (ok, numbers, err) = volley_logs(&["--task", "Numbers"]);
    assert!(ok, "{err}");
    let headers: Vec<&str> = numbers
        .lines()
        .filter(|l| l.starts_with("==> task Numbers"))
        .collect();
    let printed: Vec<&str> = numbers
        .lines()
        .filter(|l| l.starts_with("numbers "))
        .collect();
    assert_eq!((headers.len(), printed.len()), (7, 7), "{numbers}");
    // Each task's line sits under its own header, which names the node it ran on.
    let lines: Vec<&str> = numbers.lines().collect();
    for pair in lines.chunks(2) {
        let node = pair[1].rsplit(' ').next().unwrap();
        assert!(pair[0].contains(&format!(" on {node} ")), "{numbers}");
    }
    let id = numbers_tasks[0]
        .split_whitespace()
        .skip_while(|w| *w != "Numbers")
        .nth(1)
        .unwrap()
        .to_string();
    let (ok, one, err) = volley_logs(&["--task", &id]);
    assert!(ok, "{err}");
    assert_eq!(
        one.lines().filter(|l| l.starts_with("numbers ")).count(),
        1,
        "{one}"
    );
    let actors: Vec<String> = listing
        .lines()
        .filter_map(|l| {
            l.split_once("  actor ")
                .map(|(_, r)| r.split(' ').next().unwrap().to_string())
        })
        .collect();
    assert!(!actors.is_empty(), "{listing}");
    let actor_output: String = actors
        .iter()
        .map(|a| {
            let (ok, text, err) = volley_logs(&["--actor", a]);
            assert!(ok, "{err}");
            text
        })
        .collect();
    assert!(actor_output.contains("accumulator total"), "{actor_output}");
    // Following an ended task's output prints it and returns.
    let (ok, followed, err) = volley_logs(&["--task", &id, "--follow"]);
    assert!(ok, "{err}");
    assert_eq!(followed, one);
    let (ok, _, err) = volley_logs(&["--task", "NoSuchTask"]);
    assert!(!ok && err.contains("no output of task NoSuchTask"), "{err}");
    let out = c
        .volley()
        .args(["logs", "--job", "job-9999-nothere", "--workers"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no job job-9999-nothere"),
        "{err}"
    );

    // A task needing 2 GPUs and a group needing 4 CPUs on one node wait until such a
    // node joins, then run there.
    let wait = c.submit(&[
        example("cluster_tasks").to_str().unwrap(),
        "--wait-for-resources",
    ]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !c.logs(&wait).contains("WAITING") {
        assert_ne!(c.job_state(&wait), "FAILED", "{}", c.logs(&wait));
        assert!(Instant::now() < deadline, "{}", c.logs(&wait));
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.job_state(&wait), "RUNNING");
    // The head says what waits, and what no node has, in the job's record and log.
    c.wait_log(&wait, "[volley] task `");
    let record = c.describe(&wait);
    let waiting = record
        .lines()
        .find_map(|l| l.strip_prefix("waiting:"))
        .unwrap_or_else(|| panic!("no `waiting:` in {record}"));
    for part in [
        "asks for 0 CPU, 2 GPU: no node has 2 GPU (the most on one node is 1)",
        "(STRICT_PACK: all on one node) asks for 4 CPU: no node has 4 CPU (the most on one \
         node is 2)",
        "it waits until a node with enough joins",
    ] {
        assert!(waiting.contains(part), "{record}");
    }
    // The task's own record says it too (the dashboard's task list).
    let (code, tasks) = c.http_get(&format!("/api/jobs/{wait}/tasks"), Some(&c.token));
    assert_eq!(code, 200, "{tasks}");
    let tasks: serde_json::Value = serde_json::from_str(&tasks).unwrap();
    let gpu_task = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "WhereAmI")
        .unwrap_or_else(|| panic!("{tasks}"));
    assert_eq!(
        gpu_task["waiting"], "asks for 0 CPU, 2 GPU: no node has 2 GPU (the most on one node is 1)",
        "{tasks}"
    );
    // A program that joined the cluster itself (no job log) hears it on its stderr.
    let warned = attached_program_warning(&c, &["--wait-for-resources"]);
    assert!(
        warned.contains("asks for 0 CPU, 2 GPU: no node has 2 GPU"),
        "{warned}"
    );
    c.add_node(4, 2);
    assert_eq!(
        c.wait_job(&wait, Duration::from_secs(120)),
        "SUCCEEDED",
        "{}",
        c.describe(&wait)
    );
    let log = c.logs(&wait);
    assert!(
        log.contains("GPU task ran on node-4 with GPUs [0, 1], CUDA_VISIBLE_DEVICES=0,1"),
        "{log}"
    );
    assert!(
        log.contains(r#"group placed on ["node-4", "node-4"]"#),
        "{log}"
    );

    // The HTTP API sees the same jobs, and takes new ones.
    let (code, body) = c.http_get("/api/jobs", Some(&c.token));
    assert_eq!(code, 200, "{body}");
    let jobs: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 7, "{body}");
    let posted = Command::new("curl")
        .args(["-s", "-X", "POST", "-H", "Content-Type: application/json", "-H"])
        .arg(format!("Authorization: Bearer {}", c.token))
        .arg("--data")
        .arg(r#"{"entrypoint": ["sh", "run.sh"], "files": [{"path": "run.sh", "data_base64": "ZWNobyBoZWxsbyBmcm9tIGh0dHA="}]}"#)
        .arg(format!("http://{}/api/jobs", c.http))
        .output()
        .unwrap();
    let posted: serde_json::Value = serde_json::from_slice(&posted.stdout).unwrap();
    let http_job = posted["job_id"].as_str().expect("a job id").to_string();
    assert_eq!(
        c.wait_job(&http_job, Duration::from_secs(60)),
        "SUCCEEDED",
        "{}",
        c.describe(&http_job)
    );
    assert_eq!(c.logs(&http_job).trim(), "hello from http");
    let escape = Command::new("curl")
        .args([
            "-s",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-H",
        ])
        .arg(format!("Authorization: Bearer {}", c.token))
        .arg("--data")
        // A path escaping the package, refused by the head.
        .arg(r#"{"entrypoint": ["true"], "files": [{"path": "../evil", "data_base64": ""}]}"#) // check_paths: allow
        .arg(format!("http://{}/api/jobs", c.http))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&escape.stdout).contains("`..` is not allowed"));
    // Refused before any work, with the status and a JSON error: no token (the body is
    // not even read), a body that is not a job, a file that is also a folder of others,
    // an environment variable named with `=`.
    let post = |token: Option<&str>, body: &str| {
        let mut curl = Command::new("curl");
        curl.args(["-s", "-w", "\n%{http_code}", "-X", "POST"])
            .args(["-H", "Content-Type: application/json"]);
        if let Some(t) = token {
            curl.args(["-H", &format!("Authorization: bearer {t}")]);
        }
        let out = curl
            .arg("--data")
            .arg(body)
            .arg(format!("http://{}/api/jobs", c.http))
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = out.rsplit_once('\n').unwrap();
        (code.to_string(), body.to_string())
    };
    let (code, body) = post(None, "{");
    assert_eq!(code, "401", "{body}");
    let (code, body) = post(Some(&c.token), "{");
    assert!(code == "400" && body.contains("not a job"), "{code} {body}");
    let (code, body) = post(
        Some(&c.token),
        r#"{"entrypoint": ["true"], "files": [{"path": "a", "data_base64": ""}, {"path": "a/b", "data_base64": ""}]}"#,
    );
    assert!(
        code == "400" && body.contains("a is a file of the package too"),
        "{code} {body}"
    );
    let (code, body) = post(
        Some(&c.token),
        r#"{"entrypoint": ["true"], "env": {"A=B": "c"}}"#,
    );
    assert!(
        code == "400" && body.contains("A=B") && body.contains("give a name without `=`"),
        "{code} {body}"
    );
    // A log offset past the end reads nothing.
    let (code, body) = c.http_get(
        &format!("/api/jobs/{http_job}/logs?offset=18446744073709551615"),
        Some(&c.token),
    );
    assert_eq!((code, body.as_str()), (200, ""));
    let (code, body) = c.http_get(&format!("/api/jobs/{job}"), Some(&c.token));
    assert!(body.contains("cluster_pipeline"), "{body}");
    assert_eq!(code, 200);
    assert!(body.contains("\"state\":\"SUCCEEDED\""), "{body}");

    // Stopping a job kills its driver and workers and leaves no output.
    let stopped_out = dir.path().join("stopped");
    let slow = c.submit(&[
        example("cluster_pipeline").to_str().unwrap(),
        data.to_str().unwrap(),
        stopped_out.to_str().unwrap(),
        "--slow-ms",
        "5000",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.processes(&format!("VOLLEY_JOB_ID={slow}")).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the job's processes did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Its driver tells the head how its execution goes: per operator on `/metrics`
    // (Prometheus' parser) and in `volley job status`.
    let deadline = Instant::now() + Duration::from_secs(30);
    let operators = loop {
        let (_, text) = c.http_get("/metrics", Some(&c.token));
        let ops: Vec<(String, f64)> = prometheus_samples(&text)
            .into_iter()
            .filter(|(n, l, _)| n == "volley_operator_tasks" && l["job"] == slow)
            .map(|(_, l, v)| (l["operator"].clone(), v))
            .collect();
        if ops.iter().any(|(_, tasks)| *tasks > 0.0) {
            break ops;
        }
        assert!(
            Instant::now() < deadline,
            "no operator of {slow} on /metrics:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        operators
            .iter()
            .any(|(name, _)| name.starts_with("0 ReadParquet")),
        "{operators:?}"
    );
    let status = c.volley().args(["job", "status", &slow]).output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("(running):") && status.contains("  0 ReadParquet"),
        "{status}"
    );
    let stop = c.volley().args(["job", "stop", &slow]).output().unwrap();
    assert!(stop.status.success());
    assert_eq!(c.wait_job(&slow, Duration::from_secs(10)), "STOPPED");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.processes(&format!("VOLLEY_JOB_ID={slow}")).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the stopped job's processes are still running"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!stopped_out.exists(), "a stopped job leaves no output");

    // Nothing the cluster started outlives it: the head goes, then each agent is told
    // to stop (it cannot drain without its head, and stops its workers).
    let agents: Vec<Child> = c.nodes.drain(..).collect();
    let address = c.address.clone();
    drop(c);
    for mut agent in agents {
        nix_kill(agent.id() as i32, "TERM");
        let _ = agent.wait();
    }
    let left = || -> Vec<i32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
                let env = std::fs::read(e.path().join("environ")).ok()?;
                String::from_utf8_lossy(&env)
                    .split('\0')
                    .any(|v| v == format!("VOLLEY_ADDRESS={address}"))
                    .then_some(pid)
            })
            .collect()
    };
    // Workers go as their agent stops them; a loaded machine takes a while to end them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !left().is_empty() {
        assert!(
            Instant::now() < deadline,
            "processes left behind: {:?}",
            left()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn killed_node_agent_and_killed_worker_lose_no_rows() {
    let mut c = TestCluster::start(2.0);
    c.add_node(1, 0);
    let victim = c.add_node(1, 0);
    c.add_node(1, 0);
    let dir = tempfile::tempdir().unwrap();
    let data = input(dir.path(), 12, 20_000);
    let local = dir.path().join("local");
    run_local(&data, &local);
    let expected = checksum(&local);

    // SIGKILL a node agent while tasks run on it.
    let out = dir.path().join("after-node-kill");
    let job = c.submit(&[
        example("cluster_pipeline").to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        "--slow-ms",
        "300",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !c
        .task_workers(Some(&job))
        .iter()
        .any(|w| w.starts_with("node-2-"))
    {
        assert!(Instant::now() < deadline, "no task started on node-2");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let pid = c.nodes[victim].id() as i32;
    kill9(pid);
    let _ = c.nodes[victim].wait();
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(180)),
        "SUCCEEDED",
        "{}",
        c.describe(&job)
    );
    assert!(c.status().contains("DEAD"), "{}", c.status());
    assert!(
        c.retries(&job) >= 1,
        "the dead node's tasks ran again elsewhere"
    );
    assert_eq!(checksum(&out), expected);

    // SIGKILL a worker process while it runs a task.
    let out = dir.path().join("after-worker-kill");
    let job = c.submit(&[
        example("cluster_pipeline").to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        "--slow-ms",
        "300",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let worker = loop {
        let busy = c.task_workers(Some(&job));
        // The worker with exactly that id (`node-1-w1` is a prefix of `node-1-w10`).
        let with_id = |p: &i32, w: &str| {
            std::fs::read(format!("/proc/{p}/environ")).is_ok_and(|e| {
                String::from_utf8_lossy(&e)
                    .split('\0')
                    .any(|v| v == format!("VOLLEY_WORKER_ID={w}"))
            })
        };
        if let Some(p) = busy.iter().find_map(|w| {
            c.processes(&format!("VOLLEY_WORKER_ID={w}"))
                .into_iter()
                .find(|p| with_id(p, w))
        }) {
            break p;
        }
        assert!(Instant::now() < deadline, "no task started");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(400));
    kill9(worker);
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(180)),
        "SUCCEEDED",
        "{}",
        c.describe(&job)
    );
    assert!(c.retries(&job) >= 1, "the killed worker's task ran again");
    assert_eq!(checksum(&out), expected);
}

#[test]
fn tls_cluster_runs_jobs_refuses_clear_text_and_restarts_its_head() {
    // A CA, and a certificate for 127.0.0.1 that it signs.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, ca_key) = (d.join("ca.pem"), d.join("ca.key"));
    let (cert, key, csr, ext) = (
        d.join("cert.pem"),
        d.join("key.pem"),
        d.join("req.csr"),
        d.join("ext.cnf"),
    );
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: Vec<&std::ffi::OsStr>| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    openssl(vec![
        os("req"),
        os("-x509"),
        os("-newkey"),
        os("rsa:2048"),
        os("-nodes"),
        os("-days"),
        os("2"),
        os("-subj"),
        os("/CN=volley-test-ca"),
        os("-keyout"),
        ca_key.as_os_str(),
        os("-out"),
        ca.as_os_str(),
    ]);
    openssl(vec![
        os("req"),
        os("-newkey"),
        os("rsa:2048"),
        os("-nodes"),
        os("-subj"),
        os("/CN=127.0.0.1"),
        os("-keyout"),
        key.as_os_str(),
        os("-out"),
        csr.as_os_str(),
    ]);
    openssl(vec![
        os("x509"),
        os("-req"),
        os("-in"),
        csr.as_os_str(),
        os("-CA"),
        ca.as_os_str(),
        os("-CAkey"),
        ca_key.as_os_str(),
        os("-CAcreateserial"),
        os("-days"),
        os("2"),
        os("-extfile"),
        ext.as_os_str(),
        os("-out"),
        cert.as_os_str(),
    ]);
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let tls = vec![
        ("VOLLEY_TLS_CERT".to_string(), path(&cert)),
        ("VOLLEY_TLS_KEY".to_string(), path(&key)),
        ("VOLLEY_TLS_CA".to_string(), path(&ca)),
    ];
    // A fixed port, so that a restarted head comes back where its nodes look for it.
    let port = free_port("127.0.0.1");
    let mut c = TestCluster::start_with_args("127.0.0.1", 5.0, tls, &["--port", &port]);
    c.add_node(2, 0);
    let job = c.submit(&[example("cluster_tasks").to_str().unwrap(), "4"]);
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(120)),
        "SUCCEEDED",
        "{}",
        c.describe(&job)
    );

    // Clear text is refused; the HTTP API speaks HTTPS.
    let plain = c
        .volley()
        .env_remove("VOLLEY_TLS_CA")
        .arg("status")
        .output()
        .unwrap();
    assert!(!plain.status.success());
    let curl = Command::new("curl")
        .args(["-s", "--cacert", &path(&ca), "-H"])
        .arg(format!("Authorization: Bearer {}", c.token))
        .arg(format!("https://{}/api/jobs/{job}", c.http))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&curl.stdout);
    assert!(body.contains("\"state\":\"SUCCEEDED\""), "{body}");

    // A head restarted over TLS: the node rejoins it and the program holding an actor
    // goes on, its actor in the same process (`cluster_tasks` checks its total).
    let actors = c.submit(&[
        example("cluster_tasks").to_str().unwrap(),
        "--across-restart",
        "--pause-ms",
        "2000",
    ]);
    c.wait_log(&actors, "PAUSED actor");
    c.kill_head();
    c.start_head_again("head-restarted.log");
    assert_eq!(
        c.wait_job(&actors, Duration::from_secs(240)),
        "SUCCEEDED",
        "{}\n{}",
        c.describe(&actors),
        std::fs::read_to_string(c.home.path().join("head-restarted.log")).unwrap_or_default()
    );
    let logs = c.logs(&actors);
    assert!(logs.contains("OK across restart"), "{logs}");
}

/// A training job on two two-CPU nodes: its two one-CPU ranks (SPREAD) each get a node,
/// average their gradients between the nodes' worker processes, while the pipeline's
/// read tasks run on the CPUs left; the run checks its held-out accuracy and writes its
/// checkpoints. The ranks read their shares from the nodes (the driver sends
/// references), and end with the same weights as a run whose driver relays every row.
#[test]
fn training_ranks_spread_over_nodes() {
    let mut c = TestCluster::start(5.0);
    c.add_node(2, 0);
    c.add_node(2, 0);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let runs = dir.path().join("runs");
    let job = c.submit(&[
        example("train_mlp").to_str().unwrap(),
        "--rows",
        "8000",
        "--epochs",
        "2",
        "--workers",
        "2",
        "--placement",
        "spread",
        "--min-accuracy",
        "0.5",
        "--data",
        data.to_str().unwrap(),
        "--storage",
        runs.to_str().unwrap(),
        "--no-shuffle",
        "--compare-relay",
    ]);
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(300)),
        "SUCCEEDED",
        "{}",
        c.describe(&job)
    );
    let log = c.logs(&job);
    // The ranks read their shares from the nodes: the driver sent (almost) no rows;
    // relaying, it sends them all; both runs end with the same weights.
    let numbers = |key: &str| -> Vec<u64> {
        line_of(&log, key)
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .collect()
    };
    // [ranks, driver rows, driver bytes, node rows, node bytes]
    let direct = numbers("data 2 ranks: ");
    let relayed = numbers("data 2 ranks, relayed: ");
    assert!(
        direct[3] > 0 && direct[1] * 20 < direct[3],
        "{direct:?}\n{log}"
    );
    assert_eq!(relayed[3], 0, "{relayed:?}");
    assert_eq!(
        relayed[1],
        direct[1] + direct[3],
        "{relayed:?} vs {direct:?}"
    );
    assert!(
        log.contains("weights identical with the driver relaying: true"),
        "{log}"
    );
    let line = log
        .lines()
        .find(|l| l.starts_with("ranks ran on nodes"))
        .unwrap_or_else(|| panic!("no rank placement in the log:\n{log}"));
    let nodes: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
    assert_eq!(nodes.len(), 2, "{line}");
    assert_ne!(
        nodes[0], nodes[1],
        "SPREAD puts the ranks on two nodes: {line}"
    );
    assert!(log.contains("volley 2 ranks: accuracy"), "{log}");
    // Two epochs, a checkpoint each (kept: all).
    let run = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| !p.to_string_lossy().ends_with("-relayed"))
        .unwrap();
    let complete = std::fs::read_dir(&run)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().join("checkpoint.json").is_file())
        .count();
    assert_eq!(complete, 2, "checkpoints in {}", run.display());
}

/// A line `KEY ...` of a program's output.
fn line_of(text: &str, key: &str) -> String {
    text.lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} line in:\n{text}"))
        .to_string()
}

/// A plan with a read stage on the nodes, a closure in the driver, a union, a limit and
/// a named stateful transform on a pool of 2-4 cluster actors gives the local run's
/// rows; the pool's actors ran on at least two nodes; the statistics name every
/// operator. And the quick start, unchanged, succeeds as a job.
#[test]
fn every_plan_shape_runs_on_the_cluster_as_locally() {
    let mut c = TestCluster::start(5.0);
    for _ in 0..3 {
        c.add_node(2, 0);
    }
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path(), 6, 20_000);
    let args = [input.to_str().unwrap(), "--limit", "50000"];

    let local = Command::new(example("cluster_plan"))
        .args(args)
        .env_remove("VOLLEY_ADDRESS")
        .output()
        .unwrap();
    let local_out = String::from_utf8_lossy(&local.stdout).to_string();
    assert!(
        local.status.success(),
        "{local_out}{}",
        String::from_utf8_lossy(&local.stderr)
    );

    let mut job_args = vec![example("cluster_plan").to_str().unwrap().to_string()];
    job_args.extend(args.iter().map(|a| a.to_string()));
    let refs: Vec<&str> = job_args.iter().map(String::as_str).collect();
    let job = c.submit(&refs);
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(240)),
        "SUCCEEDED",
        "{}",
        c.describe(&job)
    );
    let logs = c.logs(&job);
    assert_eq!(
        line_of(&logs, "RESULT"),
        line_of(&local_out, "RESULT"),
        "the cluster's rows are the local run's:\n{logs}"
    );
    assert_eq!(
        line_of(&local_out, "RESULT"),
        format!(
            "RESULT rows=50000 sum_x={} sum_y={}",
            (10_000_000..10_002_000i64).sum::<i64>() + (0..48_000i64).sum::<i64>(),
            3 * ((10_000_000..10_002_000i64).sum::<i64>() + (0..48_000i64).sum::<i64>())
        )
    );
    // The pool's actors were placed on at least two nodes (which of them got calls
    // depends on when each started).
    let head_log = std::fs::read_to_string(c.home.path().join("head.log")).unwrap();
    let actor_nodes: std::collections::BTreeSet<&str> = head_log
        .lines()
        .filter(|l| l.contains(&format!("actor {job}:")))
        .filter_map(|l| l.split_once(": starts on ").map(|(_, n)| n.trim()))
        .collect();
    assert!(
        actor_nodes.len() >= 2,
        "the actor pool ran on {actor_nodes:?}\n{head_log}\n{logs}"
    );
    let ops = line_of(&logs, "OPERATORS");
    for op in [
        "Range->MapBatches:2000",
        "ReadParquet->Filter->Project",
        "Limit[50000]:50000",
        "MapBatches(TagNode):50000",
    ] {
        assert!(ops.contains(op), "{op} missing from the stats: {ops}");
    }
    assert!(
        logs.contains("on the cluster's nodes") && logs.contains("cluster actors"),
        "explain shows where stages run:\n{logs}"
    );

    // The quick start (a closure, SQL, sorts, group-bys, a split) as a job, unchanged.
    let out = dir.path().join("quickstart");
    let job = c.submit(&[
        example("quickstart").to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(300)),
        "SUCCEEDED",
        "{}",
        c.describe(&job)
    );
}

/// Sorts, group-bys, global aggregates (one of no rows), distincts, every join kind
/// (one with a side whose schema a transform decides), a seeded shuffle,
/// a hash repartition and a repartition into equal parts run as exchanges on three
/// nodes, and SQL (a group-by, a join, a sort) as stages there, and give the local
/// run's rows (the sorts, the shuffle and the equal parts in the same order); the
/// sort's output partitions were on all three nodes.
#[test]
fn exchanges_on_three_nodes_give_the_local_rows() {
    let mut c = TestCluster::start(5.0);
    for _ in 0..3 {
        c.add_node(2, 0);
    }
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path(), 6, 20_000);
    let job = c.submit(&[
        example("cluster_exchange").to_str().unwrap(),
        input.to_str().unwrap(),
    ]);
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(300)),
        "SUCCEEDED",
        "{}",
        c.describe(&job)
    );
    let logs = c.logs(&job);
    for (op, rows) in [
        ("sort", 120_000),
        ("groupby", 7_007),
        ("aggregate", 1),
        ("filtered sort", 109_090),
        ("empty sort", 0),
        ("empty aggregate", 1),
        ("distinct", 91),
        ("unique", 1_001),
        ("random_shuffle", 120_000),
        ("repartition_by", 120_000),
        ("repartition", 120_000),
        ("randomize_block_order", 120_000),
        ("split 1/3", 40_000),
        ("split 2/3", 40_000),
        ("split 3/3", 40_000),
        ("split_at 1", 1_000),
        ("split_at 2", 49_000),
        ("split_at 3", 0),
        ("split_at 4", 70_000),
        ("split_at 5", 0),
        ("train_test_split train", 90_000),
        ("train_test_split test", 30_000),
        ("join inner", 109_090),
        ("join left", 120_000),
        ("join right", 109_590),
        ("join full", 120_500),
        ("join semi", 109_090),
        ("join anti", 10_910),
        ("join full transformed", 120_500),
        ("empty join aggregate", 1),
        ("join groupby", 7),
        ("sql groupby", 7_000),
        ("sql join", 40_000),
        ("sql union", 12),
        ("sql sort", 120_000),
    ] {
        assert!(
            logs.contains(&format!("SAME {op} rows={rows}\n")),
            "{op}: not the local rows\n{logs}"
        );
    }
    assert!(
        logs.contains("EMPTY SCHEMA unknown\n"),
        "an empty dataset's schema decided by a transform: the plan error\n{logs}"
    );
    let nodes = line_of(&logs, "NODES");
    assert_eq!(
        nodes.trim_start_matches("NODES ").split(',').count(),
        3,
        "the sort's partitions were on every node: {nodes}"
    );
    assert!(
        logs.contains("an exchange on the cluster's nodes, 12 partitions"),
        "explain shows the exchange:\n{logs}"
    );
    assert!(
        logs.contains("Sort->MapBatches(TagNode)->Project: an exchange")
            && logs.contains("then, in its reduce tasks: "),
        "the steps after the sort run in its reduce tasks:\n{logs}"
    );
    assert!(
        logs.contains("Sort->MapBatches(TagNode)->Project: an exchange on the cluster's nodes, 12 partitions (the tasks below partition each block as they make it")
            && logs.contains("tasks on the cluster's nodes, after 6 tasks sampling their keys")
            && logs.contains("then, in its tasks: the map of the Sort above, its key ranges from a first pass of 6 tasks reading the keys"),
        "the sort's read tasks run its map, after a first pass sampled its keys:\n{logs}"
    );
    assert!(
        logs.contains("Aggregate: an exchange on the cluster's nodes, 12 partitions (the tasks below partition each block as they make it")
            && logs.contains("then, in its tasks: the map of the Aggregate above"),
        "the group-by's read tasks run its map:\n{logs}"
    );
    assert!(
        logs.contains("RandomShuffle: an exchange on the cluster's nodes, 64 partitions (the tasks below partition each block as they make it")
            && logs.contains("then, in its tasks: the map of the RandomShuffle above"),
        "the seeded shuffle's read tasks run its map, knowing their first rows:\n{logs}"
    );
    assert!(
        logs.contains("Join->Aggregate (map): an exchange")
            && logs.contains("then, in its reduce tasks: the map of the Aggregate above"),
        "the join's reduce tasks run the group-by's map:\n{logs}"
    );
    assert!(
        logs.contains("Split: blocks in the cluster's stores"),
        "a split's parts are the input's blocks on the nodes:\n{logs}"
    );
    for (op, rows) in [
        ("join inner", 109_090),
        ("join left", 120_000),
        ("join semi", 109_090),
        ("join anti", 10_910),
    ] {
        assert!(
            logs.contains(&format!("SAME {op} partitioned rows={rows}\n")),
            "{op} partitioned: not the local rows\n{logs}"
        );
    }
    // The inner join broadcast its right side: a task per left block (six files), no
    // map tasks and no 12 reduce tasks.
    let tasks = line_of(&logs, "JOIN TASKS");
    let count = |key: &str| -> usize {
        tasks
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {tasks}"))
    };
    assert!(
        count("broadcast=") < 12 && count("partitioned=") >= 12,
        "the small right side was broadcast: {tasks}"
    );
    let order = line_of(&logs, "BLOCK ORDER");
    assert_eq!(
        order
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .split(',')
            .count(),
        3,
        "randomize_block_order's blocks stayed on every node: {order}"
    );
}

/// The node that runs a job's driver, from the head's log.
fn driver_node(c: &TestCluster, job: &str) -> String {
    let log = std::fs::read_to_string(c.home.path().join("head.log")).unwrap();
    log.lines()
        .find_map(|l| {
            l.split_once(&format!("job {job}: driver starts on "))
                .map(|(_, n)| n.trim().to_string())
        })
        .unwrap_or_default()
}

/// Tasks the head re-ran because their objects were lost with `node`.
fn rebuilt_on(c: &TestCluster, node: &str) -> usize {
    let log = std::fs::read_to_string(c.home.path().join("head.log")).unwrap();
    log.lines()
        .filter(|l| l.contains(&format!("was lost with node {node}: re-running task")))
        .count()
}

/// A node agent killed with SIGKILL while an exchange maps (a group-by fed by a slow
/// stage) and, with a fresh node added, while one reduces (a sort whose driver stops
/// reading with the map outputs on the nodes): both jobs give the local run's rows; in
/// the second, the head re-runs only the tasks whose objects were on the lost node.
#[test]
fn a_node_killed_mid_shuffle_loses_no_row() {
    let mut c = TestCluster::start(2.0);
    for _ in 0..3 {
        c.add_node(2, 0);
    }
    let dir = tempfile::tempdir().unwrap();
    let data = input(dir.path(), 6, 20_000);
    let exchange = example("cluster_exchange");
    // A live victim that does not run the job's driver.
    let victim = |c: &TestCluster, job: &str, dead: &[usize]| -> (usize, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let driver = loop {
            let d = driver_node(c, job);
            if !d.is_empty() {
                break d;
            }
            assert!(Instant::now() < deadline, "the driver did not start");
            std::thread::sleep(Duration::from_millis(100));
        };
        (0..c.nodes.len())
            .rev()
            .map(|i| (i, format!("node-{}", i + 1)))
            .find(|(i, n)| *n != driver && !dead.contains(i))
            .unwrap()
    };

    // While mapping: the group-by's input comes through a stage that takes 300 ms a
    // block.
    let job = c.submit(&[
        exchange.to_str().unwrap(),
        data.to_str().unwrap(),
        "--only",
        "groupby",
        "--slow-ms",
        "300",
    ]);
    let (first, node) = victim(&c, &job, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !c
        .task_workers(Some(&job))
        .iter()
        .any(|w| w.starts_with(&format!("{node}-")))
    {
        assert!(Instant::now() < deadline, "no task started on {node}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(800));
    kill9(c.nodes[first].id() as i32);
    let _ = c.nodes[first].wait();
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(240)),
        "SUCCEEDED",
        "{}",
        c.describe(&job)
    );
    let logs = c.logs(&job);
    assert!(logs.contains("SAME groupby rows=7007\n"), "{logs}");

    // While reducing: the driver stops reading after the first block; a small
    // object-store budget keeps the reduce tasks waiting, the map outputs on the nodes.
    c.add_node(2, 0);
    let job = c.submit(&[
        exchange.to_str().unwrap(),
        data.to_str().unwrap(),
        "--only",
        "sort",
        "--pause-ms",
        "5000",
        "--store-limit",
        "256KiB",
    ]);
    c.wait_log(&job, "PAUSED sort");
    let (i, node) = victim(&c, &job, &[first]);
    kill9(c.nodes[i].id() as i32);
    let _ = c.nodes[i].wait();
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(240)),
        "SUCCEEDED",
        "{}",
        c.describe(&job)
    );
    let logs = c.logs(&job);
    assert!(logs.contains("SAME sort rows=120000\n"), "{logs}");
    let rebuilt = rebuilt_on(&c, &node);
    // Its read blocks, map outputs and finished reduce outputs; not the others'.
    assert!(
        (1..20).contains(&rebuilt),
        "{rebuilt} tasks re-ran for the objects lost with {node}\n{}",
        String::from_utf8_lossy(
            &c.volley()
                .args(["logs", "--job", &job, "--list"])
                .output()
                .unwrap()
                .stdout
        )
    );
}

/// A node agent told to stop (SIGTERM, as Kubernetes does when scaling down) while
/// an exchange's map outputs wait on the nodes drains: it takes no new work, the
/// objects only it holds are copied to the other nodes, and it leaves the cluster. The
/// job gives the local run's rows without re-running a task, and the node is listed as
/// left, not dead.
#[test]
fn a_node_told_to_stop_drains_its_objects_and_leaves_without_failing_work() {
    let mut c = TestCluster::start(2.0);
    for _ in 0..3 {
        c.add_node(2, 0);
    }
    let dir = tempfile::tempdir().unwrap();
    let data = input(dir.path(), 6, 20_000);
    let job = c.submit(&[
        example("cluster_exchange").to_str().unwrap(),
        data.to_str().unwrap(),
        "--only",
        "sort",
        "--pause-ms",
        "5000",
        "--store-limit",
        "256KiB",
    ]);
    c.wait_log(&job, "PAUSED sort");
    let driver = driver_node(&c, &job);
    let (i, node) = (0..3)
        .map(|i| (i, format!("node-{}", i + 1)))
        .find(|(_, n)| *n != driver)
        .unwrap();
    let started = Instant::now();
    nix_kill(c.nodes[i].id() as i32, "TERM");
    let exit = c.nodes[i].wait().unwrap();
    assert!(exit.success(), "the agent left with {exit}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "draining took {:?}",
        started.elapsed()
    );
    let status = c.status();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{node} ")))
        .unwrap();
    assert!(line.contains(" left "), "{status}");
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(240)),
        "SUCCEEDED",
        "{}\nhead log:\n{}",
        c.describe(&job),
        std::fs::read_to_string(c.home.path().join("head.log")).unwrap()
    );
    let logs = c.logs(&job);
    assert!(logs.contains("SAME sort rows=120000\n"), "{logs}");
    assert_eq!(rebuilt_on(&c, &node), 0, "objects of {node} were rebuilt");
    assert_eq!(c.retries(&job), 0, "{}", c.describe(&job));
    let head_log = std::fs::read_to_string(c.home.path().join("head.log")).unwrap();
    assert!(
        head_log.contains(&format!("{node} left the cluster")),
        "{head_log}"
    );
    assert!(
        head_log.contains(&format!("{node} is draining: copying object")),
        "{head_log}"
    );
}

/// `kill -9` of the head while a Dataset job runs on two nodes, then `volley start
/// --head` on the same state folder and port: the node agents rejoin by themselves
/// under their ids, keeping their objects and the job's driver; the driver replays its
/// job to the new head and goes on (the same process: the job does not start again);
/// the finished job and its log are still listed; the output equals the local run's.
#[test]
fn a_restarted_head_keeps_its_jobs_and_its_nodes_rejoin() {
    let port = free_port("127.0.0.1");
    let mut c = TestCluster::start_with_args("127.0.0.1", 2.0, vec![], &["--port", &port]);
    c.add_node(1, 0);
    c.add_node(1, 0);
    let dir = tempfile::tempdir().unwrap();
    let data = input(dir.path(), 12, 20_000);
    let local = dir.path().join("local");
    run_local(&data, &local);
    let expected = checksum(&local);

    let first = c.submit(&["sh", "-c", "echo the first job"]);
    assert_eq!(c.wait_job(&first, Duration::from_secs(60)), "SUCCEEDED");
    let out = dir.path().join("out");
    let job = c.submit(&[
        example("cluster_pipeline").to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        // Tasks of seconds (three batches of 600 ms): one seen starting still runs
        // when the nodes rejoin (0.3-0.6 s after the kill).
        "--slow-ms",
        "600",
        // A stateful stage: its pool's actor outlives the restart too.
        "--actors",
        "1",
        "--model-ms",
        "20",
    ]);
    c.wait_for_job_processes(&job, 2);
    // The job's process that is not a worker.
    let driver: Vec<i32> = c
        .processes(&format!("VOLLEY_JOB_ID={job}"))
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/environ")).is_ok_and(|e| {
                !String::from_utf8_lossy(&e)
                    .split('\0')
                    .any(|v| v.starts_with("VOLLEY_WORKER_ID="))
            })
        })
        .collect();
    assert_eq!(driver.len(), 1, "one driver: {driver:?}");
    // Under way: a task that started while the test watched (seen running twice,
    // 100 ms apart), so that it still runs when the nodes rejoin.
    c.wait_for_a_long_task(&job);
    c.kill_head();
    let restarted = Instant::now();
    let address = c.start_head_again("head-restarted.log");
    assert_eq!(address, c.address, "the head came back on its address");
    c.wait_for_nodes(2, Duration::from_secs(60), "the nodes did not rejoin");
    let rejoined = restarted.elapsed();
    assert!(
        Path::new(&format!("/proc/{}", driver[0])).exists() || c.job_state(&job) == "SUCCEEDED",
        "the driver did not survive the head's restart:\n{}\n{}\n{}\n{}",
        std::fs::read_to_string(c.home.path().join("head-restarted.log")).unwrap_or_default(),
        std::fs::read_to_string(c.home.path().join("agent-0.log")).unwrap_or_default(),
        std::fs::read_to_string(c.home.path().join("agent-1.log")).unwrap_or_default(),
        c.describe(&job)
    );
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(240)),
        "SUCCEEDED",
        "{}",
        c.describe(&job)
    );
    eprintln!(
        "head restart: nodes back after {rejoined:?}, the job done {:?} after the restart",
        restarted.elapsed()
    );
    assert_eq!(checksum(&out), expected);
    let log = std::fs::read_to_string(c.home.path().join("head-restarted.log")).unwrap();
    for line in log
        .lines()
        .filter(|l| l.contains("rejoined from") || l.contains("replayed") || l.contains("actor "))
    {
        eprintln!("{line}");
    }
    // The pool's actor went on where it lived.
    assert!(log.contains(": goes on on "), "{log}");
    // The tasks that ran when the head went ran on, and were taken back.
    let ran_on: usize = log
        .lines()
        .filter_map(|l| {
            let (head, _) = l.split_once(" running tasks")?;
            head.rsplit(' ').next()?.parse::<usize>().ok()
        })
        .sum();
    assert!(ran_on > 0, "no task ran on across the restart:\n{log}");
    assert!(
        log.contains(&format!("job {job}: its driver on "))
            && log.contains("goes on (the head restarted)"),
        "{log}"
    );
    assert!(!log.contains(&format!("job {job}: starts again")), "{log}");
    // The driver that ran before the restart wrote the output: one run, one line.
    let job_log = c.logs(&job);
    assert_eq!(job_log.matches("wrote ").count(), 1, "{job_log}");
    assert_eq!(c.job_state(&first), "SUCCEEDED");
    assert_eq!(c.logs(&first).trim(), "the first job");

    // Again while a sort's driver stops reading, its map outputs (and the reduce
    // outputs made so far) on the nodes: they are kept and taken back.
    let sort = c.submit(&[
        example("cluster_exchange").to_str().unwrap(),
        data.to_str().unwrap(),
        "--only",
        "sort",
        "--pause-ms",
        "3000",
        "--store-limit",
        "256KiB",
    ]);
    c.wait_log(&sort, "PAUSED sort");
    c.kill_head();
    c.start_head_again("head-restarted-2.log");
    assert_eq!(
        c.wait_job(&sort, Duration::from_secs(240)),
        "SUCCEEDED",
        "{}",
        c.describe(&sort)
    );
    let logs = c.logs(&sort);
    assert!(logs.contains("SAME sort rows=240000\n"), "{logs}");
    assert_eq!(logs.matches("PAUSED sort").count(), 1, "{logs}");
    let log = std::fs::read_to_string(c.home.path().join("head-restarted-2.log")).unwrap();
    let kept: usize = log
        .lines()
        .filter_map(|l| {
            l.split("keeping ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    for line in log.lines().filter(|l| l.contains("rejoined from")) {
        eprintln!("{line}");
    }
    assert!(kept > 0, "the nodes kept no object:\n{log}");
    // The driver's replay found the map outputs the nodes kept: they did not run again.
    let replay = log
        .lines()
        .find(|l| l.contains(&format!("job {sort}: its driver replayed")))
        .unwrap_or_else(|| panic!("no replay in\n{log}"));
    eprintln!("{replay}");
    let done: u32 = replay
        .split(" tasks to this head: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        done >= 12,
        "fewer tasks done than the sort's 12 map tasks: {replay}"
    );
    assert!(!log.contains(&format!("job {sort}: starts again")), "{log}");

    // Again while an actor and a placement group live: the actor goes on in the same
    // process with what it holds, and the group is placed again.
    let actors = c.submit(&[
        example("cluster_tasks").to_str().unwrap(),
        "--across-restart",
    ]);
    c.wait_log(&actors, "PAUSED actor");
    c.kill_head();
    // Away long enough for the actor's calls to end meanwhile (the long one ends 4 s
    // after the pause begins), their reports waiting on its node.
    std::thread::sleep(Duration::from_secs(7));
    c.start_head_again("head-restarted-3.log");
    assert_eq!(
        c.wait_job(&actors, Duration::from_secs(240)),
        "SUCCEEDED",
        "{}\n{}",
        c.describe(&actors),
        std::fs::read_to_string(c.home.path().join("head-restarted-3.log")).unwrap_or_default()
    );
    let logs = c.logs(&actors);
    assert!(logs.contains("OK across restart"), "{logs}");
    for line in logs.lines().filter(|l| l.contains("actor total")) {
        eprintln!("{line}");
    }
    let log = std::fs::read_to_string(c.home.path().join("head-restarted-3.log")).unwrap();
    let kept = log
        .lines()
        .find(|l| l.contains(": goes on on "))
        .unwrap_or_else(|| panic!("no actor kept in\n{log}"));
    eprintln!("{kept}");
    // The actor's node kept the calls queued behind the long one (the driver had let
    // go of three's results, so that no replay brings them back: the total above, 355,
    // counts each once) and ran them while the head was away; it listed the one that
    // failed, its report on its way, with its running tasks (the replay fails it
    // rather than run it again: the program checks it was made once).
    let rejoined = log
        .lines()
        .find(|l| l.contains(" 1 running tasks and 1 actors"))
        .unwrap_or_else(|| panic!("no node listed the failed call in\n{log}"));
    eprintln!("{rejoined}");

    // A node agent told to stop while the head is away stops at once, instead of
    // waiting out its patience (60 s) for a head to drain to.
    c.kill_head();
    std::thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &c.nodes[1].id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    while c.nodes[1].try_wait().unwrap().is_none() {
        assert!(
            asked.elapsed() < Duration::from_secs(15),
            "the node agent did not stop while the head was away"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "a node told to stop while the head was away stopped in {:?}",
        asked.elapsed()
    );
    c.start_head_again("head-restarted-4.log");

    // New jobs get new ids.
    let third = c.submit(&["true"]);
    assert_ne!(third, first);
    assert_ne!(third, job);
    assert_eq!(c.wait_job(&third, Duration::from_secs(60)), "SUCCEEDED");
}

/// The browser the dashboard test drives, and the `playwright-core` it drives it with
/// (`scripts/test.sh` installs both); `None`, saying why, where they are missing.
fn browser_for_tests() -> Option<PathBuf> {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    let driver =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboard/node_modules/playwright-core");
    match chromium {
        Some(c) if driver.exists() && Command::new("node").arg("--version").output().is_ok() => {
            Some(c)
        }
        _ => {
            eprintln!(
                "SKIPPED: no Chromium, node or tests/dashboard/node_modules/playwright-core \
                 (scripts/test.sh installs them)"
            );
            None
        }
    }
}

/// The head's dashboard in headless Chromium: refused without the token, then with it
/// the cluster's nodes, a running job whose operators progress, its log; screenshots
/// under `target/dashboard-screenshots/`.
#[test]
fn the_dashboard_shows_the_cluster_and_a_job_in_a_browser() {
    let Some(chromium) = browser_for_tests() else {
        return;
    };
    let mut c = TestCluster::start(5.0);
    c.add_node(1, 0);
    c.add_node(1, 0);
    let dir = tempfile::tempdir().unwrap();
    let data = input(dir.path(), 12, 20_000);
    let out = dir.path().join("out");
    // About 18 s of tasks (12 of three 1 s batches on two one-CPU nodes): the page
    // still sees the job run after a slow browser start and two logins.
    let job = c.submit(&[
        example("cluster_pipeline").to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        "--slow-ms",
        "1000",
    ]);
    let big = c.submit_with_options(&["--num-cpus", "64"], &["true"]);
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let run = Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboard/drive.mjs"))
        .env("DASHBOARD_URL", format!("http://{}/", c.http))
        .env("VOLLEY_TOKEN", &c.token)
        .env("JOB", &job)
        .env("BIG", &big)
        .env("NODES", "2")
        .env("OUT", &shots)
        .env("CHROMIUM", &chromium)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&run.stdout).trim()).unwrap();
    assert_eq!(report["api_without_token"], 401, "{report}");
    assert!(report["refused"]
        .as_str()
        .unwrap()
        .contains("wrong cluster token"));
    assert_eq!(report["nodes_alive"], 2, "{report}");
    assert_eq!(report["node_rows"], 2, "{report}");
    let why = "its driver asks for 64 CPU: no node has 64 CPU (the most on one node is 1); \
               it waits until a node with enough joins";
    assert_eq!(report["big_waiting_in_list"], why, "{report}");
    assert_eq!(
        report["big_waiting_on_page"],
        format!("waiting: {why}"),
        "{report}"
    );
    let operators = report["operators"].as_array().unwrap();
    assert!(
        operators[0].as_str().unwrap().starts_with("ReadParquet"),
        "{report}"
    );
    // The first operator's finished tasks, sampled every half second while the job
    // ran: they grow (the page follows the execution) and never go back.
    let done: Vec<u64> = report["tasks_done_seen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");
    assert!(done.first() < done.last(), "no progress seen: {done:?}");
    assert_eq!(report["state"], "SUCCEEDED");
    assert!(
        report["log"]
            .as_str()
            .unwrap()
            .contains("wrote 240000 rows"),
        "{report}"
    );
    assert_eq!(
        report["external_requests"].as_array().unwrap().len(),
        0,
        "{report}"
    );
    for shot in ["refused", "overview", "job-running", "job-done"] {
        assert!(shots.join(format!("{shot}.png")).exists(), "{shot}.png");
    }
    assert_eq!(c.wait_job(&job, Duration::from_secs(10)), "SUCCEEDED");
}

/// Sends signal `SIG<name>` to `pid`.
fn nix_kill(pid: i32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// An actor pool between 1 and 3 actors grows to 3 under a burst and shrinks back to 1
/// during a pause; every row comes out once.
#[test]
fn an_actor_pool_grows_under_load_and_shrinks_when_idle() {
    let mut c = TestCluster::start(5.0);
    for _ in 0..2 {
        c.add_node(2, 0);
    }
    let dir = tempfile::tempdir().unwrap();
    // 24 files of 1,000 rows: 24 blocks.
    let input = input(dir.path(), 24, 1_000);
    let job = c.submit(&[
        example("actor_pool").to_str().unwrap(),
        input.to_str().unwrap(),
        "--min",
        "1",
        "--max",
        "3",
        "--sleep-ms",
        "300",
        "--burst",
        "16",
        // Long enough for the burst to drain (actors starting under load) and for the
        // extra actors to stay idle for the pool's 5 s before they go.
        "--pause-ms",
        "14000",
    ]);
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(240)),
        "SUCCEEDED",
        "{}",
        c.describe(&job)
    );
    let logs = c.logs(&job);
    let n: i64 = 24_000;
    assert_eq!(
        line_of(&logs, "RESULT"),
        format!("RESULT rows={n} distinct={n} sum={}", n * (n - 1) / 2),
        "{logs}"
    );
    let pool = line_of(&logs, "POOL");
    let sizes: Vec<usize> = pool
        .trim_start_matches("POOL ")
        .split("->")
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(sizes.first(), Some(&1), "starts at its minimum: {pool}");
    let peak = sizes.iter().position(|&s| s == 3);
    assert!(
        peak.is_some(),
        "grew to its maximum under load: {pool}\n{logs}"
    );
    assert!(
        sizes[peak.unwrap()..].contains(&1),
        "shrank back to its minimum when idle: {pool}\n{logs}"
    );
}

/// A pool's actor killed mid-run is replaced; its blocks are run again, and every row
/// comes out exactly once.
#[test]
fn a_killed_pool_actor_is_replaced_and_no_row_is_lost_or_doubled() {
    let mut c = TestCluster::start(5.0);
    for _ in 0..2 {
        c.add_node(2, 0);
    }
    let dir = tempfile::tempdir().unwrap();
    // 40 blocks of 400 ms on two actors: work left for the replacement when it starts.
    let input = input(dir.path(), 40, 1_000);
    let pids = dir.path().join("pids");
    std::fs::create_dir_all(&pids).unwrap();
    let job = c.submit(&[
        example("actor_pool").to_str().unwrap(),
        input.to_str().unwrap(),
        "--min",
        "2",
        "--max",
        "2",
        "--sleep-ms",
        "400",
        "--pids-dir",
        pids.to_str().unwrap(),
    ]);
    // Once both actors started and the run is under way, kill one of them.
    let deadline = Instant::now() + Duration::from_secs(120);
    let victim: i32 = loop {
        let found: Vec<i32> = std::fs::read_dir(&pids)
            .unwrap()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_string_lossy()
                    .strip_prefix("actor-")
                    .and_then(|p| p.parse().ok())
            })
            .collect();
        if found.len() >= 2 {
            break found[0];
        }
        assert!(Instant::now() < deadline, "the actors did not start");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(1500));
    kill9(victim);
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(240)),
        "SUCCEEDED",
        "{}",
        c.describe(&job)
    );
    let logs = c.logs(&job);
    let n: i64 = 40_000;
    assert_eq!(
        line_of(&logs, "RESULT"),
        format!("RESULT rows={n} distinct={n} sum={}", n * (n - 1) / 2),
        "{logs}"
    );
    let started = std::fs::read_dir(&pids).unwrap().count();
    assert!(
        started >= 3,
        "the killed actor was replaced ({started} actors started)"
    );
}

/// `volley llm generate` on a cluster: two engines as cluster actors on two nodes give
/// transformers' greedy continuation for every row; one engine killed mid-run is
/// replaced, and every row is answered exactly once.
#[cfg(feature = "llm")]
#[test]
fn llm_engines_run_as_cluster_actors_and_survive_a_killed_engine() {
    use volley::arrow::array::{AsArray, StringArray};
    use volley::arrow::datatypes::Int64Type;

    let mut c = TestCluster::start(5.0);
    c.add_node(2, 0);
    c.add_node(2, 0);
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("llm/tests/fixtures/tiny-llama");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("reference.json")).unwrap())
            .unwrap();
    let prompts: Vec<String> = reference["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    // The greedy tokens transformers produced for each prompt, as text.
    let tok = volley::llm::Tokenizer::from_dir(&model).unwrap();
    let bytes = std::fs::read(model.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let want: Vec<String> = (0..prompts.len())
        .map(|i| {
            let ids: Vec<u32> = st
                .tensor(&format!("greedy_{i}"))
                .unwrap()
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
                .collect();
            tok.decode(&ids, true).unwrap()
        })
        .collect();
    // 60 rows (every prompt 12 times) in 12 files: 12 blocks for the engines.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prompts");
    std::fs::create_dir_all(&input).unwrap();
    for f in 0..12i64 {
        let ids: Vec<i64> = (f * 5..f * 5 + 5).collect();
        let texts: Vec<&str> = ids
            .iter()
            .map(|i| prompts[*i as usize % prompts.len()].as_str())
            .collect();
        let batch = RecordBatch::try_from_iter([
            ("id", Arc::new(Int64Array::from(ids)) as ArrayRef),
            ("prompt", Arc::new(StringArray::from(texts)) as ArrayRef),
        ])
        .unwrap();
        let file = std::fs::File::create(input.join(format!("p-{f:02}.parquet"))).unwrap();
        let mut w = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }
    let output = dir.path().join("answers");
    let max_tokens = "160";
    let job = c.submit(&[
        volley_bin().to_str().unwrap(),
        "llm",
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--max-tokens",
        max_tokens,
        "--ignore-eos",
        "--concurrency",
        "2",
        "--batch-size",
        "5",
    ]);
    // Once both engines are alive, kill one of them.
    let actors = |c: &TestCluster| -> Vec<serde_json::Value> {
        let (code, body) = c.http_get(&format!("/api/jobs/{job}/actors"), Some(&c.token));
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<Vec<serde_json::Value>>(&body).unwrap()
    };
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    let victim = loop {
        let alive: Vec<serde_json::Value> = actors(&c)
            .into_iter()
            .filter(|a| a["state"] == "ALIVE" && a["name"] == "LlmProcessor")
            .collect();
        let nodes: std::collections::BTreeSet<String> = alive
            .iter()
            .map(|a| a["node_id"].as_str().unwrap().to_string())
            .collect();
        if alive.len() == 2 {
            assert_eq!(
                nodes.len(),
                2,
                "the engines spread over both nodes: {alive:?}"
            );
            break alive[0]["pid"].as_i64().unwrap() as i32;
        }
        assert!(
            Instant::now() < deadline,
            "the engines did not start:\n{}",
            c.describe(&job)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    kill9(victim);
    while !["SUCCEEDED", "FAILED", "STOPPED"].contains(&c.job_state(&job).as_str()) {
        for a in actors(&c) {
            seen.insert(a["actor_id"].as_str().unwrap().to_string());
        }
        assert!(Instant::now() < deadline, "{}", c.describe(&job));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(c.job_state(&job), "SUCCEEDED", "{}", c.describe(&job));
    assert!(
        seen.len() >= 3,
        "the killed engine was replaced (actors seen: {seen:?})\n{}",
        c.logs(&job)
    );
    let ctx = volley::Context::try_default().unwrap();
    let batches = ctx
        .read_parquet(output.to_str().unwrap())
        .unwrap()
        .collect()
        .unwrap();
    let mut ids = Vec::new();
    for b in &batches {
        let id = b.column_by_name("id").unwrap().as_primitive::<Int64Type>();
        let text = b
            .column_by_name("generated_text")
            .unwrap()
            .as_string::<i32>();
        let n = b
            .column_by_name("num_generated_tokens")
            .unwrap()
            .as_primitive::<Int64Type>();
        for r in 0..b.num_rows() {
            let i = id.value(r);
            ids.push(i);
            let w = &want[i as usize % want.len()];
            assert!(
                text.value(r).starts_with(w.as_str()),
                "row {i}: {:?} does not continue as transformers does ({w:?})",
                text.value(r)
            );
            assert_eq!(n.value(r), 160);
        }
    }
    ids.sort();
    assert_eq!(ids, (0..60).collect::<Vec<i64>>(), "every row exactly once");
}

/// Each `volley sql` query on a cluster is a job of its own. The next query's tasks run
/// in the worker processes the query before left on the node (the same program and
/// environment), moved to the new job's folder and log; left unused, they exit.
#[test]
fn consecutive_sql_queries_share_their_workers() {
    let mut c = TestCluster::start(2.0);
    c.add_node(2, 0);
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path(), 4, 20_000);
    let query = format!(
        "SELECT count(*) AS n, sum(x) AS s FROM '{}/' WHERE x % 7 = 3",
        input.display()
    );
    let first = c.sql_csv(&query);
    let kept = c.processes("VOLLEY_WORKER_ID=");
    assert!(
        !kept.is_empty(),
        "the first query's workers stay for the next"
    );
    let second = c.sql_csv(&query);
    assert_eq!(first, second);
    assert!(first.contains("11429,457171429"), "{first}");
    // A worker of the first query that had not asked for work when it ended exits
    // instead of staying, so the second may start one; the others are taken again.
    let now = c.processes("VOLLEY_WORKER_ID=");
    assert!(
        now.iter().any(|p| kept.contains(p)),
        "no worker of the first query ran the second: {kept:?} then {now:?}"
    );
    // On the node: each job's folder holds the logs of the workers that ran its tasks,
    // the second job's those of workers of the first.
    let node = std::fs::read_dir(c.home.path().join("nodes"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let mut jobs: Vec<_> = std::fs::read_dir(node.join("jobs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    jobs.sort();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let logs = |job: &Path| -> Vec<String> {
        std::fs::read_dir(job)
            .unwrap()
            .flatten()
            .map(|f| f.file_name().to_string_lossy().to_string())
            .filter(|f| f.ends_with(".log"))
            .collect()
    };
    let (before, after) = (logs(&jobs[0]), logs(&jobs[1]));
    assert!(!after.is_empty(), "{jobs:?}");
    assert!(
        after.iter().any(|l| before.contains(l)),
        "{before:?} then {after:?}"
    );
    // Unused, they exit.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !c.processes("VOLLEY_WORKER_ID=").is_empty() {
        assert!(Instant::now() < deadline, "the spare workers did not exit");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `volley sql` on a cluster: DataFusion plans the query for the cluster's partitions,
/// its stages (the scan with the partial aggregation, the final aggregation with the
/// sort) run as tasks on the nodes, and the answer is the local one.
#[test]
fn sql_stages_run_on_the_cluster_nodes() {
    let mut c = TestCluster::start(5.0);
    for _ in 0..3 {
        c.add_node(2, 0);
    }
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path(), 6, 20_000);
    let query = format!(
        "SELECT x % 5 AS k, count(*) AS n, sum(x) AS s FROM '{}/' WHERE x % 7 = 3 \
         GROUP BY 1 ORDER BY 1",
        input.display()
    );
    let local = Command::new(volley_bin())
        .args(["sql", &query, "--format", "csv"])
        .env_remove("VOLLEY_ADDRESS")
        .output()
        .unwrap();
    assert!(
        local.status.success(),
        "{}",
        String::from_utf8_lossy(&local.stderr)
    );
    let on_cluster = c.sql_csv(&query);
    assert_eq!(on_cluster, String::from_utf8_lossy(&local.stdout));
    assert_eq!(String::from_utf8_lossy(&local.stdout).lines().count(), 6);
    // A token given on the command line is not the job's command line, which its
    // workers run with and `volley job list` shows.
    let with_flag = c
        .volley()
        .env_remove("VOLLEY_TOKEN")
        .args(["sql", &query, "--format", "csv", "--token", &c.token])
        .output()
        .unwrap();
    assert_eq!(with_flag.stdout, local.stdout);
    let jobs = stdout_of(c.volley().args(["job", "list"]));
    assert!(
        jobs.contains("--format csv") && !jobs.contains(&c.token),
        "{jobs}"
    );
    // A second head on this state folder, the first running in the foreground, is
    // refused and leaves the first's address and token as they are.
    let files = || {
        ["head_address", "token"].map(|f| std::fs::read_to_string(c.home.path().join(f)).unwrap())
    };
    let before = files();
    let second = c
        .volley()
        .args(["start", "--head", "--port", "0", "--http-port", "0"])
        .args(["--token", "another"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && err.contains("a head already runs"),
        "{err}"
    );
    assert_eq!(files(), before);
    let explain = c
        .volley()
        .args(["sql", &query, "--explain"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&explain.stdout);
    // The EXPLAIN statement shows the same stages.
    let shown = c.sql_csv(&format!("EXPLAIN {query}"));
    assert!(
        shown.starts_with("plan_type,plan\nlogical_plan,")
            && shown.contains("physical_plan,")
            && shown.contains("ClusterStageExec: stage 2"),
        "{shown}"
    );
    let shown = c.sql_csv(&format!("EXPLAIN ANALYZE {query}"));
    assert!(
        shown.starts_with("plan_type,plan\nPlan with Metrics,")
            && shown.contains("metrics=[output_rows=5")
            && shown.contains("ClusterStageExec: stage 2")
            && shown.contains("output rows: 5"),
        "{shown}"
    );
    // A limit, and a join whose build side is any 100 rows: computed once, by one task,
    // and read by every task of the join (each computing its own would join with
    // different rows).
    let source = format!("'{}/'", input.display());
    for (query, want) in [
        (
            format!("SELECT x FROM {source} WHERE x % 3 = 0 ORDER BY x DESC LIMIT 3"),
            "x\n119997\n119994\n119991\n",
        ),
        (
            format!(
                "SELECT count(*) AS n FROM {source} a JOIN (SELECT x FROM {source} LIMIT 100) b \
                 ON a.x = b.x"
            ),
            "n\n100\n",
        ),
    ] {
        let out = c
            .volley()
            .args(["sql", &query, "--format", "csv"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            want,
            "{query}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Each command's job ended with it, succeeded (not failed when its heartbeats
    // stopped, nor still running).
    let list = c.volley().args(["job", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.lines().count() == 7 && list.lines().all(|l| l.contains("SUCCEEDED")),
        "{list}"
    );
    assert!(
        text.contains("ClusterStageExec: stage 2")
            && text.contains("map tasks into 6 partitions)")
            && text.contains("AggregateExec: mode=Partial"),
        "{text}"
    );
    // A setting the query changed reaches its tasks on the nodes: `to_timestamp` there
    // takes its time zone, in the scan's filter and in the partial aggregation (with
    // the nodes' own, the stages failed on a mismatched type).
    let query = format!(
        "SET datafusion.execution.time_zone = '+05:00'; SELECT x % 5 AS k, \
         max(to_timestamp(x)) AS t FROM {source} WHERE to_timestamp(x) > to_timestamp(1000) \
         GROUP BY 1 ORDER BY 1"
    );
    let local = stdout_of(
        Command::new(volley_bin())
            .args(["sql", &query, "--format", "csv"])
            .env_remove("VOLLEY_ADDRESS"),
    );
    assert!(
        local.contains("+05:00") && local.lines().count() == 6,
        "{local}"
    );
    assert_eq!(c.sql_csv(&query), local);
    // A file whose first pages are unreadable (its footer and page index intact): the
    // error names the file and the node whose task read it.
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    let mut bytes = std::fs::read(input.join("part-002.parquet")).unwrap();
    let n = bytes.len();
    let footer = u32::from_le_bytes(bytes[n - 8..n - 4].try_into().unwrap()) as usize;
    bytes[4..(n - 8 - footer) / 2].fill(0xff);
    std::fs::write(broken.join("part-000.parquet"), bytes).unwrap();
    let query = format!(
        "SELECT x % 5 AS k, count(*) AS n FROM '{}/' GROUP BY 1",
        broken.display()
    );
    let out = c.volley().args(["sql", &query]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("broken/part-000.parquet")
            && stderr.contains(" failed on node-"),
        "{stderr}"
    );
    // A division by zero in a stage that runs on the nodes: named as in one process,
    // with the file (its whole path) and the node; the task named once.
    let query = format!("SELECT x / (x - x) AS y FROM '{}/'", input.display());
    let out = c.volley().args(["sql", &query]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("dividing by zero in `x / (x - x)`")
            && stderr.contains(&format!("reading {}/part-", input.display()))
            && stderr.matches(" failed on node-").count() == 1
            && !stderr.contains(": stage "),
        "{stderr}"
    );
    // One task fails at once while the others are still to run or running: freeing
    // the stage cancels them, and the query fails with the failed task's error
    // (the cancelled tasks' ends once read as a partition with no rows: the query
    // succeeded with rows missing, on about half of these runs).
    let many = dir.path().join("many");
    std::fs::create_dir_all(&many).unwrap();
    let files = self::input(&many, 30, 50_000);
    let query = format!(
        "SELECT x / (x - 100) AS y FROM '{}/' WHERE x = 100 OR sha256(CAST(x AS VARCHAR)) = ''",
        files.display()
    );
    for run in 0..5 {
        let out = c.volley().args(["sql", &query]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && stderr.contains("dividing by zero in `x / (x - Int64(100))`")
                && stderr.contains(" failed on node-"),
            "run {run}: {}{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// The 22 TPC-H queries through `volley sql` on a head and three node agents give
/// DuckDB's answers; their stages ran on all three nodes; and Q21 with a node agent
/// killed (SIGKILL) mid-query gives the fault-free answer (the head re-runs the tasks
/// whose outputs were lost). Scale factor 1 (`VOLLEY_TPCH_SCALE` to change).
#[test]
fn tpch_queries_run_in_stages_on_three_nodes_and_give_duckdbs_answers() {
    let mut c = TestCluster::start(5.0);
    for _ in 0..3 {
        c.add_node(2, 0);
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let scale = std::env::var("VOLLEY_TPCH_SCALE").unwrap_or_else(|_| "1".into());
    tpch::generate(&data, &scale);
    let results = dir.path().join("results");
    std::fs::create_dir_all(&results).unwrap();
    let tables: Vec<String> = tpch::TABLES
        .iter()
        .map(|t| format!("{t}={}/{t}/", data.display()))
        .collect();
    let sql_env = |q: u32, args: &[&str], env: &[(&str, &str)]| -> Output {
        let mut cmd = c.volley();
        cmd.arg("sql")
            .arg("-f")
            .arg(tpch::queries().join(format!("q{q:02}.sql")));
        for t in &tables {
            cmd.args(["--table", t]);
        }
        cmd.envs(env.iter().copied()).args(args).output().unwrap()
    };
    let sql = |q: u32, args: &[&str]| sql_env(q, args, &[]);
    for q in 1..=22 {
        let out = results.join(format!("q{q:02}.parquet"));
        let run = sql(q, &["--output", out.to_str().unwrap()]);
        assert!(
            run.status.success(),
            "Q{q:02}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    tpch::assert_duckdb_answers(&data, &results);

    let explain = sql(5, &["--explain"]);
    let text = String::from_utf8_lossy(&explain.stdout);
    // Q05's joins have a small side by the files' statistics: it is broadcast (each
    // task of the join reads it whole), and lineitem is not exchanged.
    assert!(
        text.contains("ClusterStageExec")
            && text.contains("map tasks into 6 partitions")
            && text.contains("HashJoinExec: mode=CollectLeft"),
        "{text}"
    );
    // With broadcasts off, every join is partitioned: the same answers.
    let off = [("VOLLEY_EXEC_BROADCAST_JOIN_BYTES", "0")];
    for q in [5, 18] {
        let explain = sql_env(q, &["--explain"], &off);
        let text = String::from_utf8_lossy(&explain.stdout);
        assert!(
            text.contains("HashJoinExec: mode=Partitioned") && !text.contains("CollectLeft"),
            "Q{q:02} with broadcasts off: {text}"
        );
        let csv = |env: &[(&str, &str)]| {
            let out = sql_env(q, &["--format", "csv"], env);
            assert!(
                out.status.success(),
                "Q{q:02}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        assert_eq!(csv(&off), csv(&[]), "Q{q:02} with broadcasts off");
    }
    // Every job (one per query) lists its stages' tasks with the node each ran on.
    let list = c.volley().args(["job", "list"]).output().unwrap();
    let mut nodes = std::collections::BTreeSet::new();
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let job = line.split_whitespace().next().unwrap();
        let out = c
            .volley()
            .args(["logs", "--job", job, "--list"])
            .output()
            .unwrap();
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((_, rest)) = l.split_once("task query stage ") {
                if let Some((_, node)) = rest.split_once(" on ") {
                    nodes.insert(node.split(' ').next().unwrap().to_string());
                }
            }
        }
    }
    assert_eq!(nodes.len(), 3, "the stages ran on every node: {nodes:?}");

    // A node agent killed with SIGKILL while Q21 runs (once some of its stage tasks
    // have finished on that node): the answer is the fault-free one.
    let want = sql(21, &["--format", "csv"]);
    assert!(want.status.success());
    let mut cmd = c.volley();
    cmd.arg("sql")
        .arg("-f")
        .arg(tpch::queries().join("q21.sql"));
    for t in &tables {
        cmd.args(["--table", t]);
    }
    let running = cmd
        .args(["--format", "csv"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (job, victim) = loop {
        assert!(Instant::now() < deadline, "Q21's stages did not start");
        std::thread::sleep(Duration::from_millis(100));
        let list = c.volley().args(["job", "list"]).output().unwrap();
        let Some(job) = String::from_utf8_lossy(&list.stdout)
            .lines()
            .find(|l| l.contains(" RUNNING "))
            .map(|l| l.split_whitespace().next().unwrap().to_string())
        else {
            continue;
        };
        let driver = driver_node(&c, &job);
        let listing = c
            .volley()
            .args(["logs", "--job", &job, "--list"])
            .output()
            .unwrap();
        let victim = String::from_utf8_lossy(&listing.stdout)
            .lines()
            .filter(|l| l.contains("ended") && l.contains("task query stage "))
            .filter_map(|l| {
                l.split_once(" on ")
                    .map(|(_, n)| n.split(' ').next().unwrap().to_string())
            })
            .find(|n| *n != driver);
        if let Some(v) = victim {
            break (job, v);
        }
    };
    let i: usize = victim.trim_start_matches("node-").parse::<usize>().unwrap() - 1;
    let mut running = running;
    assert!(
        running.try_wait().unwrap().is_none(),
        "Q21 ended before {victim} could be killed: a larger scale makes it longer"
    );
    kill9(c.nodes[i].id() as i32);
    let _ = c.nodes[i].wait();
    let got = running.wait_with_output().unwrap();
    eprintln!(
        "Q21: {victim} killed, {} tasks re-ran for its objects",
        rebuilt_on(&c, &victim)
    );
    assert!(
        got.status.success(),
        "Q21 with {victim} killed ({job}): {}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        String::from_utf8_lossy(&want.stdout),
        "Q21 with {victim} killed ({job}; {} tasks re-ran for its objects)",
        rebuilt_on(&c, &victim)
    );
}

/// 2 GiB flow from a stage to an actor pool to a stage between the nodes, 16 times
/// what the two nodes' object stores hold (64 MiB each): the execution's object-store
/// budget (queued blocks, blocks held by waiting and running work, room for running
/// work's output) keeps it in memory, so no node spills a byte; and the driver, which
/// holds only references, keeps its peak memory flat: the whole run raises it by little
/// more than a quarter of it did.
#[test]
fn gigabytes_flow_between_nodes_without_spilling_while_the_driver_holds_references() {
    let mut c = TestCluster::start(5.0);
    for _ in 0..2 {
        c.add_node(2, 0);
    }
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path(), 512, 1);
    let job = c.submit(&[
        example("big_flow").to_str().unwrap(),
        input.to_str().unwrap(),
        "--mib",
        "4",
    ]);
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(600)),
        "SUCCEEDED",
        "{}",
        c.describe(&job)
    );
    let logs = c.logs(&job);
    let field = |line: &str, key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line}"))
    };
    let quarter = line_of(&logs, "QUARTER");
    let all = line_of(&logs, "ALL");
    assert_eq!(field(&quarter, "bytes"), (128 * 4) << 20);
    assert_eq!(field(&all, "bytes"), (512 * 4) << 20, "2 GiB went through");
    let (q, a) = (field(&quarter, "peak_rss_mib"), field(&all, "peak_rss_mib"));
    println!("driver peak RSS: {q} MiB after 512 MiB flowed, {a} MiB after 2 GiB more");
    assert!(
        a <= q + 64,
        "the driver's peak grew from {q} MiB to {a} MiB while 4x the data flowed:\n{logs}"
    );
    // The execution's object-store budget (half of the two stores) is passed by at most
    // a few blocks (an operator with nothing running may always start one task).
    let peaks: Vec<(f64, f64)> = logs
        .lines()
        .filter_map(|l| l.split("object stores: peak ").nth(1))
        .map(|rest| {
            let mib: Vec<f64> = rest
                .split(" MiB")
                .take(2)
                .map(|n| n.trim_start_matches(" of ").trim().parse().unwrap())
                .collect();
            (mib[0], mib[1])
        })
        .collect();
    assert_eq!(peaks.len(), 2, "{logs}");
    for (peak, budget) in peaks {
        assert_eq!(budget, 64.0);
        assert!(
            peak <= budget + 32.0,
            "object stores peaked at {peak} MiB:\n{logs}"
        );
    }
    assert_no_node_spilled(&c, 2, "");
}

/// Checks that none of the cluster's `nodes` ever spilled (the last column of `volley
/// status`, which nodes report with their heartbeats).
fn assert_no_node_spilled(c: &TestCluster, nodes: usize, context: &str) {
    std::thread::sleep(Duration::from_millis(1500));
    let status = c.status();
    let lines: Vec<&str> = status.lines().filter(|l| l.starts_with("node-")).collect();
    assert_eq!(lines.len(), nodes, "{status}");
    assert!(
        lines.iter().all(|l| l.trim_end().ends_with(" 0 B")),
        "a node spilled (last column):\n{status}{context}"
    );
}

/// A Dataset job that stops before its input is read (a `limit` reached) cancels the
/// cluster tasks it has in flight instead of waiting for them: they end as cancelled.
/// The first row's task does not sleep, so the limit is reached while the others do;
/// the stores are large enough for the first read tasks' expected outputs (64 MiB each
/// before any has finished) to start four at once.
#[test]
fn a_dataset_that_stops_early_cancels_its_tasks_in_flight() {
    let mut c = TestCluster::start(5.0);
    for _ in 0..2 {
        c.add_node_with_store(2, 0, "512MiB");
    }
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path(), 32, 1);
    let out = dir.path().join("out");
    let job = c.submit(&[
        example("cluster_pipeline").to_str().unwrap(),
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        "--slow-ms",
        "3000",
        "--fast-first",
        "--limit",
        "1",
    ]);
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(120)),
        "SUCCEEDED",
        "{}",
        c.describe(&job)
    );
    let logs = c.logs(&job);
    assert!(logs.contains("wrote 1 rows"), "{logs}");
    let cancelled = head_metric(&c, "volley_tasks_ended_total", &[("outcome", "cancelled")]);
    assert!(
        cancelled >= 1.0,
        "{cancelled} tasks cancelled; job log:\n{logs}"
    );
}

/// A driver that stops reading holds the cluster back: while it pauses, the stage and
/// the pool stop at the execution's object-store budget (half of two 64 MiB stores)
/// instead of filling the stores behind it (which would spill), and after it reads on
/// every byte arrives.
#[test]
fn a_consumer_that_stops_reading_holds_the_cluster_back() {
    let mut c = TestCluster::start(5.0);
    for _ in 0..2 {
        c.add_node(2, 0);
    }
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path(), 96, 1);
    let job = c.submit(&[
        example("big_flow").to_str().unwrap(),
        input.to_str().unwrap(),
        "--mib",
        "4",
        "--pause-ms",
        "4000",
    ]);
    // While the driver pauses, the stores hold at most the budget plus a block or so.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !c.logs(&job).contains("PAUSED") {
        assert!(Instant::now() < deadline, "{}", c.describe(&job));
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(2500));
    let during = c.status();
    // `volley status`: ... OBJECTS SPILLED, each as `12.0 MiB`.
    let mib = |value: &str, unit: &str| -> f64 {
        let v: f64 = value.parse().unwrap();
        v * match unit {
            "B" => 1.0 / (1 << 20) as f64,
            "KiB" => 1.0 / 1024.0,
            "MiB" => 1.0,
            "GiB" => 1024.0,
            other => panic!("unit {other} in:\n{during}"),
        }
    };
    let held: f64 = during
        .lines()
        .filter(|l| l.starts_with("node-"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            mib(f[f.len() - 4], f[f.len() - 3])
        })
        .sum();
    println!("during the pause the stores held {held} MiB:\n{during}");
    assert!(
        held <= 64.0 + 32.0,
        "the stores hold {held} MiB behind a paused consumer:\n{during}"
    );
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(300)),
        "SUCCEEDED",
        "{}",
        c.describe(&job)
    );
    let logs = c.logs(&job);
    let slow = line_of(&logs, "SLOW");
    assert!(
        slow.contains(&format!("bytes={}", (96u64 * 4) << 20)),
        "every byte arrived: {slow}"
    );
    let peak: f64 = logs
        .lines()
        .find_map(|l| l.split("object stores: peak ").nth(1))
        .and_then(|rest| rest.split(" MiB").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no object-store peak in:\n{logs}"));
    assert!(
        peak <= 64.0 + 32.0,
        "object stores peaked at {peak} MiB:\n{logs}"
    );
    assert_no_node_spilled(&c, 2, &format!("\nduring the pause:\n{during}"));
}

/// Test hosts in network namespaces: a bridge in this namespace (the head's host,
/// `.1`) and one namespace per node agent, joined to the bridge by a veth pair (`.2`,
/// `.3`, ...), all in a /24 of our own. Taking a host's link down cuts it off (a network
/// partition: the agent and its workers live on, unreachable). Removed on drop.
struct NetnsHosts {
    bridge: String,
    prefix: String,
    names: Vec<String>,
}

impl NetnsHosts {
    /// `n` hosts, or why they cannot be made here (not root, no `ip`, namespaces refused).
    /// Names carry this process's id; leftovers of earlier runs whose process is gone
    /// are removed first, and the subnet is one no interface here uses.
    fn create(n: usize) -> Result<Self, String> {
        remove_stale_hosts();
        let pid = std::process::id();
        let used = Command::new("ip")
            .args(["-o", "addr"])
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        let used = String::from_utf8_lossy(&used.stdout).to_string();
        let subnet = (0..250)
            .map(|k| 100 + (pid as usize + k) % 150)
            .find(|s| !used.contains(&format!("10.231.{s}.")))
            .ok_or("no free 10.231.x.0/24 subnet")?;
        let mut hosts = Self {
            bridge: String::new(),
            prefix: format!("10.231.{subnet}"),
            names: vec![],
        };
        let bridge = format!("vlbr{pid}");
        let head_ip = format!("{}.1/24", hosts.prefix);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        hosts.bridge = bridge.clone();
        ip(&["addr", "add", &head_ip, "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..n {
            let ns = format!("volley-t{pid}-{i}");
            let (inside, outside) = (format!("vli{pid}x{i}"), format!("vlo{pid}x{i}"));
            ip(&["netns", "add", &ns])?;
            hosts.names.push(ns.clone());
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside,
            ])?;
            ip(&["link", "set", &inside, "netns", &ns])?;
            ip(&["link", "set", &outside, "master", &bridge])?;
            ip(&["link", "set", &outside, "up"])?;
            let addr = format!("{}/24", hosts.host(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inside])?;
            ip(&["-n", &ns, "link", "set", &inside, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    /// The head's address on the bridge.
    fn head(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// Host `i`'s address.
    fn host(&self, i: usize) -> String {
        format!("{}.{}", self.prefix, i + 2)
    }

    /// Takes host `i`'s link down until the head declares one more node dead, waits two
    /// seconds more, and brings it back.
    fn cut_off_until_declared_dead(&self, c: &TestCluster, i: usize) {
        let dead_before = c.status().matches("DEAD").count();
        self.link(i, false);
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.status().matches("DEAD").count() == dead_before {
            assert!(
                Instant::now() < deadline,
                "the cut-off node was not declared dead"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_secs(2));
        self.link(i, true);
    }

    /// Takes host `i`'s link up or down.
    fn link(&self, i: usize, up: bool) {
        let status = Command::new("ip")
            .args(["link", "set", &format!("vlo{}x{i}", std::process::id())])
            .arg(if up { "up" } else { "down" })
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        // Only what this run made (a veth goes with its namespace).
        for ns in &self.names {
            let _ = ip(&["netns", "del", ns]);
        }
        if !self.bridge.is_empty() {
            let _ = ip(&["link", "del", &self.bridge]);
        }
    }
}

/// Runs `ip ARGS`; its error output when it fails.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Removes test hosts left by runs whose process is gone (killed before their drop).
fn remove_stale_hosts() {
    let alive = |pid: &str| Path::new(&format!("/proc/{pid}")).exists();
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if let Some(pid) = name
                .strip_prefix("volley-t")
                .and_then(|r| r.split('-').next())
            {
                if !alive(pid) {
                    let _ = ip(&["netns", "del", name]);
                }
            }
        }
    }
    if let Ok(out) = Command::new("ip")
        .args(["-o", "link", "show", "type", "bridge"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split(": ").nth(1).unwrap_or("");
            if let Some(pid) = name.strip_prefix("vlbr") {
                if !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) && !alive(pid) {
                    let _ = ip(&["link", "del", name]);
                }
            }
        }
    }
}

impl TestCluster {
    /// Starts a node agent on network-namespace host `i` and waits until the head
    /// lists it.
    fn add_host_node(&mut self, hosts: &NetnsHosts, i: usize, cpus: u32) {
        let before = self.node_count();
        let child = self
            .volley()
            .env_remove("VOLLEY_ADDRESS")
            .args(["start", "--block", "--address", &self.address])
            .args(["--host", &hosts.host(i), "--num-cpus", &cpus.to_string()])
            .args(["--num-gpus", "0", "--object-store-memory", "64MiB"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn_in(&hosts.names[i]);
        self.nodes.push(child);
        self.wait_for_nodes(
            before + 1,
            Duration::from_secs(30),
            &format!("the node on host {i} did not join"),
        );
    }
}

/// Runs a command inside a network namespace (`ip netns exec` execs it, so the child
/// is the command itself).
trait SpawnIn {
    fn spawn_in(&mut self, ns: &str) -> Child;
}

impl SpawnIn for Command {
    fn spawn_in(&mut self, ns: &str) -> Child {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(self.get_program());
        c.args(self.get_args());
        for (k, v) in self.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }
}

/// Node agents on three hosts of their own (network namespaces on a bridge; the head
/// and the driver on the bridge's address): a pipeline's output equals the local run's.
/// Then one host is cut off mid-job by taking its link down: the head declares it dead,
/// its tasks run again elsewhere, and the output is still the local run's (no row lost,
/// none twice, nothing the cut-off host's workers staged is committed); when its link
/// comes back, the agent learns it was declared dead and exits. Then a new agent on that
/// host, and a sort cut off the same way while it reduces: the local run's rows; then
/// SQL stages (a group-by, a join, a sort) with another host cut off while the driver
/// reads the sort's output: the local run's rows.
#[test]
fn hosts_in_network_namespaces_survive_a_partition() {
    let hosts = match NetnsHosts::create(3) {
        Ok(h) => h,
        Err(why) => {
            println!("skipped: network namespaces cannot be made here ({why})");
            return;
        }
    };
    let mut c = TestCluster::start_on(&hosts.head(), 2.0, vec![]);
    for i in 0..3 {
        c.add_host_node(&hosts, i, 1);
    }
    let status = c.status();
    for i in 0..3 {
        assert!(status.contains(&format!("{}:", hosts.host(i))), "{status}");
    }
    let dir = tempfile::tempdir().unwrap();
    let data = input(dir.path(), 12, 20_000);
    let local = dir.path().join("local");
    run_local(&data, &local);
    let expected = checksum(&local);
    // The driver runs here, on the bridge's host, attached to the cluster.
    let driver = |out: &Path| {
        Command::new(example("cluster_pipeline"))
            .arg(&data)
            .arg(out)
            .args(["--slow-ms", "300", "--tag-node"])
            .env("VOLLEY_ADDRESS", &c.address)
            .env("VOLLEY_TOKEN", &c.token)
            .env_remove("VOLLEY_WORKER_ID")
            .env_remove("VOLLEY_JOB_ID")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    let out = dir.path().join("spread");
    let run = driver(&out).wait_with_output().unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(checksum(&out), expected);
    let n = distinct_nodes(&out);
    assert!(n >= 2, "the rows were computed on {n} host(s)");

    // Cut host 1 off while its workers run tasks; bring it back later.
    let out = dir.path().join("partitioned");
    let run = driver(&out);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !c
        .task_workers(None)
        .iter()
        .any(|w| w.starts_with("node-2-"))
    {
        assert!(Instant::now() < deadline, "no task started on node-2");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    hosts.cut_off_until_declared_dead(&c, 1);
    let run = run.wait_with_output().unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(checksum(&out), expected);
    // The agent that was cut off hears it was declared dead and rejoins as a new node
    // (a fresh store: nothing it held before is read again).
    c.wait_for_nodes(
        3,
        Duration::from_secs(30),
        "the agent cut off did not rejoin once its link was back",
    );
    assert!(c.status().contains("node-4 "), "{}", c.status());
    // Nothing its workers staged reached the output, or was left beside it.
    assert_eq!(checksum(&out), expected);
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "staging left beside the outputs: {left:?}");

    // An exchange with a host cut off while it reduces (the driver stops reading, the
    // map outputs on the nodes), brought back later: the sort's rows are the local
    // run's, none lost, none twice, none read from the host that came back.
    c.add_host_node(&hosts, 1, 1);
    let sort = PrintingRun::start(&c, &data, &["--only", "sort", "--store-limit", "256KiB"]);
    sort.wait_for("PAUSED sort");
    hosts.cut_off_until_declared_dead(&c, 1);
    let printed = sort.finish();
    assert!(printed.contains("SAME sort rows=240000\n"), "{printed}");

    // SQL stages, with a host cut off once the driver has read the first batch of a
    // sort (the stages' outputs waiting on the nodes) and brought back later: a
    // group-by, a join and the sort give the local run's rows.
    c.wait_for_nodes(
        3,
        Duration::from_secs(30),
        "the agents cut off did not rejoin",
    );
    let reruns = || {
        std::fs::read_to_string(c.home.path().join("head.log"))
            .unwrap()
            .matches(": re-running task")
            .count()
    };
    let before = reruns();
    // Three partitions of 80,000 rows: the driver reads each in two slices, the second
    // after its pause.
    let sql = PrintingRun::start_with(
        &c,
        &data,
        &["--only", "sql"],
        &[("VOLLEY_EXEC_SHUFFLE_PARTITIONS", "3")],
    );
    sql.wait_for("PAUSED sql sort");
    hosts.cut_off_until_declared_dead(&c, 2);
    let printed = sql.finish();
    eprintln!(
        "SQL with a host cut off: {} tasks re-ran for lost objects",
        reruns() - before
    );
    for (op, rows) in [
        ("sql groupby", 7_000),
        ("sql join", 80_000),
        ("sql sort", 240_000),
    ] {
        assert!(
            printed.contains(&format!("SAME {op} rows={rows}\n")),
            "{op}: {printed}"
        );
    }
}

/// A head restart with node agents on hosts of their own (network namespaces on a
/// bridge, the head on the bridge's address): `kill -9` of the head while a pipeline
/// job runs on both hosts, then the head started again on its state folder and
/// address. The agents reach it again across the bridge and rejoin under their ids,
/// the job's driver (on one of the hosts) goes on, and the output is the local run's.
#[test]
fn a_head_restart_with_hosts_in_network_namespaces() {
    let hosts = match NetnsHosts::create(2) {
        Ok(h) => h,
        Err(why) => {
            println!("skipped: network namespaces cannot be made here ({why})");
            return;
        }
    };
    let port = free_port(&hosts.head());
    let mut c = TestCluster::start_with_args(&hosts.head(), 2.0, vec![], &["--port", &port]);
    for i in 0..2 {
        c.add_host_node(&hosts, i, 1);
    }
    let dir = tempfile::tempdir().unwrap();
    let data = input(dir.path(), 12, 20_000);
    let local = dir.path().join("local");
    run_local(&data, &local);
    let expected = checksum(&local);
    let out = dir.path().join("out");
    let job = c.submit(&[
        example("cluster_pipeline").to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        "--slow-ms",
        "300",
        "--tag-node",
    ]);
    c.wait_for_job_processes(&job, 2);
    std::thread::sleep(Duration::from_millis(1500));
    let before = c.status();
    assert_eq!(c.job_state(&job), "RUNNING", "{}", c.describe(&job));

    c.kill_head();
    let address = c.start_head_again("head-restarted.log");
    assert_eq!(address, c.address, "the head came back on its address");
    c.wait_for_nodes(
        2,
        Duration::from_secs(60),
        "the hosts' agents did not rejoin",
    );
    assert_eq!(
        c.wait_job(&job, Duration::from_secs(240)),
        "SUCCEEDED",
        "{}",
        c.describe(&job)
    );
    assert_eq!(checksum(&out), expected);
    assert!(
        distinct_nodes(&out) >= 2,
        "the rows were computed on one host"
    );
    // Each host's agent came back under the id it had: no node joined anew.
    let after = c.status();
    for i in 0..2 {
        let host = format!("{}:", hosts.host(i));
        let id = |status: &str| {
            status
                .lines()
                .find(|l| l.contains(&host))
                .and_then(|l| l.split_whitespace().next())
                .map(str::to_string)
        };
        assert!(id(&before).is_some(), "{before}");
        assert_eq!(id(&before), id(&after), "host {i}:\n{before}\n{after}");
    }
    let log = std::fs::read_to_string(c.home.path().join("head-restarted.log")).unwrap();
    for line in log.lines().filter(|l| l.contains("rejoined from")) {
        eprintln!("{line}");
    }
    assert_eq!(log.matches("rejoined from").count(), 2, "{log}");
    assert!(log.contains("goes on (the head restarted)"), "{log}");
    assert!(!log.contains(&format!("job {job}: starts again")), "{log}");
    assert_eq!(c.logs(&job).matches("wrote ").count(), 1);
}

/// `cluster_exchange` run here as the driver of a cluster: it stops reading for six
/// seconds after each operation's first batch, and what it prints is gathered as it
/// comes.
struct PrintingRun {
    child: Child,
    printed: Arc<std::sync::Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl PrintingRun {
    fn start(c: &TestCluster, data: &Path, args: &[&str]) -> Self {
        Self::start_with(c, data, args, &[])
    }

    fn start_with(c: &TestCluster, data: &Path, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut child = Command::new(example("cluster_exchange"))
            .arg(data)
            .args(args)
            .args(["--pause-ms", "6000"])
            .envs(envs.iter().copied())
            .env("VOLLEY_ADDRESS", &c.address)
            .env("VOLLEY_TOKEN", &c.token)
            .env_remove("VOLLEY_WORKER_ID")
            .env_remove("VOLLEY_JOB_ID")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let printed = Arc::new(std::sync::Mutex::new(String::new()));
        let reader = {
            let printed = Arc::clone(&printed);
            let mut stdout = child.stdout.take().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stdout.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    printed
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            })
        };
        Self {
            child,
            printed,
            reader,
        }
    }

    /// Waits until it printed `line`.
    fn wait_for(&self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.printed.lock().unwrap().contains(line) {
            assert!(
                Instant::now() < deadline,
                "no {line:?} came: {}",
                self.printed.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for it to end successfully; what it printed.
    fn finish(self) -> String {
        let done = self.child.wait_with_output().unwrap();
        self.reader.join().unwrap();
        let printed = self.printed.lock().unwrap().clone();
        assert!(
            done.status.success(),
            "{printed}{}",
            String::from_utf8_lossy(&done.stderr)
        );
        printed
    }
}

/// `volley start` in the background (as users run it): the token given with `--token`
/// reaches the head and the node agent, and appears on no process's command line.
#[test]
fn background_start_keeps_the_token_off_command_lines() {
    let home = tempfile::tempdir().unwrap();
    let token = "0123456789abcdef0123456789abcdef-not-on-argv";
    let volley = || {
        let mut c = Command::new(volley_bin());
        c.env("VOLLEY_HOME", home.path())
            .env_remove("VOLLEY_TOKEN")
            .env_remove("VOLLEY_ADDRESS");
        c
    };
    /// Stops what the test started, however it ends.
    struct Stop<'a>(&'a Path);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = Command::new(volley_bin())
                .env("VOLLEY_HOME", self.0)
                .arg("stop")
                .output();
        }
    }
    let _stop = Stop(home.path());
    let head = volley()
        .args(["start", "--head", "--port", "0", "--http-port", "0"])
        .args(["--token", token])
        .output()
        .unwrap();
    assert!(
        head.status.success(),
        "{}",
        String::from_utf8_lossy(&head.stderr)
    );
    let address = std::fs::read_to_string(home.path().join("head_address")).unwrap();
    let node = volley()
        .args(["start", "--address", address.trim(), "--num-cpus", "1"])
        .args(["--token", token])
        .output()
        .unwrap();
    assert!(
        node.status.success(),
        "{}",
        String::from_utf8_lossy(&node.stderr)
    );
    // It says so once the head took it.
    let said = String::from_utf8_lossy(&node.stdout);
    assert!(said.contains(" as node-1"), "{said}");

    // What cannot work is said before anything starts, or as the agent stops.
    let refused = |args: &[&str], why: &str| {
        let run = volley()
            .args(["start", "--address", address.trim()])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    };
    refused(&["--token", token, "--num-cpus", "-3"], "--num-cpus -3");
    refused(
        &["--token", token, "--memory", "lots"],
        "--memory: invalid configuration: `lots`",
    );
    refused(
        &[
            "--token",
            token,
            "--memory",
            "1GiB",
            "--object-store-memory",
            "2GiB",
        ],
        "more than the node's memory",
    );
    refused(&["--token", "wrong"], "the node agent stopped");
    // A second head on the same state folder leaves the first one alone.
    let log = std::fs::read_to_string(home.path().join("logs/head.log")).unwrap();
    let second = volley()
        .args(["start", "--head", "--port", "0", "--http-port", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && err.contains("a head already runs"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(home.path().join("head_address")).unwrap(),
        address
    );
    let log_after = std::fs::read_to_string(home.path().join("logs/head.log")).unwrap();
    assert!(
        log_after.starts_with(&log),
        "the head's log was cut:\n{log_after}"
    );

    let mut pids = vec![std::fs::read_to_string(home.path().join("head.pid")).unwrap()];
    for e in std::fs::read_dir(home.path().join("nodes"))
        .unwrap()
        .flatten()
    {
        if e.path().extension().is_some_and(|x| x == "pid") {
            pids.push(std::fs::read_to_string(e.path()).unwrap());
        }
    }
    assert_eq!(pids.len(), 2, "a head and a node agent");
    for pid in &pids {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(cmdline.contains("--block"), "{cmdline}");
        assert!(
            !cmdline.contains(token),
            "the token is on a command line: {cmdline}"
        );
    }
    // Both took the token: the node joined, and a client needs it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = volley()
            .args(["status", "--address", address.trim()])
            .env("VOLLEY_TOKEN", token)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&status.stdout).to_string();
        if status.status.success() && text.contains("node-1") {
            break;
        }
        assert!(Instant::now() < deadline, "the node did not join: {text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let refused = volley()
        .args(["status", "--address", address.trim(), "--token", "wrong"])
        .output()
        .unwrap();
    assert!(!refused.status.success());

    // `--wait` ends with the driver's exit code; the job's name is listed.
    let failed = volley()
        .args([
            "job",
            "submit",
            "--address",
            address.trim(),
            "--name",
            "nightly",
        ])
        .args(["--wait", "--", "sh", "-c", "exit 3"])
        .env("VOLLEY_TOKEN", token)
        .output()
        .unwrap();
    assert_eq!(
        failed.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    let list = volley()
        .args(["job", "list", "--address", address.trim()])
        .env("VOLLEY_TOKEN", token)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    let line = list.lines().find(|l| l.contains("[nightly]")).expect(&list);
    assert!(line.contains("FAILED"), "{list}");
    let id = line.split_whitespace().next().unwrap();
    let status = volley()
        .args(["job", "status", "--address", address.trim(), id])
        .env("VOLLEY_TOKEN", token)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("name:       nightly"), "{status}");

    // A stopped job's driver takes what it started with it (here a shell's command).
    let submit = volley()
        .args(["job", "submit", "--address", address.trim(), "--"])
        .args(["sh", "-c", "sleep 987 & wait"])
        .env("VOLLEY_TOKEN", token)
        .output()
        .unwrap();
    assert!(
        submit.status.success(),
        "{}",
        String::from_utf8_lossy(&submit.stderr)
    );
    let job = String::from_utf8_lossy(&submit.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("job-"))
        .expect("a job id")
        .to_string();
    let sleeping = || -> Vec<i32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
                let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
                let env = std::fs::read(e.path().join("environ")).ok()?;
                (cmdline == b"sleep\0987\0"
                    && String::from_utf8_lossy(&env).contains(&format!("VOLLEY_JOB_ID={job}")))
                .then_some(pid)
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while sleeping().is_empty() {
        assert!(Instant::now() < deadline, "the job's command did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let stop = volley()
        .args(["job", "stop", "--address", address.trim(), &job])
        .env("VOLLEY_TOKEN", token)
        .output()
        .unwrap();
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sleeping().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the stopped job's command still runs: {:?}",
            sleeping()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Resident memory of process `pid` in bytes (0 once it is gone).
fn rss(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Out of core across nodes: three nodes whose object stores keep 24 MiB each in memory
/// sort ~980 MiB of rows (40 times one node's store, 1.8 times what a node may hold in
/// all: its store plus the processes' stated overhead) into three ranges of ~330 MiB
/// and write them as Parquet (each reduce task writes its range). A reduce task takes
/// its range as its worker reads it and sorts it under a 48 MiB budget, spilling: it
/// never holds the range whole. The job finishes with every row, sorted, in ranges
/// that do not overlap; the stores spilled; and no node's memory (its agent's and
/// workers' resident memory plus its shared-memory object files, sampled through the
/// run) went past its store plus a stated overhead for the processes themselves.
#[test]
fn a_sort_larger_than_every_node_finishes_inside_each_nodes_memory() {
    const STORE_MIB: u64 = 24;
    // Each worker's memory budget (its sort spills past it), and the sort's ranges:
    // ~330 MiB each, so that a reduce task's partition is larger than what its
    // node may hold.
    const WORKER_MIB: u64 = 48;
    const PARTITIONS: usize = 3;
    let mut c = TestCluster::start(10.0);
    for _ in 0..3 {
        c.add_node_with_store(1, 0, &format!("{STORE_MIB}MiB"));
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    std::fs::create_dir_all(&input).unwrap();
    let (files, rows) = (32_i64, 250_000_i64);
    let n = files * rows;
    let pad = "p".repeat(120);
    for f in 0..files {
        // A permutation of 0..n: every key once, in no order.
        let keys: Vec<i64> = (f * rows..(f + 1) * rows)
            .map(|i| (i * 7_919) % n)
            .collect();
        let batch = RecordBatch::try_from_iter([
            ("x", Arc::new(Int64Array::from(keys)) as ArrayRef),
            (
                "pad",
                Arc::new(volley::arrow::array::StringArray::from_iter_values(
                    (0..rows).map(|_| pad.as_str()),
                )) as ArrayRef,
            ),
        ])
        .unwrap();
        let file = std::fs::File::create(input.join(format!("part-{f:03}.parquet"))).unwrap();
        let mut w = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }
    let out = dir.path().join("sorted");
    let agents: Vec<i32> = c.nodes.iter().map(|n| n.id() as i32).collect();
    let job = c.submit_with_env(
        &[&format!("VOLLEY_EXEC_MEMORY_LIMIT={WORKER_MIB}MiB")],
        &[
            example("cluster_sort").to_str().unwrap(),
            input.to_str().unwrap(),
            out.to_str().unwrap(),
            "--by",
            "x",
            "--partitions",
            &PARTITIONS.to_string(),
        ],
    );

    // Each node's memory, sampled while the job runs: the total, and its agent's, its
    // workers' and its shared folder's at their own peaks.
    let mut peaks = [0_u64; 3];
    let mut parts = [[0_u64; 3]; 3];
    let deadline = Instant::now() + Duration::from_secs(900);
    let state = loop {
        for (i, agent) in agents.iter().enumerate() {
            let workers = c.processes(&format!("VOLLEY_WORKER_ID=node-{}-", i + 1));
            let shared: u64 = std::fs::read_dir("/dev/shm")
                .map(|entries| {
                    entries
                        .flatten()
                        .filter(|e| {
                            e.file_name()
                                .to_string_lossy()
                                .starts_with(&format!("volley-objects-{agent}-"))
                        })
                        .map(|e| dir_bytes(&e.path()))
                        .sum()
                })
                .unwrap_or(0);
            let now = [
                rss(*agent),
                workers.iter().map(|p| rss(*p)).sum::<u64>(),
                shared,
            ];
            peaks[i] = peaks[i].max(now.iter().sum());
            for (part, n) in parts[i].iter_mut().zip(now) {
                *part = (*part).max(n);
            }
        }
        let state = c.job_state(&job);
        if ["SUCCEEDED", "FAILED", "STOPPED"].contains(&state.as_str()) {
            break state;
        }
        assert!(Instant::now() < deadline, "the sort did not finish");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(state, "SUCCEEDED", "{}", c.describe(&job));
    let logs = c.logs(&job);
    assert!(logs.contains(&format!("wrote {n} rows")), "{logs}");
    // The sort's reduce tasks wrote the files: no stage of write tasks read their
    // output again.
    let listing = c
        .volley()
        .args(["logs", "--job", &job, "--list"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains(&format!("Sort (reduce) #{}", PARTITIONS - 1))
            && !listing.contains("task Write"),
        "{listing}"
    );

    // Every key once, each file sorted, the files' ranges apart and in the order of
    // the files' names.
    let mut ranges = Vec::new();
    let mut total = 0_i64;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for path in files {
        let file = std::fs::File::open(&path).unwrap();
        let reader =
            volley::datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(
                file, 65_536,
            )
            .unwrap();
        let mut keys = Vec::new();
        for b in reader {
            let b = b.unwrap();
            let x = b
                .column_by_name("x")
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .clone();
            keys.extend(x.values().iter().copied());
        }
        if keys.is_empty() {
            continue;
        }
        assert!(
            keys.windows(2).all(|w| w[0] < w[1]),
            "{} is not sorted",
            path.display()
        );
        total += keys.len() as i64;
        ranges.push((keys[0], keys[keys.len() - 1]));
    }
    assert_eq!(total, n);
    assert!(ranges.windows(2).all(|w| w[0].1 < w[1].0), "{ranges:?}");
    assert_eq!((ranges[0].0, ranges[ranges.len() - 1].1), (0, n - 1));

    // The data did not fit the stores: they spilled (the last column of `volley status`).
    let status = c.status();
    assert!(
        status
            .lines()
            .filter(|l| l.starts_with("node-"))
            .any(|l| !l.trim_end().ends_with(" 0 B")),
        "no node spilled:\n{status}"
    );
    // The processes' own memory (binaries, runtimes, a reduce task's partition and its
    // sort) is the overhead over the store.
    const OVERHEAD_MIB: u64 = 512;
    let mib: Vec<u64> = peaks.iter().map(|b| b >> 20).collect();
    let parts: Vec<Vec<u64>> = parts
        .iter()
        .map(|p| p.iter().map(|b| b >> 20).collect())
        .collect();
    println!(
        "peak memory per node: {mib:?} MiB (agent, workers, shared folder: {parts:?}); \
         store {STORE_MIB} MiB, data {} MiB",
        (n * 8 + n * 120) >> 20
    );
    for m in &mib {
        assert!(
            *m <= STORE_MIB + OVERHEAD_MIB,
            "a node's memory peaked at {m} MiB: {mib:?}\n{status}"
        );
    }
}

/// The samples of a `/metrics` page as Prometheus' own client library parses them
/// (OpenMetrics): `(name, labels, value)`.
fn prometheus_samples(
    text: &str,
) -> Vec<(String, std::collections::BTreeMap<String, String>, f64)> {
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        print(json.dumps([s.name, s.labels, s.value]))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 must be installed (scripts/test.sh installs the parser)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "Prometheus' parser refused the page (run scripts/test.sh, which installs \
         prometheus_client):\n{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The value of the sample `name` with exactly `labels` on the head's `/metrics` page.
fn head_metric(c: &TestCluster, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (code, text) = c.http_get("/metrics", Some(&c.token));
    assert_eq!(code, 200, "{text}");
    prometheus_samples(&text)
        .into_iter()
        .find(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
        .2
}

/// `(path, inode)` of each file in a folder with `len` bytes.
fn files_of_len(dir: &Path, len: u64) -> Vec<(PathBuf, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out: Vec<(PathBuf, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            (m.is_file() && m.len() == len).then(|| (e.path(), m.ino()))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn job_files_are_sent_once_per_content_and_cached_on_nodes_up_to_a_limit() {
    const MIB: u64 = 1 << 20;
    // Head and node each keep at most 5 MiB of job files: one 3 MiB file fits, two do not.
    let mut c =
        TestCluster::start_with_args("127.0.0.1", 5.0, vec![], &["--package-cache", "5MiB"]);
    let before = c.node_count();
    let node = c
        .volley()
        .args(["start", "--block", "--address", &c.address])
        .args([
            "--num-cpus",
            "1",
            "--package-cache",
            "5MiB",
            "--metrics-port",
            "0",
        ])
        .args(["--object-store-memory", "64MiB"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    c.nodes.push(node);
    c.wait_for_nodes(before + 1, Duration::from_secs(30), "the node did not join");
    let node_cache = c.home.path().join("package-cache");

    let dir = tempfile::tempdir().unwrap();
    let wd = dir.path().join("wd");
    std::fs::create_dir_all(&wd).unwrap();
    // Bytes that no compression or sparse file would shrink.
    let noise = |seed: u64| -> Vec<u8> {
        let mut x = seed;
        (0..3 * MIB)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    std::fs::write(wd.join("data.bin"), noise(1)).unwrap();
    std::fs::write(wd.join("run.sh"), "wc -c < data.bin\n").unwrap();
    let run = |c: &TestCluster| -> String {
        let out = c
            .volley()
            .args(["job", "submit", "--wait", "--working-dir"])
            .arg(&wd)
            .args(["--", "sh", "run.sh"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let received =
        |c: &TestCluster| head_metric(c, "volley_package_received_bytes_total", &[]) as u64;

    // First job: both files go up, and the node fetches both.
    assert_eq!(run(&c).trim(), "3145728");
    let first = received(&c);
    assert!((3 * MIB..3 * MIB + 100).contains(&first), "{first}");
    let cached = files_of_len(&node_cache, 3 * MIB);
    assert_eq!(cached.len(), 1, "{cached:?}");
    // The agent's own `/metrics` (token required) shows what it fetched and caches.
    let metrics_file = c
        .home
        .path()
        .join("nodes")
        .join(c.nodes[0].id().to_string())
        .join("metrics_address");
    let agent_http = std::fs::read_to_string(&metrics_file).unwrap();
    let agent_get = |token: Option<&str>| -> (u16, String) {
        let mut s = std::net::TcpStream::connect(&agent_http).unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (resp[9..12].parse().unwrap(), body)
    };
    assert_eq!(agent_get(None).0, 401);
    let (code, text) = agent_get(Some(&c.token));
    assert_eq!(code, 200, "{text}");
    let samples = prometheus_samples(&text);
    let value = |name: &str| {
        samples
            .iter()
            .find(|(n, l, _)| n == name && l.get("node").map(String::as_str) == Some("node-1"))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .2 as u64
    };
    assert!(
        value("volley_agent_package_fetched_bytes_total") >= 3 * MIB,
        "{text}"
    );
    assert!(
        value("volley_agent_package_cache_bytes") >= 3 * MIB,
        "{text}"
    );
    assert_eq!(
        value("volley_agent_object_store_limit_bytes"),
        64 * MIB,
        "{text}"
    );

    // The same files again: nothing is uploaded, and the node reads its own copy (the
    // same file: a fetch would have written a new one).
    assert_eq!(run(&c).trim(), "3145728");
    assert_eq!(received(&c), first);
    assert_eq!(files_of_len(&node_cache, 3 * MIB), cached);

    // A changed script: only the script goes up.
    std::fs::write(wd.join("run.sh"), "wc -c < data.bin; echo changed\n").unwrap();
    assert_eq!(run(&c).trim(), "3145728\nchanged");
    let third = received(&c);
    assert!(third > first && third < first + 100, "{first} {third}");
    assert_eq!(files_of_len(&node_cache, 3 * MIB), cached);

    // New data: with both 3 MiB files the caches are past their limits, and the least
    // recently used (the old data, whose jobs ended) is evicted on the head and the node.
    std::fs::write(wd.join("data.bin"), noise(2)).unwrap();
    assert_eq!(run(&c).trim(), "3145728\nchanged");
    assert!(received(&c) >= third + 3 * MIB);
    let now = files_of_len(&node_cache, 3 * MIB);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(
        now[0].0, cached[0].0,
        "the old data was not evicted on the node"
    );
    let cache_bytes = head_metric(&c, "volley_package_cache_bytes", &[]) as u64;
    assert!(cache_bytes <= 5 * MIB, "{cache_bytes}");

    // The old data again: evicted, so it goes up once more.
    let before = received(&c);
    std::fs::write(wd.join("data.bin"), noise(1)).unwrap();
    assert_eq!(run(&c).trim(), "3145728\nchanged");
    assert!(received(&c) >= before + 3 * MIB);
}
