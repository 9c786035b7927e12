//! Loading a checkpoint onto the devices a plan names.
//!
//! The fast path, per GPU, all GPUs at once:
//!
//! 1. Lay out the GPU's tensors in one device allocation, in file order, each at a 256-byte
//!    boundary; consecutive tensors whose file bytes are contiguous and whose slots are adjacent
//!    merge into one copy (for a typical checkpoint, one copy per file and GPU).
//! 2. Stream the file bytes through a ring of pinned staging buffers per GPU (sized in
//!    [`LoadOptions`]): each GPU has its own copy threads (the threads are split between GPUs in
//!    proportion to their bytes, and steal from the fullest queue when theirs is empty), which
//!    fill slots from the mmap (or with `pread`) while the GPU's copy engine drains filled ones
//!    with `cuMemcpyHtoDAsync` on the GPU's own stream. Pageable memory would be staged again by
//!    the driver, synchronously.
//! 3. Tensors the plan keeps on `cpu` are copied into one pinned host allocation (so engines can
//!    stream them to a GPU at full speed); tensors on `disk` are left to devmap-offload's reader.
//!
//! Everything is allocated before the first byte moves, so running out of memory fails fast and
//! frees what was taken; tied tensors on the same device share one slot.

#![allow(unsafe_code)] // raw copies into pinned and device memory; each block states its invariant.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::CudaContext;
use memmap2::Mmap;
use serde::Serialize;

use devmap_core::validate::tensor_devices;
use devmap_core::{validate, DType, Device, DeviceMap, Model, Problem, SizeRules, TensorKind};

use crate::copy::{self, GpuTarget, HostTarget, Knobs, Piece, Sources};
use crate::driver::{self, DeviceMemory, PinnedMemory};
use crate::error::{Error, Result};

/// Alignment of every tensor's slot on a device (what `cudaMalloc` guarantees for a fresh block).
pub const TENSOR_ALIGN: u64 = 256;

/// Called with the number of bytes just queued for copying (from any thread).
pub type ProgressFn = Arc<dyn Fn(u64) + Send + Sync>;

/// How the host reads the checkpoint files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadMode {
    /// Copy out of a read-only memory map into pinned staging buffers.
    #[default]
    Mmap,
    /// `pread` into the staging buffers (no page-table work for the mapping).
    Pread,
}

/// Options of [`load`].
#[derive(Clone)]
pub struct LoadOptions {
    /// Bytes per pinned staging buffer.
    pub staging_bytes: usize,
    /// Staging buffers per GPU, a ring: threads fill some while the GPU copies out of others
    /// (2 is plain double buffering). `None`: one per copy thread of that GPU plus 8 (see
    /// [`LoadOptions::buffers_for`]), so the rings of all GPUs together stay about one GPU's
    /// size.
    pub staging_buffers: Option<usize>,
    /// Host threads that fill staging buffers and copy cpu-mapped tensors, split between the
    /// GPUs (and the pinned host copy) in proportion to their bytes.
    pub copy_threads: usize,
    /// How the files are read.
    pub read: ReadMode,
    /// Allocate staging buffers write-combined (uncached: CPU writes stream to DRAM, the GPU
    /// reads them from there) instead of cached.
    pub write_combined: bool,
    /// Progress callback.
    pub progress: Option<ProgressFn>,
}

impl Default for LoadOptions {
    /// One copy thread per core; per GPU a ring of 2 MiB cached staging buffers, 8 more than
    /// that GPU's threads (48 MiB with 16 threads on one GPU: small enough to stay in the CPU's
    /// last-level cache, so the GPU reads the staged bytes from there); mmap reads.
    /// docs/performance.md has the measurements behind each choice.
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
        LoadOptions {
            staging_bytes: 2 << 20,
            staging_buffers: None,
            copy_threads: threads,
            read: ReadMode::Mmap,
            write_combined: false,
            progress: None,
        }
    }
}

impl LoadOptions {
    /// The default ring size of a GPU with `threads` copy threads of its own: one buffer each
    /// being filled, plus 8 whose copies are queued on the GPU.
    pub fn buffers_for(threads: usize) -> usize {
        copy::ring_slots(None, threads, u64::MAX)
    }
}

impl fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadOptions")
            .field("staging_bytes", &self.staging_bytes)
            .field("staging_buffers", &self.staging_buffers)
            .field("copy_threads", &self.copy_threads)
            .field("read", &self.read)
            .field("write_combined", &self.write_combined)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// One tensor the loader placed.
