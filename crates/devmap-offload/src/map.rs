//! The crate's only `unsafe`: memory-mapping files read-only.
//!
//! Mapping a file is unsafe in Rust because another process may truncate or rewrite it while it is
//! mapped (reads past a truncation raise SIGBUS; rewrites change bytes under a `&[u8]`). devmap maps
//! only files whose length it has just checked against what it needs, and documents that an offload
//! folder and its source checkpoint must not be modified while they are being read, as every
//! mmap-based loader (safetensors, numpy's memmap) requires.

use std::fs::File;
use std::ops::Range;
use std::path::Path;

use memmap2::{Mmap, MmapOptions};

use crate::error::{Error, Result};
use crate::format::Checksum;

/// Map `range` of `file` (whose length the caller has checked covers `range`).
pub(crate) fn map_range(
    file: &File,
    path: &Path,
    range: Range<u64>,
    populate: bool,
) -> Result<Mmap> {
    let len = usize::try_from(range.end - range.start).map_err(|_| {
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "range larger than the address space",
            ),
        )
    })?;
    let mut options = MmapOptions::new();
    options.offset(range.start).len(len);
    if populate {
        options.populate();
    }
    // SAFETY: read-only mapping of a range inside the file's current length (checked by every
    // caller); concurrent modification is excluded by contract (module docs).
    #[allow(unsafe_code)]
    let map = unsafe { options.map(file) };
    map.map_err(|e| Error::io(path, e))
}

/// Bytes of a window: large enough that mapping costs nothing, small enough that a few threads
/// hold a bounded amount of the source mapped (file pages mapped into the process count as its RSS).
pub const DEFAULT_WINDOW_BYTES: usize = 16 << 20;
/// Bytes hashed then handed to the sink at a time: they are still in the CPU cache for the write.
const SLICE_BYTES: usize = 1 << 20;

/// Stream `range` of `file` through windows of `window` bytes, hashing every byte and handing it to
/// `sink` in order; the mapping of each window is dropped before the next, so memory stays bounded
/// whatever the size of the range.
pub(crate) fn stream_range(
    file: &File,
    path: &Path,
    range: Range<u64>,
    window: usize,
    mut sink: impl FnMut(&[u8]) -> Result<()>,
) -> Result<Checksum> {
    let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
    let window = window.max(SLICE_BYTES) as u64;
    let mut at = range.start;
    while at < range.end {
        let end = range.end.min(at + window);
        let map = map_range(file, path, at..end, true)?;
        for slice in map.chunks(SLICE_BYTES) {
            hasher.update(slice);
            sink(slice)?;
        }
        at = end;
    }
    Ok(Checksum {
        bytes: range.end - range.start,
        xxh3: hasher.digest(),
    })
}
