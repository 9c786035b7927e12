//! Reading safetensors headers (never the data) and sharded checkpoint folders.
//!
//! A safetensors file is an 8-byte little-endian header length `n`, `n` bytes of JSON, then the data.
//! devmap reads only the first `8 + n` bytes and checks every entry against the file length, so a
//! hostile header cannot make it allocate or read beyond what the file holds.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::de::{self, MapAccess, Visitor};
use serde::Deserialize;

use crate::dtype::{element_count, DType};
use crate::error::{Error, Result};
use crate::model::{TensorKind, TensorSource, TensorSpec};

/// Largest header devmap accepts (the reference implementation uses the same bound).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor entry of a header.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderEntry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Absolute byte range of the data within the file.
    pub byte_range: std::ops::Range<u64>,
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// The file.
    pub path: PathBuf,
    /// Tensors in file order.
    pub tensors: Vec<HeaderEntry>,
    /// `__metadata__`, if present.
    pub metadata: BTreeMap<String, String>,
    /// Offset of the data section (8 + header length).
    pub data_start: u64,
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Top-level object that keeps entries in file order and rejects duplicate names.
struct RawHeader(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of tensor name -> {dtype, shape, data_offsets}")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<RawHeader, A::Error> {
                let mut out: Vec<(String, serde_json::Value)> = Vec::new();
                let mut seen = std::collections::HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value: serde_json::Value = map.next_value()?;
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format!("duplicate tensor name {key:?}")));
                    }
                    out.push((key, value));
                }
                Ok(RawHeader(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl Header {
    /// Read and validate the header of `path`.
    pub fn read(path: &Path) -> Result<Header> {
        let bad = |reason: String| Error::SafetensorsHeader {
            path: path.to_path_buf(),
            reason,
        };
        // Before opening: opening a FIFO blocks until a writer comes, so a checkpoint folder (or an
        // offload index) naming one would hang devmap. Only regular files have a header to read.
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(bad(
                "not a regular file (a folder, FIFO, socket or device): safetensors headers are read from regular files only"
                    .to_string(),
            ));
        }
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if file_len < 8 {
            return Err(bad(format!(
                "truncated: the file has {file_len} bytes, fewer than the 8-byte header length"
            )));
        }
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes)
            .map_err(|e| Error::io(path, e))?;
        let n = u64::from_le_bytes(len_bytes);
        if n > MAX_HEADER_BYTES {
            return Err(bad(format!(
                "header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit"
            )));
        }
        if 8 + n > file_len {
            return Err(bad(format!(
                "header length {n} runs past the end of the file ({file_len} bytes)"
            )));
        }
        let mut json = vec![0u8; n as usize];
        file.read_exact(&mut json).map_err(|e| Error::io(path, e))?;
        Header::parse(path, &json, file_len)
    }

    /// Validate header JSON `json` of a file of `file_len` bytes.
    pub fn parse(path: &Path, json: &[u8], file_len: u64) -> Result<Header> {
        let bad = |reason: String| Error::SafetensorsHeader {
            path: path.to_path_buf(),
            reason,
        };
        let data_start = 8 + json.len() as u64;
        let data_len = file_len.checked_sub(data_start).ok_or_else(|| {
            bad(format!(
                "header length {} runs past the end of the file ({file_len} bytes)",
                json.len()
            ))
        })?;
        let text =
            std::str::from_utf8(json).map_err(|e| bad(format!("header is not UTF-8: {e}")))?;
        let raw: RawHeader = serde_json::from_str(text.trim_end_matches([' ', '\0']))
            .map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let mut metadata = BTreeMap::new();
        let mut tensors = Vec::with_capacity(raw.0.len());
        for (name, value) in raw.0 {
            if name == "__metadata__" {
                metadata = serde_json::from_value(value)
                    .map_err(|e| bad(format!("__metadata__ must map strings to strings: {e}")))?;
                continue;
            }
            let entry: RawEntry =
                serde_json::from_value(value).map_err(|e| bad(format!("tensor {name:?}: {e}")))?;
            let dtype = DType::parse(&entry.dtype).map_err(|_| {
                bad(format!(
                    "tensor {name:?} has unknown dtype {:?}",
                    entry.dtype
                ))
            })?;
            let numel = element_count(&entry.shape).ok_or_else(|| {
                bad(format!(
                    "tensor {name:?}: shape {:?} overflows a 64-bit element count",
                    entry.shape
                ))
            })?;
            let bytes = numel.checked_mul(dtype.size_bytes()).ok_or_else(|| {
                bad(format!(
                    "tensor {name:?}: shape {:?} overflows a 64-bit byte count",
                    entry.shape
                ))
            })?;
            let (begin, end) = entry.data_offsets;
            if end < begin {
                return Err(bad(format!(
                    "tensor {name:?}: data_offsets [{begin}, {end}] end before they begin"
                )));
            }
            if end - begin != bytes {
                return Err(bad(format!(
                    "tensor {name:?}: data_offsets [{begin}, {end}] hold {} bytes but {dtype} {:?} needs {bytes}",
                    end - begin,
                    entry.shape
                )));
            }
            if end > data_len {
                return Err(bad(format!(
                    "tensor {name:?}: data_offsets [{begin}, {end}] run past the end of the data ({data_len} bytes)"
                )));
            }
            tensors.push(HeaderEntry {
                name,
                dtype,
                shape: entry.shape,
                byte_range: data_start + begin..data_start + end,
            });
        }
        let mut by_offset: Vec<&HeaderEntry> = tensors
            .iter()
            .filter(|t| !t.byte_range.is_empty())
            .collect();
        by_offset.sort_by_key(|t| t.byte_range.start);
        for pair in by_offset.windows(2) {
            if pair[1].byte_range.start < pair[0].byte_range.end {
                return Err(bad(format!(
                    "tensors {:?} and {:?} have overlapping data_offsets",
                    pair[0].name, pair[1].name
                )));
            }
        }
        Ok(Header {
            path: path.to_path_buf(),
            tensors,
            metadata,
            data_start,
        })
    }

    /// The entries as model tensor specs.
    pub fn tensor_specs(&self) -> impl Iterator<Item = TensorSpec> + '_ {
        self.tensors.iter().map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            kind: TensorKind::Param,
            source: Some(TensorSource {
                file: self.path.clone(),
                byte_range: t.byte_range.clone(),
            }),
            converted: false,
        })
    }
}

