//! The files of an offload folder: accelerate's `index.json`, devmap's checksums and journal, and
//! the dtype names they use.
//!
//! ```text
//! folder/
//!   index.json                 accelerate's index: {name: {"dtype", "shape"}} or
//!                              {name: {"safetensors_file", "weight_name", "dtype"}}
//!   <name>.dat                 raw little-endian C-order bytes of one tensor (copy form)
//!   devmap-checksums.json      {"format": "devmap-offload-checksums/1", "algorithm": "xxh3-64",
//!                               "tensors": {name: {"bytes": n, "xxh3": "<16 hex digits>"}}}
//!   devmap-checksums.journal   while a write is under way: one JSON line per finished .dat file
//! ```

use std::path::Path;

use devmap_core::DType;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// accelerate's index file name.
pub const INDEX_FILE: &str = "index.json";
/// devmap's per-tensor checksums, written just before `index.json`.
pub const CHECKSUMS_FILE: &str = "devmap-checksums.json";
/// Checksums of `.dat` files finished by a write still under way (or interrupted); a rerun reads it
/// to skip them.
pub const JOURNAL_FILE: &str = "devmap-checksums.journal";
/// Prefix of the temporary files a writer renames into place; stale ones are removed by the next write.
pub const TEMP_PREFIX: &str = ".devmap-tmp-";
/// The `format` value of [`CHECKSUMS_FILE`].
pub const CHECKSUMS_FORMAT: &str = "devmap-offload-checksums/1";
/// The checksum algorithm: 64-bit XXH3 of the tensor's stored bytes, as 16 lower-case hex digits.
pub const CHECKSUM_ALGORITHM: &str = "xxh3-64";

/// The dtype name accelerate writes in `index.json`: numpy's name of the array it saved, except
/// `bfloat16` (saved as int16) and the float8 types (saved as int8). For these dtypes numpy's and
/// torch's spellings agree, so the same name serves the `safetensors_file` form, where accelerate
/// calls `getattr(torch, dtype)`.
pub fn index_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F64 => "float64",
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F8E4M3 => "float8_e4m3fn",
        DType::F8E5M2 => "float8_e5m2",
        DType::I64 => "int64",
        DType::I32 => "int32",
        DType::I16 => "int16",
        DType::I8 => "int8",
        DType::U64 => "uint64",
        DType::U32 => "uint32",
        DType::U16 => "uint16",
        DType::U8 => "uint8",
        DType::Bool => "bool",
    }
}

/// The dtype of an `index.json` name ([`index_dtype_name`]'s inverse); `None` for names devmap
/// does not know (`complex64`, `float8_e4m3fnuz`...).
pub fn dtype_from_index_name(name: &str) -> Option<DType> {
    DType::ALL
        .into_iter()
        .find(|d| index_dtype_name(*d) == name)
}

/// A checksum as stored: XXH3-64 of the bytes, with their count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checksum {
    /// Number of bytes hashed.
    pub bytes: u64,
    /// XXH3-64 of them.
    pub xxh3: u64,
}

