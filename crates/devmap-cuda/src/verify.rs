//! `--verify`: read every loaded tensor back and compare its checksum with the file's bytes.
#![allow(unsafe_code)] // device-to-host copies into a pinned buffer.

use std::collections::HashSet;
use std::fs::File;
use std::time::Instant;

use memmap2::Mmap;
use rayon::prelude::*;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use devmap_core::Device;

use crate::driver::{self, PinnedMemory, Stream};
use crate::error::{Error, Result};
use crate::load::{LoadedModel, LoadedTensor, Mismatch, VerifyReport};

/// Bytes read back from a GPU per copy.
const READBACK_BYTES: usize = 64 << 20;

pub(crate) fn verify(model: &LoadedModel) -> Result<VerifyReport> {
    let started = Instant::now();
    let parts = model.parts();
    // One check per storage: tied aliases on one device share it.
    let mut seen = HashSet::new();
    let checks: Vec<&LoadedTensor> = parts
        .tensors
        .iter()
        .filter(|t| seen.insert((t.device, t.ptr)))
        .collect();
    let mut maps = Vec::with_capacity(parts.files.len());
    for path in parts.files {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map; ranges were checked against the file length when loading.
        maps.push(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?);
    }
    let expected: Vec<u64> = checks
        .par_iter()
        .map(|t| {
            let (file, start) = t.source();
            let start = start as usize;
            xxh3_64(&maps[file][start..start + t.bytes as usize])
        })
        .collect();

    let mut found = vec![0u64; checks.len()];
    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for (gpu, ctx) in parts.contexts {
            let on_gpu: Vec<(usize, &LoadedTensor)> = checks
                .iter()
                .enumerate()
                .filter(|(_, t)| t.device == Device::Gpu(*gpu))
                .map(|(i, t)| (i, *t))
                .collect();
            if on_gpu.is_empty() {
                continue;
            }
            let (gpu, ctx) = (*gpu, ctx.clone());
            handles.push(s.spawn(move || -> Result<Vec<(usize, u64)>> {
                driver::bind(&ctx, gpu)?;
                let stream = Stream::new(&ctx, gpu)?;
                let mut buf =
                    PinnedMemory::alloc(&ctx, gpu, READBACK_BYTES, driver::PINNED_PORTABLE, 0)?;
                let mut out = Vec::with_capacity(on_gpu.len());
                for (i, t) in on_gpu {
                    let mut hasher = Xxh3::new();
                    let mut done = 0u64;
                    while done < t.bytes {
                        let len = (t.bytes - done).min(READBACK_BYTES as u64) as usize;
                        // SAFETY: buf is ours and idle (the previous copy was synchronised);
                        // the source range lies inside the tensor's slot.
                        unsafe { stream.copy_dtoh(buf.ptr(), t.ptr + done, len)? };
                        stream.synchronize()?;
                        hasher.update(&buf.as_mut_slice()[..len]);
                        done += len as u64;
                    }
                    out.push((i, hasher.digest()));
                }
                Ok(out)
            }));
        }
        for (i, t) in checks.iter().enumerate() {
            if t.device == Device::Cpu {
                found[i] = xxh3_64(model.host_bytes(&t.name).unwrap_or_default());
            }
        }
        for h in handles {
            let results = h
                .join()
                .unwrap_or_else(|_| Err(Error::Options("verify thread panicked".into())))?;
            for (i, digest) in results {
                found[i] = digest;
            }
        }
        Ok(())
    })?;

    let mismatches = checks
        .iter()
        .zip(expected.iter().zip(&found))
        .filter(|(_, (e, f))| e != f)
        .map(|(t, (e, f))| Mismatch {
            tensor: t.name.clone(),
            device: t.device,
            expected: *e,
            found: *f,
        })
        .collect();
    Ok(VerifyReport {
        tensors: checks.len(),
        bytes: checks.iter().map(|t| t.bytes).sum(),
        mismatches,
        seconds: started.elapsed().as_secs_f64(),
    })
}
