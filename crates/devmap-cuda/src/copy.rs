//! The copy engine behind [`crate::load()`]: one task queue per GPU (and one for the pinned
//! host copy), each with its own copy threads and its own staging ring.
//!
//! - GPU task: one chunk of one GPU's tensors (at most `staging_bytes`). The thread takes one of
//!   that GPU's pinned staging buffers (waiting on the event of the copy that last read it),
//!   fills it from the file, queues `cuMemcpyHtoDAsync` on the GPU's stream and records the
//!   buffer's event. Threads never wait for each other, so a slow page fault holds up one chunk,
//!   not a round of them, and the GPU's copy engine sees a steady queue of copies.
//! - Host task: a grain of the tensors kept in pinned host memory (`cpu` in the plan).
//!
//! The copy threads are split between the queues in proportion to their bytes ([`home_threads`]);
//! each GPU's ring has one slot per home thread plus a few whose copies are queued, so the rings
//! of all GPUs together stay about as large as one GPU's ring alone (small rings stay in the
//! CPU's last-level cache, docs/performance.md). A thread works its home queue first and the
//! fullest other queue when its own is empty ([`Queues::next`]), so uneven GPUs finish together.
//! With one GPU this is the single shared queue of before. Staging buffers are allocated by
//! [`prepare`], before the copies are timed.
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
/// Ring slots per GPU beyond one per home thread: copies queued on the GPU while every thread
/// fills another slot.
pub(crate) const QUEUED_SLOTS: usize = 8;
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
    /// Slots per GPU ring; `None`: the GPU's home threads plus [`QUEUED_SLOTS`].
    pub(crate) staging_buffers: Option<usize>,
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
    /// Home copy threads per GPU lane, then (last) for the host copy.
    home: Vec<usize>,
}

/// Copy threads per queue, in proportion to the queue's bytes (largest remainders first, ties to
/// the earlier queue), at least one for every queue with bytes while threads last; queues without
/// bytes get none. The counts sum to `threads`, or to 0 when nothing is to be copied.
pub(crate) fn home_threads(bytes: &[u64], threads: usize) -> Vec<usize> {
    let busy: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i] > 0).collect();
    let mut out = vec![0; bytes.len()];
    if busy.is_empty() || threads == 0 {
        return out;
    }
    // Biggest queues first, so a thread short of one each goes where the bytes are.
    let mut by_size = busy.clone();
    by_size.sort_by_key(|&i| (std::cmp::Reverse(bytes[i]), i));
    if threads <= busy.len() {
        for &i in &by_size[..threads] {
            out[i] = 1;
        }
        return out;
    }
    // One each, then the rest by share of the bytes (largest remainder).
    let spare = (threads - busy.len()) as u128;
    let total: u128 = busy.iter().map(|&i| bytes[i] as u128).sum();
    let mut rest: Vec<(u128, usize)> = Vec::new();
    let mut given = 0;
    for &i in &busy {
        let exact = spare * bytes[i] as u128;
        let whole = (exact / total) as usize;
        out[i] = 1 + whole;
        given += whole;
        rest.push((exact % total, i));
    }
    rest.sort_by_key(|&(r, i)| (std::cmp::Reverse(r), i));
    for &(_, i) in rest.iter().take(spare as usize - given) {
        out[i] += 1;
    }
    out
}

/// Slots of a GPU's staging ring: as asked, else one per home thread plus [`QUEUED_SLOTS`];
/// never more than the GPU has chunks (small models pin little), at least one.
pub(crate) fn ring_slots(asked: Option<usize>, home: usize, chunks: u64) -> usize {
    let want = asked.unwrap_or(home + QUEUED_SLOTS);
    want.min(chunks.max(1) as usize).max(1)
}

