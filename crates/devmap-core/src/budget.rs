//! Devices and memory budgets, parsed with accelerate's `max_memory` rules.
//!
//! Sizes follow `accelerate.utils.convert_file_size_to_int`: `GiB`/`MiB`/`KiB` are powers of two,
//! `GB`/`MB`/`KB` powers of ten, and a lower-case final `b` (`"20gb"`) means *bits*, so the value is
//! divided by 8. Decimal values (`"1.5GB"`) are allowed and truncated toward zero. devmap also accepts
//! `TiB`/`TB` (accelerate rejects them) and a bare integer meaning bytes.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a tensor can live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Device {
    /// A GPU by CUDA index.
    Gpu(u32),
    /// Host RAM.
    Cpu,
    /// Disk offload.
    Disk,
}

impl Device {
    /// Parse `0`, `"cuda:0"`, `"cpu"` or `"disk"`.
    pub fn parse(text: &str) -> Result<Device> {
        let t = text.trim();
        match t {
            "cpu" => return Ok(Device::Cpu),
            "disk" => return Ok(Device::Disk),
            _ => {}
        }
        let digits = t.strip_prefix("cuda:").unwrap_or(t);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(i) = digits.parse::<u32>() {
                return Ok(Device::Gpu(i));
            }
        }
        Err(Error::UnknownDevice(text.to_string()))
    }

    /// Whether this is a GPU.
    pub fn is_gpu(self) -> bool {
        matches!(self, Device::Gpu(_))
    }

    /// The JSON value accelerate uses for this device: an integer for GPUs, a string otherwise.
    pub fn to_json(self) -> serde_json::Value {
        match self {
            Device::Gpu(i) => serde_json::Value::from(i),
            Device::Cpu => serde_json::Value::from("cpu"),
            Device::Disk => serde_json::Value::from("disk"),
        }
    }

    /// Read a device from a JSON value (`0`, `"0"`, `"cuda:0"`, `"cpu"`, `"disk"`).
    pub fn from_json(value: &serde_json::Value) -> Result<Device> {
        match value {
            serde_json::Value::Number(n) => match n.as_u64().and_then(|v| u32::try_from(v).ok()) {
                Some(i) => Ok(Device::Gpu(i)),
                None => Err(Error::UnknownDevice(n.to_string())),
            },
            serde_json::Value::String(s) => Device::parse(s),
            other => Err(Error::UnknownDevice(other.to_string())),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Gpu(i) => write!(f, "{i}"),
            Device::Cpu => f.write_str("cpu"),
            Device::Disk => f.write_str("disk"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Device::parse(s)
    }
}

impl Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Device::from_json(&v).map_err(serde::de::Error::custom)
    }
}

/// Parse a memory size with accelerate's rules (see the module docs).
pub fn parse_memory_size(text: &str) -> Result<u64> {
    let err = |reason: &str| Error::MemorySize {
        text: text.to_string(),
        reason: reason.to_string(),
    };
    let t = text.trim();
    if t.is_empty() {
        return Err(err("empty size"));
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse::<u64>().map_err(|_| err("does not fit in 64 bits"));
    }
    let upper = t.to_ascii_uppercase();
    // (suffix, multiplier, whether a lower-case final `b` means bits)
    const UNITS: [(&str, f64, bool); 8] = [
        ("TIB", 1099511627776.0, false),
        ("GIB", 1073741824.0, false),
        ("MIB", 1048576.0, false),
        ("KIB", 1024.0, false),
        ("TB", 1e12, true),
        ("GB", 1e9, true),
        ("MB", 1e6, true),
        ("KB", 1e3, true),
    ];
    let Some(&(suffix, mult, bits_rule)) = UNITS.iter().find(|(s, _, _)| upper.ends_with(s)) else {
        return Err(err(
            "unknown unit (use GiB, MiB, KiB, TiB, GB, MB, KB, TB, or a plain integer of bytes)",
        ));
    };
    let number = t[..t.len() - suffix.len()].trim();
    let value: f64 = number
        .parse()
        .map_err(|_| err(&format!("{number:?} is not a number")))?;
    if !value.is_finite() {
        return Err(err("not a finite number"));
    }
    if value < 0.0 || number.starts_with('-') {
        return Err(err("negative size"));
    }
    let bytes = value * mult;
    if bytes >= 1.8e19 {
        return Err(err("does not fit in 64 bits"));
    }
    // Python's int(float) truncates toward zero.
    let mut bytes = bytes.trunc() as u64;
    if bits_rule && t.ends_with('b') {
        bytes /= 8;
    }
    Ok(bytes)
}

