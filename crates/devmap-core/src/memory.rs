//! The memory model: what a device holds at the peak of Hugging Face `generate` under a device map,
//! besides the weights mapped to it. docs/cost-model.md ("Memory rules") derives every term.
//!
//! - [`Workload`]: batch, prompt and new tokens (`--workload`), the dtype of KV and activations.
//! - [`kv_bytes_per_layer`]: the KV cache of each decoder layer, by attention type (GQA/MQA,
//!   multi-head latent attention, sliding/chunked windows, encoder-decoder cross-attention).
//! - [`activation_bytes`]: the working set of prefill and decode on a device that executes layers.
//! - [`stream_buffers`]: what accelerate holds on the main device while it streams an offloaded unit.
//! - [`main_device`]: accelerate's main device of a map.
//! - [`load_peak`]: a GPU's peak while a quantizer converts weights on load.
//!
//! The rule that adds these up per device lives in one place, `devmap_solver::Instance::usage`,
//! which serves both `auto` and `devmap check`.

use crate::budget::Device;
use crate::cost::KvCacheSpec;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::graph::Unit;
use crate::model::{Model, SizeRules, TensorId, MAX_MODEL_BYTES};

/// cuBLAS's workspace on Hopper (PyTorch allocates it through its caching allocator on the first
/// matmul of a device: 4096 KiB × 8 on sm90), part of every executing device's working set.
pub const CUBLAS_WORKSPACE_BYTES: u64 = 32 << 20;

/// Allocator allowance, fixed part: PyTorch's caching allocator rounds large blocks to 2 MiB and
/// keeps freed blocks cached, so the reserved peak sits above the allocated one.
pub const ALLOCATOR_ALLOWANCE_BYTES: u64 = 128 << 20;

/// Allocator allowance, proportional part: a fraction of the activation working set (its blocks
/// come and go every layer and fragment the cache).
pub const ALLOCATOR_ALLOWANCE_FRACTION: f64 = 0.10;

/// What a load that builds tensors from several checkpoint tensors leaves fragmented, in units of
/// the largest tensor it builds: measured 1.0–2.5 (0.25–0.63 GiB of free blocks inside split
/// segments after `from_pretrained` of a Mixtral with 256 MiB fused `gate_up_proj`,
/// docs/validation.md, "Fused experts leave the cache fragmented").
pub const CONVERSION_FRAGMENTATION_FACTOR: f64 = 2.5;

/// A declared inference workload: `batch=B,prompt=P,new=N[,dtype=D]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Sequences generated together.
    pub batch: u64,
    /// Prompt tokens per sequence (prefill).
    pub prompt: u64,
    /// Tokens generated per sequence (decode).
    pub new_tokens: u64,
    /// Dtype of the KV cache and activations (defaults to `--dtype`, else the model's float dtype).
    pub dtype: Option<DType>,
}

impl Default for Workload {
    /// One sequence, a 2048-token prompt, 256 new tokens: a single `generate` call on a long-ish
    /// prompt, what accelerate's big-model inference serves (docs/cost-model.md says why).
    fn default() -> Self {
        Workload {
            batch: 1,
            prompt: 2048,
            new_tokens: 256,
            dtype: None,
        }
    }
}

impl Workload {
    /// Parse `batch=1,prompt=2048,new=256[,dtype=bf16]`; missing keys take the defaults.
    pub fn parse(text: &str) -> Result<Workload> {
        let bad = |reason: String| Error::BudgetSpec {
            spec: text.to_string(),
            reason,
        };
        let mut w = Workload::default();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| bad(format!("{item:?} is not KEY=VALUE")))?;
            let int = |what: &str| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| bad(format!("{what} {v:?} is not an integer")))
            };
            match k.trim() {
                "batch" => w.batch = int("batch")?,
                "prompt" => w.prompt = int("prompt")?,
                "new" => w.new_tokens = int("new")?,
                "dtype" => w.dtype = Some(DType::parse(v)?),
                other => {
                    return Err(bad(format!(
                        "unknown key {other:?} (expected batch, prompt, new, dtype)"
                    )))
                }
            }
        }
        if w.batch == 0 || w.prompt == 0 {
            return Err(bad("batch and prompt must be positive".into()));
        }
        Ok(w)
    }

    /// The workload `--kv-cache batch=B,seq=S` stands for: a prompt of S tokens, nothing generated
    /// (so the cache holds S tokens, as that flag always charged).
    pub fn from_kv_cache(spec: &KvCacheSpec) -> Workload {
        Workload {
            batch: spec.batch,
            prompt: spec.seq,
            new_tokens: 0,
            dtype: spec.dtype,
        }
    }

    /// The workload with `dtype` as its dtype unless it names one (`--dtype` applies to KV and
    /// activations too).
    pub fn or_dtype(self, dtype: Option<DType>) -> Workload {
        Workload {
            dtype: self.dtype.or(dtype),
            ..self
        }
    }

    /// Tokens each sequence holds at the end: prompt + new.
    pub fn total_tokens(&self) -> u64 {
        self.prompt.saturating_add(self.new_tokens)
    }

    /// Bytes of one element of KV and activations.
    pub fn element_bytes(&self, model: &Model) -> u64 {
        self.dtype
            .or_else(|| model.float_dtype())
            .map_or(2, |d| d.size_bytes())
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "batch={},prompt={},new={}",
            self.batch, self.prompt, self.new_tokens
        )?;
        if let Some(d) = self.dtype {
            write!(f, ",dtype={}", d.safetensors_name())?;
        }
        Ok(())
    }
}

