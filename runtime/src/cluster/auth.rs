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

/// Compares without an early exit, so the time taken says nothing about the token.
pub(crate) fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Server side: refuses calls without the right token.
#[derive(Clone)]
pub struct CheckToken {
    token: std::sync::Arc<str>,
}

impl CheckToken {
    /// Checks for `token`.
    pub fn new(token: &str) -> Self {
        Self {
            token: token.into(),
        }
    }
}

impl Interceptor for CheckToken {
    fn call(&mut self, request: Request<()>) -> std::result::Result<Request<()>, Status> {
        match request.metadata().get(TOKEN_HEADER).map(|v| v.to_str()) {
            Some(Ok(t)) if same_token(t, &self.token) => Ok(request),
            Some(_) => Err(Status::unauthenticated(
                "wrong cluster token (give the head's token with --token or VOLLEY_TOKEN)",
            )),
            None => Err(Status::unauthenticated(
                "no cluster token (give the head's token with --token or VOLLEY_TOKEN)",
            )),
        }
    }
}

/// Client side: adds the token to every call.
#[derive(Clone)]
pub struct AddToken {
    value: MetadataValue<tonic::metadata::Ascii>,
}

impl AddToken {
    /// Adds `token`.
    pub fn new(token: &str) -> Result<Self> {
        let value = token
            .parse()
            .map_err(|_| VolleyError::Config("the cluster token has invalid characters".into()))?;
        Ok(Self { value })
    }
}

impl Interceptor for AddToken {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(TOKEN_HEADER, self.value.clone());
        Ok(request)
    }
}
