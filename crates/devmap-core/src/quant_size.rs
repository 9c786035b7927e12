//! What a quantized model's tensors take where the runtime holds them (`auto`'s real bytes), and
//! where each quantizer lets them go (docs/quantization.md, "auto with real bytes").
//!
//! Quantize on load: bitsandbytes 4-bit (packed weight, `absmax`, the 4-bit code, the nested
//! double-quant tensors), 8-bit (int8 weight and `SCB`), FP8 fine-grained (fp8 weight and
//! `weight_scale_inv`, fused experts included). Pre-quantized checkpoints: the header's stored
//! dtypes and shapes, which are already what the runtime allocates.

use std::collections::BTreeMap;

use crate::budget::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::{Model, SizeRules, TensorId, TensorKind};
use crate::quant::{
    modules_to_not_convert, BnbBits, BnbConfig, GroupConfig, QuantConfig, SkipPatterns,
};
use crate::quant::{Quantization, TorchKind};

/// Elements per `absmax` block of bitsandbytes' 4-bit weights (`Params4bit`'s default).
pub const BNB_4BIT_BLOCK: u64 = 64;
/// Elements per nested block when double quantization quantizes `absmax` itself.
pub const BNB_NESTED_BLOCK: u64 = 256;
/// Bytes of the 4-bit code (16 float32 values) each `QuantState` holds.
const BNB_4BIT_CODE_BYTES: u64 = 16 * 4;
/// Bytes of the nested 8-bit dynamic code (256 float32) plus the float32 offset of double quant.
const BNB_NESTED_FIXED_BYTES: u64 = 256 * 4 + 4;

/// Where a quantizer lets weights go, as its `validate_environment` judges a map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffloadRule {
    /// cpu entries load.
    pub cpu: bool,
    /// disk entries load.
    pub disk: bool,
    /// Offloaded modules load unquantized, at full precision (`llm_int8_enable_fp32_cpu_offload`).
    pub offloaded_full_precision: bool,
    /// The rule in words, naming the config field that decides it.
    pub rule: String,
}

/// Per tensor bytes of a quantized model as the runtime allocates them.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeBytes {
    /// The method, as the table shows it (`bitsandbytes 4-bit nf4`).
    pub label: String,
    /// Per tensor, bytes on a GPU (tied duplicates included, as [`Model::read_sizes`]).
    pub on_gpu: Vec<u64>,
    /// Per tensor, bytes when its module is offloaded to cpu or disk.
    pub offloaded: Vec<u64>,
    /// Per tensor, whether it is held quantized on a GPU.
    pub quantized: Vec<bool>,
    /// Scratch an executing GPU needs beside the weights: the largest weight bitsandbytes 4-bit
    /// dequantizes into the compute dtype for a prefill matmul (0 for the other methods).
    pub workspace: u64,
    /// Where weights may go.
    pub offload: OffloadRule,
    /// Per tensor, the bytes quantizing it on load holds on its GPU at once beyond its final
    /// size (the materialized full-precision copy and the conversion's intermediates; 0 for a
    /// tensor loaded as is): [`fp8_load_transient`], [`bnb_load_transient`].
    pub load_transient: Vec<u64>,
}

impl RuntimeBytes {
    /// A pre-quantized checkpoint's bytes: every tensor takes `on_gpu` wherever it goes (packed
    /// tensors load as stored, offloaded too), no dequantization workspace, and nothing is
    /// converted on the GPU while loading.
    fn as_stored(
        label: String,
        on_gpu: Vec<u64>,
        quantized: Vec<bool>,
        offload: OffloadRule,
    ) -> RuntimeBytes {
        RuntimeBytes {
            label,
            offloaded: on_gpu.clone(),
            load_transient: vec![0; on_gpu.len()],
            on_gpu,
            quantized,
            workspace: 0,
            offload,
        }
    }

    /// `per_tensor` with tied duplicates at 0 (the storage counted once, as [`Model::tensor_sizes`]).
    pub fn held(model: &Model, per_tensor: &[u64]) -> Vec<u64> {
        per_tensor
            .iter()
            .enumerate()
            .map(|(t, &b)| if model.is_tied_duplicate(t) { 0 } else { b })
            .collect()
    }

    /// Per device of `tensor_devices` (a device per tensor, `None` when unmapped): bytes held
    /// quantized and bytes held at full precision, tied duplicates counted once.
    pub fn split_by_device(
        &self,
        model: &Model,
        tensor_devices: &[Option<Device>],
    ) -> BTreeMap<Device, (u64, u64)> {
        let mut out: BTreeMap<Device, (u64, u64)> = BTreeMap::new();
        for (t, dev) in tensor_devices.iter().enumerate() {
            let Some(d) = dev else { continue };
            if model.is_tied_duplicate(t) {
                continue;
            }
            let bytes = if d.is_gpu() {
                self.on_gpu[t]
            } else {
                self.offloaded[t]
            };
            let entry = out.entry(*d).or_default();
            if self.quantized[t] && (d.is_gpu() || !self.offload.offloaded_full_precision) {
                entry.0 += bytes;
            } else {
                entry.1 += bytes;
            }
        }
        out
    }

    /// The largest load transient among `tensors` (those a GPU holds) and the tensor it belongs
    /// to: what converting one tensor adds at once to the weights already resident there.
    pub fn largest_load_transient(
        &self,
        tensors: impl IntoIterator<Item = TensorId>,
    ) -> Option<(TensorId, u64)> {
        tensors
            .into_iter()
            .map(|t| (t, self.load_transient[t]))
            .filter(|&(_, b)| b > 0)
            .max_by_key(|&(t, b)| (b, std::cmp::Reverse(t)))
    }

    /// Each offload rule's verdict on a map using `used` devices: `(rule, holds)`. An all-cpu
    /// map has no GPU to keep weights off (bitsandbytes accepts it).
    pub fn verdicts(&self, used: &[Device]) -> Vec<(String, bool)> {
        let any_gpu = used.iter().any(|d| d.is_gpu());
        [
            (Device::Cpu, self.offload.cpu),
            (Device::Disk, self.offload.disk),
        ]
        .into_iter()
        .map(|(dev, allowed)| {
            let uses = used.contains(&dev);
            let holds = allowed || !uses || (dev == Device::Cpu && !any_gpu);
            let what = if allowed { "allowed" } else { "forbidden" };
            (
                format!(
                    "{dev} entries {what} ({}); map uses {dev}: {uses}",
                    self.offload.rule
                ),
                holds,
            )
        })
        .collect()
    }
}

