//! The guarded entry into the CUDA driver, and owners of driver memory that free it on drop.
//!
//! cudarc loads libcuda lazily and panics on the first call when the library is missing, so every
//! path into the driver goes through [`init`], which probes the library with
//! `is_culib_present()` first and turns "no driver" and "no device" into [`Error`]s.
#![allow(unsafe_code)] // FFI to the CUDA driver; each block states what keeps it sound.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, OnceLock};

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::CudaContext;

use crate::error::{Error, Result};

/// Probe for libcuda once; then `cuInit`. Safe to call from any thread, any number of times.
pub(crate) fn init() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: is_culib_present only tries dlopen on the candidate names and drops the handles.
    if !*PRESENT.get_or_init(|| unsafe { sys::is_culib_present() }) {
        return Err(Error::DriverNotFound);
    }
    match result::init() {
        Ok(()) => Ok(()),
        Err(e) if e.0 == CUresult::CUDA_ERROR_NO_DEVICE => Err(Error::NoDevice {
            reason: format!("cuInit: {}", crate::error::describe(&e)),
        }),
        Err(e) => Err(Error::driver("cuInit", None, e)),
    }
}

/// Number of GPUs the driver sees (after `CUDA_VISIBLE_DEVICES`).
pub(crate) fn device_count() -> Result<u32> {
    init()?;
    let n = result::device::get_count().map_err(|e| Error::driver("cuDeviceGetCount", None, e))?;
    Ok(u32::try_from(n).unwrap_or(0))
}

/// The driver's CUDA API version, `13000` for 13.0.
pub(crate) fn driver_version() -> Result<i32> {
    init()?;
    let mut v: c_int = 0;
    // SAFETY: v is a valid out-pointer.
    unsafe { sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| Error::driver("cuDriverGetVersion", None, e))?;
    Ok(v)
}

/// The device handle of ordinal `gpu`.
pub(crate) fn device(gpu: u32) -> Result<sys::CUdevice> {
    result::device::get(gpu as c_int).map_err(|e| Error::driver("cuDeviceGet", Some(gpu), e))
}

/// One integer attribute of a device.
pub(crate) fn attribute(
    gpu: u32,
    dev: sys::CUdevice,
    attr: sys::CUdevice_attribute,
) -> Result<i32> {
    // SAFETY: dev came from cuDeviceGet.
    unsafe { result::device::get_attribute(dev, attr) }
        .map_err(|e| Error::driver("cuDeviceGetAttribute", Some(gpu), e))
}

/// The PCI bus id, `0000:3b:00.0`.
pub(crate) fn pci_bus_id(gpu: u32, dev: sys::CUdevice) -> Result<String> {
    let mut buf = [0 as c_char; 32];
    // SAFETY: the buffer is 32 bytes and we pass its length; the driver NUL-terminates.
    unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as c_int, dev) }
        .result()
        .map_err(|e| Error::driver("cuDeviceGetPCIBusId", Some(gpu), e))?;
    // SAFETY: NUL-terminated within the buffer (see above).
    let id = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Ok(id.to_string_lossy().to_ascii_lowercase())
}

/// Whether `a` can access `b`'s memory directly, and the P2P performance rank of the pair
/// (0 = best; only meaningful when access is supported).
pub(crate) fn peer(a: (u32, sys::CUdevice), b: (u32, sys::CUdevice)) -> Result<(bool, i32)> {
    let mut can: c_int = 0;
    // SAFETY: out-pointer valid; both handles from cuDeviceGet.
    unsafe { sys::cuDeviceCanAccessPeer(&mut can, a.1, b.1) }
        .result()
        .map_err(|e| Error::driver("cuDeviceCanAccessPeer", Some(a.0), e))?;
    if can == 0 {
        return Ok((false, 0));
    }
    let mut rank: c_int = 0;
    // SAFETY: as above.
    unsafe {
        sys::cuDeviceGetP2PAttribute(
            &mut rank,
            sys::CUdevice_P2PAttribute::CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK,
            a.1,
            b.1,
        )
    }
    .result()
    .map_err(|e| Error::driver("cuDeviceGetP2PAttribute", Some(a.0), e))?;
    Ok((true, rank))
}