/// Format bytes for people: `1.50 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// One device's memory budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    /// The device.
    pub device: Device,
    /// Bytes the plan may use on it.
    pub bytes: u64,
}

/// Largest budget a device keeps: 2⁵² bytes (4 PiB). Larger values (`u64::MAX` as "unlimited")
/// are capped to it, which changes no plan (a model holds at most [`crate::model::MAX_MODEL_BYTES`],
/// 1 PiB) and keeps sums of budgets over thousands of devices inside 64 bits.
pub const MAX_BUDGET_BYTES: u64 = 1 << 52;

/// The budgets of every device a plan may use, in accelerate's order: GPUs by index, then cpu, then disk.
/// Each is capped at [`MAX_BUDGET_BYTES`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryBudgets {
    budgets: Vec<MemoryBudget>,
}

impl MemoryBudgets {
    /// Build from (device, bytes) pairs; rejects duplicates and sorts into accelerate's order.
    pub fn new(pairs: impl IntoIterator<Item = (Device, u64)>) -> Result<MemoryBudgets> {
        let mut budgets: Vec<MemoryBudget> = Vec::new();
        for (device, bytes) in pairs {
            if budgets.iter().any(|b| b.device == device) {
                return Err(Error::BudgetSpec {
                    spec: device.to_string(),
                    reason: format!("device {device} is given twice"),
                });
            }
            budgets.push(MemoryBudget {
                device,
                bytes: bytes.min(MAX_BUDGET_BYTES),
            });
        }
        budgets.sort_by_key(|b| b.device);
        Ok(MemoryBudgets { budgets })
    }

