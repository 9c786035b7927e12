//! GPU discovery: what the CUDA driver (and NVML, when present) says about every GPU and every pair.
//!
//! Everything comes from attribute queries that need no CUDA context, except free memory: NVML
//! reads it without a context; without NVML devmap retains each GPU's primary context for one
//! `cuMemGetInfo` (which costs a few hundred MiB while it is held, then gives them back).

use cudarc::driver::sys::{self, CUdevice_attribute as A};
use serde::Serialize;

use crate::driver;
use crate::error::{Error, Result};

/// Everything discovery found.
#[derive(Debug, Clone, Serialize)]
pub struct Inventory {
    /// The driver's CUDA API version, `"13.0"`.
    pub cuda_driver_version: String,
    /// The NVIDIA driver version from NVML (`"580.159.04"`), when NVML is present.
    pub nvidia_driver_version: Option<String>,
    /// Whether NVML answered (NVLink and PCIe fields need it).
    pub nvml: bool,
    /// `CUDA_VISIBLE_DEVICES`, when set (CUDA indices are relative to it).
    pub cuda_visible_devices: Option<String>,
    /// The GPUs by CUDA index.
    pub gpus: Vec<GpuInfo>,
    /// Every ordered pair of distinct GPUs.
    pub peers: Vec<PeerInfo>,
    /// Things that could not be read, and why (NVML missing, an attribute unsupported...).
    pub notes: Vec<String>,
}

/// One GPU.
#[derive(Debug, Clone, Serialize)]
pub struct GpuInfo {
    /// CUDA device index (what device maps use).
    pub index: u32,
    /// Marketing name, `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as nvidia-smi prints it.
    pub uuid: String,
    /// PCI bus id, `0000:3b:00.0`.
    pub pci_bus_id: String,
    /// Total memory, bytes.
    pub total_memory: u64,
    /// Free memory, bytes, when discovery read it.
    pub free_memory: u64,
    /// Where `free_memory` came from: `"nvml"` (no context created) or `"cuda"` (cuMemGetInfo).
    pub free_memory_source: &'static str,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
    /// Peak memory bandwidth from the memory clock and bus width, bytes per second.
    pub memory_bandwidth: Option<f64>,
    /// PCIe link (NVML).
    pub pcie: Option<PcieLink>,
    /// NVLink state (NVML); `None` when the GPU has no NVLink or NVML is absent.
    pub nvlink: Option<NvLinkState>,
}

/// A PCIe link's generation and width, current and maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PcieLink {
    /// Generation now (GPUs drop to a lower one when idle).
    pub current_gen: u32,
    /// Lanes now.
    pub current_width: u32,
    /// Highest generation the GPU and the slot support.
    pub max_gen: u32,
    /// Widest link the GPU and the slot support.
    pub max_width: u32,
}

/// NVLink links of one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NvLinkState {
    /// Links that are up.
    pub active_links: u32,
    /// Links the GPU has.
    pub links: u32,
    /// NVLink version of the first active link.
    pub version: Option<u32>,
}

/// What one GPU can do with another's memory.
#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    /// The accessing GPU.
    pub from: u32,
    /// The GPU whose memory is accessed.
    pub to: u32,
    /// `cuDeviceCanAccessPeer`.
    pub access: bool,
    /// `CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK` (0 = best) when access is possible.
    pub performance_rank: Option<i32>,
    /// NVML: whether peer traffic goes over NVLink.
    pub nvlink: Option<bool>,
    /// NVML: the closest common ancestor in the PCI tree (`Single`, `HostBridge`, `System`...).
    pub common_ancestor: Option<String>,
}

impl Inventory {
    /// The GPU with CUDA index `index`.
    pub fn gpu(&self, index: u32) -> Option<&GpuInfo> {
        self.gpus.iter().find(|g| g.index == index)
    }

    /// The pair `from -> to`.
    pub fn peer(&self, from: u32, to: u32) -> Option<&PeerInfo> {
        self.peers.iter().find(|p| p.from == from && p.to == to)
    }
}

