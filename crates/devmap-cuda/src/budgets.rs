//! From discovery to planning inputs: default memory budgets and the cost model's topology.
//!
//! Budgets (used by `devmap plan` when no `--max-memory` is given):
//!
//! - each GPU: free memory − (1 GiB + 2 % of its total memory). The fixed part holds the CUDA
//!   context of the process that will load the weights (300–600 MiB on Hopper) and library
//!   workspaces; the proportional part absorbs allocator fragmentation.
//! - cpu: `MemAvailable` − (2 GiB + 10 % of `MemTotal`), from `/proc/meminfo`: room for the OS, the
//!   loading process and the page cache it reads the checkpoint through.
//! - no disk budget: offloading to disk stays an explicit choice (`disk=` in `--max-memory`).
//!
//! Activations and the KV cache are not in these reserves: `--kv-cache` and `--reserve` add them.

use devmap_core::cost::{GpuProfile, Link};
use devmap_core::{Device, MemoryBudgets, Topology};

use crate::discover::{GpuInfo, Inventory, PcieLink};

/// What [`default_budgets`] keeps free on each device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reserve {
    /// Bytes kept free on every GPU.
    pub gpu_fixed: u64,
    /// Fraction of each GPU's total memory kept free on top of `gpu_fixed`.
    pub gpu_fraction: f64,
    /// Bytes of available RAM kept free.
    pub cpu_fixed: u64,
    /// Fraction of total RAM kept free on top of `cpu_fixed`.
    pub cpu_fraction: f64,
}

impl Default for Reserve {
    /// 1 GiB + 2 % per GPU; 2 GiB + 10 % of RAM (the module docs say why).
    fn default() -> Self {
        Reserve {
            gpu_fixed: 1 << 30,
            gpu_fraction: 0.02,
            cpu_fixed: 2 << 30,
            cpu_fraction: 0.10,
        }
    }
}

impl Reserve {
    /// Bytes kept free on a GPU of `total` bytes.
    pub fn gpu(&self, total: u64) -> u64 {
        self.gpu_fixed + (total as f64 * self.gpu_fraction) as u64
    }

    /// Bytes of RAM kept free on a machine with `total` bytes.
    pub fn cpu(&self, total: u64) -> u64 {
        self.cpu_fixed + (total as f64 * self.cpu_fraction) as u64
    }
}

/// Budgets from discovery: every GPU's free memory and the available RAM, minus `reserve`.
/// RAM is left out (with no error) where `/proc/meminfo` cannot be read.
pub fn default_budgets(inv: &Inventory, reserve: &Reserve) -> MemoryBudgets {
    let mut budgets = MemoryBudgets::default();
    for g in &inv.gpus {
        budgets.set(
            Device::Gpu(g.index),
            g.free_memory.saturating_sub(reserve.gpu(g.total_memory)),
        );
    }
    if let (Some(avail), Some(total)) = (available_ram(), total_ram()) {
        budgets.set(Device::Cpu, avail.saturating_sub(reserve.cpu(total)));
    }
    budgets
}

/// `MemAvailable` from `/proc/meminfo`, bytes.
pub fn available_ram() -> Option<u64> {
    meminfo("MemAvailable:")
}

/// `MemTotal` from `/proc/meminfo`, bytes.
pub fn total_ram() -> Option<u64> {
    meminfo("MemTotal:")
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text, key)
}

