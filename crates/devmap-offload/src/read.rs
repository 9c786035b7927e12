//! Opening an offload folder (devmap's or accelerate's own), validating it, and handing out
//! zero-copy views of its tensors.
//!
//! Path rules:
//! - a `{"dtype", "shape"}` entry is the file `{name}.dat` directly inside the folder; a name that
//!   would put it anywhere else (`/`, `\`, NUL; see [`crate::paths`]) is an error, and so is a link;
//! - a `{"safetensors_file", ...}` entry names a file anywhere: an absolute path is used as it is, a
//!   relative one is resolved against the folder (accelerate resolves it against the working
//!   directory of the Python process, which is why devmap always writes absolute paths). Links are
//!   followed there: Hugging Face's cache stores checkpoints as links to blobs.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use devmap_core::dtype::element_count;
use devmap_core::safetensors::Header;
use devmap_core::DType;
use memmap2::Mmap;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::format::{
    dtype_from_index_name, json_kind, read_index_object, Checksum, Checksums, INDEX_FILE,
};
use crate::map::{map_range, stream_range, DEFAULT_WINDOW_BYTES};
use crate::paths::{dat_path, file_metadata, open_regular};

/// Where an entry's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `{name}.dat` in the folder.
    Dat {
        /// The file.
        path: PathBuf,
    },
    /// A tensor of a safetensors file.
    Safetensors {
        /// The file, resolved (see the module docs).
        file: PathBuf,
        /// The tensor's name in that file.
        weight_name: String,
        /// Absolute byte range of its data in the file.
        byte_range: Range<u64>,
    },
}

/// One validated entry of `index.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The parameter name (the index key).
    pub name: String,
    /// The dtype of the stored bytes.
    pub dtype: DType,
    /// The shape (`[]` for a 0-d tensor, even though its `.dat` file holds one element).
    pub shape: Vec<u64>,
    /// For a safetensors entry whose `"dtype"` differs from the stored one: the dtype accelerate
    /// converts to when it loads the tensor. devmap's views hand out the stored bytes.
    pub cast_to: Option<DType>,
    /// Where the bytes are.
    pub location: Location,
}

impl Entry {
    /// Bytes of the stored data.
    pub fn bytes(&self) -> u64 {
        // Validated at open: the product fits in 64 bits.
        element_count(&self.shape).unwrap_or(0) * self.dtype.size_bytes()
    }

    fn file_and_range(&self) -> (&Path, Range<u64>) {
        match &self.location {
            Location::Dat { path } => (path, 0..self.bytes()),
            Location::Safetensors {
                file, byte_range, ..
            } => (file, byte_range.clone()),
        }
    }
}

/// A tensor's bytes, memory-mapped read-only: no copy is made. The mapping lives as long as the view.
#[derive(Debug)]
pub struct TensorView {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    map: Mmap,
}

impl TensorView {
    /// The parameter name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The stored dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The shape as indexed.
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }
    /// The raw little-endian C-order bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

/// A tensor whose bytes do not match its recorded checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The tensor.
    pub tensor: String,
    /// What `devmap-checksums.json` records.
    pub expected: Checksum,
    /// What the bytes hash to now.
    pub actual: Checksum,
}

/// The result of [`OffloadFolder::verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Tensors whose bytes match their checksum.
    pub verified: usize,
    /// Bytes hashed.
    pub bytes: u64,
    /// Tensors without a checksum (written by accelerate itself, or by another tool).
    pub unchecked: Vec<String>,
    /// Tensors whose bytes changed.
    pub mismatched: Vec<Mismatch>,
}

impl VerifyReport {
    /// Whether every checksum matched.
    pub fn is_ok(&self) -> bool {
        self.mismatched.is_empty()
    }
}

/// An opened, validated offload folder.
#[derive(Debug)]
pub struct OffloadFolder {
    dir: PathBuf,
    index_path: PathBuf,
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
    checksums: Checksums,
}