/// The product of `factors`, or an error naming `what` when it passes [`MAX_MODEL_BYTES`]
/// (the factors come from config.json and the command line: overflow is an error, never a wrap).
fn product(what: &str, factors: &[u64]) -> Result<u64> {
    factors
        .iter()
        .try_fold(1u64, |acc, &f| acc.checked_mul(f))
        .filter(|&p| p <= MAX_MODEL_BYTES)
        .ok_or_else(|| {
            let text: Vec<String> = factors.iter().map(u64::to_string).collect();
            Error::Model(format!("{what} ({}) is more than 1 PiB", text.join(" × ")))
        })
}

/// What one decoder layer caches per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCache {
    /// K and V of every token (`full_attention`).
    Full,
    /// K and V of a window (`sliding_attention`, `chunked_attention`).
    Window(u64),
    /// Nothing (`mlp`/`moe`/linear-attention layers: their state is not a growing cache).
    None,
}

/// The cache type of each decoder layer: config.json's `layer_types` when listed, else sliding
/// everywhere when `sliding_window` is set (transformers' rule for configs without the list).
pub fn layer_caches(config: &crate::config::ModelConfig, layers: u64) -> Vec<LayerCache> {
    let window = config.sliding_window();
    let chunk = config.attention_chunk_size();
    let default = match (window, chunk) {
        (Some(w), _) => LayerCache::Window(w),
        (None, Some(c)) => LayerCache::Window(c),
        (None, None) => LayerCache::Full,
    };
    let Some(types) = config.layer_types() else {
        return vec![default; layers as usize];
    };
    (0..layers as usize)
        .map(|l| match types.get(l).map(String::as_str) {
            Some("full_attention") | None => LayerCache::Full,
            Some("sliding_attention") => window.map_or(LayerCache::Full, LayerCache::Window),
            Some("chunked_attention") => chunk.map_or(LayerCache::Full, LayerCache::Window),
            Some(_) => LayerCache::None,
        })
        .collect()
}

/// Tokens a layer's cache holds at its peak. A window layer keeps a view of the whole prefill
/// (transformers slices the concatenated states without copying) until the first decode step
/// replaces it, so its peak is the larger of the prompt and the capped decode cache.
fn cached_tokens(cache: LayerCache, w: &Workload) -> u64 {
    match cache {
        LayerCache::Full => w.total_tokens(),
        LayerCache::Window(win) => w.prompt.max(w.total_tokens().min(win)),
        LayerCache::None => 0,
    }
}

/// KV-cache bytes of each decoder layer at the peak of `w`, in layer order, from config.json.
///
/// Per token and layer: `2 × KV heads × head dim` elements (GQA/MQA), or `kv_lora_rank +
/// qk_rope_head_dim` for multi-head latent attention (DeepSeek-V2/V3 cache the latent and the
/// rotary key in transformers 5). Encoder-decoders cache the generated tokens for self-attention
/// and the encoded prompt for cross-attention in every decoder layer. Models without a
/// generation head cache nothing.
pub fn kv_bytes_per_layer(model: &Model, w: &Workload) -> Result<Vec<u64>> {
    let cfg = model.config.as_ref().ok_or_else(|| {
        Error::Model(format!(
            "a workload needs the model's config.json (layers, KV heads, head dim); none was found for {}",
            model.name
        ))
    })?;
    if !cfg.generates() {
        return Ok(Vec::new());
    }
    // Without a layer count, one entry: every decoder-layer unit is charged it.
    let layers = if cfg.is_encoder_decoder() {
        cfg.num_decoder_layers()
    } else {
        cfg.num_layers()
    }
    .unwrap_or(1);
    let per_token = kv_elements_per_token(cfg)?;
    let bytes = w.element_bytes(model);
    let caches = layer_caches(cfg, layers);
    caches
        .iter()
        .map(|&cache| {
            let tokens = if cfg.is_encoder_decoder() {
                // Self-attention over the decoded tokens (start token included), cross-attention
                // over the prompt.
                w.new_tokens.saturating_add(1).saturating_add(w.prompt)
            } else {
                cached_tokens(cache, w)
            };
            product(
                "the KV cache of one layer (batch × tokens × elements per token × bytes)",
                &[w.batch, tokens, per_token, bytes],
            )
        })
        .collect()
}