impl Checksum {
    /// The checksum of `data`.
    pub fn of(data: &[u8]) -> Checksum {
        Checksum {
            bytes: data.len() as u64,
            xxh3: xxhash_rust::xxh3::xxh3_64(data),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ChecksumJson {
    bytes: u64,
    xxh3: String,
}

impl ChecksumJson {
    fn from_checksum(c: Checksum) -> Self {
        ChecksumJson {
            bytes: c.bytes,
            xxh3: format!("{:016x}", c.xxh3),
        }
    }
    fn to_checksum(&self) -> Option<Checksum> {
        if self.xxh3.len() != 16 {
            return None;
        }
        let xxh3 = u64::from_str_radix(&self.xxh3, 16).ok()?;
        Some(Checksum {
            bytes: self.bytes,
            xxh3,
        })
    }
}

/// The checksums of a folder, in the order they were first recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checksums {
    entries: Vec<(String, Checksum)>,
    position: std::collections::HashMap<String, usize>,
}

impl Checksums {
    /// The checksum recorded for `name`.
    pub fn get(&self, name: &str) -> Option<Checksum> {
        self.position.get(name).map(|&i| self.entries[i].1)
    }

    /// Record or replace the checksum of `name`.
    pub fn insert(&mut self, name: &str, checksum: Checksum) {
        match self.position.get(name) {
            Some(&i) => self.entries[i].1 = checksum,
            None => {
                self.position.insert(name.to_string(), self.entries.len());
                self.entries.push((name.to_string(), checksum));
            }
        }
    }

    /// Number of tensors with a checksum.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Read `folder/devmap-checksums.json`; an absent file is an empty set.
    pub fn read(folder: &Path) -> Result<Checksums> {
        let path = folder.join(CHECKSUMS_FILE);
        let Some(text) = crate::paths::read_optional(&path)? else {
            return Ok(Checksums::default());
        };
        #[derive(Deserialize)]
        struct File {
            format: String,
            algorithm: String,
            tensors: serde_json::Map<String, serde_json::Value>,
        }
        let file: File = serde_json::from_str(&text)
            .map_err(|e| Error::json(&path, format!("not a {CHECKSUMS_FORMAT} document: {e}")))?;
        if file.format != CHECKSUMS_FORMAT {
            return Err(Error::json(
                &path,
                format!("format is {:?}, expected {CHECKSUMS_FORMAT:?}", file.format),
            ));
        }
        if file.algorithm != CHECKSUM_ALGORITHM {
            return Err(Error::json(
                &path,
                format!(
                    "algorithm is {:?}, expected {CHECKSUM_ALGORITHM:?}",
                    file.algorithm
                ),
            ));
        }
        let mut out = Checksums::default();
        for (name, value) in file.tensors {
            let c = serde_json::from_value::<ChecksumJson>(value)
                .ok()
                .and_then(|c| c.to_checksum())
                .ok_or_else(|| {
                    Error::json(
                        &path,
                        format!(
                            "tensor {name:?}: expected {{\"bytes\": N, \"xxh3\": \"<16 hex digits>\"}}"
                        ),
                    )
                })?;
            out.insert(&name, c);
        }
        Ok(out)
    }

    /// The checksums file's bytes.
    pub(crate) fn to_json_bytes(&self) -> Vec<u8> {
        let mut tensors = serde_json::Map::new();
        for (name, c) in &self.entries {
            tensors.insert(
                name.clone(),
                serde_json::to_value(ChecksumJson::from_checksum(*c)).expect("plain struct"),
            );
        }
        let doc = serde_json::json!({
            "format": CHECKSUMS_FORMAT,
            "algorithm": CHECKSUM_ALGORITHM,
            "tensors": tensors,
        });
        let mut bytes = serde_json::to_vec_pretty(&doc).expect("JSON values serialise");
        bytes.push(b'\n');
        bytes
    }
}

/// One line of the journal.
#[derive(Serialize, Deserialize)]
struct JournalLine {
    tensor: String,
    bytes: u64,
    xxh3: String,
}

/// A journal line for a finished `.dat` file.
pub(crate) fn journal_line(name: &str, c: Checksum) -> Vec<u8> {
    let line = JournalLine {
        tensor: name.to_string(),
        bytes: c.bytes,
        xxh3: format!("{:016x}", c.xxh3),
    };
    let mut bytes = serde_json::to_vec(&line).expect("plain struct");
    bytes.push(b'\n');
    bytes
}

/// Checksums from `folder/devmap-checksums.journal`, if any. A line that does not parse (the torn
/// last line of an interrupted write) is ignored: its tensor is simply written again.
pub(crate) fn read_journal(folder: &Path) -> Result<Vec<(String, Checksum)>> {
    let path = folder.join(JOURNAL_FILE);
    let Some(text) = crate::paths::read_optional(&path)? else {
        return Ok(Vec::new());
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<JournalLine>(l).ok())
        .filter_map(|l| {
            let c = ChecksumJson {
                bytes: l.bytes,
                xxh3: l.xxh3,
            }
            .to_checksum()?;
            Some((l.tensor, c))
        })
        .collect())
}

/// accelerate's index as a JSON object, in file order. Entries devmap does not touch are kept as
/// they are when it merges its own into an existing index.
pub(crate) fn read_index_object(
    folder: &Path,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
    let path = folder.join(INDEX_FILE);
    let Some(text) = crate::paths::read_optional(&path)? else {
        return Ok(None);
    };
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::json(&path, format!("invalid JSON: {e}")))?;
    match value {
        serde_json::Value::Object(map) => Ok(Some(map)),
        other => Err(Error::json(
            &path,
            format!(
                "expected a JSON object of tensor name -> entry, found {}",
                json_kind(&other)
            ),
        )),
    }
}

/// `index.json`'s bytes: indented by two spaces, as accelerate's `json.dump(..., indent=2)` writes it.
pub(crate) fn index_bytes(index: &serde_json::Map<String, serde_json::Value>) -> Vec<u8> {
    serde_json::to_vec_pretty(index).expect("JSON values serialise")
}

pub(crate) fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(dtype_from_index_name(index_dtype_name(d)), Some(d));
        }
        assert_eq!(dtype_from_index_name("complex64"), None);
        assert_eq!(index_dtype_name(DType::BF16), "bfloat16");
        assert_eq!(index_dtype_name(DType::F8E4M3), "float8_e4m3fn");
    }

    #[test]
    fn checksums_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Checksums::default();
        c.insert("b.weight", Checksum::of(b"abc"));
        c.insert("a.weight", Checksum::of(b""));
        c.insert("b.weight", Checksum::of(b"abcd"));
        std::fs::write(dir.path().join(CHECKSUMS_FILE), c.to_json_bytes()).unwrap();
        let back = Checksums::read(dir.path()).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.entries[0].0, "b.weight");
        assert_eq!(back.get("b.weight"), Some(Checksum::of(b"abcd")));
    }

    #[test]
    fn torn_journal_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = journal_line("x", Checksum::of(b"12"));
        text.extend_from_slice(b"{\"tensor\": \"y\", \"by");
        std::fs::write(dir.path().join(JOURNAL_FILE), text).unwrap();
        let j = read_journal(dir.path()).unwrap();
        assert_eq!(j, vec![("x".to_string(), Checksum::of(b"12"))]);
    }
}
