//! Quantization configs (`quantization_config` in config.json, or a `--quantization-config` file)
//! and the rules transformers 5.23 applies to them before it plans a device map.
//!
//! Parsing covers bitsandbytes (4-bit incl. double quant, 8-bit), FP8 fine-grained, GPTQ, AWQ,
//! compressed-tensors and MXFP4; an unknown `quant_method` is an error listing the supported ones.
//! The planning rules (which modules a quantizer converts, `modules_to_not_convert`, the bytes per
//! element Hugging Face's planner counts) are implemented for bitsandbytes quantize-on-load, FP8's
//! in [`crate::quant_size`] (docs/quantization.md).

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::model::{Model, ModuleId, TensorId, TensorKind};

/// The `quant_method` values devmap reads.
pub const SUPPORTED_METHODS: &str = "bitsandbytes, fp8, gptq, awq, compressed-tensors, mxfp4";

/// Which bitsandbytes width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnbBits {
    /// `load_in_4bit` (`Linear4bit`).
    Four,
    /// `load_in_8bit` (`Linear8bitLt`, LLM.int8()).
    Eight,
}

/// A bitsandbytes config as `BitsAndBytesConfig.to_dict()` writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct BnbConfig {
    /// 4-bit or 8-bit.
    pub bits: BnbBits,
    /// `bnb_4bit_quant_type`: `nf4` or `fp4`.
    pub quant_type: String,
    /// `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
    /// `bnb_4bit_quant_storage` (a torch dtype name, `uint8` by default).
    pub quant_storage: String,
    /// `llm_int8_skip_modules`: when set it replaces the default skip list (it does not extend it).
    pub skip_modules: Option<Vec<String>>,
    /// `llm_int8_enable_fp32_cpu_offload`: cpu/disk entries allowed in the map.
    pub fp32_cpu_offload: bool,
}

/// A weight-only integer method with groups (GPTQ, AWQ).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupConfig {
    /// `bits`.
    pub bits: u32,
    /// `group_size` (-1: one group per row).
    pub group_size: i64,
    /// `modules_to_not_convert`.
    pub modules_to_not_convert: Option<Vec<String>>,
}

/// A parsed `quantization_config`.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantConfig {
    /// `bitsandbytes`.
    Bnb(BnbConfig),
    /// `fp8` (FineGrainedFP8Config): `weight_block_size`, `modules_to_not_convert`.
    Fp8 {
        /// Block of the weight scales (`[128, 128]` by default), `None` for per-tensor.
        weight_block_size: Option<[u64; 2]>,
        /// `modules_to_not_convert`.
        modules_to_not_convert: Option<Vec<String>>,
    },
    /// `gptq`.
    Gptq(GroupConfig),
    /// `awq`.
    Awq(GroupConfig),
    /// `compressed-tensors`: the `ignore` list (targets and schemes are kept unparsed).
    CompressedTensors {
        /// `ignore`.
        ignore: Vec<String>,
    },
    /// `mxfp4` (gpt-oss).
    Mxfp4 {
        /// `modules_to_not_convert`.
        modules_to_not_convert: Option<Vec<String>>,
        /// `dequantize`: load the experts unpacked at the model's dtype (what transformers also
        /// does, whatever the config says, without a GPU of compute capability >= 7.5 with Triton
        /// and the `kernels` package).
        dequantize: bool,
    },
}

/// A quantization config and whether the checkpoint already holds quantized weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantization {
    /// The config.
    pub config: QuantConfig,
    /// `true` when it came from the checkpoint's config.json (weights stored quantized), `false`
    /// when the weights are quantized on load (`--quantization-config`).
    pub pre_quantized: bool,
}

impl Quantization {
    /// The quantization a checkpoint's config.json declares (`quantization_config`, at the top or
    /// in `text_config`): its weights are stored quantized.
    pub fn from_model_config(
        config: Option<&crate::config::ModelConfig>,
    ) -> Result<Option<Quantization>> {
        let Some(config) = config else {
            return Ok(None);
        };
        let found = [Some(&config.raw), config.raw.get("text_config")]
            .into_iter()
            .flatten()
            .find_map(|scope| scope.get("quantization_config").filter(|v| !v.is_null()));
        found
            .map(|v| {
                Ok(Quantization {
                    config: QuantConfig::from_json(v, "config.json")?,
                    pre_quantized: true,
                })
            })
            .transpose()
    }
}

/// What a quantizer must know of a module's class (manifest field `torch_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TorchKind {
    /// Exactly `torch.nn.Linear`.
    Linear,
    /// A subclass of `torch.nn.Linear`.
    LinearSubclass,
    /// transformers' `Conv1D` (GPT-2 style, weight stored transposed).
    Conv1d,
}

