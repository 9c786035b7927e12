//! The copy engine behind [`crate::load()`]: a queue of tasks that every copy thread pulls from.
//!
//! - GPU task: one chunk of one GPU's tensors (at most `staging_bytes`). The thread takes one of
//!   that GPU's pinned staging buffers (waiting on the event of the copy that last read it),
//!   fills it from the file, queues `cuMemcpyHtoDAsync` on the GPU's stream and records the
//!   buffer's event. Threads never wait for each other, so a slow page fault holds up one chunk,
//!   not a round of them, and the GPU's copy engine sees a steady queue of copies.
//! - Host task: a grain of the tensors kept in pinned host memory (`cpu` in the plan).
//!
//! Tasks of different GPUs are interleaved, so all GPUs load at once. Staging buffers are
//! allocated by [`prepare`], before the copies are timed.
#![allow(unsafe_code)] // raw copies into pinned memory and driver copies; each block says why.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::CudaContext;
use memmap2::Mmap;

use devmap_core::Device;

use crate::driver::{self, Event, PinnedMemory, Stream};
use crate::error::{Error, Result};
use crate::load::{DeviceStats, ProgressFn, ReadMode};

/// Bytes one host task copies into pinned host memory.
const HOST_GRAIN: usize = 8 << 20;
/// Bytes per memcpy when the destination should stay in the CPU cache: below glibc's
/// non-temporal threshold, so memcpy uses ordinary stores.
const CACHED_BLOCK: usize = 64 << 10;

/// One copy from a file range to a contiguous range of a device allocation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Piece {
    pub(crate) file: usize,
    pub(crate) src: u64,
    pub(crate) dst: u64,
    pub(crate) len: u64,
}

/// One GPU's part of the load.
pub(crate) struct GpuTarget {
    pub(crate) gpu: u32,
    pub(crate) ctx: Arc<CudaContext>,
    /// Base address of its allocation.
    pub(crate) base: u64,
    pub(crate) pieces: Vec<Piece>,
    pub(crate) tensors: usize,
}

/// The pinned host allocation and what goes into it.
pub(crate) struct HostTarget<'a> {
    pub(crate) base: usize,
    pub(crate) len: usize,
    pub(crate) pieces: &'a [Piece],
    pub(crate) tensors: usize,
}

/// Knobs of the engine (from [`crate::LoadOptions`]).
pub(crate) struct Knobs<'a> {
    pub(crate) staging_bytes: usize,
    pub(crate) staging_buffers: usize,
    pub(crate) threads: usize,
    pub(crate) read: ReadMode,
    pub(crate) write_combined: bool,
    pub(crate) progress: Option<&'a ProgressFn>,
}

/// The opened checkpoint files.
pub(crate) struct Sources<'a> {
    pub(crate) maps: &'a [Mmap],
    pub(crate) files: &'a [PathBuf],
}

impl Sources<'_> {
    /// Copy `len` bytes at `offset` of file `file` to `dst`. `cached`: copy in [`CACHED_BLOCK`]
    /// pieces so the bytes stay in the CPU cache, where the GPU reads them (a staging ring that
    /// fits in the cache costs one trip through DRAM per byte instead of three).
    ///
    /// # Safety
    /// `dst..dst+len` must be writable memory that nothing else touches during the call.
    unsafe fn copy(
        &self,
        read: ReadMode,
        file: usize,
        offset: u64,
        dst: *mut u8,
        len: usize,
        cached: bool,
    ) -> Result<()> {
        match read {
            ReadMode::Pread => {
                let out = std::slice::from_raw_parts_mut(dst, len);
                read_at(&self.files[file], out, offset)
            }
            ReadMode::Mmap => {
                let start = offset as usize;
                let src = &self.maps[file][start..start + len];
                if cached {
                    for (i, block) in src.chunks(CACHED_BLOCK).enumerate() {
                        std::ptr::copy_nonoverlapping(
                            block.as_ptr(),
                            dst.add(i * CACHED_BLOCK),
                            block.len(),
                        );
                    }
                } else {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), dst, len);
                }
                Ok(())
            }
        }
    }
}

