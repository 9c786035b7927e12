//! The one error type of devmap-core.

use std::path::PathBuf;

/// Everything that can go wrong while reading models, budgets and device maps.
///
/// Every variant names the offending file, key, tensor or value so a user can fix the input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file whose header is malformed.
    #[error("{path}: invalid safetensors header: {reason}")]
    SafetensorsHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the tensor or field.
        reason: String,
    },
    /// A JSON document (manifest, index, map, budget file, config) that does not parse or has the wrong shape.
    #[error("{path}: {reason}")]
    Json {
        /// The file (or `<inline>` for command-line values).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A model whose tensor table is inconsistent (duplicate names, a tensor named like a module...).
    #[error("invalid model: {0}")]
    Model(String),
    /// A quantization config that is unknown, unsupported or malformed.
    #[error("{origin}: quantization_config: {reason}")]
    QuantConfig {
        /// Where the config came from (a config.json or a `--quantization-config` file).
        origin: String,
        /// What is wrong, naming the field or the method.
        reason: String,
    },
    /// An unknown dtype spelling.
    #[error("unknown dtype {0:?} (expected one of F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL F8_E4M3 F8_E5M2, or bf16/f16/f32)")]
    UnknownDtype(String),
    /// A tensor whose element count or byte size overflows 64 bits.
    #[error("tensor {tensor:?}: shape {shape:?} overflows a 64-bit element count")]
    ShapeOverflow {
        /// The tensor name.
        tensor: String,
        /// Its shape.
        shape: Vec<u64>,
    },
    /// A memory size such as `"20GiB"` that cannot be parsed.
    #[error("invalid memory size {text:?}: {reason}")]
    MemorySize {
        /// The text as given.
        text: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A device name that is neither a GPU index, `cuda:N`, `cpu` nor `disk`.
    #[error(
        "unknown device {0:?} (expected a GPU index such as 0, \"cuda:0\", \"cpu\" or \"disk\")"
    )]
    UnknownDevice(String),
    /// A `--max-memory` specification that is malformed.
    #[error("invalid memory budget specification {spec:?}: {reason}")]
    BudgetSpec {
        /// The specification as given.
        spec: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A `--no-split` class or pattern that matches nothing in the model.
    #[error("--no-split {0:?} matches no module class or module name in the model")]
    NoSplitUnmatched(String),
    /// One shard of a sharded checkpoint given alone, with no index beside it to complete it.
    #[error("{shard}: {reason} (expected the index {index}); give the checkpoint folder or its index instead")]
    LoneShard {
        /// The shard file given.
        shard: PathBuf,
        /// The index that should list it.
        index: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An architecture registry file that is malformed; `line` is 1-based.
    #[error("{path}:{line}: {reason}")]
    Registry {
        /// The registry file (or `<embedded ...>` for the built-in one).
        path: PathBuf,
        /// The line at fault.
        line: usize,
        /// What is wrong, naming the field or class.
        reason: String,
    },
    /// A device map that cannot be parsed (not its validation: see [`crate::validate()`]).
    #[error("invalid device map: {0}")]
    DeviceMap(String),
}

/// Result alias for devmap-core.
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
