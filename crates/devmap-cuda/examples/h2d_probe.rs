//! Where the time of a load goes, measured piece by piece on one GPU: host fill rate (page cache to
//! pinned memory) by thread count, and DMA straight out of the page cache after
//! `cuMemHostRegister` (read-only) of the file's mapping. The numbers behind the loader's design
//! choices in docs/performance.md.
//!
//! `cargo run --release -p devmap-cuda --example h2d_probe -- FILE.safetensors`
#![allow(unsafe_code)] // raw driver calls and copies into pinned memory.

use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use cudarc::driver::result;
use cudarc::driver::sys;
use cudarc::driver::CudaContext;

const GRAIN: usize = 2 << 20;

fn gib_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / (1u64 << 30) as f64
}

fn check(what: &str, r: sys::CUresult) -> Result<(), String> {
    r.result().map_err(|e| format!("{what}: {e}"))
}

fn main() -> Result<(), String> {
    let path = std::env::args().nth(1).ok_or("usage: h2d_probe FILE")?;
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver".into());
    }
    let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| e.to_string())?;
    let len = map.len() & !4095;
    let ctx = CudaContext::new(0).map_err(|e| e.to_string())?;
    ctx.bind_to_thread().map_err(|e| e.to_string())?;
    let dst = unsafe { result::malloc_sync(len) }.map_err(|e| e.to_string())?;
    let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
        .map_err(|e| e.to_string())?;
    println!("file {path}: {:.2} GiB", len as f64 / (1u64 << 30) as f64);

    // 1. Host fill only: page cache -> a pinned ring, by threads, write-combined or cached.
    let ring = 256usize << 20;
    for wc in [true, false] {
        let flags = if wc {
            sys::CU_MEMHOSTALLOC_WRITECOMBINED
        } else {
            0
        };
        let t = Instant::now();
        let buf = unsafe { result::malloc_host(ring, flags) }.map_err(|e| e.to_string())? as usize;
        let alloc = t.elapsed().as_secs_f64();
        for threads in [1, 4, 8, 12, 16] {
            let next = AtomicUsize::new(0);
            let t = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let off = i * GRAIN;
                        if off >= len {
                            break;
                        }
                        let n = GRAIN.min(len - off);
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                map.as_ptr().add(off),
                                (buf + off % ring) as *mut u8,
                                n,
                            )
                        };
                    });
                }
            });
            println!(
                "fill {} threads {threads:>2}: {:.1} GiB/s",
                if wc {
                    "write-combined"
                } else {
                    "cached        "
                },
                gib_s(len, t.elapsed().as_secs_f64())
            );
        }
        println!("  (pinned alloc of 256 MiB: {:.3} s)", alloc);
        unsafe { result::free_host(buf as *mut c_void) }.map_err(|e| e.to_string())?;
    }

    // 2. DMA straight from the page cache: register the read-only mapping, copy, unregister.
    let base = map.as_ptr() as *mut c_void;
    for round in 0..2 {
        let t = Instant::now();
        let r = unsafe { sys::cuMemHostRegister_v2(base, len, sys::CU_MEMHOSTREGISTER_READ_ONLY) };
        let reg = t.elapsed().as_secs_f64();
        if let Err(e) = check("cuMemHostRegister(READ_ONLY) of the file mapping", r) {
            println!("{e}");
            break;
        }
        let t = Instant::now();
        let mut off = 0;
        while off < len {
            let n = (256usize << 20).min(len - off);
            check("copy", unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    dst + off as u64,
                    base.cast::<u8>().add(off).cast(),
                    n,
                    stream,
                )
            })?;
            off += n;
        }
        unsafe { result::stream::synchronize(stream) }.map_err(|e| e.to_string())?;
        let dma = t.elapsed().as_secs_f64();
        let t = Instant::now();
        check("unregister", unsafe { sys::cuMemHostUnregister(base) })?;
        let unreg = t.elapsed().as_secs_f64();
        println!(
            "register whole file (round {round}): register {reg:.3} s ({:.1} GiB/s), DMA {:.1} GiB/s, unregister {unreg:.3} s; end to end {:.1} GiB/s",
            gib_s(len, reg),
            gib_s(len, dma),
            gib_s(len, reg + dma + unreg)
        );
    }

    // 3. Registration in windows by several threads at once, then DMA (scaling of register).
    let window = 256usize << 20;
    let base_addr = base as usize; // an address, so the threads can share it
    for threads in [1, 4, 8] {
        let next = AtomicUsize::new(0);
        let failed = AtomicUsize::new(0);
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    let _ = ctx.bind_to_thread();
                    loop {
                        let off = next.fetch_add(1, Ordering::Relaxed) * window;
                        if off >= len {
                            break;
                        }
                        let n = window.min(len - off);
                        let r = unsafe {
                            sys::cuMemHostRegister_v2(
                                (base_addr + off) as *mut c_void,
                                n,
                                sys::CU_MEMHOSTREGISTER_READ_ONLY,
                            )
                        };
                        if r != sys::CUresult::CUDA_SUCCESS {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let reg = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut off = 0;
        while off < len {
            let n = window.min(len - off);
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    dst + off as u64,
                    base.cast::<u8>().add(off).cast(),
                    n,
                    stream,
                )
            };
            off += n;
        }
        unsafe { result::stream::synchronize(stream) }.map_err(|e| e.to_string())?;
        let dma = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut off = 0;
        while off < len {
            unsafe { sys::cuMemHostUnregister(base.cast::<u8>().add(off).cast()) };
            off += window;
        }
        let unreg = t.elapsed().as_secs_f64();
        println!(
            "register 256 MiB windows, {threads} threads: register {:.1} GiB/s ({} failed), DMA {:.1} GiB/s, unregister {unreg:.3} s",
            gib_s(len, reg),
            failed.load(Ordering::Relaxed),
            gib_s(len, dma)
        );
    }
    unsafe { result::free_sync(dst) }.map_err(|e| e.to_string())?;
    Ok(())
}
