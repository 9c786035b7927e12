//! The one error type of devmap-offload.

use std::path::PathBuf;

/// Everything that can go wrong while writing, opening or verifying an offload folder.
///
/// Every variant names the offending file, tensor or value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An error from devmap-core (reading a safetensors header, a device map...).
    #[error(transparent)]
    Core(#[from] devmap_core::Error),
    /// A tensor name that cannot become a file name inside the folder.
    #[error("tensor {tensor:?} cannot be offloaded to a file: {reason}")]
    UnsafeName {
        /// The name as given.
        tensor: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A symbolic link where devmap reads or writes a file of the folder.
    #[error("{path} is a symbolic link: devmap neither follows nor replaces links inside an offload folder")]
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// A disk-mapped tensor whose bytes are in no safetensors file.
    #[error("tensor {tensor:?} is mapped to disk but its bytes are in no safetensors file (offloading needs a model read from safetensors, not a manifest)")]
    NoSource {
        /// The tensor.
        tensor: String,
    },
    /// A source safetensors file that no longer holds a tensor where the model says it is.
    #[error("{path}: tensor {tensor:?}: {reason}")]
    Source {
        /// The safetensors file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What changed.
        reason: String,
    },
    /// A device map that does not fit the model.
    #[error("the plan does not fit model {model:?}: {reason}")]
    Plan {
        /// The model's name.
        model: String,
        /// What is wrong.
        reason: String,
    },
    /// An `index.json` or `devmap-checksums.json` that does not parse or has the wrong shape.
    #[error("{path}: {reason}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the entry.
        reason: String,
    },
    /// An index entry that does not match the files it names.
    #[error("{index}: tensor {tensor:?}: {reason}")]
    Entry {
        /// The index file.
        index: PathBuf,
        /// The entry's name.
        tensor: String,
        /// What is wrong (missing file, wrong length, unknown dtype...).
        reason: String,
    },
    /// A tensor asked of a folder whose index does not list it.
    #[error("{index} has no tensor {tensor:?}")]
    NotInIndex {
        /// The index file.
        index: PathBuf,
        /// The name asked for.
        tensor: String,
    },
    /// The writer stopped on purpose after `fail_after_bytes` bytes (a test hook simulating a crash).
    #[error("offload interrupted after {bytes} bytes (fail_after_bytes test hook)")]
    Interrupted {
        /// Bytes written when it stopped.
        bytes: u64,
    },
}

/// Result alias for devmap-offload.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn json(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Json {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
