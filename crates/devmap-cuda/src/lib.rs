//! devmap-cuda: the real devices behind a plan, and the weights put on them.
//!
//! - [`discover()`]: every GPU the CUDA driver sees (index, name, UUID, PCI bus id, total and free
//!   memory, compute capability), the peer-access matrix with P2P performance ranks, and through
//!   NVML where present the PCIe generation/width and NVLink state.
//! - [`budgets`]: default memory budgets (free memory minus a documented reserve) and the cost
//!   model's [`Topology`](devmap_core::Topology) from what discovery found.
//! - [`load()`]: a checkpoint onto the devices a plan names, through pinned double-buffered staging
//!   and one stream per GPU, all GPUs at once; [`LoadedModel::verify`] reads it back.
//! - [`bench`](mod@bench): host-to-device bandwidth, the ceiling a load is judged against.
//! - [`calibrate`](mod@calibrate): this machine's copy rates (pinned, pageable, peer, within a
//!   GPU, the page cache) written into the cost model's topology (`devmap calibrate`).
//!
//! No CUDA toolkit is needed to build: cudarc loads libcuda at run time. Without a driver every
//! entry point returns [`Error::DriverNotFound`] (never a panic); without a GPU,
//! [`Error::NoDevice`].
//!
//! ```
//! # fn main() -> Result<(), devmap_cuda::Error> {
//! match devmap_cuda::discover() {
//!     Ok(inventory) => {
//!         for gpu in &inventory.gpus {
//!             println!("{} {}: {} bytes free", gpu.index, gpu.name, gpu.free_memory);
//!         }
//!         let budgets = devmap_cuda::budgets::default_budgets(&inventory, &Default::default());
//!         assert_eq!(budgets.gpus().len(), inventory.gpus.len());
//!     }
//!     // A machine without an NVIDIA driver or GPU: a clear error, not a panic.
//!     Err(e) if e.is_no_gpu() => println!("{e}"),
//!     Err(e) => return Err(e),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Loading (needs a GPU):
//!
//! ```no_run
//! use devmap_core::{load_model, DeviceMap};
//! use devmap_cuda::{load, LoadOptions};
//!
//! let model = load_model("checkpoint/".as_ref())?;
//! let plan = DeviceMap::read("plan.json".as_ref())?;
//! let loaded = load(&model, &plan, &LoadOptions::default())?;
//! let embed = loaded.get("model.embed_tokens.weight").expect("loaded");
//! println!("{} on {} at {:#x}", embed.name, embed.device, embed.ptr);
//! println!("{:.1} GiB/s", loaded.stats().copy_gib_per_s());
//! assert!(loaded.verify()?.mismatches.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bench;
pub mod budgets;
pub mod calibrate;
mod copy;
pub mod discover;
mod driver;
pub mod error;
pub mod load;
mod verify;

pub use discover::{discover, GpuInfo, Inventory, NvLinkState, PcieLink, PeerInfo};
pub use error::{Error, Result};
pub use load::{
    load, DeviceStats, LoadOptions, LoadStats, LoadedModel, LoadedTensor, Mismatch, ReadMode,
    VerifyReport,
};

/// Whether the CUDA driver library can be loaded here (without initialising it).
pub fn driver_present() -> bool {
    !matches!(driver::init(), Err(Error::DriverNotFound))
}

/// Number of GPUs the driver sees; [`Error::DriverNotFound`] without a driver.
pub fn device_count() -> Result<u32> {
    driver::device_count()
}