/// Cached elements per token of one layer (K and V together).
fn kv_elements_per_token(cfg: &crate::config::ModelConfig) -> Result<u64> {
    if let Some((rank, rope)) = cfg.latent_attention() {
        return Ok(rank.saturating_add(rope));
    }
    let kv_heads = cfg.num_key_value_heads().ok_or_else(|| {
        Error::Model("config.json has no num_key_value_heads / num_attention_heads".into())
    })?;
    let head_dim = cfg.head_dim().ok_or_else(|| {
        Error::Model("config.json has no head_dim and no hidden_size/heads".into())
    })?;
    product("K and V elements per token", &[2, kv_heads, head_dim])
}

/// Whether the MLP is gated (SwiGLU/GeGLU: gate and up projections, so three `intermediate`-wide
/// tensors are alive at the multiply instead of two).
fn gated_mlp(model: &Model) -> bool {
    model.tensors().iter().any(|t| {
        let n = t.name.as_str();
        n.contains("gate_proj.")
            || n.contains("gate_up_proj")
            || n.contains(".wi_0.")
            || n.contains(".w3.")
    })
}

/// The activation working set of `w` on one executing device, with its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Activations {
    /// Prefill: every prompt token through the widest layer, plus the logits.
    pub prefill: u64,
    /// Decode: one token per sequence, plus the copy `torch.cat` makes of the largest layer cache.
    pub decode: u64,
    /// The larger of the two plus cuBLAS's workspace: what is charged.
    pub peak: u64,
}

/// The activation working set of `w` (see docs/cost-model.md for the derivation and its check
/// against measured peaks).
///
/// Live elements per token inside a decoder layer: the larger of the MLP (`3 × intermediate` when
/// gated, else `2 ×`) and attention (`2 × q + 3 × kv + hidden`: q and k before and after rotary,
/// v, the output) phases, plus four hidden-wide tensors (the embeddings, the layer input, the
/// residual, the normed input) and the rotary cos/sin (`2 × head dim`). Logits: transformers 5
/// `generate` keeps the last token's only (`logits_to_keep=1`) and copies them to float32;
/// models without a generation head produce every token's.
pub fn activation_bytes(model: &Model, w: &Workload, kv_layers: &[u64]) -> Result<Activations> {
    let cfg = model.config.as_ref();
    let per_token = live_elements_per_token(model);
    let bytes = w.element_bytes(model);
    let vocab = cfg.and_then(|c| c.vocab_size()).unwrap_or(0);
    let generative = cfg.is_none_or(|c| c.generates());
    let logits = if generative {
        product("the logits", &[w.batch, vocab, bytes.saturating_add(4)])?
    } else {
        product("the logits", &[w.batch, w.prompt, vocab, bytes])?
    };
    let prefill = product(
        "the prefill working set (batch × prompt × live elements per token × bytes)",
        &[w.batch, w.prompt, per_token, bytes],
    )?
    .saturating_add(logits);
    let largest_layer_cache = kv_layers.iter().copied().max().unwrap_or(0);
    let decode = if generative && w.new_tokens > 0 {
        product("the decode working set", &[w.batch, per_token, bytes])?
            .saturating_add(logits)
            .saturating_add(largest_layer_cache)
    } else {
        0
    };
    Ok(Activations {
        prefill,
        decode,
        peak: prefill.max(decode).saturating_add(CUBLAS_WORKSPACE_BYTES),
    })
}

