//! Job submission from the command line (or any program): upload, status, logs, stop.

use std::collections::HashMap;
use std::path::Path;

use futures::StreamExt;
use volley_common::{Result, VolleyError};

use super::net::{status_error, Channels, Head};
use super::package::{blob_chunks, manifest_of, safe_relative, working_dir_files, DigestCache};
use super::proto;
use super::resources::Resources;
use super::status::{ClusterStatus, JobStatus};

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct JobRequest {
    /// The command. If its first word is a file on this machine, that file is uploaded
    /// (as `bin/NAME`) and run; otherwise it is looked up on the nodes' `PATH`.
    pub entrypoint: Vec<String>,
    /// A folder whose files are uploaded; the driver runs inside it.
    pub working_dir: Option<std::path::PathBuf>,
    /// Environment of the driver and its workers.
    pub env: HashMap<String, String>,
    /// What the driver holds (default nothing: it mostly waits).
    pub resources: Resources,
    /// A name.
    pub name: String,
}

/// Whose worker output to read (`volley logs --job ID --task T | --actor A | --workers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerOutput {
    /// A task: its id, the id's part after the job (`t-...`), or its name (every task
    /// of that name).
    Task(String),
    /// An actor, all its incarnations.
    Actor(String),
    /// Every worker of the job.
    AllWorkers,
}

/// One piece of worker output: a task attempt, an actor incarnation or a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSection {
    /// Whose output and where it ran.
    pub title: String,
    /// Its size.
    pub bytes: u64,
    /// Whether it is still being written.
    pub running: bool,
}

/// How one operator of a Dataset execution is going.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct OperatorProgress {
    /// With its fused steps (`ReadParquet->Filter`).
    pub name: String,
    /// Tasks finished.
    pub tasks_done: u64,
    /// Tasks running.
    pub tasks_running: u64,
    /// Tasks known so far (grows while its input is still coming).
    pub tasks_total: u64,
    /// Rows produced.
    pub rows: u64,
    /// Bytes produced (Arrow memory size).
    pub bytes: u64,
    /// Bytes waiting in its output queue.
    pub queued_bytes: u64,
    /// Bytes written to spill files.
    pub spilled_bytes: u64,
}

/// A Dataset execution of a job's driver, as last reported to the head.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExecutionProgress {
    /// Unique within the job.
    pub id: String,
    /// When it started, milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// Whether it has ended.
    pub finished: bool,
    /// From the source to the output.
    pub operators: Vec<OperatorProgress>,
}

impl From<&OperatorProgress> for proto::OperatorProgress {
    fn from(o: &OperatorProgress) -> Self {
        Self {
            name: o.name.clone(),
            tasks_done: o.tasks_done,
            tasks_running: o.tasks_running,
            tasks_total: o.tasks_total,
            rows: o.rows,
            bytes: o.bytes,
            queued_bytes: o.queued_bytes,
            spilled_bytes: o.spilled_bytes,
        }
    }
}

impl From<proto::ExecutionProgress> for ExecutionProgress {
    fn from(e: proto::ExecutionProgress) -> Self {
        Self {
            id: e.execution_id,
            started_ms: e.started_ms,
            finished: e.finished,
            operators: e
                .operators
                .into_iter()
                .map(|o| OperatorProgress {
                    name: o.name,
                    tasks_done: o.tasks_done,
                    tasks_running: o.tasks_running,
                    tasks_total: o.tasks_total,
                    rows: o.rows,
                    bytes: o.bytes,
                    queued_bytes: o.queued_bytes,
                    spilled_bytes: o.spilled_bytes,
                })
                .collect(),
        }
    }
}

/// A client of a head's job API.
#[derive(Debug, Clone)]
pub struct JobClient {
    head: Head,
    rt: std::sync::Arc<tokio::runtime::Runtime>,
}

impl JobClient {
    /// Connects to the head at `address`, over TLS if `VOLLEY_TLS_CA` names a CA.
    pub fn connect(address: &str, token: &str) -> Result<Self> {
        Self::connect_with(address, token, &super::tls::TlsConfig::from_env()?)
    }

