//! Host-to-device copy bandwidth, measured: the ceiling a load is judged against.
#![allow(unsafe_code)] // raw copies between a host buffer and a device allocation.

use std::time::Instant;

use serde::Serialize;

use crate::driver::{self, DeviceMemory, PinnedMemory, Stream};
use crate::error::Result;

/// The kind of host memory a copy starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostMemory {
    /// Page-locked (`cuMemHostAlloc`, flags 0: what `torch.Tensor.pin_memory()` gives).
    Pinned,
    /// Page-locked and write-combined (devmap's staging buffers).
    PinnedWriteCombined,
    /// Ordinary pageable memory (the driver stages it through its own pinned buffer).
    Pageable,
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Bandwidth {
    /// The GPU.
    pub gpu: u32,
    /// The source memory.
    pub memory: HostMemory,
    /// Bytes per copy.
    pub bytes: u64,
    /// Timed copies.
    pub repeats: u32,
    /// Median over the repeats, bytes per second.
    pub median: f64,
    /// Best repeat, bytes per second.
    pub best: f64,
}

impl Bandwidth {
    /// The median in GiB/s.
    pub fn median_gib_per_s(&self) -> f64 {
        self.median / (1u64 << 30) as f64
    }
}

/// Copy `bytes` from host memory of kind `memory` to GPU `gpu`, `repeats` times after one
/// warm-up copy, each timed alone (host clock around a stream synchronisation).
pub fn h2d_bandwidth(
    gpu: u32,
    memory: HostMemory,
    bytes: usize,
    repeats: u32,
) -> Result<Bandwidth> {
    let ctx = driver::context(gpu)?;
    let dst = DeviceMemory::alloc(&ctx, gpu, bytes, 0)?;
    let stream = Stream::new(&ctx, gpu)?;
    let mut pinned = None;
    let mut pageable = Vec::new();
    let src: *const u8 = match memory {
        HostMemory::Pageable => {
            // Non-zero bytes, touched, so page faults stay out of the timing.
            pageable = (0..bytes).map(|i| (i % 251) as u8).collect::<Vec<u8>>();
            pageable.as_ptr()
        }
        HostMemory::Pinned | HostMemory::PinnedWriteCombined => {
            let flags = if memory == HostMemory::Pinned {
                0
            } else {
                driver::PINNED_WRITE_COMBINED
            };
            let mut p = PinnedMemory::alloc(&ctx, gpu, bytes, flags, 0)?;
            // Whole-block copies: byte-wise writes to write-combined memory would be slow.
            let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
            for chunk in p.as_mut_slice().chunks_mut(block.len()) {
                chunk.copy_from_slice(&block[..chunk.len()]);
            }
            let ptr = p.ptr() as *const u8;
            pinned = Some(p);
            ptr
        }
    };
    let mut rates = Vec::with_capacity(repeats as usize);
    for r in 0..=repeats {
        let t = Instant::now();
        // SAFETY: src and dst hold `bytes` bytes and live until after the synchronisation.
        unsafe { stream.copy_htod(dst.ptr, src, bytes)? };
        stream.synchronize()?;
        if r > 0 {
            rates.push(bytes as f64 / t.elapsed().as_secs_f64());
        }
    }
    drop(pinned);
    drop(pageable);
    rates.sort_by(f64::total_cmp);
    Ok(Bandwidth {
        gpu,
        memory,
        bytes: bytes as u64,
        repeats,
        median: rates.get(rates.len() / 2).copied().unwrap_or(0.0),
        best: rates.last().copied().unwrap_or(0.0),
    })
}