/// Model facts quantizers need beyond the tensor table (manifest fields, docs/formats.md).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantMeta {
    /// Per module name, its `torch_kind` when the manifest records them; otherwise modules of class
    /// `Linear` count as exact `nn.Linear` and `Conv1D` as `Conv1D`.
    pub torch_kinds: Option<HashMap<String, TorchKind>>,
    /// `_keep_in_fp32_modules`.
    pub keep_in_fp32_modules: Vec<String>,
    /// The module `get_output_embeddings()` returns.
    pub output_embedding: Option<String>,
}

impl QuantMeta {
    /// The kind of module `id` of `model`.
    pub fn torch_kind(&self, model: &Model, id: ModuleId) -> Option<TorchKind> {
        let module = model.module(id);
        match &self.torch_kinds {
            Some(kinds) => kinds.get(&module.name).copied(),
            None => match module.class.as_str() {
                "Linear" => Some(TorchKind::Linear),
                "Conv1D" => Some(TorchKind::Conv1d),
                _ => None,
            },
        }
    }
}

struct Fields<'a> {
    obj: &'a Map<String, Value>,
    origin: &'a str,
}

impl<'a> Fields<'a> {
    fn err(&self, reason: String) -> Error {
        Error::QuantConfig {
            origin: self.origin.to_string(),
            reason,
        }
    }
    /// A present, non-null field.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("field {key:?} must be true or false, got {v}"))),
        }
    }
    fn string(&self, key: &str, default: &str) -> Result<String> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| self.err(format!("field {key:?} must be a string, got {v}"))),
        }
    }
    fn int(&self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_i64()
                .ok_or_else(|| self.err(format!("field {key:?} must be an integer, got {v}"))),
        }
    }
    fn names(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let bad = || {
            self.err(format!(
                "field {key:?} must be a list of module names, got {v}"
            ))
        };
        let list = v.as_array().ok_or_else(bad)?;
        list.iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

impl QuantConfig {
    /// Parse a `quantization_config` object; `origin` names its file in errors.
    pub fn from_json(value: &Value, origin: &str) -> Result<QuantConfig> {
        let obj = value.as_object().ok_or_else(|| Error::QuantConfig {
            origin: origin.to_string(),
            reason: format!("expected a JSON object, got {value}"),
        })?;
        let f = Fields { obj, origin };
        let method = match f.get("quant_method") {
            Some(v) => v
                .as_str()
                .ok_or_else(|| f.err(format!("field \"quant_method\" must be a string, got {v}")))?
                .to_string(),
            // Old bitsandbytes configs carry only the load_in_* flags (transformers reads them so).
            None if f.bool("load_in_4bit", false)? || f.bool("load_in_8bit", false)? => {
                "bitsandbytes".to_string()
            }
            None => return Err(f.err("no \"quant_method\" field".into())),
        };
        match method.as_str() {
            "bitsandbytes" => parse_bnb(&f).map(QuantConfig::Bnb),
            "fp8" => parse_fp8(&f),
            "gptq" => parse_group(&f, &[2, 3, 4, 8]).map(QuantConfig::Gptq),
            "awq" => parse_group(&f, &[4]).map(QuantConfig::Awq),
            "compressed-tensors" => Ok(QuantConfig::CompressedTensors {
                ignore: f.names("ignore")?.unwrap_or_default(),
            }),
            "mxfp4" => Ok(QuantConfig::Mxfp4 {
                modules_to_not_convert: f.names("modules_to_not_convert")?,
                dequantize: f.bool("dequantize", false)?,
            }),
            other => Err(f.err(format!(
                "quant_method {other:?} is not supported (devmap reads {SUPPORTED_METHODS})"
            ))),
        }
    }

    /// Read a JSON file holding a quantization_config dict.
    pub fn read(path: &std::path::Path) -> Result<QuantConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| Error::json(path, e.to_string()))?;
        QuantConfig::from_json(&value, &path.display().to_string())
    }

    /// The `quant_method` spelling.
    pub fn method(&self) -> &'static str {
        match self {
            QuantConfig::Bnb(_) => "bitsandbytes",
            QuantConfig::Fp8 { .. } => "fp8",
            QuantConfig::Gptq(_) => "gptq",
            QuantConfig::Awq(_) => "awq",
            QuantConfig::CompressedTensors { .. } => "compressed-tensors",
            QuantConfig::Mxfp4 { .. } => "mxfp4",
        }
    }
}