/// Retain GPU `gpu`'s primary context and make it current on this thread.
pub(crate) fn context(gpu: u32) -> Result<Arc<CudaContext>> {
    init()?;
    CudaContext::new(gpu as usize)
        .map_err(|e| Error::driver("cuDevicePrimaryCtxRetain", Some(gpu), e))
}

/// Make `ctx` current on the calling thread.
pub(crate) fn bind(ctx: &CudaContext, gpu: u32) -> Result<()> {
    ctx.bind_to_thread()
        .map_err(|e| Error::driver("cuCtxSetCurrent", Some(gpu), e))
}

/// Let `ctx`'s GPU (`gpu`) access `peer`'s memory directly, as PyTorch does before copies between
/// GPUs; "already enabled" is success.
pub(crate) fn enable_peer_access(ctx: &CudaContext, gpu: u32, peer: &CudaContext) -> Result<()> {
    bind(ctx, gpu)?;
    // SAFETY: both contexts are live primary contexts; flags must be 0.
    match unsafe { sys::cuCtxEnablePeerAccess(peer.cu_ctx(), 0) }.result() {
        Ok(()) => Ok(()),
        Err(e) if e.0 == CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => Ok(()),
        Err(e) => Err(Error::driver("cuCtxEnablePeerAccess", Some(gpu), e)),
    }
}

/// (free, total) bytes of the GPU whose context is `ctx`.
pub(crate) fn mem_info(ctx: &CudaContext, gpu: u32) -> Result<(u64, u64)> {
    let (free, total) = ctx
        .mem_get_info()
        .map_err(|e| Error::driver("cuMemGetInfo", Some(gpu), e))?;
    Ok((free as u64, total as u64))
}

/// A device allocation, freed on drop (with its context made current first).
#[derive(Debug)]
pub(crate) struct DeviceMemory {
    ctx: Arc<CudaContext>,
    pub(crate) gpu: u32,
    pub(crate) ptr: sys::CUdeviceptr,
    pub(crate) bytes: usize,
}

impl DeviceMemory {
    /// `cuMemAlloc` `bytes` on the GPU of `ctx`. Out of memory is [`Error::OutOfMemory`] with the
    /// free memory at that moment; `tensors` says what the memory was for.
    pub(crate) fn alloc(
        ctx: &Arc<CudaContext>,
        gpu: u32,
        bytes: usize,
        tensors: usize,
    ) -> Result<DeviceMemory> {
        bind(ctx, gpu)?;
        // cuMemAlloc rejects 0 bytes; one byte keeps a valid, unique base pointer.
        let size = bytes.max(1);
        // SAFETY: the context is current; the pointer is owned by the returned value.
        match unsafe { result::malloc_sync(size) } {
            Ok(ptr) => Ok(DeviceMemory {
                ctx: ctx.clone(),
                gpu,
                ptr,
                bytes,
            }),
            Err(e) if crate::error::is_oom(&e) => {
                let free = mem_info(ctx, gpu).map(|(f, _)| f).unwrap_or(0);
                Err(Error::OutOfMemory {
                    device: devmap_core::Device::Gpu(gpu),
                    requested: bytes as u64,
                    free,
                    tensors,
                })
            }
            Err(e) => Err(Error::driver("cuMemAlloc", Some(gpu), e)),
        }
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        // Errors here cannot be reported; the context's own drop records them.
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: ptr came from cuMemAlloc in this context and is freed once.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Page-locked host memory from `cuMemHostAlloc`, freed on drop.
#[derive(Debug)]
pub(crate) struct PinnedMemory {
    ctx: Arc<CudaContext>,
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: the memory is plain bytes owned by this value; access is through &self / &mut self.
unsafe impl Send for PinnedMemory {}
// SAFETY: shared access only reads (as_slice); writes need &mut or the caller's own synchronisation.
unsafe impl Sync for PinnedMemory {}

/// Flags for staging buffers the CPU only writes: write-combined memory streams to the GPU fastest.
pub(crate) const PINNED_WRITE_COMBINED: u32 = sys::CU_MEMHOSTALLOC_WRITECOMBINED;
/// Flags for host memory the CPU reads (weights kept in RAM, read-back buffers): cached, and
/// usable from every context.
pub(crate) const PINNED_PORTABLE: u32 = sys::CU_MEMHOSTALLOC_PORTABLE;

impl PinnedMemory {
    /// Allocate `bytes` of pinned memory in `ctx` (`gpu` names it in errors).
    pub(crate) fn alloc(
        ctx: &Arc<CudaContext>,
        gpu: u32,
        bytes: usize,
        flags: u32,
        tensors: usize,
    ) -> Result<PinnedMemory> {
        bind(ctx, gpu)?;
        let size = bytes.max(1);
        // SAFETY: the context is current; the pointer is owned by the returned value.
        match unsafe { result::malloc_host(size, flags) } {
            Ok(ptr) => Ok(PinnedMemory {
                ctx: ctx.clone(),
                ptr: ptr.cast::<u8>(),
                bytes,
            }),
            Err(e) if crate::error::is_oom(&e) => Err(Error::OutOfMemory {
                device: devmap_core::Device::Cpu,
                requested: bytes as u64,
                free: crate::budgets::available_ram().unwrap_or(0),
                tensors,
            }),
            Err(e) => Err(Error::driver("cuMemHostAlloc", Some(gpu), e)),
        }
    }

    /// The bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to `bytes` (≥ 1 allocated) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) }
    }

    /// The bytes, writable.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }

    /// The address, for copies the driver performs.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.bytes
    }
}

impl Drop for PinnedMemory {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: ptr came from cuMemHostAlloc and is freed once.
            let _ = unsafe { result::free_host(self.ptr.cast::<c_void>()) };
        }
    }
}