#[derive(Debug, Clone, Serialize)]
pub struct LoadedTensor {
    /// Full name.
    pub name: String,
    /// Element type as stored.
    #[serde(serialize_with = "dtype_name")]
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Where it lives: a GPU or `cpu` (pinned host memory).
    pub device: Device,
    /// Size in bytes.
    pub bytes: u64,
    /// Address: a `CUdeviceptr` on a GPU, a host address for `cpu`. Tied tensors on one device
    /// share an address. Valid while the [`LoadedModel`] lives.
    pub ptr: u64,
    #[serde(skip)]
    source: Src,
}

fn dtype_name<S: serde::Serializer>(d: &DType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(d)
}

/// Per-device figures of a load.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceStats {
    /// The device.
    pub device: Device,
    /// Tensors placed there (tied aliases count once).
    pub tensors: usize,
    /// Bytes copied there.
    pub bytes: u64,
    /// Copy time, seconds (first fill to the last copy's completion).
    pub seconds: f64,
    /// Copy threads whose home queue was this device's (they help other devices when done).
    pub home_threads: usize,
    /// Slots of its pinned staging ring (0 for `cpu`, which is copied into directly).
    pub staging_slots: usize,
}

impl DeviceStats {
    /// Bytes per second over `seconds`, in GiB/s.
    pub fn gib_per_s(&self) -> f64 {
        gib_per_s(self.bytes, self.seconds)
    }
}

fn gib_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / seconds / (1u64 << 30) as f64
    } else {
        0.0
    }
}

/// Figures of a whole load.
#[derive(Debug, Clone, Serialize)]
pub struct LoadStats {
    /// Per device, GPUs first.
    pub devices: Vec<DeviceStats>,
    /// Reading the plan, opening files, contexts, allocations (device, pinned, staging), seconds.
    pub setup_seconds: f64,
    /// Wall time of the copies, all devices in parallel, seconds.
    pub copy_seconds: f64,
    /// From the call to the return, seconds.
    pub total_seconds: f64,
    /// Bytes copied to GPUs and pinned host memory.
    pub bytes: u64,
    /// Bytes of the tensors left on disk.
    pub offloaded_bytes: u64,
}

impl LoadStats {
    /// Aggregate copy rate, GiB/s (bytes over the copy phase's wall time).
    pub fn copy_gib_per_s(&self) -> f64 {
        gib_per_s(self.bytes, self.copy_seconds)
    }

    /// Rate over the whole call, GiB/s (setup included).
    pub fn total_gib_per_s(&self) -> f64 {
        gib_per_s(self.bytes, self.total_seconds)
    }
}

/// A checkpoint on its devices: device buffers by tensor name, for engines that link devmap-cuda.
///
/// Dropping it frees the device and pinned memory.
pub struct LoadedModel {
    tensors: Vec<LoadedTensor>,
    by_name: HashMap<String, usize>,
    left_to_offload: Vec<String>,
    files: Vec<PathBuf>,
    stats: LoadStats,
    // Declared last so the memory is freed after everything that points into it.
    gpu_memory: Vec<DeviceMemory>,
    host_memory: Option<PinnedMemory>,
    contexts: Vec<(u32, Arc<CudaContext>)>,
}

impl fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedModel")
            .field("tensors", &self.tensors.len())
            .field("left_to_offload", &self.left_to_offload.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl LoadedModel {
    /// Every loaded tensor, in the model's order.
    pub fn tensors(&self) -> &[LoadedTensor] {
        &self.tensors
    }

    /// A loaded tensor by name.
    pub fn get(&self, name: &str) -> Option<&LoadedTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor kept in pinned host memory (`None` for GPU tensors and unknown names).
    pub fn host_bytes(&self, name: &str) -> Option<&[u8]> {
        let t = self.get(name)?;
        let host = self.host_memory.as_ref()?;
        if t.device != Device::Cpu {
            return None;
        }
        let base = host.ptr() as u64;
        let start = (t.ptr - base) as usize;
        host.as_slice().get(start..start + t.bytes as usize)
    }

    /// Tensors the plan puts on `disk`: not loaded, left to devmap-offload's reader.
    pub fn left_to_offload(&self) -> &[String] {
        &self.left_to_offload
    }

    /// Bytes allocated per device (slots included their alignment padding), GPUs first.
    pub fn allocated(&self) -> Vec<(Device, u64)> {
        let mut out: Vec<(Device, u64)> = self
            .gpu_memory
            .iter()
            .map(|m| (Device::Gpu(m.gpu), m.bytes as u64))
            .collect();
        if let Some(h) = &self.host_memory {
            out.push((Device::Cpu, h.len() as u64));
        }
        out
    }

    /// Figures of the load.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    /// Copy every loaded tensor back (GPUs) or read it (pinned host memory) and compare its
    /// checksum (xxh3-64) with the checkpoint file's bytes.
    pub fn verify(&self) -> Result<VerifyReport> {
        crate::verify::verify(self)
    }

    pub(crate) fn parts(&self) -> VerifyParts<'_> {
        VerifyParts {
            tensors: &self.tensors,
            files: &self.files,
            contexts: &self.contexts,
        }
    }
}