fn parse_bnb(f: &Fields<'_>) -> Result<BnbConfig> {
    let four = f.bool("load_in_4bit", false)? || f.bool("_load_in_4bit", false)?;
    let eight = f.bool("load_in_8bit", false)? || f.bool("_load_in_8bit", false)?;
    let bits = match (four, eight) {
        (true, true) => {
            return Err(
                f.err("load_in_4bit and load_in_8bit are both true; only one can be used".into())
            )
        }
        (true, false) => BnbBits::Four,
        (false, true) => BnbBits::Eight,
        (false, false) => {
            return Err(f.err("bitsandbytes needs load_in_4bit or load_in_8bit set to true".into()))
        }
    };
    let quant_type = f.string("bnb_4bit_quant_type", "fp4")?;
    if !matches!(quant_type.as_str(), "nf4" | "fp4") {
        return Err(f.err(format!(
            "field \"bnb_4bit_quant_type\" must be \"nf4\" or \"fp4\", got {quant_type:?}"
        )));
    }
    let quant_storage = f.string("bnb_4bit_quant_storage", "uint8")?;
    if quant_storage.parse::<crate::dtype::DType>().is_err()
        && !matches!(
            quant_storage.as_str(),
            "uint8" | "int8" | "float16" | "bfloat16" | "float32"
        )
    {
        return Err(f.err(format!(
            "field \"bnb_4bit_quant_storage\" is not a torch dtype: {quant_storage:?}"
        )));
    }
    Ok(BnbConfig {
        bits,
        quant_type,
        double_quant: f.bool("bnb_4bit_use_double_quant", false)?,
        quant_storage,
        skip_modules: f.names("llm_int8_skip_modules")?,
        fp32_cpu_offload: f.bool("llm_int8_enable_fp32_cpu_offload", false)?,
    })
}

fn parse_fp8(f: &Fields<'_>) -> Result<QuantConfig> {
    let weight_block_size = match f.obj.get("weight_block_size") {
        None => Some([128, 128]),
        Some(Value::Null) => None,
        Some(v) => {
            let pair: Option<Vec<u64>> = v.as_array().map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .filter(|&x| x > 0)
                    .collect()
            });
            match pair.as_deref() {
                Some(&[a, b]) if v.as_array().map(Vec::len) == Some(2) => Some([a, b]),
                _ => {
                    return Err(f.err(format!(
                        "field \"weight_block_size\" must be two positive integers, got {v}"
                    )))
                }
            }
        }
    };
    Ok(QuantConfig::Fp8 {
        weight_block_size,
        modules_to_not_convert: f.names("modules_to_not_convert")?,
    })
}

fn parse_group(f: &Fields<'_>, allowed_bits: &[i64]) -> Result<GroupConfig> {
    let bits = f.int("bits", 4)?;
    if !allowed_bits.contains(&bits) {
        return Err(f.err(format!(
            "field \"bits\" is {bits}; {} supports {allowed_bits:?}",
            f.string("quant_method", "")?
        )));
    }
    let group_size = f.int("group_size", 128)?;
    if group_size == 0 || group_size < -1 {
        return Err(f.err(format!(
            "field \"group_size\" must be a positive integer or -1, got {group_size}"
        )));
    }
    Ok(GroupConfig {
        bits: bits as u32,
        group_size,
        modules_to_not_convert: f.names("modules_to_not_convert")?,
    })
}

/// Compiled `modules_to_not_convert` patterns for [`SkipPatterns::should_convert`].
#[derive(Debug, Clone)]
pub struct SkipPatterns(Vec<(String, regex::Regex)>);

impl SkipPatterns {
    /// Compile the patterns (each read as a regex anchored at the start, as Python's `re.match`).
    pub fn new(patterns: &[String]) -> Result<SkipPatterns> {
        patterns
            .iter()
            .map(|key| {
                let re =
                    regex::Regex::new(&format!("^(?:{key})$")).map_err(|e| Error::QuantConfig {
                        origin: "modules_to_not_convert".into(),
                        reason: format!("pattern {key:?} is not a valid regular expression: {e}"),
                    })?;
                Ok((key.clone(), re))
            })
            .collect::<Result<Vec<_>>>()
            .map(SkipPatterns)
    }

    /// Hugging Face's `should_convert_module`: a module is skipped when a pattern matches its name
    /// from the start up to a module boundary (the pattern read as a regex), or as a plain suffix.
    pub fn should_convert(&self, name: &str) -> bool {
        !self
            .0
            .iter()
            .any(|(key, re)| name.ends_with(key.as_str()) || matches_to_boundary(name, re))
    }
}