impl OffloadFolder {
    /// Open `dir` and validate every entry of its `index.json` against the files: each `.dat` file
    /// exists, is not a link and holds exactly dtype × shape bytes; each safetensors entry names a
    /// readable safetensors file holding that tensor. Errors name the entry and the file.
    pub fn open(dir: &Path) -> Result<OffloadFolder> {
        let index_path = dir.join(INDEX_FILE);
        let index = read_index_object(dir)?.ok_or_else(|| {
            Error::io(
                &index_path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no index.json: not an offload folder, or no write to it has finished",
                ),
            )
        })?;
        let checksums = Checksums::read(dir)?;
        let mut headers: HashMap<PathBuf, Header> = HashMap::new();
        let mut entries = Vec::with_capacity(index.len());
        let mut by_name = HashMap::with_capacity(index.len());
        for (name, value) in &index {
            let entry = parse_entry(dir, &index_path, name, value, &mut headers)?;
            by_name.insert(name.clone(), entries.len());
            entries.push(entry);
        }
        Ok(OffloadFolder {
            dir: dir.to_path_buf(),
            index_path,
            entries,
            by_name,
            checksums,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every entry, in index order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The entry of `name`.
    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The recorded checksums (empty for a folder accelerate wrote).
    pub fn checksums(&self) -> &Checksums {
        &self.checksums
    }

    /// A zero-copy view of `name`'s bytes, its pages faulted in up front (`MAP_POPULATE`): a view
    /// meant to be read whole, such as a copy to a GPU, reads at page-cache speed without a page
    /// fault every few pages. [`OffloadFolder::get_lazy`] maps without reading.
    pub fn get(&self, name: &str) -> Result<TensorView> {
        self.view(name, true)
    }

    /// A zero-copy view of `name`'s bytes whose pages are read when first touched: for reading a
    /// part of a large tensor.
    pub fn get_lazy(&self, name: &str) -> Result<TensorView> {
        self.view(name, false)
    }

    fn view(&self, name: &str, populate: bool) -> Result<TensorView> {
        let entry = self.entry(name).ok_or_else(|| Error::NotInIndex {
            index: self.index_path.clone(),
            tensor: name.to_string(),
        })?;
        let (path, range) = entry.file_and_range();
        let file = self.open_checked(entry, path, &range)?;
        let map = map_range(&file, path, range, populate)?;
        Ok(TensorView {
            name: entry.name.clone(),
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            map,
        })
    }

    /// Re-hash every tensor that has a checksum and compare (in parallel, through bounded windows).
    pub fn verify(&self) -> Result<VerifyReport> {
        self.verify_with_progress(&|_| {})
    }

    /// [`OffloadFolder::verify`], calling `progress` with each run of bytes hashed.
    pub fn verify_with_progress(&self, progress: &(dyn Fn(u64) + Sync)) -> Result<VerifyReport> {
        let results: Vec<(usize, Option<Checksum>)> = self
            .entries
            .par_iter()
            .enumerate()
            .map(|(i, entry)| {
                if self.checksums.get(&entry.name).is_none() {
                    return Ok((i, None));
                }
                let (path, range) = entry.file_and_range();
                let file = self.open_checked(entry, path, &range)?;
                let c = stream_range(&file, path, range, DEFAULT_WINDOW_BYTES, |s| {
                    progress(s.len() as u64);
                    Ok(())
                })?;
                Ok((i, Some(c)))
            })
            .collect::<Result<_>>()?;
        let mut report = VerifyReport::default();
        for (i, actual) in results {
            let name = &self.entries[i].name;
            let Some(actual) = actual else {
                report.unchecked.push(name.clone());
                continue;
            };
            let expected = self.checksums.get(name).expect("checked above");
            report.bytes += actual.bytes;
            if actual == expected {
                report.verified += 1;
            } else {
                report.mismatched.push(Mismatch {
                    tensor: name.clone(),
                    expected,
                    actual,
                });
            }
        }
        Ok(report)
    }

    /// Open an entry's file and check, again, that it still covers the entry's bytes: mapping past
    /// the end of a file that shrank since `open` would crash the process on access.
    fn open_checked(&self, entry: &Entry, path: &Path, range: &Range<u64>) -> Result<File> {
        let file = match entry.location {
            Location::Dat { .. } => open_regular(path)?,
            Location::Safetensors { .. } => Some(File::open(path).map_err(|e| Error::io(path, e))?),
        };
        let bad = |reason: String| Error::Entry {
            index: self.index_path.clone(),
            tensor: entry.name.clone(),
            reason,
        };
        let file = file.ok_or_else(|| bad(format!("{} no longer exists", path.display())))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < range.end {
            return Err(bad(format!(
                "{} is now {len} bytes, shorter than the {} the entry needs",
                path.display(),
                range.end
            )));
        }
        Ok(file)
    }
}

fn parse_entry(
    dir: &Path,
    index_path: &Path,
    name: &str,
    value: &serde_json::Value,
    headers: &mut HashMap<PathBuf, Header>,
) -> Result<Entry> {
    let bad = |reason: String| Error::Entry {
        index: index_path.to_path_buf(),
        tensor: name.to_string(),
        reason,
    };
    let obj = value.as_object().ok_or_else(|| {
        bad(format!(
            "expected an object with \"dtype\" and \"shape\" (or \"safetensors_file\"), found {}",
            json_kind(value)
        ))
    })?;
    let dtype = match obj.get("dtype") {
        None => None,
        Some(serde_json::Value::String(s)) => {
            Some(dtype_from_index_name(s).ok_or_else(|| bad(format!("unknown dtype {s:?}")))?)
        }
        Some(other) => {
            return Err(bad(format!(
                "\"dtype\" must be a string, found {}",
                json_kind(other)
            )))
        }
    };
    // accelerate takes the safetensors form whenever "safetensors_file" is present and not null.
    match obj.get("safetensors_file") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::String(file)) => {
            let weight_name = match obj.get("weight_name") {
                None | Some(serde_json::Value::Null) => name.to_string(),
                Some(serde_json::Value::String(w)) => w.clone(),
                Some(other) => {
                    return Err(bad(format!(
                        "\"weight_name\" must be a string, found {}",
                        json_kind(other)
                    )))
                }
            };
            let path = resolve_safetensors(dir, file);
            if !headers.contains_key(&path) {
                let header = Header::read(&path)
                    .map_err(|e| bad(format!("safetensors_file {file:?}: {e}")))?;
                headers.insert(path.clone(), header);
            }
            let t = headers[&path]
                .tensors
                .iter()
                .find(|t| t.name == weight_name)
                .ok_or_else(|| {
                    bad(format!(
                        "safetensors_file {} holds no tensor {weight_name:?}",
                        path.display()
                    ))
                })?;
            return Ok(Entry {
                name: name.to_string(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                cast_to: dtype.filter(|d| *d != t.dtype),
                location: Location::Safetensors {
                    file: path,
                    weight_name,
                    byte_range: t.byte_range.clone(),
                },
            });
        }
        Some(other) => {
            return Err(bad(format!(
                "\"safetensors_file\" must be a string, found {}",
                json_kind(other)
            )))
        }
    }
    let dtype = dtype.ok_or_else(|| bad("no \"dtype\"".to_string()))?;
    let shape: Vec<u64> = match obj.get("shape") {
        Some(serde_json::Value::Array(dims)) => dims
            .iter()
            .map(|d| d.as_u64())
            .collect::<Option<_>>()
            .ok_or_else(|| {
                bad(format!(
                    "\"shape\" must be a list of non-negative integers, found {}",
                    serde_json::Value::Array(dims.clone())
                ))
            })?,
        Some(other) => {
            return Err(bad(format!(
                "\"shape\" must be a list, found {}",
                json_kind(other)
            )))
        }
        None => return Err(bad("no \"shape\"".to_string())),
    };
    let bytes = element_count(&shape)
        .and_then(|n| n.checked_mul(dtype.size_bytes()))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows a 64-bit byte count")))?;
    let path = dat_path(dir, name).map_err(|e| match e {
        Error::UnsafeName { reason, .. } => bad(format!(
            "its .dat file would be outside the folder: {reason}"
        )),
        other => other,
    })?;
    let meta = file_metadata(&path)
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad(format!("{} is missing", path.display())))?;
    if meta.len() != bytes {
        return Err(bad(format!(
            "{} is {} bytes but {} {shape:?} needs {bytes}",
            path.display(),
            meta.len(),
            crate::format::index_dtype_name(dtype),
        )));
    }
    Ok(Entry {
        name: name.to_string(),
        dtype,
        shape,
        cast_to: None,
        location: Location::Dat { path },
    })
}

/// An absolute path as it is; a relative one against the folder (see the module docs).
pub fn resolve_safetensors(dir: &Path, file: &str) -> PathBuf {
    let p = Path::new(file);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}