/// Discover every GPU the driver sees.
///
/// Errors: [`Error::DriverNotFound`] without libcuda, [`Error::NoDevice`] when the driver reports
/// none (an empty machine never yields an empty list). NVML problems only add notes.
pub fn discover() -> Result<Inventory> {
    let count = driver::device_count()?;
    if count == 0 {
        return Err(Error::NoDevice {
            reason: "the CUDA driver reports 0 devices".into(),
        });
    }
    let version = driver::driver_version()?;
    let mut notes = Vec::new();
    let mut handles = Vec::with_capacity(count as usize);
    let mut gpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        let dev = driver::device(index)?;
        handles.push((index, dev));
        gpus.push(read_gpu(index, dev, &mut notes)?);
    }
    let mut peers = Vec::new();
    for &a in &handles {
        for &b in &handles {
            if a.0 == b.0 {
                continue;
            }
            let (access, rank) = driver::peer(a, b)?;
            peers.push(PeerInfo {
                from: a.0,
                to: b.0,
                access,
                performance_rank: access.then_some(rank),
                nvlink: None,
                common_ancestor: None,
            });
        }
    }
    let mut inv = Inventory {
        cuda_driver_version: format!("{}.{}", version / 1000, (version % 1000) / 10),
        nvidia_driver_version: None,
        nvml: false,
        cuda_visible_devices: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
        gpus,
        peers,
        notes,
    };
    nvml::enrich(&mut inv);
    for g in &mut inv.gpus {
        if g.free_memory_source.is_empty() {
            // No NVML answer for this GPU: ask CUDA (needs its primary context for a moment).
            let ctx = driver::context(g.index)?;
            g.free_memory = driver::mem_info(&ctx, g.index)?.0;
            g.free_memory_source = "cuda";
        }
    }
    Ok(inv)
}

