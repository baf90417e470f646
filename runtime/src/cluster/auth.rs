//! The cluster token: created by the head, required on every call.
//!
//! The token travels in the `x-volley-token` metadata of each gRPC call (and as an
//! `Authorization: Bearer` header on the HTTP API). It is stored in the head's state
//! folder with owner-only permissions; other machines are given it with `--token` or
//! `VOLLEY_TOKEN`.

use std::path::Path;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};
use volley_common::{Result, VolleyError};

/// The metadata key that carries the token.
pub const TOKEN_HEADER: &str = "x-volley-token";

/// A fresh random token (256 bits, hex).
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `token` to `path`, readable and writable by the owner only.
pub fn write_token(path: &Path, token: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| VolleyError::Io(e).context(format!("cannot write {}", tmp.display())))?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Reads a token file written by [`write_token`].
pub fn read_token(path: &Path) -> Result<String> {
    let t = std::fs::read_to_string(path)
        .map_err(|e| VolleyError::Io(e).context(format!("cannot read {}", path.display())))?;
    Ok(t.trim().to_string())
}

/// This process's arguments after the program's name; one that is not UTF-8 is
/// refused, naming it (the command lines volley passes on are text).
pub fn program_args() -> Result<Vec<String>> {
    std::env::args_os()
        .skip(1)
        .map(|a| {
            a.into_string().map_err(|a| {
                VolleyError::plan(format!(
                    "argument `{}` is not valid UTF-8",
                    a.to_string_lossy()
                ))
            })
        })
        .collect()
}

/// `args` of a `volley` command less its token option (`--token T`, `--token=T`): the
/// command line of a process `volley start` runs in the background, which every user
/// of a machine can read (`ps`). The token travels in `VOLLEY_TOKEN` or a file instead.
pub fn without_token(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--token" {
            it.next();
        } else if !a.starts_with("--token=") {
            out.push(a.clone());
        }
    }
    out
}

/// `args` with the token hidden (`***`) where an argument is the token or ends in
/// `=token` (`--token=T`): the command line of an attached job's workers, which the
/// head lists (`volley job list`, the dashboard) and every user of a node can read
/// (`ps`). The arguments keep their places, so a program's own options (its own
/// `--token` among them) still parse; the workers take the token from `VOLLEY_TOKEN`.
/// Only whole values are hidden: a short token inside a path leaves the path as it is.
pub fn redact_token(args: &[String], token: &str) -> Vec<String> {
    args.iter()
        .map(|a| match a.strip_suffix(token) {
            Some(before) if !token.is_empty() && (before.is_empty() || before.ends_with('=')) => {
                format!("{before}***")
            }
            _ => a.clone(),
        })
        .collect()
}

/// Compares without an early exit, so the time taken says nothing about the token.
pub(crate) fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The metadata key in which a driver names the head incarnation it last spoke to
/// (`DriverAlive`'s answer): a head that restarted since refuses the call (`ABORTED`,
/// with this key set to its own), so the driver replays what the old head knew of its
/// job before it asks anything of the new one.
pub const HEAD_HEADER: &str = "x-volley-head";

/// Whether `status` is a head's refusal of a call meant for the head before it.
pub fn head_restarted(status: &Status) -> bool {
    status.code() == tonic::Code::Aborted && status.metadata().contains_key(HEAD_HEADER)
}

/// Server side: refuses calls without the right token (and, on a head, calls meant
/// for another incarnation of it).
#[derive(Clone)]
pub struct CheckToken {
    token: std::sync::Arc<str>,
    head: Option<u64>,
}

impl CheckToken {
    /// Checks for `token`.
    pub fn new(token: &str) -> Self {
        Self {
            token: token.into(),
            head: None,
        }
    }

    /// Also refuses calls that name a head incarnation other than `incarnation`.
    pub fn for_head(token: &str, incarnation: u64) -> Self {
        Self {
            token: token.into(),
            head: Some(incarnation),
        }
    }
}

impl Interceptor for CheckToken {
    fn call(&mut self, request: Request<()>) -> std::result::Result<Request<()>, Status> {
        match request.metadata().get(TOKEN_HEADER).map(|v| v.to_str()) {
            Some(Ok(t)) if same_token(t, &self.token) => {}
            Some(_) => {
                return Err(Status::unauthenticated(
                    "wrong cluster token (give the head's token with --token or VOLLEY_TOKEN)",
                ))
            }
            None => {
                return Err(Status::unauthenticated(
                    "no cluster token (give the head's token with --token or VOLLEY_TOKEN)",
                ))
            }
        }
        if let (Some(ours), Some(theirs)) = (self.head, request.metadata().get(HEAD_HEADER)) {
            if theirs.to_str().ok().and_then(|t| t.parse::<u64>().ok()) != Some(ours) {
                let mut status =
                    Status::aborted("the head restarted since this driver last spoke to it");
                status
                    .metadata_mut()
                    .insert(HEAD_HEADER, MetadataValue::from(ours));
                return Err(status);
            }
        }
        Ok(request)
    }
}

/// Client side: adds the token to every call (and, for a driver, the head incarnation
/// it last spoke to: [`HEAD_HEADER`]).
#[derive(Clone)]
pub struct AddToken {
    value: MetadataValue<tonic::metadata::Ascii>,
    /// The incarnation to name; 0 names none.
    head: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl AddToken {
    /// Adds `token`.
    pub fn new(token: &str) -> Result<Self> {
        let value = token
            .parse()
            .map_err(|_| VolleyError::Config("the cluster token has invalid characters".into()))?;
        Ok(Self { value, head: None })
    }

    /// Also names the head incarnation `head` holds (none while it holds 0).
    pub fn naming_head(mut self, head: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.head = Some(head);
        self
    }
}

impl Interceptor for AddToken {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(TOKEN_HEADER, self.value.clone());
        if let Some(h) = &self.head {
            let h = h.load(std::sync::atomic::Ordering::SeqCst);
            if h != 0 {
                request
                    .metadata_mut()
                    .insert(HEAD_HEADER, MetadataValue::from(h));
            }
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn a_volley_commands_token_option_is_left_out() {
        let args = strings(&[
            "start",
            "--token",
            "s3cr3t",
            "--block",
            "--token=s3cr3t",
            "-v",
        ]);
        assert_eq!(without_token(&args), strings(&["start", "--block", "-v"]));
    }

    #[test]
    fn a_programs_arguments_keep_their_places_with_the_token_hidden() {
        let args = strings(&[
            "--token",
            "s3cr3t",
            "--hf-token",
            "other",
            "--key=s3cr3t",
            "/data/s3cr3t/x",
        ]);
        assert_eq!(
            redact_token(&args, "s3cr3t"),
            strings(&[
                "--token",
                "***",
                "--hf-token",
                "other",
                "--key=***",
                "/data/s3cr3t/x"
            ])
        );
        assert_eq!(redact_token(&args, ""), args);
    }
}
