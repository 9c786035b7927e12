//! The one error type of devmap-cuda.

use std::path::PathBuf;

use cudarc::driver::result::DriverError;
use cudarc::driver::sys::CUresult;
use devmap_core::{format_bytes, Device};

/// Everything that can go wrong while discovering GPUs or loading a checkpoint onto them.
///
/// Every variant names the device, tensor, file or value at fault. None of them is a panic: a
/// missing driver library is detected before cudarc would panic on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libcuda could not be loaded: no NVIDIA driver on this machine.
    #[error(
        "no CUDA driver found: libcuda.so / libcuda.so.1 could not be loaded (no NVIDIA driver on this machine)"
    )]
    DriverNotFound,
    /// The driver loaded but reports no usable GPU.
    #[error("no CUDA device: {reason}")]
    NoDevice {
        /// What the driver said.
        reason: String,
    },
    /// A driver call failed.
    #[error("{call}{}: {}", on_gpu(*.gpu), describe(.source))]
    Driver {
        /// The driver function (`cuMemAlloc`, `cuMemcpyHtoDAsync`...).
        call: &'static str,
        /// The GPU it was called for, if any.
        gpu: Option<u32>,
        /// The driver's error code.
        #[source]
        source: DriverError,
    },
    /// A plan names a GPU index the machine does not have.
    #[error("the plan puts {tensors} tensor(s) on GPU {index}, but this machine has {count} GPU(s) (indices 0..{count})")]
    NoSuchGpu {
        /// The index the plan names.
        index: u32,
        /// How many GPUs the driver reports.
        count: u32,
        /// How many tensors the plan puts there.
        tensors: usize,
    },
    /// A device ran out of memory while allocating what the plan puts on it.
    #[error(
        "out of memory on {}: {} tensor(s) need {} but only {} {}; everything allocated so far was freed",
        device_name(*.device), .tensors, format_bytes(*.requested), format_bytes(*.free),
        if .device.is_gpu() { "is free" } else { "could be pinned" }
    )]
    OutOfMemory {
        /// The device (a GPU, or `cpu` for pinned host memory).
        device: Device,
        /// Bytes asked for.
        requested: u64,
        /// Bytes free on the device when the allocation failed.
        free: u64,
        /// Tensors the allocation was for.
        tensors: usize,
    },
    /// The plan names a module or tensor that the checkpoint does not have.
    #[error("the plan names {key:?}, which is no tensor or module of the checkpoint (the plan was made for another model?)")]
    MissingTensor {
        /// The plan key.
        key: String,
    },
    /// A tensor that the plan places has no bytes in the checkpoint (and no tied twin that has).
    #[error("tensor {tensor:?} has no data in the checkpoint files (it was not read from a safetensors file)")]
    MissingTensorData {
        /// The tensor.
        tensor: String,
    },
    /// The plan leaves tensors without a device, or is ambiguous.
    #[error("the plan does not fit the checkpoint: {reason}")]
    Plan {
        /// What is wrong (from devmap-core's validation).
        reason: String,
    },
    /// A checkpoint file changed or shrank since its header was read.
    #[error("{path}: tensor {tensor:?} needs bytes {start}..{end} but the file has {len} bytes (it changed since its header was read?)")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The tensor whose bytes are missing.
        tensor: String,
        /// Start of its byte range.
        start: u64,
        /// End of its byte range.
        end: u64,
        /// The file's length now.
        len: u64,
    },
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Options that cannot work (zero-sized staging buffers...).
    #[error("invalid load options: {0}")]
    Options(String),
    /// An error from devmap-core (reading a model or a plan).
    #[error(transparent)]
    Core(#[from] devmap_core::Error),
}

/// Result alias for devmap-cuda.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn driver(call: &'static str, gpu: Option<u32>, source: DriverError) -> Error {
        Error::Driver { call, gpu, source }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether the error means "no NVIDIA driver or no GPU here" (as opposed to a failure on a GPU).
    pub fn is_no_gpu(&self) -> bool {
        matches!(self, Error::DriverNotFound | Error::NoDevice { .. })
    }
}

fn on_gpu(gpu: Option<u32>) -> String {
    gpu.map(|g| format!(" on GPU {g}")).unwrap_or_default()
}

fn device_name(device: Device) -> String {
    match device {
        Device::Gpu(i) => format!("GPU {i}"),
        Device::Cpu => "cpu (pinned host memory)".to_string(),
        Device::Disk => "disk".to_string(),
    }
}

/// `CUDA_ERROR_OUT_OF_MEMORY (out of memory)`: the driver's name and text for an error code.
pub fn describe(e: &DriverError) -> String {
    let name = e
        .error_name()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(text) => format!("{name} ({})", text.to_string_lossy()),
        Err(_) => name,
    }
}

/// Whether a driver error is an out-of-memory error.
pub(crate) fn is_oom(e: &DriverError) -> bool {
    e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY
}
