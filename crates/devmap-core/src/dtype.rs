//! Tensor element types, in the safetensors spelling, and their sizes.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// An element type as safetensors spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// 64-bit float.
    F64,
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 8-bit float, e4m3.
    F8E4M3,
    /// 8-bit float, e5m2.
    F8E5M2,
    /// Signed 64-bit integer.
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Signed 16-bit integer.
    I16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 64-bit integer.
    U64,
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned 16-bit integer.
    U16,
    /// Unsigned 8-bit integer.
    U8,
    /// Boolean, one byte per element in storage.
    Bool,
}

impl DType {
    /// Every dtype devmap knows.
    pub const ALL: [DType; 15] = [
        DType::F64,
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F8E4M3,
        DType::F8E5M2,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U64,
        DType::U32,
        DType::U16,
        DType::U8,
        DType::Bool,
    ];

    /// Bytes per element as stored (bool is one byte).
    pub fn size_bytes(self) -> u64 {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::F8E4M3 | DType::F8E5M2 | DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// Whether the type is a floating-point type (the only kind Hugging Face casts to a target dtype).
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F64 | DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3 | DType::F8E5M2
        )
    }

    /// The safetensors spelling (`"BF16"`, `"F8_E4M3"`...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U64 => "U64",
            DType::U32 => "U32",
            DType::U16 => "U16",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    /// Parse the safetensors spelling or a short alias (`bf16`, `f16`, `fp16`, `float32`...).
    pub fn parse(text: &str) -> Result<DType, Error> {
        let upper = text.trim().to_ascii_uppercase();
        let dtype = match upper.as_str() {
            "F64" | "FLOAT64" | "FP64" | "DOUBLE" => DType::F64,
            "F32" | "FLOAT32" | "FP32" | "FLOAT" => DType::F32,
            "F16" | "FLOAT16" | "FP16" | "HALF" => DType::F16,
            "BF16" | "BFLOAT16" => DType::BF16,
            "F8_E4M3" | "F8E4M3" | "FLOAT8_E4M3FN" => DType::F8E4M3,
            "F8_E5M2" | "F8E5M2" | "FLOAT8_E5M2" => DType::F8E5M2,
            "I64" | "INT64" => DType::I64,
            "I32" | "INT32" => DType::I32,
            "I16" | "INT16" => DType::I16,
            "I8" | "INT8" => DType::I8,
            "U64" | "UINT64" => DType::U64,
            "U32" | "UINT32" => DType::U32,
            "U16" | "UINT16" => DType::U16,
            "U8" | "UINT8" => DType::U8,
            "BOOL" => DType::Bool,
            _ => return Err(Error::UnknownDtype(text.to_string())),
        };
        Ok(dtype)
    }
}

impl FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DType::parse(s)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// Number of elements of `shape`, or `None` on 64-bit overflow.
pub fn element_count(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::parse(d.safetensors_name()).unwrap(), d);
        }
        assert_eq!(DType::parse("bf16").unwrap(), DType::BF16);
        let err = DType::parse("F12").unwrap_err().to_string();
        assert!(err.contains("\"F12\""), "{err}");
    }

    #[test]
    fn element_count_overflow() {
        assert_eq!(element_count(&[2, 3]), Some(6));
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[u64::MAX, 2]), None);
    }
}