/// What verification reads of a [`LoadedModel`].
pub(crate) struct VerifyParts<'a> {
    pub(crate) tensors: &'a [LoadedTensor],
    pub(crate) files: &'a [PathBuf],
    pub(crate) contexts: &'a [(u32, Arc<CudaContext>)],
}

impl LoadedTensor {
    pub(crate) fn source(&self) -> (usize, u64) {
        (self.source.file, self.source.start)
    }
}

/// Result of [`LoadedModel::verify`].
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Distinct storages compared (tied aliases once per device).
    pub tensors: usize,
    /// Bytes compared.
    pub bytes: u64,
    /// Tensors whose checksum differs from the file's.
    pub mismatches: Vec<Mismatch>,
    /// Seconds taken.
    pub seconds: f64,
}

/// One tensor whose loaded bytes differ from the file.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    /// The tensor.
    pub tensor: String,
    /// Where it was loaded.
    pub device: Device,
    /// xxh3-64 of the file's bytes.
    pub expected: u64,
    /// xxh3-64 of the loaded bytes.
    pub found: u64,
}

/// Where a tensor's bytes are: file index and absolute byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
struct Src {
    file: usize,
    start: u64,
    len: u64,
}

/// The tensors of one device, laid out in one allocation.
#[derive(Debug, Default)]
struct Layout {
    /// Size of the allocation.
    bytes: u64,
    /// The copies that fill it.
    pieces: Vec<Piece>,
    /// Slots (distinct storages) in it.
    tensors: usize,
}