/// [`SkipPatterns::should_convert`] for one name (compiles the patterns each call).
pub fn should_convert_module(name: &str, patterns: &[String]) -> Result<bool> {
    Ok(SkipPatterns::new(patterns)?.should_convert(name))
}

/// Whether `re` (`^(?:key)$`) matches `name` up to a position that is a module boundary (after a
/// dot, before a dot, or the end): Python's `re.match` backtracks over every such end.
fn matches_to_boundary(name: &str, re: &regex::Regex) -> bool {
    let bytes = name.as_bytes();
    (0..=name.len()).any(|e| {
        let boundary = e == name.len() || bytes[e] == b'.' || (e > 0 && bytes[e - 1] == b'.');
        boundary && name.is_char_boundary(e) && re.is_match(&name[..e])
    })
}

/// transformers' `get_keys_to_not_convert`: tied names, the last parameter and the output
/// embedding, with `.weight` removed.
pub fn default_keys_to_not_convert(model: &Model) -> Vec<String> {
    let mut keys: Vec<String> = model
        .tied_groups()
        .iter()
        .flatten()
        .map(|&t| model.tensor(t).name.clone())
        .collect();
    let last_param = (0..model.tensors().len())
        .rev()
        .find(|&t| model.tensor(t).kind == TensorKind::Param && !model.is_tied_duplicate(t));
    keys.extend(last_param.map(|t| model.tensor(t).name.clone()));
    keys.extend(model.quant_meta.output_embedding.clone());
    let mut out: Vec<String> = keys
        .into_iter()
        .map(|k| k.strip_suffix(".weight").map(str::to_string).unwrap_or(k))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// transformers' `get_modules_to_not_convert` for a string device map: `skip` when set (it
/// replaces the defaults), else [`default_keys_to_not_convert`], plus `_keep_in_fp32_modules`.
pub fn modules_to_not_convert(model: &Model, skip: Option<&[String]>) -> Vec<String> {
    let mut out = match skip {
        Some(skip) => skip.to_vec(),
        None => default_keys_to_not_convert(model),
    };
    out.extend(model.quant_meta.keep_in_fp32_modules.iter().cloned());
    out.sort();
    out.dedup();
    out
}

impl BnbConfig {
    /// `modules_to_not_convert` as the bitsandbytes quantizers compute it for a string device map:
    /// `llm_int8_skip_modules` when set (replacing the defaults), else the defaults, plus
    /// `_keep_in_fp32_modules`.
    pub fn modules_to_not_convert(&self, model: &Model) -> Vec<String> {
        modules_to_not_convert(model, self.skip_modules.as_deref())
    }

    /// The modules `replace_with_bnb_linear` converts: exact `nn.Linear` and `Conv1D`, unless skipped.
    pub fn converted_modules(&self, model: &Model) -> Result<Vec<bool>> {
        let skip = SkipPatterns::new(&self.modules_to_not_convert(model))?;
        Ok((0..model.modules().len())
            .map(|id| {
                let convertible = matches!(
                    model.quant_meta.torch_kind(model, id),
                    Some(TorchKind::Linear | TorchKind::Conv1d)
                );
                convertible && skip.should_convert(&model.module(id).name)
            })
            .collect())
    }

    /// Per tensor, the bytes per element Hugging Face's planner counts for it when quantized
    /// (`quantized_element_size`: 0.5 for 4-bit, 1 for 8-bit weights of converted modules), `None`
    /// for tensors sized at their own dtype.
    pub fn hf_element_sizes(&self, model: &Model) -> Result<Vec<Option<f64>>> {
        let converted = self.converted_modules(model)?;
        let per = match self.bits {
            BnbBits::Four => 0.5,
            BnbBits::Eight => 1.0,
        };
        Ok((0..model.tensors().len())
            .map(|t: TensorId| {
                let tensor = model.tensor(t);
                let is_weight = tensor.name.rsplit('.').next() != Some("bias")
                    && tensor.kind == TensorKind::Param;
                (converted[tensor.module] && is_weight).then_some(per)
            })
            .collect())
    }

    /// validate_environment's verdict on a computed map: without fp32 cpu offload, a map using the
    /// cpu or the disk (other than all-cpu) is rejected with this message.
    pub fn map_verdict(&self, uses_cpu_or_disk: bool, all_cpu: bool) -> Option<&'static str> {
        (!self.fp32_cpu_offload && uses_cpu_or_disk && !all_cpu).then_some(BNB_OFFLOAD_REJECTION)
    }
}