/// The runtime bytes of `model` under its quantization (`None` when it has none).
pub fn runtime_bytes(model: &Model, rules: SizeRules) -> Result<Option<RuntimeBytes>> {
    let Some(q) = &model.quantization else {
        return Ok(None);
    };
    let full: Vec<u64> = model.read_sizes(rules);
    if let (
        true,
        QuantConfig::Mxfp4 {
            modules_to_not_convert: skip,
            dequantize,
        },
    ) = (q.pre_quantized, &q.config)
    {
        return mxfp4_pre_quantized(model, skip.as_deref(), *dequantize, &full, rules).map(Some);
    }
    if q.pre_quantized {
        return Ok(Some(pre_quantized(model, q, &full)));
    }
    match &q.config {
        QuantConfig::Bnb(b) => bnb_on_load(model, b, &full, rules).map(Some),
        QuantConfig::Fp8 {
            weight_block_size,
            modules_to_not_convert: skip,
        } => fp8_on_load(model, *weight_block_size, skip.as_deref(), &full, rules).map(Some),
        other => Err(Error::QuantConfig {
            origin: "quantization_config".into(),
            reason: format!(
                "quant_method {:?} cannot quantize on load (it needs a pre-quantized checkpoint: \
                 a folder whose config.json carries this quantization_config); devmap quantizes \
                 on load with bitsandbytes and fp8",
                other.method()
            ),
        }),
    }
}

/// The rows of a converted module's weight (`out_features`): Conv1D stores the weight transposed.
fn out_features(model: &Model, t: TensorId) -> u64 {
    let tensor = model.tensor(t);
    let conv1d = model.quant_meta.torch_kind(model, tensor.module) == Some(TorchKind::Conv1d);
    match (conv1d, tensor.shape.as_slice()) {
        (true, [_, out]) => *out,
        (_, [out, ..]) => *out,
        _ => 1,
    }
}

/// Bytes of one bitsandbytes-quantized weight of `numel` elements and `rows` output rows.
pub fn bnb_weight_bytes(config: &BnbConfig, numel: u64, rows: u64) -> u64 {
    match config.bits {
        BnbBits::Eight => numel + rows * 4,
        BnbBits::Four => {
            let blocks = numel.div_ceil(BNB_4BIT_BLOCK);
            let absmax = if config.double_quant {
                blocks + blocks.div_ceil(BNB_NESTED_BLOCK) * 4 + BNB_NESTED_FIXED_BYTES
            } else {
                blocks * 4
            };
            numel.div_ceil(2) + absmax + BNB_4BIT_CODE_BYTES
        }
    }
}

/// Bytes per element tensor `t` materializes at on its device before a quantizer converts it:
/// its dtype under `rules` (transformers casts it to the load `dtype` first).
fn load_element_bytes(model: &Model, t: TensorId, rules: SizeRules) -> u64 {
    let tensor = model.tensor(t);
    tensor.bytes(rules).checked_div(tensor.numel).unwrap_or(0)
}

/// Bytes bitsandbytes' quantize-on-load (transformers 5.23 `Bnb4bitQuantize`/`Bnb8bitQuantize`)
/// holds on the GPU at once beyond the final quantized weight of `numel` elements, materialized
/// at `element_bytes` per element. 4-bit: the materialized copy (a second one for `Conv1D`,
/// whose transposed view `Params4bit` makes contiguous), and with double quant the float32
/// `absmax` and its offset-shifted copy while the nested quantization runs. 8-bit: the
/// materialized copy plus the float16 copy `Int8Params` quantizes from (it goes through the cpu
/// and back at float16).
pub fn bnb_load_transient(config: &BnbConfig, numel: u64, element_bytes: u64, conv1d: bool) -> u64 {
    let value = numel.saturating_mul(element_bytes);
    match config.bits {
        BnbBits::Four => {
            let transposed = if conv1d { value } else { 0 };
            let nested = if config.double_quant {
                8 * numel.div_ceil(BNB_4BIT_BLOCK)
            } else {
                0
            };
            value + transposed + nested
        }
        BnbBits::Eight => value + numel.saturating_mul(2),
    }
}

fn bnb_on_load(
    model: &Model,
    config: &BnbConfig,
    full: &[u64],
    rules: SizeRules,
) -> Result<RuntimeBytes> {
    let converted = config.hf_element_sizes(model)?;
    let mut on_gpu = full.to_vec();
    let mut load_transient = vec![0; full.len()];
    let mut workspace = 0;
    for (t, size) in converted.iter().enumerate() {
        if size.is_some() {
            let tensor = model.tensor(t);
            on_gpu[t] = bnb_weight_bytes(config, tensor.numel, out_features(model, t));
            let conv1d =
                model.quant_meta.torch_kind(model, tensor.module) == Some(TorchKind::Conv1d);
            let element = load_element_bytes(model, t, rules);
            load_transient[t] = bnb_load_transient(config, tensor.numel, element, conv1d);
            if config.bits == BnbBits::Four {
                workspace = workspace.max(tensor.bytes(rules));
            }
        }
    }
    let bits = match config.bits {
        BnbBits::Four => format!("4-bit {}", config.quant_type),
        BnbBits::Eight => "8-bit".to_string(),
    };
    let dq = if config.double_quant && config.bits == BnbBits::Four {
        " double-quant"
    } else {
        ""
    };
    let offload = bnb_offload(config);
    // Offloaded modules load unquantized only under fp32 cpu offload; otherwise (an all-cpu map)
    // they stay quantized where they are.
    let offloaded = if offload.offloaded_full_precision {
        full.to_vec()
    } else {
        on_gpu.clone()
    };
    Ok(RuntimeBytes {
        label: format!("bitsandbytes {bits}{dq}"),
        offloaded,
        quantized: converted.iter().map(Option::is_some).collect(),
        on_gpu,
        workspace,
        offload,
        load_transient,
    })
}

