//! Job submission from the command line (or any program): upload, status, logs, stop.

use std::collections::HashMap;
use std::path::Path;

use futures::StreamExt;
use volley_common::{Result, VolleyError};

use super::net::{status_error, Channels, Head};
use super::package::{chunk_stream, safe_relative, working_dir_files};
use super::proto;
use super::resources::Resources;

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
        };
        let mut head = self.head.clone();
        let _enter = self.rt.enter();
        let upload = upload_stream(spec, files);
        let r = self
            .rt
            .block_on(head.submit_job(upload))
            .map_err(|e| status_error("submitting the job", e))?;
        Ok(r.into_inner().job_id)
    }

    /// A job's record.
    pub fn status(&self, job: &str) -> Result<proto::JobInfo> {
        let mut head = self.head.clone();
        Ok(self
            .rt
            .block_on(head.get_job(proto::JobId {
                job_id: job.to_string(),
            }))
            .map_err(|e| status_error(format!("job {job}"), e))?
            .into_inner())
    }

    /// Every job.
    pub fn list(&self) -> Result<Vec<proto::JobInfo>> {
        let mut head = self.head.clone();
        Ok(self
            .rt
            .block_on(head.list_jobs(proto::Empty {}))
            .map_err(|e| status_error("listing jobs", e))?
            .into_inner()
            .jobs)
    }

    /// Stops a job.
    pub fn stop(&self, job: &str) -> Result<proto::JobInfo> {
        let mut head = self.head.clone();
        Ok(self
            .rt
            .block_on(head.stop_job(proto::JobId {
                job_id: job.to_string(),
            }))
            .map_err(|e| status_error(format!("job {job}"), e))?
            .into_inner())
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
    pub fn wait(&self, job: &str, timeout: std::time::Duration) -> Result<proto::JobInfo> {
        let start = std::time::Instant::now();
        loop {
            let info = self.status(job)?;
            if ["SUCCEEDED", "FAILED", "STOPPED"].contains(&info.state.as_str()) {
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
    pub fn cluster_status(&self) -> Result<proto::ClusterStatus> {
        let mut head = self.head.clone();
        Ok(self
            .rt
            .block_on(head.status(proto::Empty {}))
            .map_err(|e| status_error("status", e))?
            .into_inner())
    }
}

/// A job upload: the spec, then the files' chunks, read as they are sent. A file that
/// cannot be read ends the stream early, and the head refuses the incomplete package.
pub(crate) fn upload_stream(
    spec: proto::JobSpec,
    files: Vec<(String, std::path::PathBuf, u32)>,
) -> impl futures::Stream<Item = proto::JobUpload> + Send + 'static {
    let chunks = tokio_stream::wrappers::ReceiverStream::new(chunk_stream(files))
        .take_while(|c| futures::future::ready(c.is_ok()))
        .filter_map(|c| futures::future::ready(c.ok()))
        .map(|c| proto::JobUpload {
            part: Some(proto::job_upload::Part::Chunk(c)),
        });
    futures::stream::once(futures::future::ready(proto::JobUpload {
        part: Some(proto::job_upload::Part::Spec(spec)),
    }))
    .chain(chunks)
}