/// A stream of one GPU, destroyed on drop.
pub(crate) struct Stream {
    ctx: Arc<CudaContext>,
    pub(crate) raw: sys::CUstream,
    gpu: u32,
}

impl Stream {
    /// A non-blocking stream (it does not serialise with the legacy default stream).
    pub(crate) fn new(ctx: &Arc<CudaContext>, gpu: u32) -> Result<Stream> {
        bind(ctx, gpu)?;
        let raw = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(|e| Error::driver("cuStreamCreate", Some(gpu), e))?;
        Ok(Stream {
            ctx: ctx.clone(),
            raw,
            gpu,
        })
    }

    /// Wait for everything queued on the stream.
    pub(crate) fn synchronize(&self) -> Result<()> {
        // SAFETY: raw is a live stream of this context.
        unsafe { result::stream::synchronize(self.raw) }
            .map_err(|e| Error::driver("cuStreamSynchronize", Some(self.gpu), e))
    }

    /// Queue a host-to-device copy of `len` bytes.
    ///
    /// # Safety
    /// `src` must stay valid and unchanged until the copy completes (an event recorded after it
    /// has been waited on, or the stream synchronised); `dst..dst+len` must lie in a live allocation.
    pub(crate) unsafe fn copy_htod(
        &self,
        dst: sys::CUdeviceptr,
        src: *const u8,
        len: usize,
    ) -> Result<()> {
        sys::cuMemcpyHtoDAsync_v2(dst, src.cast::<c_void>(), len, self.raw)
            .result()
            .map_err(|e| self.copy_error("cuMemcpyHtoDAsync", e))
    }

    /// Queue a device-to-host copy of `len` bytes.
    ///
    /// # Safety
    /// `dst` must stay valid and untouched until the copy completes; `src..src+len` must lie in a
    /// live allocation.
    pub(crate) unsafe fn copy_dtoh(
        &self,
        dst: *mut u8,
        src: sys::CUdeviceptr,
        len: usize,
    ) -> Result<()> {
        sys::cuMemcpyDtoHAsync_v2(dst.cast::<c_void>(), src, len, self.raw)
            .result()
            .map_err(|e| self.copy_error("cuMemcpyDtoHAsync", e))
    }