/// Load `model`'s tensors onto the devices `plan` names.
///
/// `model` must come from safetensors files ([`devmap_core::load_model`] on a checkpoint), so
/// every tensor knows its bytes. GPUs receive device allocations, `cpu` tensors pinned host
/// memory; `disk` tensors are listed in [`LoadedModel::left_to_offload`].
///
/// Errors, each with everything allocated so far freed: the plan names a tensor or module the
/// model lacks ([`Error::MissingTensor`]) or leaves tensors unmapped ([`Error::Plan`]); a tensor
/// has no bytes ([`Error::MissingTensorData`]); a GPU index beyond the machine's
/// ([`Error::NoSuchGpu`]); not enough memory ([`Error::OutOfMemory`]); no driver.
pub fn load(model: &Model, plan: &DeviceMap, options: &LoadOptions) -> Result<LoadedModel> {
    let started = Instant::now();
    if options.staging_bytes == 0 || options.staging_buffers == Some(0) || options.copy_threads == 0
    {
        return Err(Error::Options(format!(
            "staging_bytes ({}), staging_buffers ({:?}) and copy_threads ({}) must be positive",
            options.staging_bytes, options.staging_buffers, options.copy_threads
        )));
    }
    check_plan(model, plan)?;
    let devices = tensor_devices(model, plan);

    // Which file range feeds each tensor: its own, or (for a tied name the checkpoint omits,
    // such as a restored lm_head) that of a tied twin stored in the file.
    let mut files: Vec<PathBuf> = Vec::new();
    let mut file_index: HashMap<PathBuf, usize> = HashMap::new();
    let mut twin: HashMap<usize, usize> = HashMap::new();
    for group in model.tied_groups() {
        if let Some(&with_data) = group.iter().find(|&&t| model.tensor(t).source.is_some()) {
            for &t in group {
                twin.insert(t, with_data);
            }
        }
    }
    let mut tensors: Vec<LoadedTensor> = Vec::new();
    let mut left_to_offload = Vec::new();
    let mut offloaded_bytes = 0;
    // Storage already placed on a device: (device, source) -> index in `tensors`.
    let mut placed: HashMap<(Device, Src), usize> = HashMap::new();
    let mut aliases: Vec<(usize, usize)> = Vec::new();
    for (id, t) in model.tensors().iter().enumerate() {
        let Some(device) = devices[id] else {
            // A non-persistent buffer a map may leave out: the model computes it at init.
            if model.is_non_persistent(id) {
                continue;
            }
            return Err(Error::Plan {
                reason: format!("tensor {:?} has no device", t.name),
            });
        };
        if device == Device::Disk {
            left_to_offload.push(t.name.clone());
            offloaded_bytes += t.stored_bytes();
            continue;
        }
        let stored = t
            .source
            .as_ref()
            .or_else(|| twin.get(&id).and_then(|&o| model.tensor(o).source.as_ref()));
        let Some(source) = stored else {
            // A buffer no checkpoint holds (rotary `inv_freq`, position ids: the architecture
            // registry adds them) is computed by the model at init: nothing to copy.
            if t.kind == TensorKind::Buffer {
                continue;
            }
            return Err(Error::MissingTensorData {
                tensor: t.name.clone(),
            });
        };
        let file = *file_index.entry(source.file.clone()).or_insert_with(|| {
            files.push(source.file.clone());
            files.len() - 1
        });
        let src = Src {
            file,
            start: source.byte_range.start,
            len: source.byte_range.end - source.byte_range.start,
        };
        let index = tensors.len();
        tensors.push(LoadedTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            device,
            bytes: src.len,
            ptr: 0,
            source: src,
        });
        match placed.get(&(device, src)) {
            Some(&owner) => aliases.push((index, owner)),
            None => {
                placed.insert((device, src), index);
            }
        }
    }

    let maps = open_files(&files, &tensors)?;
    let used: BTreeSet<Device> = placed.keys().map(|(d, _)| *d).collect();
    let gpus: Vec<u32> = used
        .iter()
        .filter_map(|d| match d {
            Device::Gpu(i) => Some(*i),
            _ => None,
        })
        .collect();

    // Slot offsets per device, in file order so neighbouring tensors merge into one copy.
    let mut owners: Vec<usize> = placed.values().copied().collect();
    owners.sort_by_key(|&i| {
        (
            tensors[i].device,
            tensors[i].source.file,
            tensors[i].source.start,
        )
    });
    let mut layouts: HashMap<Device, Layout> = HashMap::new();
    let mut offsets: HashMap<usize, u64> = HashMap::new();
    for &i in &owners {
        let t = &tensors[i];
        let layout = layouts.entry(t.device).or_default();
        let dst = layout.bytes.next_multiple_of(TENSOR_ALIGN);
        layout.bytes = dst + t.bytes;
        layout.tensors += 1;
        offsets.insert(i, dst);
        let s = t.source;
        match layout.pieces.last_mut() {
            Some(p) if p.file == s.file && p.src + p.len == s.start && p.dst + p.len == dst => {
                p.len += s.len
            }
            _ if s.len == 0 => {}
            _ => layout.pieces.push(Piece {
                file: s.file,
                src: s.start,
                dst,
                len: s.len,
            }),
        }
    }

    if used.is_empty() {
        // Everything is on disk: nothing to allocate, no driver needed.
        return Ok(LoadedModel {
            tensors,
            by_name: HashMap::new(),
            left_to_offload,
            files,
            stats: LoadStats {
                devices: Vec::new(),
                setup_seconds: started.elapsed().as_secs_f64(),
                copy_seconds: 0.0,
                total_seconds: started.elapsed().as_secs_f64(),
                bytes: 0,
                offloaded_bytes,
            },
            gpu_memory: Vec::new(),
            host_memory: None,
            contexts: Vec::new(),
        });
    }

    let count = driver::device_count()?;
    for &g in &gpus {
        if g >= count {
            return Err(Error::NoSuchGpu {
                index: g,
                count,
                tensors: tensors
                    .iter()
                    .filter(|t| t.device == Device::Gpu(g))
                    .count(),
            });
        }
    }
    if count == 0 {
        return Err(Error::NoDevice {
            reason: "pinned host memory for cpu-mapped tensors needs a CUDA device".into(),
        });
    }

    // Contexts in parallel (each takes ~0.1-0.3 s), then every allocation before any copy.
    let ctx_gpus: Vec<u32> = if gpus.is_empty() {
        vec![0]
    } else {
        gpus.clone()
    };
    let contexts: Vec<(u32, Arc<CudaContext>)> = std::thread::scope(|s| {
        let handles: Vec<_> = ctx_gpus
            .iter()
            .map(|&g| s.spawn(move || driver::context(g).map(|c| (g, c))))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Options("context thread panicked".into())))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let ctx_of = |g: u32| {
        contexts
            .iter()
            .find(|(i, _)| *i == g)
            .map(|(_, c)| c.clone())
            .expect("a context per used GPU")
    };

    let mut gpu_memory = Vec::new();
    for &g in &gpus {
        let layout = &layouts[&Device::Gpu(g)];
        gpu_memory.push(DeviceMemory::alloc(
            &ctx_of(g),
            g,
            layout.bytes as usize,
            layout.tensors,
        )?);
    }
    let host_memory = match layouts.get(&Device::Cpu) {
        Some(layout) => Some(PinnedMemory::alloc(
            &contexts[0].1,
            contexts[0].0,
            layout.bytes as usize,
            driver::PINNED_PORTABLE,
            layout.tensors,
        )?),
        None => None,
    };
    let targets: Vec<GpuTarget> = gpus
        .iter()
        .enumerate()
        .map(|(k, &g)| {
            let layout = &layouts[&Device::Gpu(g)];
            GpuTarget {
                gpu: g,
                ctx: ctx_of(g),
                base: gpu_memory[k].ptr,
                pieces: layout.pieces.clone(),
                tensors: layout.tensors,
            }
        })
        .collect();
    let host = match (&host_memory, layouts.get(&Device::Cpu)) {
        (Some(h), Some(layout)) => Some(HostTarget {
            base: h.ptr() as usize,
            len: h.len(),
            pieces: &layout.pieces,
            tensors: layout.tensors,
        }),
        _ => None,
    };
    let knobs = Knobs {
        staging_bytes: options.staging_bytes,
        staging_buffers: options.staging_buffers,
        threads: options.copy_threads,
        read: options.read,
        write_combined: options.write_combined,
        progress: options.progress.as_ref(),
    };
    let sources = Sources {
        maps: &maps,
        files: &files,
    };
    let host_bytes = host
        .as_ref()
        .map_or(0, |h| h.pieces.iter().map(|p| p.len).sum());
    let prepared = copy::prepare(targets, host_bytes, &knobs)?;
    let setup_seconds = started.elapsed().as_secs_f64();

    let copy_started = Instant::now();
    let stats = copy::run(prepared, host, &sources, &knobs)?;
    let copy_seconds = copy_started.elapsed().as_secs_f64();

    // Addresses: owners from their slots, aliases from their owners.
    for (i, off) in &offsets {
        let base = match tensors[*i].device {
            Device::Gpu(g) => gpu_memory[gpus.iter().position(|&x| x == g).expect("allocated")].ptr,
            _ => host_memory.as_ref().map_or(0, |h| h.ptr() as u64),
        };
        tensors[*i].ptr = base + off;
    }
    for (alias, owner) in aliases {
        tensors[alias].ptr = tensors[owner].ptr;
    }
    let by_name = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let bytes = stats.iter().map(|d| d.bytes).sum();
    Ok(LoadedModel {
        tensors,
        by_name,
        left_to_offload,
        files,
        stats: LoadStats {
            devices: stats,
            setup_seconds,
            copy_seconds,
            total_seconds: started.elapsed().as_secs_f64(),
            bytes,
            offloaded_bytes,
        },
        gpu_memory,
        host_memory,
        contexts,
    })
}