fn bnb_offload(config: &BnbConfig) -> OffloadRule {
    if config.fp32_cpu_offload {
        OffloadRule {
            cpu: true,
            disk: true,
            offloaded_full_precision: true,
            rule: "llm_int8_enable_fp32_cpu_offload=true: cpu/disk modules load unquantized".into(),
        }
    } else {
        OffloadRule {
            cpu: false,
            disk: false,
            offloaded_full_precision: false,
            rule:
                "bitsandbytes forbids cpu/disk modules unless llm_int8_enable_fp32_cpu_offload=true"
                    .into(),
        }
    }
}

/// transformers' `FP8Linear`/`FP8Experts` replacement: exact `nn.Linear` modules and modules named
/// `*.experts`, unless skipped; per tensor, the weights it quantizes.
fn fp8_converted(model: &Model, skip: Option<&[String]>) -> Result<Vec<bool>> {
    let patterns = SkipPatterns::new(&modules_to_not_convert(model, skip))?;
    Ok((0..model.tensors().len())
        .map(|t| {
            let tensor = model.tensor(t);
            let module = model.module(tensor.module);
            if tensor.kind != TensorKind::Param || !patterns.should_convert(&module.name) {
                return false;
            }
            let linear =
                model.quant_meta.torch_kind(model, tensor.module) == Some(TorchKind::Linear);
            let leaf = tensor.name.rsplit('.').next().unwrap_or("");
            (linear && leaf == "weight" && tensor.shape.len() == 2)
                || (module.name.ends_with(".experts") && tensor.shape.len() == 3)
        })
        .collect())
}

/// Bytes of an FP8 weight of `shape` with its float32 `weight_scale_inv` (one per block of the
/// last two dimensions, or one per tensor).
pub fn fp8_weight_bytes(shape: &[u64], block: Option<[u64; 2]>) -> u64 {
    shape.iter().product::<u64>() + fp8_scale_count(shape, block) * 4
}

/// Elements of the `weight_scale_inv` of an FP8 weight of `shape`.
pub fn fp8_scale_count(shape: &[u64], block: Option<[u64; 2]>) -> u64 {
    match (block, shape) {
        (Some([b0, b1]), [lead @ .., rows, cols]) => {
            lead.iter().product::<u64>() * rows.div_ceil(b0) * cols.div_ceil(b1)
        }
        _ => 1,
    }
}

/// Per tensor, the bytes transformers' planner counts for FP8 quantize-on-load: a converted
/// weight and its `weight_scale_inv` (which the replaced module registers beside it) at 1 byte
/// per element, as `param_element_size` counts every non-bias parameter of `FP8Linear` and
/// `FP8Experts`; `None` for tensors at their dtype.
pub fn fp8_hf_tensor_bytes(
    model: &Model,
    block: Option<[u64; 2]>,
    skip: Option<&[String]>,
) -> Result<Vec<Option<f64>>> {
    let converted = fp8_converted(model, skip)?;
    Ok((0..converted.len())
        .map(|t| {
            let tensor = model.tensor(t);
            converted[t].then(|| (tensor.numel + fp8_scale_count(&tensor.shape, block)) as f64)
        })
        .collect())
}

/// Bytes transformers 5.23's FP8 quantize-on-load (`Fp8Quantize`) holds on the GPU at once
/// beyond the final fp8 weight and its `weight_scale_inv`, for a weight of `shape` materialized
/// at `element_bytes` per element: at the cast to fp8, the materialized copy, its float32 copy
/// (none when it is float32 already), the scaled and the clamped float32 tensors, and three
/// float32 per-block tensors (max-abs, its safe copy, the scales) beside the kept inverse scales.
/// 0 when the block does not tile the last two dimensions (transformers then leaves the tensor
/// as it is).
pub fn fp8_load_transient(shape: &[u64], element_bytes: u64, block: Option<[u64; 2]>) -> u64 {
    let [lead @ .., rows, cols] = shape else {
        return 0;
    };
    let [bm, bn] = block.unwrap_or([*rows, *cols]);
    if bm == 0 || bn == 0 || rows % bm != 0 || cols % bn != 0 {
        return 0;
    }
    let n: u64 = shape.iter().product();
    let blocks = lead.iter().product::<u64>() * (rows / bm) * (cols / bn);
    let float32_copy = if element_bytes == 4 { 0 } else { 4 * n };
    element_bytes * n + float32_copy + 8 * n + 12 * blocks
}

fn fp8_on_load(
    model: &Model,
    block: Option<[u64; 2]>,
    skip: Option<&[String]>,
    full: &[u64],
    rules: SizeRules,
) -> Result<RuntimeBytes> {
    let quantized = fp8_converted(model, skip)?;
    let load_transient = (0..full.len())
        .map(|t| {
            let element = load_element_bytes(model, t, rules);
            if quantized[t] {
                fp8_load_transient(&model.tensor(t).shape, element, block)
            } else {
                0
            }
        })
        .collect();
    let on_gpu: Vec<u64> = (0..full.len())
        .map(|t| {
            if quantized[t] {
                fp8_weight_bytes(&model.tensor(t).shape, block)
            } else {
                full[t]
            }
        })
        .collect();
    Ok(RuntimeBytes {
        label: "fp8 fine-grained".into(),
        offloaded: on_gpu.clone(),
        on_gpu,
        quantized,
        workspace: 0,
        offload: OffloadRule {
            cpu: false,
            disk: false,
            offloaded_full_precision: false,
            rule: "fp8 quantize-on-load forbids cpu/disk entries (use a pre-quantized checkpoint)"
                .into(),
        },
        load_transient,
    })
}