fn read_at(path: &Path, out: &mut [u8], offset: u64) -> Result<()> {
    // One descriptor per thread and file: no shared file offset, no reopening per read.
    thread_local! {
        static OPEN: std::cell::RefCell<HashMap<PathBuf, File>> = std::cell::RefCell::new(HashMap::new());
    }
    OPEN.with(|open| {
        let mut open = open.borrow_mut();
        let file = match open.get(path) {
            Some(f) => f,
            None => {
                let f = File::open(path).map_err(|e| Error::io(path, e))?;
                open.entry(path.to_path_buf()).or_insert(f)
            }
        };
        file.read_exact_at(out, offset)
            .map_err(|e| Error::io(path, e))
    })
}

/// One GPU while it loads. Fields drop in order: the stream first (its drop waits for the
/// queued copies), then the events, then the staging buffers those copies read.
struct Lane {
    stream: Stream,
    /// Per staging slot, the event of the last copy that read it; the lock is held while the
    /// slot is filled and its copy queued.
    slots: Vec<Mutex<Event>>,
    /// `slots.len()` buffers of `staging_bytes`, in one allocation.
    staging: PinnedMemory,
    gpu: u32,
    ctx: Arc<CudaContext>,
    base: u64,
    bytes: u64,
    tensors: usize,
    /// Tasks of this lane not finished yet; the thread finishing the last one times the lane.
    remaining: AtomicUsize,
    seconds: Mutex<Option<f64>>,
}

enum Task {
    /// A chunk of one lane through staging slot `seq % slots`.
    Gpu {
        lane: usize,
        seq: usize,
        /// (piece part, offset in the staging buffer)
        parts: Vec<(Piece, usize)>,
        bytes: usize,
    },
    /// A grain of host tensors.
    Host { piece: Piece },
}

/// Streams, events and staging buffers of every GPU, allocated before the copies start (pinned
/// allocations are slow: every page is faulted in and locked).
pub(crate) struct Prepared {
    lanes: Vec<Lane>,
    targets: Vec<GpuTarget>,
}

/// Allocate what the copies need.
pub(crate) fn prepare(targets: Vec<GpuTarget>, knobs: &Knobs<'_>) -> Result<Prepared> {
    let mut lanes = Vec::with_capacity(targets.len());
    for t in &targets {
        let bytes: u64 = t.pieces.iter().map(|p| p.len).sum();
        // No more slots than the lane has chunks: small models pin little.
        let needed = bytes.div_ceil(knobs.staging_bytes as u64).max(1);
        let count = knobs.staging_buffers.min(needed as usize);
        let flags = if knobs.write_combined {
            driver::PINNED_WRITE_COMBINED
        } else {
            0
        };
        let staging = PinnedMemory::alloc(&t.ctx, t.gpu, knobs.staging_bytes * count, flags, 0)?;
        let slots = (0..count)
            .map(|_| Ok(Mutex::new(Event::new(&t.ctx, t.gpu)?)))
            .collect::<Result<Vec<_>>>()?;
        lanes.push(Lane {
            stream: Stream::new(&t.ctx, t.gpu)?,
            slots,
            staging,
            gpu: t.gpu,
            ctx: t.ctx.clone(),
            base: t.base,
            bytes,
            tensors: t.tensors,
            remaining: AtomicUsize::new(0),
            seconds: Mutex::new(None),
        });
    }
    Ok(Prepared { lanes, targets })
}

