//! How a node compresses the objects it writes to files and sends over Flight.

use arrow::ipc::writer::IpcWriteOptions;
use arrow::ipc::CompressionType;
use volley_common::{Result, VolleyError};

/// The variable telling the workers and drivers a node starts how it compresses
/// objects (its [`ObjectCompression`]).
pub(crate) const COMPRESSION_VAR: &str = "VOLLEY_OBJECT_COMPRESSION";

/// How a node compresses the Arrow buffers of the objects it writes to files (handed
/// over by workers, spilled) and sends over Flight. Compression is per buffer, as the
/// Arrow IPC format defines it, so any reader decodes it without being told.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ObjectCompression {
    /// LZ4 for objects sent to another host ([`Self::for_peer`]), nothing for files
    /// and transfers within a host. On one 2-core machine LZ4 made the 22 TPC-H
    /// queries on a 2-node cluster 23% slower (`bench/results/sql-cluster-2core.md`).
    #[default]
    Auto,
    /// Buffers as they are in memory: no CPU spent, the most bytes kept and moved.
    None,
    /// LZ4 frames: fast enough to cost little next to the work that makes the data,
    /// and typically halves the bytes of columnar data.
    Lz4,
    /// Zstandard: fewer bytes than LZ4 for more CPU; for slow networks or disks.
    Zstd,
}

impl ObjectCompression {
    /// Its name, as `--object-compression` takes it.
    pub fn name(self) -> &'static str {
        match self {
            ObjectCompression::Auto => "auto",
            ObjectCompression::None => "none",
            ObjectCompression::Lz4 => "lz4",
            ObjectCompression::Zstd => "zstd",
        }
    }

    /// The compression a process started by a node agent was told to use
    /// ([`COMPRESSION_VAR`]); the default elsewhere.
    pub(crate) fn from_env() -> Result<Self> {
        match volley_common::env_var(COMPRESSION_VAR)? {
            Some(v) if !v.is_empty() => v
                .parse()
                .map_err(|e: VolleyError| e.context(format!("${COMPRESSION_VAR}"))),
            _ => Ok(Self::default()),
        }
    }

    /// The compression of a transfer to a peer on another host (`remote`) or this one.
    pub fn for_peer(self, remote: bool) -> Self {
        match self {
            ObjectCompression::Auto if remote => ObjectCompression::Lz4,
            ObjectCompression::Auto => ObjectCompression::None,
            c => c,
        }
    }

    /// The IPC codec of its buffers (`Auto` as it writes files: none).
    pub(super) fn codec(self) -> Option<CompressionType> {
        match self {
            ObjectCompression::Auto | ObjectCompression::None => None,
            ObjectCompression::Lz4 => Some(CompressionType::LZ4_FRAME),
            ObjectCompression::Zstd => Some(CompressionType::ZSTD),
        }
    }

    pub(super) fn ipc_options(self) -> Result<IpcWriteOptions> {
        Ok(IpcWriteOptions::default().try_with_compression(self.codec())?)
    }
}

impl std::str::FromStr for ObjectCompression {
    type Err = VolleyError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(ObjectCompression::Auto),
            "none" => Ok(ObjectCompression::None),
            "lz4" => Ok(ObjectCompression::Lz4),
            "zstd" => Ok(ObjectCompression::Zstd),
            _ => Err(VolleyError::Config(format!(
                "object compression {s:?}: expected auto, none, lz4 or zstd"
            ))),
        }
    }
}

impl std::fmt::Display for ObjectCompression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