/// Tensor names that hold a quantizer's packed data or scales (their stored bytes are what loads).
fn is_quant_storage(model: &Model, t: TensorId) -> bool {
    let tensor = model.tensor(t);
    let leaf = tensor.name.rsplit('.').next().unwrap_or("");
    let packed_dtype = matches!(
        tensor.dtype,
        DType::I8 | DType::U8 | DType::I16 | DType::U16 | DType::I32 | DType::U32
    ) || matches!(tensor.dtype, DType::F8E4M3 | DType::F8E5M2);
    let scale_name = matches!(
        leaf,
        "qweight" | "qzeros" | "scales" | "g_idx" | "absmax" | "quant_map" | "nested_absmax"
            | "nested_quant_map" | "SCB" | "weight_scale" | "weight_scale_inv" | "input_scale"
            | "weight_zero_point" | "weight_packed" | "weight_shape"
    ) || leaf.ends_with("_scales")
        || leaf.ends_with("_blocks")
        || leaf.ends_with("_scale_inv")
        || tensor.name.contains(".quant_state.")
        // bitsandbytes' weight state, as the loader folds its names (`weight_absmax`, ...).
        || ["weight_absmax", "weight_quant", "weight_nested"]
            .iter()
            .any(|p| leaf.starts_with(p));
    tensor.kind == TensorKind::Param && packed_dtype || scale_name
}

fn pre_quantized(model: &Model, q: &Quantization, full: &[u64]) -> RuntimeBytes {
    let quantized: Vec<bool> = (0..full.len())
        .map(|t| is_quant_storage(model, t))
        .collect();
    let on_gpu: Vec<u64> = (0..full.len())
        .map(|t| {
            if quantized[t] {
                model.tensor(t).stored_bytes()
            } else {
                full[t]
            }
        })
        .collect();
    let offload = match &q.config {
        QuantConfig::Bnb(b) => bnb_offload(b),
        other => OffloadRule {
            cpu: true,
            disk: true,
            offloaded_full_precision: false,
            rule: format!(
                "pre-quantized {}: cpu/disk modules load as stored",
                other.method()
            ),
        },
    };
    RuntimeBytes::as_stored(
        format!("{} (pre-quantized)", q.config.method()),
        on_gpu,
        quantized,
        offload,
    )
}

/// Per tensor, the bytes transformers' planner counts for a pre-quantized GPTQ checkpoint whose
/// model is described at full precision (a manifest): optimum's `convert_model` replaces every
/// `nn.Linear` / `Conv1D` inside a decoder block (a no-split module) by gptqmodel's `QuantLinear`,
/// whose buffers are counted at their dtypes (int32 `qweight`, `qzeros`, `g_idx`; float16
/// `scales` and `bias`). The whole set is charged to the weight, the float16 bias to the bias.
/// Modules outside the blocks (embeddings, `lm_head`) and fused 3-D experts keep their dtype.
/// `None` for a model that already holds packed `qweight` tensors (their stored bytes count).
pub fn gptq_hf_tensor_bytes(model: &Model, config: &GroupConfig) -> Vec<Option<f64>> {
    if model.tensors().iter().any(|t| t.name.ends_with(".qweight")) {
        return vec![None; model.tensors().len()];
    }
    (0..model.tensors().len())
        .map(|t| gptq_replaced_bytes(model, t, config).map(|b| b as f64))
        .collect()
}

/// The `QuantLinear` bytes standing in for tensor `t`, when its module is converted.
fn gptq_replaced_bytes(model: &Model, t: TensorId, config: &GroupConfig) -> Option<u64> {
    let tensor = model.tensor(t);
    let kind = model.quant_meta.torch_kind(model, tensor.module)?;
    if tensor.kind != TensorKind::Param || model.no_split_ancestor(tensor.module).is_none() {
        return None;
    }
    let leaf = tensor.name.rsplit('.').next().unwrap_or("");
    let [rows, cols] = tensor.shape[..] else {
        return (leaf == "bias" && kind != TorchKind::LinearSubclass).then(|| tensor.numel * 2);
    };
    let (in_features, out_features) = match kind {
        TorchKind::Linear => (cols, rows),
        TorchKind::Conv1d => (rows, cols),
        TorchKind::LinearSubclass => return None,
    };
    (leaf == "weight").then(|| gptq_linear_bytes(config, in_features, out_features))
}

/// Bytes of gptqmodel's `QuantLinear` buffers for one layer (bias excluded): `qweight`
/// `[in·bits/32, out]` i32, `qzeros` `[groups, out·bits/32]` i32, `scales` `[groups, out]` f16,
/// `g_idx` `[in]` i32, with `groups = ceil(in / group_size)` (`group_size` -1: one group).
pub fn gptq_linear_bytes(config: &GroupConfig, in_features: u64, out_features: u64) -> u64 {
    let bits = u64::from(config.bits);
    let groups = in_features.div_ceil(group_of(config, in_features));
    let qweight = in_features * bits / 32 * out_features * 4;
    let qzeros = groups * (out_features * bits / 32) * 4;
    let scales = groups * out_features * 2;
    qweight + qzeros + scales + in_features * 4
}

/// Per tensor, the bytes transformers' planner counts for a pre-quantized MXFP4 (gpt-oss)
/// checkpoint: `replace_with_mxfp4_linear` swaps every `GptOssMLP` whose `<name>.experts`
/// `modules_to_not_convert` (the config's list when set, replacing the defaults, plus
/// `_keep_in_fp32_modules`) does not skip for `Mxfp4GptOssMLP`, whose experts register uint8
/// `gate_up_proj` `[E, 2I, H/2]` and `down_proj` `[E, H, I/2]` (two FP4 values a byte) and float32
/// biases `[E, 2I]`, `[E, H]`; the per-block scales are not parameters there (they go to the Triton
/// kernels' precision config at load) and count nothing. A model described at full precision (a
/// manifest: `gate_up_proj` `[E, H, 2I]`) is charged those sizes; a checkpoint holding
/// `*_blocks`/`*_scales` counts its blocks as stored, its scales as 0. `dequantize` (or a
/// machine transformers dequantizes on) leaves the model as it is: `None` everywhere.
pub fn mxfp4_hf_tensor_bytes(
    model: &Model,
    skip: Option<&[String]>,
    dequantize: bool,
) -> Result<Vec<Option<f64>>> {
    let mut out = vec![None; model.tensors().len()];
    if dequantize {
        return Ok(out);
    }
    let converted = mxfp4_converted(model, skip)?;
    for (t, slot) in out.iter_mut().enumerate() {
        let tensor = model.tensor(t);
        if converted[tensor.module] {
            *slot = mxfp4_expert_bytes(tensor).map(|b| b as f64);
        }
    }
    Ok(out)
}