/// Elements alive per token at the peak of a decoder layer (see [`activation_bytes`]), from
/// config.json (or the manifest's hidden size, with a 4 × hidden MLP, without one).
fn live_elements_per_token(model: &Model) -> u64 {
    let cfg = model.config.as_ref();
    let hidden = cfg
        .and_then(|c| c.hidden_size())
        .or(model.hidden_size)
        .unwrap_or(0);
    let inter = cfg
        .and_then(|c| c.intermediate_size())
        .unwrap_or(hidden.saturating_mul(4));
    let heads = cfg.and_then(|c| c.num_attention_heads()).unwrap_or(1);
    let head_dim = cfg.and_then(|c| c.head_dim()).unwrap_or(hidden);
    let q_dim = heads.saturating_mul(head_dim);
    let kv_dim = match cfg.and_then(|c| c.latent_attention()) {
        // MLA expands the latent to full K and V for the attention kernel.
        Some(_) => q_dim,
        None => cfg
            .and_then(|c| c.num_key_value_heads())
            .unwrap_or(heads)
            .saturating_mul(head_dim),
    };
    let mlp = inter.saturating_mul(if gated_mlp(model) { 3 } else { 2 });
    let attention = q_dim
        .saturating_mul(2)
        .saturating_add(kv_dim.saturating_mul(3))
        .saturating_add(hidden);
    mlp.max(attention)
        .saturating_add(hidden.saturating_mul(4))
        .saturating_add(head_dim.saturating_mul(2))
}

/// The allocator allowance charged with an activation working set of `activations` bytes.
pub fn allocator_allowance(activations: u64) -> u64 {
    if activations == 0 {
        return 0;
    }
    ALLOCATOR_ALLOWANCE_BYTES + (activations as f64 * ALLOCATOR_ALLOWANCE_FRACTION).ceil() as u64
}

/// The units that are decoder layers (where the KV cache lives), in layer order.
///
/// Decoder layers are the no-split units of the class that repeats `num_hidden_layers` times
/// (or, failing that, of the most repeated no-split class); when layers repeat in both an encoder
/// and a decoder, the ones under a `decoder` path. Vision towers and encoders are not charged.
pub fn decoder_layer_units(model: &Model, units: &[Unit]) -> Vec<usize> {
    let cfg = model.config.as_ref();
    let layers = cfg.and_then(|c| {
        if c.is_encoder_decoder() {
            c.num_decoder_layers()
        } else {
            c.num_layers()
        }
    });
    let no_split: Vec<usize> = (0..units.len())
        .filter(|&i| model.module(units[i].module).no_split)
        .collect();
    let decoder: Vec<usize> = no_split
        .iter()
        .copied()
        .filter(|&i| model.module(units[i].module).name.contains("decoder"))
        .collect();
    if !decoder.is_empty() && layers.is_none_or(|l| decoder.len() as u64 == l) {
        return decoder;
    }
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for &i in &no_split {
        let class = model.module(units[i].module).class.as_str();
        match counts.iter_mut().find(|(c, _)| *c == class) {
            Some(e) => e.1 += 1,
            None => counts.push((class, 1)),
        }
    }
    let class = counts
        .iter()
        .find(|(_, c)| Some(*c as u64) == layers)
        .or_else(|| counts.iter().max_by_key(|(_, c)| *c))
        .map(|(c, _)| *c);
    no_split
        .into_iter()
        .filter(|&i| Some(model.module(units[i].module).class.as_str()) == class)
        .collect()
}

/// KV bytes per unit: layer `l`'s cache on the `l`-th decoder-layer unit, 0 elsewhere.
pub fn kv_per_unit(model: &Model, units: &[Unit], kv_layers: &[u64]) -> Vec<u64> {
    let mut kv = vec![0u64; units.len()];
    if kv_layers.is_empty() {
        return kv;
    }
    // A layer count that disagrees with the checkpoint charges every layer unit the largest cache.
    let largest = kv_layers.iter().copied().max().unwrap_or(0);
    let decoder = decoder_layer_units(model, units);
    let exact = decoder.len() == kv_layers.len();
    for (l, &i) in decoder.iter().enumerate() {
        kv[i] = if exact { kv_layers[l] } else { largest };
    }
    kv
}

/// The peak a GPU reaches while a quantizer converts weights as they load (quantize on load):
/// the weights it holds once loaded plus the largest conversion transient among its tensors
/// ([`crate::quant_size::RuntimeBytes::load_transient`]). transformers loads and converts one
/// tensor at a time (no worker threads under on-the-fly quantization), so at most one
/// transient is alive; counting every other weight as already resident makes this an upper
/// bound, exact when that tensor is the last to load. KV cache and activations come later,
/// after the transients are freed, so they are not part of it.
pub fn load_peak(resident_weights: u64, largest_transient: u64) -> u64 {
    resident_weights.saturating_add(largest_transient)
}