fn parse_meminfo(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// Sustained share of a link's signalling rate that bulk copies reach (the cost model's default
/// 25 GB/s for PCIe 4.0 x16 is this share of 31.5 GB/s).
pub const LINK_EFFICIENCY: f64 = 0.8;

/// Per-lane, per-direction PCIe rate after encoding, bytes per second, by generation.
fn pcie_lane_rate(generation: u32) -> Option<f64> {
    Some(match generation {
        1 => 0.25e9,
        2 => 0.5e9,
        3 => 0.985e9,
        4 => 1.969e9,
        5 => 3.938e9,
        6 => 7.563e9,
        _ => return None,
    })
}

/// Sustained host-to-device bandwidth of a PCIe link at its maximum generation and width.
pub fn pcie_bandwidth(link: &PcieLink) -> Option<f64> {
    let lane = pcie_lane_rate(link.max_gen)?;
    (link.max_width > 0).then(|| lane * f64::from(link.max_width) * LINK_EFFICIENCY)
}

/// Per-link, per-direction NVLink rate, bytes per second, by NVML's version number
/// (1: P100, 2: V100, 3: A100, 4: H100/H200, 5: B200).
fn nvlink_link_rate(version: Option<u32>) -> f64 {
    match version {
        Some(1) => 20e9,
        Some(5) => 50e9,
        _ => 25e9,
    }
}

/// The cost model's topology from discovery: each GPU's memory bandwidth and PCIe host link,
/// and between GPUs NVLink (active links × per-link rate), direct PCIe peer access (the slower
/// host link), or staging through host memory (half of it). Everything discovery could not
/// read keeps [`Topology::default`]'s value. `measured_host` (bytes/s per GPU, from
/// [`crate::bench::h2d_bandwidth`]) replaces the PCIe estimate where given.
pub fn topology(inv: &Inventory, measured_host: &[(u32, f64)]) -> Topology {
    let mut t = Topology::default();
    let host = |g: &GpuInfo| -> Link {
        let bandwidth = measured_host
            .iter()
            .find(|(i, _)| *i == g.index)
            .map(|(_, b)| *b)
            .or_else(|| g.pcie.as_ref().and_then(pcie_bandwidth))
            .unwrap_or(t.default_host_link.bandwidth);
        Link {
            bandwidth,
            latency: t.default_host_link.latency,
        }
    };
    let hosts: Vec<(u32, Link)> = inv.gpus.iter().map(|g| (g.index, host(g))).collect();
    for g in &inv.gpus {
        t.gpus.insert(
            g.index,
            GpuProfile {
                name: g.name.clone(),
                memory_bandwidth: g.memory_bandwidth.unwrap_or(t.default_gpu.memory_bandwidth),
                host_link: Some(host(g)),
                pageable_host_link: None,
            },
        );
    }
    let host_of = |i: u32| {
        hosts
            .iter()
            .find(|(j, _)| *j == i)
            .map_or(t.default_host_link, |(_, l)| *l)
    };
    for p in inv.peers.iter().filter(|p| p.from < p.to) {
        let (a, b) = (inv.gpu(p.from), inv.gpu(p.to));
        let nvlink =
            p.nvlink == Some(true) || inv.peer(p.to, p.from).and_then(|q| q.nvlink) == Some(true);
        let slower_host = host_of(p.from).bandwidth.min(host_of(p.to).bandwidth);
        let link = match (nvlink, a.and_then(|g| g.nvlink), b.and_then(|g| g.nvlink)) {
            (true, Some(x), Some(y)) if x.active_links > 0 && y.active_links > 0 => Link {
                bandwidth: f64::from(x.active_links.min(y.active_links))
                    * nvlink_link_rate(x.version)
                    * LINK_EFFICIENCY,
                latency: 5e-6,
            },
            _ if p.access => Link {
                bandwidth: slower_host,
                latency: t.default_peer_link.latency,
            },
            _ => Link {
                bandwidth: slower_host / 2.0,
                latency: 2.0 * t.default_peer_link.latency,
            },
        };
        t.peer_links.insert(format!("{}-{}", p.from, p.to), link);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discover::{NvLinkState, PeerInfo};

    fn gpu(index: u32, pcie: Option<PcieLink>, nvlink: Option<NvLinkState>) -> GpuInfo {
        GpuInfo {
            index,
            name: format!("gpu{index}"),
            uuid: String::new(),
            pci_bus_id: String::new(),
            total_memory: 80 << 30,
            free_memory: 79 << 30,
            free_memory_source: "nvml",
            compute_capability: (9, 0),
            multiprocessors: 132,
            memory_bandwidth: Some(3.35e12),
            pcie,
            nvlink,
        }
    }

    fn inventory(gpus: Vec<GpuInfo>, peers: Vec<PeerInfo>) -> Inventory {
        Inventory {
            cuda_driver_version: "13.0".into(),
            nvidia_driver_version: None,
            nvml: true,
            cuda_visible_devices: None,
            gpus,
            peers,
            notes: vec![],
        }
    }

    fn peer(from: u32, to: u32, access: bool, nvlink: Option<bool>) -> PeerInfo {
        PeerInfo {
            from,
            to,
            access,
            performance_rank: access.then_some(0),
            nvlink,
            common_ancestor: None,
        }
    }

    const GEN5: PcieLink = PcieLink {
        current_gen: 1,
        current_width: 16,
        max_gen: 5,
        max_width: 16,
    };

    #[test]
    fn gpu_budget_is_free_minus_reserve() {
        let inv = inventory(vec![gpu(0, None, None), gpu(1, None, None)], vec![]);
        let b = default_budgets(&inv, &Reserve::default());
        let reserve = (1u64 << 30) + ((80u64 << 30) as f64 * 0.02) as u64;
        assert_eq!(b.get(Device::Gpu(0)), Some((79u64 << 30) - reserve));
        assert_eq!(b.gpus(), vec![0, 1]);
        assert!(b.get(Device::Disk).is_none());
    }

    #[test]
    fn a_reserve_larger_than_free_memory_gives_zero_not_underflow() {
        let mut g = gpu(0, None, None);
        g.free_memory = 100;
        let b = default_budgets(&inventory(vec![g], vec![]), &Reserve::default());
        assert_eq!(b.get(Device::Gpu(0)), Some(0));
    }

    #[test]
    fn meminfo_parsing() {
        let text = "MemTotal:       32768000 kB\nMemFree:  100 kB\nMemAvailable:   16384000 kB\n";
        assert_eq!(parse_meminfo(text, "MemTotal:"), Some(32_768_000 * 1024));
        assert_eq!(
            parse_meminfo(text, "MemAvailable:"),
            Some(16_384_000 * 1024)
        );
        assert_eq!(parse_meminfo(text, "Nope:"), None);
    }

    #[test]
    fn pcie_uses_the_maximum_link_not_the_idle_one() {
        let bw = pcie_bandwidth(&GEN5).unwrap();
        assert!((bw - 3.938e9 * 16.0 * 0.8).abs() < 1.0);
        let gen4 = PcieLink { max_gen: 4, ..GEN5 };
        // The cost model's default for PCIe 4.0 x16 is 25 GB/s.
        assert!((pcie_bandwidth(&gen4).unwrap() / 1e9 - 25.2).abs() < 0.1);
    }

    #[test]
    fn topology_from_nvlink_pcie_peers_and_staging() {
        let nv = Some(NvLinkState {
            active_links: 18,
            links: 18,
            version: Some(4),
        });
        let inv = inventory(
            vec![
                gpu(0, Some(GEN5), nv),
                gpu(1, Some(GEN5), nv),
                gpu(2, Some(GEN5), None),
                gpu(3, None, None),
            ],
            vec![
                peer(0, 1, true, Some(true)),
                peer(1, 0, true, Some(true)),
                peer(0, 2, true, Some(false)),
                peer(2, 0, true, Some(false)),
                peer(0, 3, false, None),
                peer(3, 0, false, None),
            ],
        );
        let t = topology(&inv, &[(2, 40e9)]);
        assert!((t.peer_link(0, 1).bandwidth - 18.0 * 25e9 * 0.8).abs() < 1.0);
        // PCIe peers: the slower host link (GPU 2's measured 40 GB/s).
        assert_eq!(t.peer_link(0, 2).bandwidth, 40e9);
        // No peer access: staged through the host, half the slower host link (GPU 3: default).
        assert_eq!(
            t.peer_link(3, 0).bandwidth,
            Topology::default().default_host_link.bandwidth / 2.0
        );
        assert_eq!(t.gpu_bandwidth(0), 3.35e12);
        assert_eq!(t.host_link(2).bandwidth, 40e9);
        assert_eq!(t.host_link(3), Topology::default().default_host_link);
    }
}