/// The shard files of a checkpoint folder: from `model.safetensors.index.json` when present
/// (checking that every indexed tensor is in its shard), else every `*.safetensors` file.
pub fn read_folder(dir: &Path) -> Result<Vec<Header>> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        return read_index(&index_path);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
        .collect();
    if files.is_empty() {
        return Err(Error::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors.index.json and no *.safetensors files in this folder",
            ),
        ));
    }
    files.sort();
    let headers = files
        .iter()
        .map(|f| Header::read(f))
        .collect::<Result<Vec<_>>>()?;
    check_no_duplicates(&headers)?;
    Ok(headers)
}

/// Read a `model.safetensors.index.json` and the headers of the shards it names.
pub fn read_index(index_path: &Path) -> Result<Vec<Header>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let index: Index =
        serde_json::from_str(&text).map_err(|e| Error::json(index_path, e.to_string()))?;
    let mut shards: Vec<String> = index.weight_map.values().cloned().collect();
    shards.sort();
    shards.dedup();
    let mut headers = Vec::with_capacity(shards.len());
    for shard in &shards {
        let rel = Path::new(shard);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(Error::json(
                index_path,
                format!("shard {shard:?} is not a plain file name inside the checkpoint folder"),
            ));
        }
        headers.push(Header::read(&dir.join(rel))?);
    }
    // Before the index check: a tensor in two shards would otherwise be reported as missing from one.
    check_no_duplicates(&headers)?;
    let mut location: HashMap<&str, &Path> = HashMap::new();
    for h in &headers {
        for t in &h.tensors {
            location.insert(&t.name, &h.path);
        }
    }
    for (tensor, shard) in &index.weight_map {
        let expected = dir.join(shard);
        match location.get(tensor.as_str()) {
            Some(p) if *p == expected => {}
            _ => {
                return Err(Error::json(
                    index_path,
                    format!(
                        "tensor {tensor:?} is indexed in {shard:?} but that shard does not hold it"
                    ),
                ))
            }
        }
    }
    Ok(headers)
}

fn check_no_duplicates(headers: &[Header]) -> Result<()> {
    let mut seen: HashMap<&str, &Path> = HashMap::new();
    for h in headers {
        for t in &h.tensors {
            if let Some(prev) = seen.insert(&t.name, &h.path) {
                return Err(Error::SafetensorsHeader {
                    path: h.path.clone(),
                    reason: format!("tensor {:?} is also in {}", t.name, prev.display()),
                });
            }
        }
    }
    Ok(())
}

/// Write a safetensors file holding `tensors` (name, dtype, shape, bytes). Used by tests and
/// examples to make real checkpoints; the data is written as given.
pub fn write_file(path: &Path, tensors: &[(&str, DType, Vec<u64>, Vec<u8>)]) -> Result<()> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, dtype, shape, data) in tensors {
        let end = offset + data.len() as u64;
        header.insert(
            (*name).to_string(),
            serde_json::json!({"dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| Error::json(path, e.to_string()))?;
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut f = std::io::BufWriter::new(File::create(path).map_err(|e| Error::io(path, e))?);
    let io = |e| Error::io(path, e);
    f.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(io)?;
    f.write_all(&json).map_err(io)?;
    for (_, _, _, data) in tensors {
        f.write_all(data).map_err(io)?;
    }
    f.flush().map_err(io)?;
    Ok(())
}