/// The exact text transformers 5.23's bitsandbytes quantizers raise (ValueError) on a map that
/// places modules on the cpu or the disk.
pub const BNB_OFFLOAD_REJECTION: &str = "Some modules are dispatched on the CPU or the disk. Make sure you have enough GPU RAM to fit the quantized model. If you want to dispatch the model on the CPU or the disk while keeping these modules in 32-bit, you need to set `llm_int8_enable_fp32_cpu_offload=True` and pass a custom `device_map` to `from_pretrained`. Check https://huggingface.co/docs/transformers/main/en/main_classes/quantization#offload-between-cpu-and-gpu for more details. ";

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<QuantConfig> {
        QuantConfig::from_json(&serde_json::from_str(text).unwrap(), "q.json")
    }

    #[test]
    fn unknown_method_names_it_and_lists_supported() {
        let e = parse(r#"{"quant_method": "hqq"}"#).unwrap_err().to_string();
        assert!(
            e.contains("\"hqq\"") && e.contains(SUPPORTED_METHODS),
            "{e}"
        );
    }

    #[test]
    fn malformed_fields_are_named() {
        for (text, field) in [
            (
                r#"{"quant_method":"bitsandbytes","load_in_4bit":"yes"}"#,
                "load_in_4bit",
            ),
            (
                r#"{"quant_method":"bitsandbytes","load_in_4bit":true,"bnb_4bit_quant_type":"int4"}"#,
                "bnb_4bit_quant_type",
            ),
            (
                r#"{"quant_method":"bitsandbytes","load_in_8bit":true,"llm_int8_skip_modules":"lm_head"}"#,
                "llm_int8_skip_modules",
            ),
            (
                r#"{"quant_method":"fp8","weight_block_size":[128]}"#,
                "weight_block_size",
            ),
            (r#"{"quant_method":"gptq","bits":5}"#, "bits"),
            (r#"{"quant_method":"awq","group_size":0}"#, "group_size"),
            (
                r#"{"quant_method":"mxfp4","dequantize":"no"}"#,
                "dequantize",
            ),
            (
                r#"{"quant_method":"mxfp4","modules_to_not_convert":"lm_head"}"#,
                "modules_to_not_convert",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(field) && e.starts_with("q.json"), "{text}: {e}");
        }
        let e = parse(r#"{"quant_method":"bitsandbytes"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("load_in_4bit or load_in_8bit"), "{e}");
        let e = parse(r#"{"quant_method":"bitsandbytes","load_in_4bit":true,"load_in_8bit":true}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("both true"), "{e}");
    }

    #[test]
    fn bnb_dict_as_transformers_writes_it() {
        let q = parse(
            r#"{"quant_method":"bitsandbytes","_load_in_4bit":true,"load_in_4bit":true,"load_in_8bit":false,
            "bnb_4bit_quant_type":"nf4","bnb_4bit_use_double_quant":true,"llm_int8_skip_modules":null,
            "llm_int8_enable_fp32_cpu_offload":false,"bnb_4bit_quant_storage":"uint8"}"#,
        )
        .unwrap();
        let QuantConfig::Bnb(b) = q else { panic!() };
        assert_eq!(b.bits, BnbBits::Four);
        assert!(b.double_quant && b.skip_modules.is_none() && b.quant_type == "nf4");
        // Legacy: no quant_method, only the flag.
        assert_eq!(
            parse(r#"{"load_in_8bit":true}"#).unwrap().method(),
            "bitsandbytes"
        );
        assert_eq!(
            parse(r#"{"quant_method":"fp8"}"#).unwrap(),
            QuantConfig::Fp8 {
                weight_block_size: Some([128, 128]),
                modules_to_not_convert: None
            }
        );
    }

    #[test]
    fn should_convert_module_follows_boundaries() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(!should_convert_module("layer.1.attn", &p(&["layer.1"])).unwrap());
        assert!(should_convert_module("layer.11.attn", &p(&["layer.1"])).unwrap());
        assert!(!should_convert_module("layer.11.attn", &p(&["layer.*"])).unwrap());
        assert!(should_convert_module("mlp.gate_proj", &p(&["mlp.gate"])).unwrap());
        assert!(!should_convert_module("model.decoder.layers.23.fc1", &p(&["fc1"])).unwrap());
        assert!(!should_convert_module("model.lm_head", &p(&["lm_head"])).unwrap());
        assert!(should_convert_module("model.layers.0.mlp.up_proj", &p(&["mlp"])).unwrap());
        assert!(should_convert_module("x", &p(&["(bad"])).is_err());
    }
}