/// Per module, whether `replace_with_mxfp4_linear` converts it: the `experts` of a `GptOssMLP`
/// that `modules_to_not_convert` does not skip. A model read from a checkpoint's header has no
/// classes: there the experts are the modules holding `*_proj_blocks`.
fn mxfp4_converted(model: &Model, skip: Option<&[String]>) -> Result<Vec<bool>> {
    let patterns = SkipPatterns::new(&modules_to_not_convert(model, skip))?;
    let mut experts: std::collections::HashSet<String> = (model.modules().iter())
        .filter(|m| m.class == "GptOssMLP")
        .map(|m| format!("{}.experts", m.name))
        .collect();
    experts.extend(
        (model.tensors().iter())
            .filter(|t| t.name.ends_with("_proj_blocks"))
            .map(|t| model.module(t.module).name.clone()),
    );
    Ok((model.modules().iter())
        .map(|m| experts.contains(&m.name) && patterns.should_convert(&m.name))
        .collect())
}

/// Elements per MXFP4 block (one uint8 scale each, 16 bytes of FP4 pairs).
pub const MXFP4_BLOCK: u64 = 32;

/// What a converted gpt-oss experts tensor takes at runtime: packed (the GPU path), its blocks
/// and one scale per 32 values (a full-precision `[E, in, out]` description is charged
/// `E·out·(in/2 + in/32)`), biases float32 (they load at the dtype `Mxfp4GptOssExperts` declares);
/// dequantized, the weights at `element` bytes a value (the model's dtype), scales gone, biases as
/// the model has them (`None`: the tensor keeps its full-precision bytes). With whether it is held
/// packed.
fn mxfp4_runtime_expert_bytes(
    tensor: &crate::model::Tensor,
    dequantize: bool,
    element: u64,
) -> Option<(u64, bool)> {
    let leaf = tensor.name.rsplit('.').next().unwrap_or("");
    let packed = !dequantize;
    Some(match (leaf, &tensor.shape[..]) {
        ("gate_up_proj" | "down_proj", &[e, inp, out]) if packed => {
            (e * out * (inp / 2 + inp.div_ceil(MXFP4_BLOCK)), true)
        }
        ("gate_up_proj_blocks" | "down_proj_blocks", _) if packed => (tensor.stored_bytes(), true),
        ("gate_up_proj_blocks" | "down_proj_blocks", _) => {
            (tensor.stored_bytes() * 2 * element, false)
        }
        ("gate_up_proj_scales" | "down_proj_scales", _) if packed => (tensor.stored_bytes(), true),
        ("gate_up_proj_scales" | "down_proj_scales", _) => (0, false),
        ("gate_up_proj_bias" | "down_proj_bias", _) if packed => (tensor.numel * 4, false),
        _ => return None,
    })
}

fn mxfp4_pre_quantized(
    model: &Model,
    skip: Option<&[String]>,
    dequantize: bool,
    full: &[u64],
    rules: SizeRules,
) -> Result<RuntimeBytes> {
    let converted = mxfp4_converted(model, skip)?;
    let element = rules
        .target_dtype
        .or_else(|| model.float_dtype())
        .map_or(2, |d| d.size_bytes());
    let mut on_gpu = full.to_vec();
    let mut quantized = vec![false; full.len()];
    for t in 0..full.len() {
        let tensor = model.tensor(t);
        if let (true, Some((bytes, packed))) = (
            converted[tensor.module],
            mxfp4_runtime_expert_bytes(tensor, dequantize, element),
        ) {
            (on_gpu[t], quantized[t]) = (bytes, packed);
        }
    }
    let offload = if dequantize {
        OffloadRule {
            cpu: true,
            disk: true,
            offloaded_full_precision: false,
            rule: "mxfp4 dequantize=true: cpu/disk modules load dequantized".into(),
        }
    } else {
        OffloadRule {
            cpu: false,
            disk: false,
            offloaded_full_precision: false,
            rule: "mxfp4 packed experts mapped to cpu/disk are swizzled onto the GPU anyway \
                   (transformers' swizzle_mxfp4_convertops); dequantize=true allows offload"
                .into(),
        }
    };
    let label = format!(
        "mxfp4 (pre-quantized{})",
        if dequantize { ", dequantized" } else { "" }
    );
    Ok(RuntimeBytes::as_stored(label, on_gpu, quantized, offload))
}

/// Bytes of one tensor of a converted gpt-oss experts module (see [`mxfp4_hf_tensor_bytes`]).
fn mxfp4_expert_bytes(tensor: &crate::model::Tensor) -> Option<u64> {
    let leaf = tensor.name.rsplit('.').next().unwrap_or("");
    match (leaf, &tensor.shape[..]) {
        // [E, H, 2I] -> uint8 [E, 2I, H / 2]; [E, I, H] -> uint8 [E, H, I / 2].
        ("gate_up_proj" | "down_proj", &[e, inp, out]) => Some(e * out * (inp / 2)),
        ("gate_up_proj_blocks" | "down_proj_blocks", _) => Some(tensor.stored_bytes()),
        ("gate_up_proj_scales" | "down_proj_scales", _) => Some(0),
        ("gate_up_proj_bias" | "down_proj_bias", _) => Some(tensor.numel * 4),
        _ => None,
    }
}