fn read_gpu(index: u32, dev: sys::CUdevice, notes: &mut Vec<String>) -> Result<GpuInfo> {
    let name = cudarc::driver::result::device::get_name(dev)
        .map_err(|e| Error::driver("cuDeviceGetName", Some(index), e))?;
    let uuid = cudarc::driver::result::device::get_uuid(dev)
        .map_err(|e| Error::driver("cuDeviceGetUuid", Some(index), e))?;
    // SAFETY-free: total_mem is unsafe only because the handle must be valid, which it is.
    #[allow(unsafe_code)]
    let total = unsafe { cudarc::driver::result::device::total_mem(dev) }
        .map_err(|e| Error::driver("cuDeviceTotalMem", Some(index), e))? as u64;
    let attr = |a: A| driver::attribute(index, dev, a);
    let cc = (
        attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    );
    let sms = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    // Memory clock (kHz) × bus width (bits) × 2 (double data rate). Newer drivers may not report
    // them; the cost model then keeps its default for this GPU.
    let bandwidth = match (
        attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE),
        attr(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH),
    ) {
        (Ok(khz), Ok(bits)) if khz > 0 && bits > 0 => {
            Some(2.0 * f64::from(khz) * 1e3 * f64::from(bits) / 8.0)
        }
        (Err(e), _) | (_, Err(e)) if !driver::unsupported(&e) => return Err(e),
        _ => {
            notes.push(format!(
                "GPU {index}: the driver does not report the memory clock or bus width; memory bandwidth unknown"
            ));
            None
        }
    };
    Ok(GpuInfo {
        index,
        name,
        uuid: format_uuid(&uuid.bytes),
        pci_bus_id: driver::pci_bus_id(index, dev)?,
        total_memory: total,
        free_memory: 0,
        free_memory_source: "",
        compute_capability: cc,
        multiprocessors: u32::try_from(sms).unwrap_or(0),
        memory_bandwidth: bandwidth,
        pcie: None,
        nvlink: None,
    })
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` from the 16 UUID bytes (nvidia-smi's spelling).
pub fn format_uuid(bytes: &[std::ffi::c_char; 16]) -> String {
    let b: Vec<u8> = bytes.iter().map(|&c| c as u8).collect();
    let hex =
        |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        hex(0..4),
        hex(4..6),
        hex(6..8),
        hex(8..10),
        hex(10..16)
    )
}

/// Normalise a PCI bus id for comparison: NVML writes `00000000:3B:00.0`, CUDA `0000:3b:00.0`.
pub(crate) fn normalize_bus_id(id: &str) -> Option<(u32, u32, u32, u32)> {
    let (domain, rest) = id.trim().split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (device, function) = rest.split_once('.')?;
    Some((
        u32::from_str_radix(domain, 16).ok()?,
        u32::from_str_radix(bus, 16).ok()?,
        u32::from_str_radix(device, 16).ok()?,
        u32::from_str_radix(function, 16).ok()?,
    ))
}

#[cfg(feature = "nvml")]
mod nvml {
    use nvml_wrapper::enum_wrappers::device::{P2pCapabilitiesIndex, P2pStatus};
    use nvml_wrapper::error::NvmlError;
    use nvml_wrapper::Nvml;

    use super::{normalize_bus_id, Inventory, NvLinkState, PcieLink};

    /// NVLink links NVML can describe per GPU (`NVML_NVLINK_MAX_LINKS`).
    const MAX_LINKS: u32 = 18;

    fn open() -> Result<Nvml, NvmlError> {
        // Driver installs ship libnvidia-ml.so.1; the unversioned name often comes only with -dev packages.
        let mut last = None;
        for name in ["libnvidia-ml.so.1", "libnvidia-ml.so"] {
            match Nvml::builder().lib_path(std::ffi::OsStr::new(name)).init() {
                Ok(n) => return Ok(n),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(NvmlError::Unknown))
    }

    /// Fill NVML's fields of `inv` (free memory, PCIe, NVLink, peer NVLink and PCI ancestry).
    pub(super) fn enrich(inv: &mut Inventory) {
        let nvml = match open() {
            Ok(n) => n,
            Err(e) => {
                inv.notes.push(format!(
                    "NVML not available ({e}): no NVLink or PCIe details; free memory read through CUDA"
                ));
                return;
            }
        };
        inv.nvml = true;
        inv.nvidia_driver_version = nvml.sys_driver_version().ok();
        let mut devices = Vec::new();
        for g in &mut inv.gpus {
            let by_uuid = nvml.device_by_uuid(g.uuid.as_str());
            let dev = match by_uuid {
                Ok(d) => Some(d),
                Err(_) => nvml.device_count().ok().and_then(|n| {
                    (0..n).find_map(|i| {
                        let d = nvml.device_by_index(i).ok()?;
                        let id = d.pci_info().ok()?.bus_id;
                        (normalize_bus_id(&id) == normalize_bus_id(&g.pci_bus_id)).then_some(d)
                    })
                }),
            };
            let Some(dev) = dev else {
                inv.notes.push(format!(
                    "GPU {}: NVML has no device with UUID {} or bus id {}",
                    g.index, g.uuid, g.pci_bus_id
                ));
                devices.push(None);
                continue;
            };
            if let Ok(m) = dev.memory_info() {
                g.free_memory = m.free;
                g.free_memory_source = "nvml";
            }
            g.pcie = match (
                dev.current_pcie_link_gen(),
                dev.current_pcie_link_width(),
                dev.max_pcie_link_gen(),
                dev.max_pcie_link_width(),
            ) {
                (Ok(cg), Ok(cw), Ok(mg), Ok(mw)) => Some(PcieLink {
                    current_gen: cg,
                    current_width: cw,
                    max_gen: mg,
                    max_width: mw,
                }),
                (a, b, c, d) => {
                    let why = [a.err(), b.err(), c.err(), d.err()]
                        .into_iter()
                        .flatten()
                        .map(|e| e.to_string())
                        .next()
                        .unwrap_or_default();
                    inv.notes.push(format!(
                        "GPU {}: PCIe link not reported by NVML ({why})",
                        g.index
                    ));
                    None
                }
            };
            let mut active = 0;
            let mut links = 0;
            let mut version = None;
            for l in 0..MAX_LINKS {
                let link = dev.link_wrapper_for(l);
                match link.is_active() {
                    Ok(up) => {
                        links += 1;
                        if up {
                            active += 1;
                            if version.is_none() {
                                version = link.version().ok();
                            }
                        }
                    }
                    // Past the last link, or a GPU without NVLink.
                    Err(_) => break,
                }
            }
            g.nvlink = (links > 0).then_some(NvLinkState {
                active_links: active,
                links,
                version,
            });
            devices.push(Some(dev));
        }
        for p in &mut inv.peers {
            let (Some(Some(a)), Some(Some(b))) =
                (devices.get(p.from as usize), devices.get(p.to as usize))
            else {
                continue;
            };
            p.nvlink = a
                .p2p_status(b, P2pCapabilitiesIndex::NvLink)
                .ok()
                .map(|s| s == P2pStatus::Ok);
            // topology_common_ancestor takes the other handle by value: fetch a second one.
            let b_again = b.uuid().ok().and_then(|u| nvml.device_by_uuid(u).ok());
            p.common_ancestor = b_again
                .and_then(|b| a.topology_common_ancestor(b).ok())
                .map(|level| format!("{level:?}"));
        }
    }
}

#[cfg(not(feature = "nvml"))]
mod nvml {
    use super::Inventory;

    pub(super) fn enrich(inv: &mut Inventory) {
        inv.notes
            .push("built without the `nvml` feature: no NVLink or PCIe details".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_spelling_matches_nvidia_smi() {
        let mut b = [0 as std::ffi::c_char; 16];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i as u8 * 17) as std::ffi::c_char;
        }
        assert_eq!(format_uuid(&b), "GPU-00112233-4455-6677-8899-aabbccddeeff");
    }

    #[test]
    fn bus_ids_compare_across_spellings() {
        assert_eq!(
            normalize_bus_id("00000000:3B:00.0"),
            normalize_bus_id("0000:3b:00.0")
        );
        assert_ne!(
            normalize_bus_id("0000:3b:00.0"),
            normalize_bus_id("0000:3c:00.0")
        );
        assert_eq!(normalize_bus_id("nonsense"), None);
    }
}