/// Allocate what the copies need. `host_bytes`: bytes of the pinned host copy (0 without one).
pub(crate) fn prepare(
    targets: Vec<GpuTarget>,
    host_bytes: u64,
    knobs: &Knobs<'_>,
) -> Result<Prepared> {
    let mut queue_bytes: Vec<u64> = targets
        .iter()
        .map(|t| t.pieces.iter().map(|p| p.len).sum())
        .collect();
    queue_bytes.push(host_bytes);
    // No more threads than tasks (a GPU's chunks are packed, so it has ceil(bytes / slot) of
    // them; host grains are at least ceil(bytes / grain)).
    let tasks: u64 = queue_bytes[..targets.len()]
        .iter()
        .map(|b| b.div_ceil(knobs.staging_bytes as u64))
        .sum::<u64>()
        + host_bytes.div_ceil(HOST_GRAIN as u64);
    let home = home_threads(&queue_bytes, knobs.threads.min(tasks as usize));
    let flags = if knobs.write_combined {
        driver::PINNED_WRITE_COMBINED
    } else {
        0
    };
    let mut lanes = Vec::with_capacity(targets.len());
    for (k, t) in targets.iter().enumerate() {
        let bytes = queue_bytes[k];
        let chunks = bytes.div_ceil(knobs.staging_bytes as u64);
        let count = ring_slots(knobs.staging_buffers, home[k], chunks);
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
    Ok(Prepared {
        lanes,
        targets,
        home,
    })
}

/// The tasks of one queue and the index of the next one to take.
struct Queue {
    tasks: Vec<Task>,
    next: AtomicUsize,
}

impl Queue {
    fn new(tasks: Vec<Task>) -> Queue {
        Queue {
            tasks,
            next: AtomicUsize::new(0),
        }
    }

    /// Tasks not taken yet (a snapshot).
    fn left(&self) -> usize {
        self.tasks
            .len()
            .saturating_sub(self.next.load(Ordering::Relaxed))
    }

    fn take(&self) -> Option<&Task> {
        self.tasks.get(self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// Every queue: one per GPU lane, then the host copy's.
struct Queues {
    queues: Vec<Queue>,
}

impl Queues {
    /// The next task for a thread whose home is queue `home`: its own queue first, then the one
    /// with the most tasks left. `None` once every queue is empty.
    fn next(&self, home: usize) -> Option<&Task> {
        if let Some(t) = self.queues[home].take() {
            return Some(t);
        }
        loop {
            let fullest = (0..self.queues.len())
                .filter(|&q| self.queues[q].left() > 0)
                .max_by_key(|&q| (self.queues[q].left(), std::cmp::Reverse(q)))?;
            // Another thread may take the last task between the look and the take: look again.
            if let Some(t) = self.queues[fullest].take() {
                return Some(t);
            }
        }
    }
}

/// Run every copy; returns per-device figures, GPUs first, then cpu.
pub(crate) fn run(
    prepared: Prepared,
    host: Option<HostTarget<'_>>,
    sources: &Sources<'_>,
    knobs: &Knobs<'_>,
) -> Result<Vec<DeviceStats>> {
    let started = Instant::now();
    let Prepared {
        lanes,
        targets,
        home,
    } = prepared;
    let queues = build_queues(
        &targets,
        host.as_ref().map(|h| h.pieces),
        knobs.staging_bytes,
    );
    for (lane, queue) in lanes.iter().zip(&queues.queues) {
        lane.remaining.store(queue.tasks.len(), Ordering::Relaxed);
    }
    let host_queue = queues.queues.len() - 1;
    let shared = Workers {
        lanes: &lanes,
        queues: &queues,
        host: host.as_ref(),
        sources,
        knobs,
        started,
        stop: AtomicBool::new(false),
        first_error: Mutex::new(None),
        host_seconds: Mutex::new(0.0),
        host_remaining: AtomicUsize::new(queues.queues[host_queue].tasks.len()),
    };
    std::thread::scope(|s| {
        for (queue, &count) in home.iter().enumerate() {
            for _ in 0..count {
                let shared = &shared;
                s.spawn(move || shared.work(queue));
            }
        }
    });
    let Workers {
        first_error,
        host_seconds,
        ..
    } = shared;
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
    let host_seconds = *host_seconds.lock().unwrap_or_else(|e| e.into_inner());
    Ok(device_stats(
        &lanes,
        &home,
        host.as_ref(),
        host_seconds,
        started.elapsed().as_secs_f64(),
    ))
}

/// Per-device figures after the copies: GPUs first (a lane never timed gets the whole copy
/// time), then the pinned host copy.
fn device_stats(
    lanes: &[Lane],
    home: &[usize],
    host: Option<&HostTarget<'_>>,
    host_seconds: f64,
    elapsed: f64,
) -> Vec<DeviceStats> {
    let mut stats: Vec<DeviceStats> = lanes
        .iter()
        .zip(home)
        .map(|(l, &threads)| DeviceStats {
            device: Device::Gpu(l.gpu),
            tensors: l.tensors,
            bytes: l.bytes,
            seconds: l
                .seconds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or(elapsed),
            home_threads: threads,
            staging_slots: l.slots.len(),
        })
        .collect();
    if let Some(h) = host {
        stats.push(DeviceStats {
            device: Device::Cpu,
            tensors: h.tensors,
            bytes: h.pieces.iter().map(|p| p.len).sum(),
            seconds: host_seconds,
            home_threads: home[home.len() - 1],
            staging_slots: 0,
        });
    }
    stats
}

/// What the copy threads share while they run.
struct Workers<'a, 'h> {
    lanes: &'a [Lane],
    queues: &'a Queues,
    host: Option<&'a HostTarget<'h>>,
    sources: &'a Sources<'a>,
    knobs: &'a Knobs<'a>,
    started: Instant,
    stop: AtomicBool,
    first_error: Mutex<Option<Error>>,
    host_seconds: Mutex<f64>,
    host_remaining: AtomicUsize,
}

impl Workers<'_, '_> {
    /// One copy thread whose home is queue `home`: tasks until none is left or one fails (the
    /// first error is kept and every thread stops).
    fn work(&self, home: usize) {
        while !self.stop.load(Ordering::Relaxed) {
            let Some(task) = self.queues.next(home) else {
                break;
            };
            let r = execute(task, self.lanes, self.host, self.sources, self.knobs)
                .and_then(|()| self.done(task));
            if let Err(e) = r {
                self.stop.store(true, Ordering::Relaxed);
                self.first_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(e);
                break;
            }
        }
    }

    /// After a task: time its device if it was the device's last.
    fn done(&self, task: &Task) -> Result<()> {
        match task {
            Task::Gpu { lane, .. } => finish(&self.lanes[*lane], self.started),
            Task::Host { .. } => {
                if self.host_remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                    *self.host_seconds.lock().unwrap_or_else(|e| e.into_inner()) =
                        self.started.elapsed().as_secs_f64();
                }
                Ok(())
            }
        }
    }
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

/// One queue of chunks per GPU lane, then the queue of host grains (empty without a host copy).
fn build_queues(targets: &[GpuTarget], host: Option<&[Piece]>, cap: usize) -> Queues {
    let mut queues: Vec<Queue> = targets
        .iter()
        .enumerate()
        .map(|(lane, t)| Queue::new(chunks(lane, &t.pieces, cap)))
        .collect();
    queues.push(Queue::new(host.map_or_else(Vec::new, host_grains)));
    Queues { queues }
}

/// The host copy in grains of at most [`HOST_GRAIN`] bytes.
fn host_grains(pieces: &[Piece]) -> Vec<Task> {
    let mut grains = Vec::new();
    for p in pieces {
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
    grains
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
    fn threads_split_by_bytes_and_every_busy_queue_gets_one() {
        // Two equal GPUs, no host copy: half each.
        assert_eq!(home_threads(&[8 << 30, 8 << 30, 0], 32), vec![16, 16, 0]);
        // One GPU: every thread, as the single shared queue had.
        assert_eq!(home_threads(&[15 << 30, 0], 16), vec![16, 0]);
        // 40+12+8+8 GiB: one each, then the 28 spare by share (16.47, 4.94, 3.29, 3.29: 26
        // whole, the last 2 to the largest remainders, GPU 1's .94 and GPU 0's .47).
        let split = home_threads(&[40, 12, 8, 8, 0], 32);
        assert_eq!(split, vec![18, 6, 4, 4, 0]);
        assert_eq!(split.iter().sum::<usize>(), 32);
        // The host copy is a queue like the GPUs'.
        assert_eq!(home_threads(&[7, 0, 9], 4), vec![2, 0, 2]);
        // Fewer threads than busy queues: the biggest queues get them, the rest are stolen.
        assert_eq!(home_threads(&[1, 5, 3, 0], 2), vec![0, 1, 1, 0]);
        // Nothing to copy: no threads.
        assert_eq!(home_threads(&[0, 0], 8), vec![0, 0]);
        assert_eq!(home_threads(&[5], 0), vec![0]);
    }

    #[test]
    fn rings_hold_a_slot_per_home_thread_plus_queued_copies() {
        assert_eq!(ring_slots(None, 16, 10_000), 16 + QUEUED_SLOTS);
        // Two GPUs on 32 threads together pin what one GPU on 32 threads pinned before, + 8.
        let two: usize = home_threads(&[8 << 30, 8 << 30, 0], 32)[..2]
            .iter()
            .map(|&h| ring_slots(None, h, 10_000))
            .sum();
        assert_eq!(two, 32 + 2 * QUEUED_SLOTS);
        assert_eq!(ring_slots(Some(3), 16, 10_000), 3);
        // Never more slots than chunks, never none.
        assert_eq!(ring_slots(None, 16, 5), 5);
        assert_eq!(ring_slots(Some(4), 0, 0), 1);
    }

    fn gpu_queue(lane: usize, chunks_of: usize) -> Queue {
        let pieces = [piece(lane, 0, 0, (chunks_of * 4096) as u64)];
        Queue::new(chunks(lane, &pieces, 4096))
    }

    fn label(t: &Task) -> String {
        match t {
            Task::Gpu { lane, seq, .. } => format!("g{lane}.{seq}"),
            Task::Host { piece } => format!("h{}", piece.src),
        }
    }

    #[test]
    fn a_thread_drains_its_home_queue_then_steals_from_the_fullest() {
        let host = host_grains(&[piece(0, 0, 0, 2 * HOST_GRAIN as u64 + 1)]);
        assert_eq!(host.len(), 3);
        let queues = Queues {
            queues: vec![gpu_queue(0, 2), gpu_queue(1, 4), Queue::new(host)],
        };
        let mut order = Vec::new();
        while let Some(t) = queues.next(0) {
            order.push(label(t));
        }
        let grain = HOST_GRAIN;
        assert_eq!(
            order,
            vec![
                "g0.0".to_string(),
                "g0.1".into(),
                // GPU 1 has 4 left, the host 3: GPU 1; then 3 and 3, a tie, to the earlier queue.
                "g1.0".into(),
                "g1.1".into(),
                // Then always the queue with more left, ties to GPU 1.
                "h0".into(),
                "g1.2".into(),
                format!("h{grain}"),
                "g1.3".into(),
                format!("h{}", 2 * grain),
            ]
        );
        assert!(queues.next(1).is_none() && queues.next(2).is_none());
    }

    #[test]
    fn threads_on_every_queue_take_each_task_exactly_once() {
        let queues = Queues {
            queues: vec![gpu_queue(0, 300), gpu_queue(1, 50), gpu_queue(2, 7)],
        };
        let taken = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for home in [0, 0, 1, 2, 2, 2] {
                let (queues, taken) = (&queues, &taken);
                s.spawn(move || {
                    while let Some(t) = queues.next(home) {
                        taken.lock().unwrap().push(label(t));
                    }
                });
            }
        });
        let mut taken = taken.into_inner().unwrap();
        taken.sort();
        let mut expected: Vec<String> = (0..300)
            .map(|i| format!("g0.{i}"))
            .chain((0..50).map(|i| format!("g1.{i}")))
            .chain((0..7).map(|i| format!("g2.{i}")))
            .collect();
        expected.sort();
        assert_eq!(taken, expected);
    }
}