/// Per tensor, the bytes transformers' planner counts for a pre-quantized AWQ checkpoint whose
/// model is described at full precision: `replace_with_awq_linear` swaps every `nn.Linear`
/// (subclasses too; not `Conv1D`) that `modules_to_not_convert` (the defaults plus the config's
/// list; bitsandbytes' list replaces the defaults) does not skip for gptqmodel's AWQ linear, whose buffers count at
/// their dtypes: `qweight` `[in, out·bits/32]` int32, `qzeros` `[groups, out·bits/32]` int32,
/// `scales` `[groups, out]` float16, a float16 `bias`. `None` everywhere for a model that already
/// holds `qweight` tensors.
pub fn awq_hf_tensor_bytes(model: &Model, config: &GroupConfig) -> Result<Vec<Option<f64>>> {
    if model.tensors().iter().any(|t| t.name.ends_with(".qweight")) {
        return Ok(vec![None; model.tensors().len()]);
    }
    // AWQ passes add_default_skips=True: the config's list extends the defaults.
    let mut skip = modules_to_not_convert(model, None);
    skip.extend(config.modules_to_not_convert.iter().flatten().cloned());
    let patterns = SkipPatterns::new(&skip)?;
    Ok((0..model.tensors().len())
        .map(|t| {
            let tensor = model.tensor(t);
            let kind = model.quant_meta.torch_kind(model, tensor.module);
            let linear = matches!(kind, Some(TorchKind::Linear | TorchKind::LinearSubclass));
            if !linear
                || tensor.kind != TensorKind::Param
                || !patterns.should_convert(&model.module(tensor.module).name)
            {
                return None;
            }
            match (tensor.name.rsplit('.').next(), &tensor.shape[..]) {
                (Some("weight"), &[out, inp]) => Some(awq_linear_bytes(config, inp, out) as f64),
                (Some("bias"), _) => Some((tensor.numel * 2) as f64),
                _ => None,
            }
        })
        .collect())
}

/// Bytes of gptqmodel's AWQ linear buffers for one layer (bias excluded).
pub fn awq_linear_bytes(config: &GroupConfig, in_features: u64, out_features: u64) -> u64 {
    let packed_out = out_features * u64::from(config.bits) / 32;
    let groups = in_features.div_ceil(group_of(config, in_features));
    in_features * packed_out * 4 + groups * packed_out * 4 + groups * out_features * 2
}