/// What accelerate holds on the main device while it streams each unit from cpu or disk: its
/// largest group of direct tensors of one module (`read` bytes per tensor).
///
/// accelerate hooks every module that has direct tensors (`attach_align_device_hook`), loads
/// those tensors to the execution device before the module's forward and frees them after it, so
/// one module's direct tensors are resident at a time, not the whole unit.
pub fn stream_buffers(model: &Model, units: &[Unit], read: &[u64]) -> Vec<u64> {
    units
        .iter()
        .map(|u| stream_buffer(model, &u.tensors, read))
        .collect()
}

/// The largest one-module group of `tensors` (`read` bytes per tensor): what accelerate holds at
/// once while it streams them.
pub fn stream_buffer(model: &Model, tensors: &[TensorId], read: &[u64]) -> u64 {
    // Sorted by module, not a linear search per tensor: a unit can hold thousands of modules
    // (an MoE layer's experts).
    let mut by_module: Vec<(usize, u64)> = tensors
        .iter()
        .map(|&t| (model.tensor(t).module, read[t]))
        .collect();
    by_module.sort_unstable_by_key(|&(m, _)| m);
    by_module
        .chunk_by(|a, b| a.0 == b.0)
        .map(|group| group.iter().map(|&(_, b)| b).sum::<u64>())
        .max()
        .unwrap_or(0)
}

/// accelerate's main device of a map: the lowest GPU id among the devices it uses (`None` when it
/// uses no GPU; then the cpu executes).
pub fn main_device(used: impl IntoIterator<Item = Device>) -> Option<Device> {
    used.into_iter().filter(|d| d.is_gpu()).min()
}

/// What a GPU's caching allocator keeps fragmented after transformers built tensors on it from
/// several checkpoint tensors ([`crate::model::Tensor::converted`]: per-expert weights stacked
/// into fused experts). The sources and intermediates of each conversion are freed into the
/// cache and split by the next loads; the free pieces stay reserved for the rest of the run, too
/// small for the next large copy. Charged on every executing device, as
/// [`CONVERSION_FRAGMENTATION_FACTOR`] × the largest converted tensor at the workload's dtype
/// ([`crate::model::Tensor::bytes`]: floats never upcast); 0 when nothing is converted.
pub fn conversion_fragmentation(model: &Model, w: &Workload) -> u64 {
    let largest = (model.tensors().iter())
        .filter(|t| t.converted)
        .map(|t| {
            t.bytes(SizeRules {
                target_dtype: w.dtype,
                bool_as_bits: false,
            })
        })
        .max()
        .unwrap_or(0);
    (largest as f64 * CONVERSION_FRAGMENTATION_FACTOR).ceil() as u64
}

/// Everything the memory model charges besides the weights, for one model and workload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkloadMemory {
    /// KV bytes of each decoder layer.
    pub kv_layers: Vec<u64>,
    /// The activation working set of an executing device.
    pub activations: Activations,
    /// The allocator allowance charged with it.
    pub allowance: u64,
    /// What conversions on load leave fragmented ([`conversion_fragmentation`]).
    pub conversion_fragmentation: u64,
}

impl WorkloadMemory {
    /// The terms of `w` for `model` (an error when config.json is missing or a size overflows).
    pub fn new(model: &Model, w: &Workload) -> Result<WorkloadMemory> {
        let kv_layers = kv_bytes_per_layer(model, w)?;
        let units = model.modules().iter().filter(|m| m.no_split).count().max(1) as u64;
        let largest = kv_layers.iter().copied().max().unwrap_or(0);
        // Planners sum the cache of every layer unit: bounded like a model's weights.
        if largest.saturating_mul(units) > MAX_MODEL_BYTES {
            return Err(Error::Model(format!(
                "the KV cache of {units} layer unit(s) at up to {largest} bytes each is more than 1 PiB"
            )));
        }
        let activations = activation_bytes(model, w, &kv_layers)?;
        Ok(WorkloadMemory {
            allowance: allocator_allowance(activations.peak),
            conversion_fragmentation: conversion_fragmentation(model, w),
            kv_layers,
            activations,
        })
    }

    /// What an executing device is charged on top of its units: activations, allowance and
    /// what conversions on load leave fragmented.
    pub fn per_executing_device(&self) -> u64 {
        (self.activations.peak)
            .saturating_add(self.allowance)
            .saturating_add(self.conversion_fragmentation)
    }
}