/// Reject plans that do not describe this checkpoint. A no-split module divided across devices is
/// accepted: it only matters to the engine, and the loader can place the tensors anyway.
fn check_plan(model: &Model, plan: &DeviceMap) -> Result<()> {
    let report = validate(model, plan, None, SizeRules::default());
    // A key naming nothing says the most (the plan was made for another model): report it first.
    if let Some(Problem::UnknownKey(key)) = report
        .errors()
        .find(|p| matches!(p, Problem::UnknownKey(_)))
    {
        return Err(Error::MissingTensor { key: key.clone() });
    }
    let other = report
        .errors()
        .find(|p| !matches!(p, Problem::SplitNoSplit { .. }))
        .map(Problem::to_string);
    match other {
        Some(reason) => Err(Error::Plan { reason }),
        None => Ok(()),
    }
}

fn open_files(files: &[PathBuf], tensors: &[LoadedTensor]) -> Result<Vec<Mmap>> {
    let mut maps = Vec::with_capacity(files.len());
    for (i, path) in files.iter().enumerate() {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        // A file shorter than its header promised would fault (SIGBUS) when mapped and read.
        if let Some(t) = tensors
            .iter()
            .find(|t| t.source.file == i && t.source.start + t.source.len > len)
        {
            return Err(Error::Truncated {
                path: path.clone(),
                tensor: t.name.clone(),
                start: t.source.start,
                end: t.source.start + t.source.len,
                len,
            });
        }
        // SAFETY: read-only map of a regular file whose length covers every range read from it
        // (checked above). A writer truncating it concurrently could still fault; checkpoints
        // are not written while they load.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let _ = map.advise(memmap2::Advice::Sequential);
        maps.push(map);
    }
    Ok(maps)
}