/// The group size of `config` over `in_features` inputs (-1 or 0: one group).
fn group_of(config: &GroupConfig, in_features: u64) -> u64 {
    u64::try_from(config.group_size)
        .ok()
        .filter(|&g| g > 0)
        .unwrap_or(in_features)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelBuilder;

    /// embed [1000, 128], one Linear fc [128 -> 256 out... weight [256, 128]] with bias, fused
    /// experts [4, 256, 128], lm_head [1000, 128]: every figure below is computed by hand.
    fn small(config: &str) -> Model {
        let mut m = ModelBuilder::new("small")
            .module("embed", "Embedding")
            .module("fc", "Linear")
            .module("moe.experts", "MixtralExperts")
            .module("lm_head", "Linear")
            .param("embed.weight", DType::BF16, &[1000, 128])
            .param("fc.weight", DType::BF16, &[256, 128])
            .param("fc.bias", DType::BF16, &[256])
            .param("moe.experts.gate_up_proj", DType::BF16, &[4, 256, 128])
            .param("lm_head.weight", DType::BF16, &[1000, 128])
            .build()
            .unwrap();
        m.quantization = Some(Quantization {
            config: QuantConfig::from_json(&serde_json::from_str(config).unwrap(), "q").unwrap(),
            pre_quantized: false,
        });
        m
    }

    fn bytes(config: &str) -> RuntimeBytes {
        runtime_bytes(&small(config), SizeRules::default())
            .unwrap()
            .unwrap()
    }

    #[test]
    fn bnb_4bit_nf4_packs_half_a_byte_plus_absmax_and_code() {
        let b = bytes(
            r#"{"quant_method":"bitsandbytes","load_in_4bit":true,"bnb_4bit_quant_type":"nf4"}"#,
        );
        // fc.weight: 32768 elements -> 16384 packed + 512 blocks x 4 (absmax) + 64 (code).
        assert_eq!(b.on_gpu, vec![256_000, 18_496, 512, 262_144, 256_000]);
        // lm_head is the output embedding's last parameter: kept; experts are not nn.Linear.
        assert_eq!(b.quantized, vec![false, true, false, false, false]);
        assert_eq!(b.workspace, 65_536);
        assert!(!b.offload.cpu && !b.offload.disk);
        assert_eq!(b.offloaded, b.on_gpu);
    }

    #[test]
    fn bnb_double_quant_and_8bit() {
        let dq = bytes(
            r#"{"quant_method":"bitsandbytes","load_in_4bit":true,"bnb_4bit_use_double_quant":true}"#,
        );
        // 16384 + 512 (uint8 absmax) + 2 x 4 (nested absmax) + 1024 + 4 (nested code, offset) + 64.
        assert_eq!(dq.on_gpu[1], 17_996);
        let e = bytes(
            r#"{"quant_method":"bitsandbytes","load_in_8bit":true,"llm_int8_enable_fp32_cpu_offload":true}"#,
        );
        // int8 weight + one float32 SCB per output row.
        assert_eq!(e.on_gpu[1], 32_768 + 256 * 4);
        assert_eq!(e.workspace, 0);
        assert!(e.offload.cpu && e.offload.offloaded_full_precision);
        assert_eq!(e.offloaded[1], 65_536);
        let devices = [
            Some(Device::Gpu(0)),
            Some(Device::Cpu),
            None,
            None,
            Some(Device::Gpu(0)),
        ];
        let split = e.split_by_device(&small("{\"load_in_8bit\":true}"), &devices);
        assert_eq!(split[&Device::Gpu(0)], (0, 512_000));
        // fc offloaded: full precision, as it then loads.
        assert_eq!(split[&Device::Cpu], (0, 65_536));
    }

    #[test]
    fn fp8_quantizes_linears_and_fused_experts_with_block_scales() {
        let b = bytes(r#"{"quant_method":"fp8","weight_block_size":[128,128]}"#);
        // fc: 32768 fp8 + 2 x 1 blocks x 4; experts: 131072 + 4 x 2 x 1 x 4.
        assert_eq!(b.on_gpu, vec![256_000, 32_776, 512, 131_104, 256_000]);
        let per_tensor = bytes(r#"{"quant_method":"fp8","weight_block_size":null}"#);
        assert_eq!(per_tensor.on_gpu[1], 32_772);
        assert_eq!(
            b.verdicts(&[Device::Gpu(0), Device::Cpu]),
            vec![
                (
                    format!(
                        "cpu entries forbidden ({}); map uses cpu: true",
                        b.offload.rule
                    ),
                    false
                ),
                (
                    format!(
                        "disk entries forbidden ({}); map uses disk: false",
                        b.offload.rule
                    ),
                    true
                ),
            ]
        );
    }

    /// Llama-3.1-8B's MLP matrix [14336, 4096] in bf16, FP8 blocks of 128: n = 58,720,256
    /// elements, 112 x 32 = 3,584 blocks. At the cast to fp8 transformers holds the bf16 copy
    /// (2n), its float32 copy (4n), the scaled and the clamped float32 tensors (4n + 4n), the fp8
    /// result (n) and four float32 per-block tensors (16 per block); the result and one of the
    /// four stay, so the transient is 2n + 12n + 12 per block.
    #[test]
    fn fp8_load_transient_of_a_llama_8b_mlp_matrix() {
        let n: u64 = 14_336 * 4_096;
        assert_eq!(n, 58_720_256);
        let by_hand = 2 * n + 4 * n + 8 * n + 12 * 3_584;
        assert_eq!(by_hand, 822_126_592);
        let shape = [14_336, 4_096];
        assert_eq!(fp8_load_transient(&shape, 2, Some([128, 128])), by_hand);
        // float32 weights are not copied to float32 again.
        assert_eq!(
            fp8_load_transient(&shape, 4, Some([128, 128])),
            4 * n + 8 * n + 12 * 3_584
        );
        // Per tensor: one block.
        assert_eq!(fp8_load_transient(&shape, 2, None), 14 * n + 12);
        // Fused experts [4, 256, 128]: 4 x 2 x 1 blocks.
        assert_eq!(
            fp8_load_transient(&[4, 256, 128], 2, Some([128, 128])),
            14 * 131_072 + 12 * 8
        );
        // A block that does not tile the matrix: transformers leaves it unconverted.
        assert_eq!(fp8_load_transient(&[100, 4_096], 2, Some([128, 128])), 0);
        assert_eq!(fp8_load_transient(&[4_096], 2, Some([128, 128])), 0);
    }

    #[test]
    fn bnb_load_transients_by_hand() {
        let bnb = |bits: BnbBits, double_quant: bool| BnbConfig {
            bits,
            quant_type: "nf4".into(),
            double_quant,
            quant_storage: "uint8".into(),
            skip_modules: None,
            fp32_cpu_offload: false,
        };
        let four = |dq: bool| bnb(BnbBits::Four, dq);
        let n: u64 = 14_336 * 4_096;
        // 4-bit: the bf16 copy the weight is packed from (2n); Conv1D makes the transposed view
        // contiguous first (another 2n); double quant keeps the float32 absmax (n / 64 blocks)
        // and its offset-shifted copy while it quantizes them.
        assert_eq!(bnb_load_transient(&four(false), n, 2, false), 2 * n);
        assert_eq!(bnb_load_transient(&four(false), n, 2, true), 4 * n);
        assert_eq!(
            bnb_load_transient(&four(true), n, 2, false),
            2 * n + 8 * (n / 64)
        );
        // 8-bit: the bf16 copy on the GPU and the float16 copy Int8Params quantizes.
        let eight = bnb(BnbBits::Eight, false);
        assert_eq!(bnb_load_transient(&eight, n, 2, false), 4 * n);
        assert_eq!(bnb_load_transient(&eight, n, 4, false), 6 * n);
    }

    #[test]
    fn load_transients_follow_the_converted_tensors() {
        // fc.weight [256, 128] bf16: 4-bit holds its bf16 copy, 65,536 bytes; nothing else is
        // converted (embed, bias, experts, lm_head load as they are).
        let b = bytes(r#"{"quant_method":"bitsandbytes","load_in_4bit":true}"#);
        assert_eq!(b.load_transient, vec![0, 65_536, 0, 0, 0]);
        assert_eq!(b.largest_load_transient(0..5), Some((1, 65_536)));
        assert_eq!(b.largest_load_transient([0, 4]), None);
        // FP8: fc (32,768 elements, 2 blocks) and the fused experts (131,072 elements, 8 blocks).
        let f = bytes(r#"{"quant_method":"fp8","weight_block_size":[128,128]}"#);
        assert_eq!(
            f.load_transient,
            vec![0, 14 * 32_768 + 12 * 2, 0, 14 * 131_072 + 12 * 8, 0]
        );
        assert_eq!(f.largest_load_transient(0..5).map(|x| x.0), Some(3));
    }

    /// gpt-oss at full precision: one layer, 4 experts, hidden 64, intermediate 96; the router and
    /// attention stay, and a second layer's MLP is skipped by the config's list.
    fn gpt_oss(config: &str) -> Model {
        let mut b = ModelBuilder::new("gpt-oss");
        for l in 0..2 {
            let p = format!("model.layers.{l}");
            b = b
                .module(format!("{p}.mlp"), "GptOssMLP")
                .module(format!("{p}.mlp.router"), "GptOssTopKRouter")
                .module(format!("{p}.mlp.experts"), "GptOssExperts")
                .param(format!("{p}.mlp.router.weight"), DType::BF16, &[4, 64])
                .param(
                    format!("{p}.mlp.experts.gate_up_proj"),
                    DType::BF16,
                    &[4, 64, 192],
                )
                .param(
                    format!("{p}.mlp.experts.gate_up_proj_bias"),
                    DType::BF16,
                    &[4, 192],
                )
                .param(
                    format!("{p}.mlp.experts.down_proj"),
                    DType::BF16,
                    &[4, 96, 64],
                )
                .param(
                    format!("{p}.mlp.experts.down_proj_bias"),
                    DType::BF16,
                    &[4, 64],
                );
        }
        let mut m = b.build().unwrap();
        m.quantization = Some(Quantization {
            config: QuantConfig::from_json(&serde_json::from_str(config).unwrap(), "q").unwrap(),
            pre_quantized: true,
        });
        m
    }

    const SKIP_LAYER_1: &str =
        r#"{"quant_method":"mxfp4","modules_to_not_convert":["model.layers.1.mlp"]}"#;

    #[test]
    fn mxfp4_planner_bytes_are_mxfp4_experts_parameters() {
        let m = gpt_oss(SKIP_LAYER_1);
        let got =
            mxfp4_hf_tensor_bytes(&m, Some(&["model.layers.1.mlp".to_string()]), false).unwrap();
        // uint8 gate_up [4, 192, 32], float32 bias [4, 192], uint8 down [4, 64, 48], float32 [4, 64].
        let layer0 = [
            None,
            Some(4. * 192. * 32.),
            Some(4. * 192. * 4.),
            Some(4. * 64. * 48.),
            Some(4. * 64. * 4.),
        ];
        assert_eq!(&got[..5], &layer0);
        assert_eq!(&got[5..], &[None; 5]);
        // dequantize: the model as it is.
        let m = gpt_oss(r#"{"quant_method":"mxfp4","dequantize":true}"#);
        assert_eq!(
            mxfp4_hf_tensor_bytes(&m, None, true).unwrap(),
            vec![None; 10]
        );
    }

    #[test]
    fn mxfp4_runtime_bytes_keep_blocks_and_scales_on_gpus() {
        let b = runtime_bytes(&gpt_oss(SKIP_LAYER_1), SizeRules::default())
            .unwrap()
            .unwrap();
        // gate_up: blocks 4 x 192 x 32 + one scale per 32 of the 64 inputs (4 x 192 x 2);
        // down: 4 x 64 x 48 + 4 x 64 x 3; biases float32; layer 1 (skipped) as stored in bf16.
        assert_eq!(
            b.on_gpu,
            vec![
                512,
                4 * 192 * (32 + 2),
                4 * 192 * 4,
                4 * 64 * (48 + 3),
                4 * 64 * 4,
                512,
                4 * 64 * 192 * 2,
                4 * 192 * 2,
                4 * 96 * 64 * 2,
                4 * 64 * 2
            ]
        );
        assert_eq!(b.quantized.iter().filter(|q| **q).count(), 2);
        assert!(!b.offload.cpu && !b.offload.disk);
        let dq = runtime_bytes(
            &gpt_oss(r#"{"quant_method":"mxfp4","dequantize":true}"#),
            SizeRules::default(),
        )
        .unwrap()
        .unwrap();
        // Dequantized: every tensor as the bf16 model holds it, both layers.
        let bf16_layer = [
            512,
            4 * 64 * 192 * 2,
            4 * 192 * 2,
            4 * 96 * 64 * 2,
            4 * 64 * 2,
        ];
        assert_eq!(dq.on_gpu, [bf16_layer, bf16_layer].concat());
        assert!(dq.offload.cpu && dq.quantized.iter().all(|q| !q));
    }

    #[test]
    fn methods_that_cannot_quantize_on_load_are_named() {
        let m = small(r#"{"quant_method":"gptq","bits":4}"#);
        let e = runtime_bytes(&m, SizeRules::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"gptq\"") && e.contains("pre-quantized"), "{e}");
    }

    /// Buffer shapes gptqmodel 7.7's `QuantLinear` registers on the meta device (printed by
    /// optimum's `convert_model` over llama-2-7b's k_proj and gpt2-xl's c_attn, 4 bits, group 128).
    #[test]
    fn gptq_linear_bytes_match_gptqmodel_buffers() {
        let g128 = GroupConfig {
            bits: 4,
            group_size: 128,
            modules_to_not_convert: None,
        };
        // k_proj 4096 -> 1024: qweight [512, 1024], qzeros [32, 128], scales [32, 1024] f16, g_idx [4096].
        let k_proj = 512 * 1024 * 4 + 32 * 128 * 4 + 32 * 1024 * 2 + 4096 * 4;
        assert_eq!(gptq_linear_bytes(&g128, 4096, 1024), k_proj);
        // c_attn 1600 -> 4800: 13 groups (1600 / 128 rounded up).
        let c_attn = 200 * 4800 * 4 + 13 * 600 * 4 + 13 * 4800 * 2 + 1600 * 4;
        assert_eq!(gptq_linear_bytes(&g128, 1600, 4800), c_attn);
    }

    /// Only Linear/Conv1D inside a no-split block is replaced; embeddings, lm_head, fused experts
    /// keep their dtype, and a model that already holds `qweight` is counted as stored.
    #[test]
    fn gptq_replaces_only_block_linears() {
        let model = ModelBuilder::new("gptq")
            .module("embed", "Embedding")
            .module("layers.0", "Block")
            .module("layers.0.fc", "Linear")
            .module("layers.0.experts", "MixtralExperts")
            .module("lm_head", "Linear")
            .no_split_classes(vec!["Block".into()])
            .param("embed.weight", DType::BF16, &[1000, 128])
            .param("layers.0.fc.weight", DType::BF16, &[256, 128])
            .param("layers.0.fc.bias", DType::BF16, &[256])
            .param("layers.0.experts.gate_up_proj", DType::BF16, &[4, 256, 128])
            .param("lm_head.weight", DType::BF16, &[1000, 128])
            .build()
            .unwrap();
        let g = GroupConfig {
            bits: 4,
            group_size: 128,
            modules_to_not_convert: None,
        };
        let fc = (128 / 8 * 256 * 4 + 256 / 8 * 4 + 256 * 2 + 128 * 4) as f64;
        assert_eq!(
            gptq_hf_tensor_bytes(&model, &g),
            vec![None, Some(fc), Some(512.0), None, None]
        );
    }

    /// gptqmodel 7.7's AWQ GEMM linear over mixtral's q_proj (4096 -> 4096, 4 bits, group 128):
    /// qweight [4096, 512], qzeros [32, 512] int32, scales [32, 4096] float16.
    #[test]
    fn awq_linear_bytes_match_gptqmodel_buffers() {
        let g128 = GroupConfig {
            bits: 4,
            group_size: 128,
            modules_to_not_convert: None,
        };
        let q_proj = 4096 * 512 * 4 + 32 * 512 * 4 + 32 * 4096 * 2;
        assert_eq!(awq_linear_bytes(&g128, 4096, 4096), q_proj);
    }
}