    /// Parse `0=22GiB,1=22GiB,cpu=64GiB,disk=1TB`, or the path of a JSON file holding the same dict.
    pub fn parse(spec: &str) -> Result<MemoryBudgets> {
        let trimmed = spec.trim();
        let as_path = Path::new(trimmed);
        if trimmed.ends_with(".json") || (as_path.is_file() && !trimmed.contains('=')) {
            return MemoryBudgets::from_json_file(as_path);
        }
        if trimmed.starts_with('{') {
            return MemoryBudgets::from_json_str(trimmed, Path::new("<--max-memory>"));
        }
        let mut pairs = Vec::new();
        for item in trimmed.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((key, value)) = item.split_once('=') else {
                return Err(Error::BudgetSpec {
                    spec: spec.to_string(),
                    reason: format!("{item:?} is not DEVICE=SIZE"),
                });
            };
            let device = Device::parse(key)?;
            pairs.push((device, parse_memory_size(value)?));
        }
        if pairs.is_empty() {
            return Err(Error::BudgetSpec {
                spec: spec.to_string(),
                reason: "no devices given".into(),
            });
        }
        MemoryBudgets::new(pairs)
    }

    /// Read a JSON `max_memory` dict from a file.
    pub fn from_json_file(path: &Path) -> Result<MemoryBudgets> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        MemoryBudgets::from_json_str(&text, path)
    }

    /// Read a JSON `max_memory` dict (`{"0": "24GiB", "cpu": 1000}`).
    pub fn from_json_str(text: &str, origin: &Path) -> Result<MemoryBudgets> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::json(origin, e.to_string()))?;
        let serde_json::Value::Object(map) = value else {
            return Err(Error::json(
                origin,
                "expected a JSON object of device -> size",
            ));
        };
        let mut pairs = Vec::new();
        // Every error names the file and the device key as well as the value.
        let in_file = |key: &str, e: Error| Error::json(origin, format!("device {key:?}: {e}"));
        for (key, v) in &map {
            let device = Device::parse(key).map_err(|e| in_file(key, e))?;
            let bytes = match v {
                serde_json::Value::String(s) => parse_memory_size(s).map_err(|e| in_file(key, e))?,
                serde_json::Value::Number(n) => n.as_u64().ok_or_else(|| {
                    in_file(
                        key,
                        Error::MemorySize {
                            text: n.to_string(),
                            reason: "sizes must be non-negative integers of bytes or strings like \"20GiB\""
                                .into(),
                        },
                    )
                })?,
                other => {
                    return Err(in_file(
                        key,
                        Error::MemorySize {
                            text: other.to_string(),
                            reason: "a budget must be a string or an integer".into(),
                        },
                    ))
                }
            };
            pairs.push((device, bytes));
        }
        MemoryBudgets::new(pairs)
    }

    /// The budgets in order.
    pub fn iter(&self) -> impl Iterator<Item = &MemoryBudget> {
        self.budgets.iter()
    }

    /// The budget of `device`, if it has one.
    pub fn get(&self, device: Device) -> Option<u64> {
        self.budgets
            .iter()
            .find(|b| b.device == device)
            .map(|b| b.bytes)
    }

    /// Whether `device` has a budget.
    pub fn contains(&self, device: Device) -> bool {
        self.get(device).is_some()
    }

    /// Set (or add) the budget of a device, keeping the order (capped at [`MAX_BUDGET_BYTES`]).
    pub fn set(&mut self, device: Device, bytes: u64) {
        let bytes = bytes.min(MAX_BUDGET_BYTES);
        if let Some(b) = self.budgets.iter_mut().find(|b| b.device == device) {
            b.bytes = bytes;
        } else {
            self.budgets.push(MemoryBudget { device, bytes });
            self.budgets.sort_by_key(|b| b.device);
        }
    }

    /// Remove a device's budget.
    pub fn remove(&mut self, device: Device) {
        self.budgets.retain(|b| b.device != device);
    }

    /// The devices, in order.
    pub fn devices(&self) -> Vec<Device> {
        self.budgets.iter().map(|b| b.device).collect()
    }

    /// The GPUs, by index.
    pub fn gpus(&self) -> Vec<u32> {
        self.budgets
            .iter()
            .filter_map(|b| match b.device {
                Device::Gpu(i) => Some(i),
                _ => None,
            })
            .collect()
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.budgets.len()
    }

    /// Whether no device has a budget.
    pub fn is_empty(&self) -> bool {
        self.budgets.is_empty()
    }

    /// The budgets as accelerate's `max_memory` dict (GPU keys as JSON strings, values in bytes).
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for b in &self.budgets {
            map.insert(b.device.to_string(), serde_json::Value::from(b.bytes));
        }
        serde_json::Value::Object(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accelerate_size_rules() {
        let cases = [
            ("500", 500),
            ("20GiB", 21_474_836_480),
            ("20gib", 21_474_836_480),
            ("20 GiB", 21_474_836_480),
            ("20GB", 20_000_000_000),
            ("20 GB", 20_000_000_000),
            ("20gb", 2_500_000_000),
            ("20Gb", 2_500_000_000),
            ("1.5GB", 1_500_000_000),
            ("512KiB", 524_288),
            ("100Kb", 12_500),
            ("0MB", 0),
            ("1TB", 1_000_000_000_000),
            ("0.0000001GiB", 107),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_memory_size(text).unwrap(), bytes, "{text}");
        }
    }

    #[test]
    fn bad_sizes_quote_the_text() {
        for bad in [
            "20G", "20TX", "-1GiB", "abcGB", "", "nanGB", "infGiB", "1e30TB",
        ] {
            let err = parse_memory_size(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }

    #[test]
    fn budget_spec_orders_like_accelerate() {
        let b = MemoryBudgets::parse("cpu=64GiB,1=22GiB,cuda:0=22GiB,disk=1TB").unwrap();
        assert_eq!(
            b.devices(),
            vec![Device::Gpu(0), Device::Gpu(1), Device::Cpu, Device::Disk]
        );
        assert_eq!(b.get(Device::Gpu(0)), Some(22 * (1 << 30)));
        let j =
            MemoryBudgets::from_json_str(r#"{"cpu": 1000, "0": "1KiB"}"#, Path::new("x")).unwrap();
        assert_eq!(j.devices(), vec![Device::Gpu(0), Device::Cpu]);
        assert_eq!(j.get(Device::Cpu), Some(1000));
    }

    #[test]
    fn bad_budget_specs() {
        let e = MemoryBudgets::parse("0=22GiB,gpu7=1GB")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"gpu7\""), "{e}");
        let e = MemoryBudgets::parse("0=22GiB,0=1GB")
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
        let e = MemoryBudgets::parse("0:22GiB").unwrap_err().to_string();
        assert!(e.contains("0:22GiB"), "{e}");
        let e = MemoryBudgets::from_json_str(r#"{"0": -5}"#, Path::new("b.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("-5"), "{e}");
    }
}
