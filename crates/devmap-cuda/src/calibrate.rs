//! This machine's rates, measured: what `devmap calibrate` writes into a topology file.
//!
//! Per GPU: host-to-device copies from pinned and from pageable memory (bandwidth of large copies,
//! latency of small ones), and the memory bandwidth seen by a device-to-device copy (it reads
//! and writes every byte, so the rate counts both). Per ordered pair of GPUs: peer copies with
//! peer access enabled, as PyTorch does. Once: a warm read through the page cache (what
//! accelerate's disk offload costs once the file is cached). docs/cost-model.md says which
//! topology field each figure sets.
#![allow(unsafe_code)] // raw copies between driver allocations.

use std::path::{Path, PathBuf};
use std::time::Instant;

use devmap_core::cost::{GpuProfile, Link};
use devmap_core::Topology;
use serde::Serialize;

use crate::bench::{h2d_bandwidth, HostMemory};
use crate::discover::Inventory;
use crate::driver::{self, DeviceMemory, Stream};
use crate::error::{Error, Result};

/// Sizes and repeat counts of the measurements.
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    /// Bytes per large copy from pinned memory, between GPUs, and within a GPU.
    pub bulk_bytes: usize,
    /// Bytes per large copy from pageable memory, and of the page-cache file.
    pub pageable_bytes: usize,
    /// Bytes per small copy (latency): one Llama-8B activation row in bf16 is 8 KiB.
    pub small_bytes: usize,
    /// Timed large copies (after one warm-up); the median counts.
    pub repeats: u32,
    /// Timed small copies (after one warm-up); the median counts.
    pub small_repeats: u32,
    /// Folder for the page-cache file (removed afterwards); `None` skips that measurement.
    pub page_cache_dir: Option<PathBuf>,
}

impl Default for CalibrateOptions {
    /// 512 MiB bulk copies, 256 MiB pageable copies, 8 KiB small copies; 5 and 101 repeats;
    /// the page-cache file in the system's temporary folder.
    fn default() -> Self {
        CalibrateOptions {
            bulk_bytes: 512 << 20,
            pageable_bytes: 256 << 20,
            small_bytes: 8 << 10,
            repeats: 5,
            small_repeats: 101,
            page_cache_dir: Some(std::env::temp_dir()),
        }
    }
}

/// One kind of copy: bandwidth of large copies and the fixed cost of one copy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CopyRate {
    /// Median over the large copies, bytes per second.
    pub bandwidth: f64,
    /// Median time of one small copy minus its bytes at `bandwidth`, seconds (host clock
    /// around a stream synchronisation, as a synchronous `tensor.to(device)` waits).
    pub latency: f64,
}

impl CopyRate {
    /// The cost model's link.
    pub fn link(&self) -> Link {
        Link {
            bandwidth: self.bandwidth,
            latency: self.latency,
        }
    }
}

/// What was measured on one GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuRates {
    /// CUDA index.
    pub gpu: u32,
    /// Device name.
    pub name: String,
    /// Host-to-device copies from page-locked memory.
    pub pinned: CopyRate,
    /// Host-to-device copies from pageable memory.
    pub pageable: CopyRate,
    /// Bytes read plus bytes written per second by a device-to-device copy.
    pub memory_bandwidth: f64,
}

/// What was measured between two GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PeerRate {
    /// Source GPU.
    pub from: u32,
    /// Destination GPU.
    pub to: u32,
    /// The copies.
    pub rate: CopyRate,
}

/// Everything `devmap calibrate` measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    /// Per GPU.
    pub gpus: Vec<GpuRates>,
    /// Per ordered pair of GPUs (empty with one GPU).
    pub peers: Vec<PeerRate>,
    /// Warm reads of a file through the page cache, bytes per second.
    pub page_cache_read: Option<f64>,
}

impl Calibration {
    /// Write the measured rates into `topo`: each GPU's memory bandwidth, pinned and pageable host
    /// links, the defaults for unlisted GPUs (from the first GPU), peer links (the slower
    /// direction of each pair), and the disk read rate.
    pub fn apply(&self, topo: &mut Topology) {
        for g in &self.gpus {
            let profile = topo.gpus.entry(g.gpu).or_insert_with(|| GpuProfile {
                name: g.name.clone(),
                memory_bandwidth: g.memory_bandwidth,
                host_link: None,
                pageable_host_link: None,
            });
            profile.memory_bandwidth = g.memory_bandwidth;
            profile.host_link = Some(g.pinned.link());
            profile.pageable_host_link = Some(g.pageable.link());
        }
        if let Some(first) = self.gpus.first() {
            topo.default_gpu.memory_bandwidth = first.memory_bandwidth;
            topo.default_host_link = first.pinned.link();
            topo.default_pageable_host_link = first.pageable.link();
        }
        for p in self.peers.iter().filter(|p| p.from < p.to) {
            let back = self.peers.iter().find(|q| (q.from, q.to) == (p.to, p.from));
            let slower = back.map_or(p.rate, |q| slower_of(p.rate, q.rate));
            topo.peer_links
                .insert(format!("{}-{}", p.from, p.to), slower.link());
        }
        if let Some(rate) = self.page_cache_read {
            topo.disk_read_bandwidth = rate;
        }
    }
}