    /// Queue a device-to-device copy of `len` bytes within this stream's GPU.
    ///
    /// # Safety
    /// `src..src+len` and `dst..dst+len` must lie in live allocations of this GPU.
    pub(crate) unsafe fn copy_dtod(
        &self,
        dst: sys::CUdeviceptr,
        src: sys::CUdeviceptr,
        len: usize,
    ) -> Result<()> {
        sys::cuMemcpyDtoDAsync_v2(dst, src, len, self.raw)
            .result()
            .map_err(|e| self.copy_error("cuMemcpyDtoDAsync", e))
    }

    /// Queue a copy of `len` bytes from another GPU's allocation into this one's.
    ///
    /// # Safety
    /// `dst` must be a live allocation of `dst_ctx`'s GPU and `src` of `src_ctx`'s, each at least
    /// `len` bytes long.
    pub(crate) unsafe fn copy_peer(
        &self,
        (dst, dst_ctx): (sys::CUdeviceptr, &CudaContext),
        (src, src_ctx): (sys::CUdeviceptr, &CudaContext),
        len: usize,
    ) -> Result<()> {
        sys::cuMemcpyPeerAsync(dst, dst_ctx.cu_ctx(), src, src_ctx.cu_ctx(), len, self.raw)
            .result()
            .map_err(|e| self.copy_error("cuMemcpyPeerAsync", e))
    }

    fn copy_error(&self, call: &'static str, e: DriverError) -> Error {
        Error::driver(call, Some(self.gpu), e)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // Wait first: buffers the queued copies read or write may be freed right after this
            // (on an error path too), and cuStreamDestroy does not wait.
            // SAFETY: raw is a live stream of this context, destroyed once.
            unsafe {
                let _ = result::stream::synchronize(self.raw);
                let _ = result::stream::destroy(self.raw);
            }
        }
    }
}

// SAFETY: driver streams may be used from any thread once their context is current (every use
// binds it first), and the driver API is thread-safe: copies queued from several threads are
// ordered as they were queued.
unsafe impl Send for Stream {}
// SAFETY: as above; &Stream only queues work or waits for it.
unsafe impl Sync for Stream {}

/// An event of one GPU, destroyed on drop.
pub(crate) struct Event {
    ctx: Arc<CudaContext>,
    raw: sys::CUevent,
    gpu: u32,
}

impl Event {
    /// An event without timing (copies are timed with host clocks around a synchronisation).
    pub(crate) fn new(ctx: &Arc<CudaContext>, gpu: u32) -> Result<Event> {
        bind(ctx, gpu)?;
        let raw = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| Error::driver("cuEventCreate", Some(gpu), e))?;
        Ok(Event {
            ctx: ctx.clone(),
            raw,
            gpu,
        })
    }

    /// Record the event on `stream`.
    pub(crate) fn record(&self, stream: &Stream) -> Result<()> {
        // SAFETY: both are live objects of the same context.
        unsafe { result::event::record(self.raw, stream.raw) }
            .map_err(|e| Error::driver("cuEventRecord", Some(self.gpu), e))
    }

    /// Block until the work before the last record has completed (at once if never recorded).
    pub(crate) fn synchronize(&self) -> Result<()> {
        // SAFETY: live event.
        unsafe { result::event::synchronize(self.raw) }
            .map_err(|e| Error::driver("cuEventSynchronize", Some(self.gpu), e))
    }
}

// SAFETY: as for Stream.
unsafe impl Send for Event {}
// SAFETY: as for Stream; record and synchronise are thread-safe driver calls.
unsafe impl Sync for Event {}

impl Drop for Event {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: live event, destroyed once.
            let _ = unsafe { result::event::destroy(self.raw) };
        }
    }
}

/// Whether a driver error means "not supported" (optional attributes on older drivers).
pub(crate) fn unsupported(e: &Error) -> bool {
    matches!(e, Error::Driver { source, .. }
        if source.0 == CUresult::CUDA_ERROR_NOT_SUPPORTED || source.0 == CUresult::CUDA_ERROR_INVALID_VALUE)
}