    /// Connects to the head at `address` with `tls`.
    pub fn connect_with(address: &str, token: &str, tls: &super::tls::TlsConfig) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| VolleyError::internal(format!("cannot start a runtime: {e}")))?;
        // Channels are made inside the runtime that drives them.
        let _enter = rt.enter();
        let head = Channels::new(token, tls).head(address)?;
        Ok(Self {
            head,
            rt: std::sync::Arc::new(rt),
        })
    }

    /// Uploads and starts a job; returns its id.
    pub fn submit(&self, request: &JobRequest) -> Result<String> {
        let first = request.entrypoint.first().ok_or_else(|| {
            VolleyError::plan("no command given (volley job submit -- PROGRAM ARGS)")
        })?;
        request.resources.validate()?;
        let mut files = Vec::new();
        if let Some(dir) = &request.working_dir {
            if !dir.is_dir() {
                return Err(VolleyError::plan(format!(
                    "--working-dir {}: not a folder",
                    dir.display()
                )));
            }
            for (rel, path, mode) in working_dir_files(dir)? {
                safe_relative(&rel)?;
                files.push((rel, path, mode));
            }
        }
        let mut entrypoint = request.entrypoint.clone();
        let local = Path::new(first);
        if local.is_file() && (first.contains('/') || request.working_dir.is_none()) {
            use std::os::unix::fs::PermissionsExt;
            let name = local
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .ok_or_else(|| VolleyError::plan(format!("{first}: not a file name")))?;
            let rel = format!("bin/{name}");
            let mode = std::fs::metadata(local)?.permissions().mode();
            files.push((rel.clone(), local.to_path_buf(), mode));
            entrypoint[0] = rel;
        }
        let spec = proto::JobSpec {
            entrypoint,
            env: request.env.clone(),
            resources: Some((&request.resources).into()),
            name: request.name.clone(),
            attached: false,
            package: None,
            share_workers: false,
        };
        let head = self.head.clone();
        self.rt
            .block_on(submit_job(head, spec, files, "submitting the job"))
    }

    fn read_worker_logs(
        &self,
        job: &str,
        which: &WorkerOutput,
        list: bool,
        seen: HashMap<String, u64>,
    ) -> Result<proto::WorkerLogs> {
        let (task, actor_id) = match which {
            WorkerOutput::Task(t) => (t.clone(), String::new()),
            WorkerOutput::Actor(a) => (String::new(), a.clone()),
            WorkerOutput::AllWorkers => (String::new(), String::new()),
        };
        let mut head = self.head.clone();
        let logs = self
            .rt
            .block_on(head.read_worker_logs(proto::LogQuery {
                query_id: 0,
                job_id: job.to_string(),
                task,
                actor_id,
                list,
                seen,
            }))
            .map_err(|e| status_error(format!("job {job}"), e))?
            .into_inner();
        for u in &logs.unanswered {
            eprintln!("warning: no worker output from {u}");
        }
        Ok(logs)
    }

    /// The pieces of worker output of job `job` that `which` selects (kept on the
    /// nodes that ran them; nodes no longer in the cluster are not asked).
    pub fn worker_output_sections(
        &self,
        job: &str,
        which: &WorkerOutput,
    ) -> Result<Vec<OutputSection>> {
        Ok(self
            .read_worker_logs(job, which, true, HashMap::new())?
            .sections
            .into_iter()
            .map(|s| OutputSection {
                title: s.title,
                bytes: s.bytes,
                running: s.open,
            })
            .collect())
    }

    /// Writes the worker output of job `job` that `which` selects to `out`, each piece
    /// under a `==> title <==` line. With `follow`, keeps writing new output every half
    /// second until every selected piece is finished (or the job has ended).
    pub fn worker_output(
        &self,
        job: &str,
        which: &WorkerOutput,
        follow: bool,
        out: &mut dyn std::io::Write,
    ) -> Result<()> {
        // Bytes written so far, by section title.
        let mut written: HashMap<String, u64> = HashMap::new();
        let mut last_title = String::new();
        loop {
            // Only what lies past the bytes written comes back.
            let logs = self.read_worker_logs(job, which, false, written.clone())?;
            for s in &logs.sections {
                if s.restarted {
                    written.remove(&s.title);
                    writeln!(out, "==> {} (its output started over) <==", s.title)?;
                    last_title = s.title.clone();
                }
                let done = written.get(&s.title).copied().unwrap_or(0);
                let end = s.skipped + s.data.len() as u64;
                if end <= done && written.contains_key(&s.title) {
                    continue;
                }
                if last_title != s.title {
                    writeln!(out, "==> {} <==", s.title)?;
                    last_title = s.title.clone();
                }
                if s.skipped > done {
                    writeln!(out, "[{} earlier bytes not shown]", s.skipped - done)?;
                }
                let from = done.saturating_sub(s.skipped) as usize;
                out.write_all(s.data.get(from..).unwrap_or_default())?;
                out.flush()?;
                written.insert(s.title.clone(), end);
            }
            let any_open = logs.sections.iter().any(|s| s.open);
            let finished = !any_open
                && (logs.job_ended
                    || (!logs.sections.is_empty() && *which != WorkerOutput::AllWorkers));
            if !follow || finished {
                if logs.sections.is_empty() {
                    let what = match which {
                        WorkerOutput::Task(t) => format!("of task {t}"),
                        WorkerOutput::Actor(a) => format!("of actor {a}"),
                        WorkerOutput::AllWorkers => "of its workers".into(),
                    };
                    return Err(VolleyError::plan(format!(
                        "job {job}: no output {what} on any node (see `volley logs --job {job} --list`)"
                    )));
                }
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }

    /// The Dataset executions of job `job` its driver reported (the last ones).
    pub fn executions(&self, job: &str) -> Result<Vec<ExecutionProgress>> {
        let mut head = self.head.clone();
        Ok(self
            .rt
            .block_on(head.get_executions(proto::JobId {
                job_id: job.to_string(),
            }))
            .map_err(|e| status_error(format!("job {job}"), e))?
            .into_inner()
            .executions
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// A job's record.
    pub fn status(&self, job: &str) -> Result<JobStatus> {
        let mut head = self.head.clone();
        Ok(self
            .rt
            .block_on(head.get_job(proto::JobId {
                job_id: job.to_string(),
            }))
            .map_err(|e| status_error(format!("job {job}"), e))?
            .into_inner()
            .into())
    }

    /// Every job.
    pub fn list(&self) -> Result<Vec<JobStatus>> {
        let mut head = self.head.clone();
        Ok(self
            .rt
            .block_on(head.list_jobs(proto::Empty {}))
            .map_err(|e| status_error("listing jobs", e))?
            .into_inner()
            .jobs
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// Stops a job.
    pub fn stop(&self, job: &str) -> Result<JobStatus> {
        let mut head = self.head.clone();
        Ok(self
            .rt
            .block_on(head.stop_job(proto::JobId {
                job_id: job.to_string(),
            }))
            .map_err(|e| status_error(format!("job {job}"), e))?
            .into_inner()
            .into())
    }

    /// Writes the job's log to `out`; with `follow`, until the job ends.
    pub fn logs(&self, job: &str, follow: bool, out: &mut dyn std::io::Write) -> Result<()> {
        let mut head = self.head.clone();
        self.rt.block_on(async {
            let mut stream = head
                .job_logs(proto::LogsRequest {
                    job_id: job.to_string(),
                    offset: 0,
                    follow,
                })
                .await
                .map_err(|e| status_error(format!("logs of {job}"), e))?
                .into_inner();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| status_error(format!("logs of {job}"), e))?;
                out.write_all(&chunk.data)?;
                out.flush()?;
            }
            Ok(())
        })
    }

    /// Waits until the job ends; returns its final record.
    pub fn wait(&self, job: &str, timeout: std::time::Duration) -> Result<JobStatus> {
        let start = std::time::Instant::now();
        loop {
            let info = self.status(job)?;
            if info.state.is_final() {
                return Ok(info);
            }
            if start.elapsed() > timeout {
                return Err(VolleyError::execution(format!(
                    "job {job} still {} after {timeout:?}",
                    info.state
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Nodes, resources and load.
    pub fn cluster_status(&self) -> Result<ClusterStatus> {
        let mut head = self.head.clone();
        Ok(self
            .rt
            .block_on(head.status(proto::Empty {}))
            .map_err(|e| status_error("status", e))?
            .into_inner()
            .into())
    }
}

/// Submits a job whose package is `files` `(relative path, file, mode)`: uploads the
/// files the head lacks (by content digest), then the spec. `context` names the call in
/// errors.
pub(crate) async fn submit_job(
    mut head: Head,
    mut spec: proto::JobSpec,
    files: Vec<(String, std::path::PathBuf, u32)>,
    context: &str,
) -> Result<String> {
    let files = std::sync::Arc::new(files);
    // Two tries: the head may evict a file between its upload and the spec (another
    // upload filled its cache in between); the second try uploads it again.
    for attempt in 0..2 {
        let listed = std::sync::Arc::clone(&files);
        let (manifest, sources) =
            tokio::task::spawn_blocking(move || manifest_of(&listed, DigestCache::user().as_ref()))
                .await
                .map_err(|e| VolleyError::internal(format!("hashing the package: {e}")))??;
        let missing = head
            .missing_blobs(manifest.clone())
            .await
            .map_err(|e| status_error(context, e))?
            .into_inner()
            .digests;
        if !missing.is_empty() {
            let blobs = missing
                .iter()
                .map(|d| {
                    let path = sources.get(d).cloned().ok_or_else(|| {
                        VolleyError::execution(format!("the head asked for an unknown file {d}"))
                    })?;
                    Ok((d.clone(), path))
                })
                .collect::<Result<Vec<_>>>()?;
            // A file that cannot be read ends the stream early; the head refuses the
            // incomplete file, and the error names it.
            let (tx, mut failed) = tokio::sync::oneshot::channel();
            let mut tx = Some(tx);
            let chunks = tokio_stream::wrappers::ReceiverStream::new(blob_chunks(blobs))
                .take_while(move |c| {
                    if let Err(e) = c {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(e.to_string());
                        }
                    }
                    futures::future::ready(c.is_ok())
                })
                .filter_map(|c| futures::future::ready(c.ok()));
            let sent = head.upload_blobs(chunks).await;
            if let Ok(why) = failed.try_recv() {
                return Err(VolleyError::execution(format!("{context}: {why}")));
            }
            sent.map_err(|e| status_error(context, e))?;
        }
        spec.package = Some(manifest);
        match head.submit_job(spec.clone()).await {
            Ok(r) => return Ok(r.into_inner().job_id),
            Err(e) if e.code() == tonic::Code::FailedPrecondition && attempt == 0 => continue,
            Err(e) => return Err(status_error(context, e)),
        }
    }
    Err(VolleyError::execution(format!(
        "{context}: the head evicted the package's files while it was sent, twice"
    )))
}