fn slower_of(a: CopyRate, b: CopyRate) -> CopyRate {
    CopyRate {
        bandwidth: a.bandwidth.min(b.bandwidth),
        latency: a.latency.max(b.latency),
    }
}

/// Measure every GPU of `inv`, every pair of them, and the page cache.
pub fn calibrate(inv: &Inventory, opts: &CalibrateOptions) -> Result<Calibration> {
    if inv.gpus.is_empty() {
        return Err(Error::NoDevice {
            reason: "the driver lists no GPU to calibrate".into(),
        });
    }
    let mut gpus = Vec::new();
    for g in &inv.gpus {
        gpus.push(GpuRates {
            gpu: g.index,
            name: g.name.clone(),
            pinned: host_copies(g.index, HostMemory::Pinned, opts.bulk_bytes, opts)?,
            pageable: host_copies(g.index, HostMemory::Pageable, opts.pageable_bytes, opts)?,
            memory_bandwidth: device_copy_bandwidth(g.index, opts)?,
        });
    }
    let mut peers = Vec::new();
    for a in &inv.gpus {
        for b in inv.gpus.iter().filter(|b| b.index != a.index) {
            peers.push(peer_copies(a.index, b.index, opts)?);
        }
    }
    let page_cache_read = match &opts.page_cache_dir {
        Some(dir) => Some(page_cache_read(dir, opts)?),
        None => None,
    };
    Ok(Calibration {
        gpus,
        peers,
        page_cache_read,
    })
}

/// Large copies for the bandwidth, small ones for the latency.
fn host_copies(
    gpu: u32,
    memory: HostMemory,
    bulk: usize,
    opts: &CalibrateOptions,
) -> Result<CopyRate> {
    let large = h2d_bandwidth(gpu, memory, bulk, opts.repeats)?;
    let small = h2d_bandwidth(gpu, memory, opts.small_bytes, opts.small_repeats)?;
    Ok(rate(
        large.median,
        opts.small_bytes,
        opts.small_bytes as f64 / small.median,
    ))
}

/// A rate from the large copies' bandwidth and one small copy's median time.
fn rate(bandwidth: f64, small_bytes: usize, small_seconds: f64) -> CopyRate {
    CopyRate {
        bandwidth,
        latency: (small_seconds - small_bytes as f64 / bandwidth).max(0.0),
    }
}

/// Median seconds of `repeats` runs of `copy` (after one warm-up), each followed by a
/// synchronisation of `stream`.
fn median_seconds(
    stream: &Stream,
    repeats: u32,
    mut copy: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let mut times = Vec::with_capacity(repeats as usize);
    for r in 0..=repeats {
        let t = Instant::now();
        copy()?;
        stream.synchronize()?;
        if r > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times.get(times.len() / 2).copied().unwrap_or(f64::NAN))
}

/// Device-to-device copies of `bulk_bytes`: read and written bytes per second.
fn device_copy_bandwidth(gpu: u32, opts: &CalibrateOptions) -> Result<f64> {
    let ctx = driver::context(gpu)?;
    let src = DeviceMemory::alloc(&ctx, gpu, opts.bulk_bytes, 0)?;
    let dst = DeviceMemory::alloc(&ctx, gpu, opts.bulk_bytes, 0)?;
    let stream = Stream::new(&ctx, gpu)?;
    let seconds = median_seconds(&stream, opts.repeats, || {
        // SAFETY: both allocations hold bulk_bytes and outlive the synchronisation.
        unsafe { stream.copy_dtod(dst.ptr, src.ptr, opts.bulk_bytes) }
    })?;
    Ok(2.0 * opts.bulk_bytes as f64 / seconds)
}

