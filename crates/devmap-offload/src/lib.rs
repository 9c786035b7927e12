//! devmap-offload: put the weights a plan maps to `disk` where a runtime reads them fast, in the
//! offload folder format accelerate 1.15 and transformers 5 read, and read them back zero-copy.
//!
//! - [`offload`] ([`write`](mod@write)): from a model read from safetensors and a [`devmap_core::DeviceMap`],
//!   write `index.json` entries for every disk-mapped tensor. By default ([`Form::Reference`]) the
//!   entries point into the original safetensors files and nothing is copied; [`Form::Copy`] streams
//!   each tensor into `{name}.dat` through bounded mmap windows (never the whole model in memory),
//!   in parallel, each file through a temporary name and a rename, `index.json` last. Per-tensor
//!   XXH3 checksums go to `devmap-checksums.json`; a rerun after an interruption skips what is
//!   already complete and verified.
//! - [`OffloadFolder`] ([`read`]): open and validate a folder (devmap's or accelerate's), hand out
//!   [`TensorView`]s (`&[u8]`, dtype, shape) mapped with memmap2, and [`OffloadFolder::verify`]
//!   every tensor against its checksum.
//! - [`format`](mod@format): the files and names; [`paths`]: how a tensor name becomes a file name safely.
//!
//! docs/offload.md describes the format, the guarantees and how accelerate reads the folder.
//!
//! ```
//! use devmap_core::{safetensors::write_file, DType, Device, DeviceMap};
//! use devmap_offload::{offload, Form, OffloadFolder, OffloadOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let checkpoint = dir.path().join("model.safetensors");
//! write_file(&checkpoint, &[
//!     ("embed.weight", DType::BF16, vec![2, 2], vec![1, 2, 3, 4, 5, 6, 7, 8]),
//!     ("head.weight", DType::F32, vec![2], vec![0, 0, 128, 63, 0, 0, 0, 64]),
//! ])?;
//! let model = devmap_core::load_model(&checkpoint)?;
//! let mut map = DeviceMap::new();
//! map.insert("embed", Device::Cpu);
//! map.insert("head", Device::Disk);
//!
//! let folder = dir.path().join("offload");
//! let options = OffloadOptions { form: Form::Copy, ..OffloadOptions::default() };
//! let report = offload(&model, &map, &folder, &options)?;
//! assert_eq!((report.written, report.bytes_written), (1, 8));
//!
//! let opened = OffloadFolder::open(&folder)?;
//! let view = opened.get("head.weight")?;
//! assert_eq!((view.dtype(), view.shape()), (DType::F32, &[2u64][..]));
//! assert_eq!(view.bytes(), &[0, 0, 128, 63, 0, 0, 0, 64]);
//! assert!(opened.verify()?.is_ok());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod error;
pub mod format;
mod map;
pub mod paths;
pub mod read;
pub mod write;

pub use error::{Error, Result};
pub use format::{Checksum, Checksums};
pub use map::DEFAULT_WINDOW_BYTES;
pub use read::{Entry, Location, Mismatch, OffloadFolder, TensorView, VerifyReport};
pub use write::{
    disk_tensors, offload, offload_tensors, offload_with_progress, Form, OffloadOptions,
    OffloadReport,
};