/// Run every copy; returns per-device figures, GPUs first, then cpu.
pub(crate) fn run(
    prepared: Prepared,
    host: Option<HostTarget<'_>>,
    sources: &Sources<'_>,
    knobs: &Knobs<'_>,
) -> Result<Vec<DeviceStats>> {
    let started = Instant::now();
    let Prepared { lanes, targets } = prepared;
    let pieces: Vec<&[Piece]> = targets.iter().map(|t| t.pieces.as_slice()).collect();
    let tasks = build_tasks(
        &pieces,
        host.as_ref().map(|h| h.pieces),
        knobs.staging_bytes,
    );
    for task in &tasks {
        if let Task::Gpu { lane, .. } = task {
            lanes[*lane].remaining.fetch_add(1, Ordering::Relaxed);
        }
    }
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let host_seconds: Mutex<f64> = Mutex::new(0.0);
    let host_remaining = AtomicUsize::new(
        tasks
            .iter()
            .filter(|t| matches!(t, Task::Host { .. }))
            .count(),
    );
    std::thread::scope(|s| {
        for _ in 0..knobs.threads.min(tasks.len()).max(1) {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(task) = tasks.get(i) else { break };
                    let r = execute(task, &lanes, host.as_ref(), sources, knobs).and_then(|()| {
                        match task {
                            Task::Gpu { lane, .. } => finish(&lanes[*lane], started)?,
                            Task::Host { .. } => {
                                if host_remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                                    *host_seconds.lock().unwrap_or_else(|e| e.into_inner()) =
                                        started.elapsed().as_secs_f64();
                                }
                            }
                        }
                        Ok(())
                    });
                    if let Err(e) = r {
                        stop.store(true, Ordering::Relaxed);
                        first_error
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(e);
                        break;
                    }
                }
            });
        }
    });
    // Every queued copy completes (or fails) before the staging buffers can be freed.
    let mut sync_error = None;
    for lane in &lanes {
        if let Err(e) = driver::bind(&lane.ctx, lane.gpu).and_then(|()| lane.stream.synchronize()) {
            sync_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    if let Some(e) = sync_error {
        return Err(e);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut stats: Vec<DeviceStats> = lanes
        .iter()
        .map(|l| DeviceStats {
            device: Device::Gpu(l.gpu),
            tensors: l.tensors,
            bytes: l.bytes,
            seconds: l
                .seconds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or(elapsed),
        })
        .collect();
    if let Some(h) = &host {
        stats.push(DeviceStats {
            device: Device::Cpu,
            tensors: h.tensors,
            bytes: h.pieces.iter().map(|p| p.len).sum(),
            seconds: *host_seconds.lock().unwrap_or_else(|e| e.into_inner()),
        });
    }
    Ok(stats)
}

/// After a GPU task: the thread that finished the lane's last task waits for its copies and
/// times the lane.
fn finish(lane: &Lane, started: Instant) -> Result<()> {
    if lane.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
        driver::bind(&lane.ctx, lane.gpu)?;
        lane.stream.synchronize()?;
        *lane.seconds.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// GPU chunks of every lane and host grains, round-robin.
fn build_tasks(lanes: &[&[Piece]], host: Option<&[Piece]>, cap: usize) -> Vec<Task> {
    let mut per_lane: Vec<Vec<Task>> = lanes
        .iter()
        .enumerate()
        .map(|(lane, pieces)| chunks(lane, pieces, cap))
        .collect();
    if let Some(host) = host {
        let mut grains = Vec::new();
        for p in host {
            let mut done = 0;
            while done < p.len {
                let len = (p.len - done).min(HOST_GRAIN as u64);
                grains.push(Task::Host {
                    piece: Piece {
                        file: p.file,
                        src: p.src + done,
                        dst: p.dst + done,
                        len,
                    },
                });
                done += len;
            }
        }
        per_lane.push(grains);
    }
    // Round-robin across lanes so every GPU (and the host copy) makes progress at once.
    let mut iters: Vec<_> = per_lane.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::new();
    loop {
        let mut any = false;
        for it in &mut iters {
            if let Some(t) = it.next() {
                out.push(t);
                any = true;
            }
        }
        if !any {
            return out;
        }
    }
}

/// Pack a lane's pieces into chunks of at most `cap` bytes (parts of a piece may straddle two).
fn chunks(lane: usize, pieces: &[Piece], cap: usize) -> Vec<Task> {
    let mut out = Vec::new();
    let mut parts: Vec<(Piece, usize)> = Vec::new();
    let mut used = 0usize;
    for p in pieces {
        let mut p = *p;
        while p.len > 0 {
            let take = (p.len as usize).min(cap - used);
            parts.push((
                Piece {
                    len: take as u64,
                    ..p
                },
                used,
            ));
            used += take;
            p = Piece {
                file: p.file,
                src: p.src + take as u64,
                dst: p.dst + take as u64,
                len: p.len - take as u64,
            };
            if used == cap {
                out.push(Task::Gpu {
                    lane,
                    seq: out.len(),
                    parts: std::mem::take(&mut parts),
                    bytes: used,
                });
                used = 0;
            }
        }
    }
    if !parts.is_empty() {
        out.push(Task::Gpu {
            lane,
            seq: out.len(),
            parts,
            bytes: used,
        });
    }
    out
}

fn execute(
    task: &Task,
    lanes: &[Lane],
    host: Option<&HostTarget<'_>>,
    sources: &Sources<'_>,
    knobs: &Knobs<'_>,
) -> Result<()> {
    match task {
        Task::Gpu {
            lane,
            seq,
            parts,
            bytes,
        } => {
            let lane = &lanes[*lane];
            driver::bind(&lane.ctx, lane.gpu)?;
            let index = seq % lane.slots.len();
            let event = lane.slots[index].lock().unwrap_or_else(|e| e.into_inner());
            // The copy that last read this buffer must be done before it is overwritten.
            event.synchronize()?;
            let buf = lane.staging.ptr() as usize + index * knobs.staging_bytes;
            for (p, off) in parts {
                // SAFETY: this thread holds the slot's lock and the slot's previous copy has
                // completed, so nothing else reads or writes these bytes; offset + part fits in
                // the slot (chunks are at most staging_bytes).
                unsafe {
                    sources.copy(
                        knobs.read,
                        p.file,
                        p.src,
                        (buf + off) as *mut u8,
                        p.len as usize,
                        !knobs.write_combined,
                    )?
                };
            }
            for (p, off) in parts {
                // SAFETY: the staging bytes stay untouched until the event recorded below has
                // completed (waited on before the slot is refilled; every stream is
                // synchronised before the buffers are freed); the destination lies inside the
                // lane's allocation (layout).
                unsafe {
                    lane.stream.copy_htod(
                        lane.base + p.dst,
                        (buf + off) as *const u8,
                        p.len as usize,
                    )?
                };
            }
            event.record(&lane.stream)?;
            drop(event);
            if let Some(f) = knobs.progress {
                f(*bytes as u64);
            }
            Ok(())
        }
        Task::Host { piece } => {
            let h = host.expect("host tasks only with a host target");
            debug_assert!(piece.dst + piece.len <= h.len as u64);
            // SAFETY: grains are disjoint ranges of the pinned host allocation, which nothing
            // else touches until load returns.
            unsafe {
                sources.copy(
                    knobs.read,
                    piece.file,
                    piece.src,
                    (h.base + piece.dst as usize) as *mut u8,
                    piece.len as usize,
                    false,
                )?
            };
            if let Some(f) = knobs.progress {
                f(piece.len);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(file: usize, src: u64, dst: u64, len: u64) -> Piece {
        Piece {
            file,
            src,
            dst,
            len,
        }
    }

    #[test]
    fn chunks_cover_every_byte_once_and_fit_the_buffer() {
        let pieces = [
            piece(0, 100, 0, 10_000),
            piece(1, 7, 10_240, 3_000),
            piece(0, 50_000, 13_312, 1),
        ];
        let tasks = chunks(0, &pieces, 4096);
        let mut covered = 0;
        let mut dst_seen = Vec::new();
        for (seq, t) in tasks.iter().enumerate() {
            let Task::Gpu {
                seq: s,
                parts,
                bytes,
                ..
            } = t
            else {
                panic!("a GPU task")
            };
            assert_eq!(*s, seq);
            assert!(*bytes <= 4096);
            let mut off = 0;
            for (p, o) in parts {
                assert_eq!(*o, off);
                off += p.len as usize;
                dst_seen.push((p.dst, p.len));
            }
            assert_eq!(off, *bytes);
            covered += bytes;
        }
        assert_eq!(covered, 13_001);
        // Destination ranges tile the pieces' destinations exactly.
        dst_seen.sort();
        let total: u64 = dst_seen.iter().map(|(_, l)| l).sum();
        assert_eq!(total, 13_001);
        for w in dst_seen.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0);
        }
    }

    #[test]
    fn tasks_of_several_gpus_and_the_host_interleave() {
        let gpu0 = [piece(0, 0, 0, 3 * 4096)];
        let gpu1 = [piece(1, 0, 0, 4096)];
        let host = [piece(0, 0, 0, 2 * HOST_GRAIN as u64 + 1)];
        let tasks = build_tasks(&[&gpu0, &gpu1], Some(&host), 4096);
        let order: Vec<String> = tasks
            .iter()
            .map(|t| match t {
                Task::Gpu { lane, seq, .. } => format!("g{lane}.{seq}"),
                Task::Host { piece } => format!("h{}", piece.len),
            })
            .collect();
        let grain = HOST_GRAIN;
        assert_eq!(
            order,
            vec![
                "g0.0".to_string(),
                "g1.0".into(),
                format!("h{grain}"),
                "g0.1".into(),
                format!("h{grain}"),
                "g0.2".into(),
                "h1".into(),
            ]
        );
    }
}