/// Copies from GPU `from` to GPU `to` (peer access enabled both ways), on a stream of `to`.
fn peer_copies(from: u32, to: u32, opts: &CalibrateOptions) -> Result<PeerRate> {
    let (src_ctx, dst_ctx) = (driver::context(from)?, driver::context(to)?);
    driver::enable_peer_access(&src_ctx, from, &dst_ctx)?;
    driver::enable_peer_access(&dst_ctx, to, &src_ctx)?;
    let src = DeviceMemory::alloc(&src_ctx, from, opts.bulk_bytes, 0)?;
    let dst = DeviceMemory::alloc(&dst_ctx, to, opts.bulk_bytes, 0)?;
    let stream = Stream::new(&dst_ctx, to)?;
    let timed = |bytes: usize, repeats: u32| {
        median_seconds(&stream, repeats, || {
            // SAFETY: both allocations hold bulk_bytes ≥ bytes and outlive the synchronisation.
            unsafe { stream.copy_peer((dst.ptr, &dst_ctx), (src.ptr, &src_ctx), bytes) }
        })
    };
    let bulk = opts.bulk_bytes as f64 / timed(opts.bulk_bytes, opts.repeats)?;
    let small = timed(opts.small_bytes.min(opts.bulk_bytes), opts.small_repeats)?;
    Ok(PeerRate {
        from,
        to,
        rate: rate(bulk, opts.small_bytes, small),
    })
}

/// Write a file of `pageable_bytes` into `dir`, then time whole reads of it (warm: the file was
/// just written). The file is removed afterwards, on errors too.
fn page_cache_read(dir: &Path, opts: &CalibrateOptions) -> Result<f64> {
    let path = dir.join(format!("devmap-calibrate-{}.bin", std::process::id()));
    let io = |e| Error::Io {
        path: path.clone(),
        source: e,
    };
    let bytes: Vec<u8> = (0..opts.pageable_bytes).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &bytes).map_err(io)?;
    let mut times = Vec::new();
    let mut result = Ok(());
    for _ in 0..=opts.repeats {
        let t = Instant::now();
        match std::fs::read(&path) {
            Ok(read) if read.len() == bytes.len() => times.push(t.elapsed().as_secs_f64()),
            Ok(read) => {
                result = Err(io(std::io::Error::other(format!(
                    "read {} bytes back, wrote {}",
                    read.len(),
                    bytes.len()
                ))));
                break;
            }
            Err(e) => {
                result = Err(io(e));
                break;
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    result?;
    times.remove(0); // the first read may still wait for the write-back
    times.sort_by(f64::total_cmp);
    Ok(opts.pageable_bytes as f64 / times[times.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(i: u32, pinned: f64, pageable: f64) -> GpuRates {
        GpuRates {
            gpu: i,
            name: format!("g{i}"),
            pinned: CopyRate {
                bandwidth: pinned,
                latency: 5e-6,
            },
            pageable: CopyRate {
                bandwidth: pageable,
                latency: 15e-6,
            },
            memory_bandwidth: 4e12,
        }
    }

    #[test]
    fn apply_sets_links_and_takes_the_slower_peer_direction() {
        let peer = |from, to, bandwidth, latency| PeerRate {
            from,
            to,
            rate: CopyRate { bandwidth, latency },
        };
        let cal = Calibration {
            gpus: vec![gpu(0, 50e9, 7e9), gpu(1, 48e9, 6e9)],
            peers: vec![peer(0, 1, 300e9, 8e-6), peer(1, 0, 290e9, 6e-6)],
            page_cache_read: Some(9e9),
        };
        let mut t = Topology::default();
        cal.apply(&mut t);
        assert_eq!(t.pageable_host_link(1).bandwidth, 6e9);
        assert_eq!(t.host_link(0).bandwidth, 50e9);
        assert_eq!(t.stream_link(0).latency, 15e-6);
        assert_eq!(t.gpu_bandwidth(1), 4e12);
        assert_eq!(t.default_pageable_host_link.bandwidth, 7e9);
        let l = t.peer_link(1, 0);
        assert_eq!((l.bandwidth, l.latency), (290e9, 8e-6));
        assert_eq!(t.disk_read_bandwidth, 9e9);
    }

    #[test]
    fn an_inventory_without_gpus_is_an_error_not_a_panic() {
        let inv = Inventory {
            cuda_driver_version: "13.0".into(),
            nvidia_driver_version: None,
            nvml: false,
            cuda_visible_devices: Some(String::new()),
            gpus: vec![],
            peers: vec![],
            notes: vec![],
        };
        let e = calibrate(&inv, &CalibrateOptions::default()).unwrap_err();
        assert!(e.is_no_gpu(), "{e}");
        assert!(e.to_string().contains("no GPU to calibrate"), "{e}");
    }

    #[test]
    fn latency_is_the_small_copy_minus_its_transfer() {
        let r = rate(10e9, 10_000, 11e-6);
        assert!((r.latency - 10e-6).abs() < 1e-12, "{r:?}");
        assert_eq!(rate(10e9, 10_000, 0.5e-6).latency, 0.0);
    }
}
