//! What each tensor costs in one batch-1 decode step, by what its module does then
//! (docs/cost-model.md, "What a decode step reads").
//!
//! - Most weights are read whole from GPU memory when resident, and copied whole by accelerate
//!   when offloaded (its hook copies every direct tensor of a module before its forward).
//! - An embedding table is gathered: a resident one reads one row per token; an offloaded one is
//!   still copied whole (the hook does not know which rows the forward will use).
//! - Routed MoE experts: a token reads `k` of `E` experts. Fused experts (one module holding every
//!   expert, transformers 5) are copied whole when offloaded; experts that are modules of their
//!   own (`experts.3.w1`) are hooked one by one, so only the `k` routed ones are copied.
//! - Encoder weights of an encoder-decoder run once, at prefill: a decode step reads and copies
//!   none of them, and runs none of their modules. So do the decoder's cross-attention key and
//!   value projections (`EncDecAttention.k`/`.v` in T5, `encoder_attn.k_proj`/`.v_proj` in the
//!   Bart family): their outputs over the encoder's states are cached at prefill, and transformers
//!   skips the two Linears on every later step (accelerate's hook, which runs with the module's
//!   forward, copies nothing).

use crate::model::{Model, TensorId, TensorKind};

/// Per-tensor decode-step costs of a model (see the module docs), indexed by [`TensorId`].
#[derive(Debug, Clone, PartialEq)]
pub struct TensorReads {
    /// Bytes read from GPU memory per step when the tensor is resident.
    pub resident: Vec<u64>,
    /// Bytes accelerate copies per step when the tensor is offloaded.
    pub copied: Vec<u64>,
    /// Expected times per step the tensor's module runs (1; `k/E` for an expert module of its
    /// own; 0 for encoder weights): scales its per-copy, hook and eager costs.
    pub runs: Vec<f64>,
}

/// What a tensor's module does in a decode step.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    /// Read whole, copied whole.
    Dense,
    /// An embedding table: one row per token read when resident.
    Gather { rows: u64 },
    /// Routed experts fused into one module: `share` of it read, all of it copied.
    FusedExperts { share: f64 },
    /// One expert's own module: it runs (and is copied) with probability `share`.
    Expert { share: f64 },
    /// Runs only at prefill (an encoder-decoder's encoder).
    PrefillOnly,
}

impl TensorReads {
    /// The decode-step costs of every tensor of `model`, where `read[t]` is the bytes tensor `t`
    /// holds at the target dtype ([`Model::read_sizes`]).
    pub fn new(model: &Model, read: &[u64]) -> TensorReads {
        let share = routed_share(model);
        let encoder_decoder = model
            .config
            .as_ref()
            .is_some_and(|c| c.is_encoder_decoder());
        let n = read.len();
        let mut out = TensorReads {
            resident: Vec::with_capacity(n),
            copied: Vec::with_capacity(n),
            runs: Vec::with_capacity(n),
        };
        for (t, &bytes) in read.iter().enumerate() {
            let (resident, copied, runs) = match role(model, t, share, encoder_decoder) {
                Role::Dense => (bytes, bytes, 1.0),
                Role::Gather { rows } => (bytes / rows.max(1), bytes, 1.0),
                Role::FusedExperts { share } => (scaled(bytes, share), bytes, 1.0),
                Role::Expert { share } => (scaled(bytes, share), scaled(bytes, share), share),
                Role::PrefillOnly => (0, 0, 0.0),
            };
            out.resident.push(resident);
            out.copied.push(copied);
            out.runs.push(runs);
        }
        out
    }

    /// Every tensor read and copied whole and run once: the costs of a plain dense model, what
    /// the cost model assumed before it knew gathers, experts and encoders.
    pub fn dense(read: &[u64]) -> TensorReads {
        TensorReads {
            resident: read.to_vec(),
            copied: read.to_vec(),
            runs: vec![1.0; read.len()],
        }
    }
}

fn scaled(bytes: u64, share: f64) -> u64 {
    (bytes as f64 * share).round() as u64
}

/// `k / E` from config.json, when the model routes tokens to experts.
fn routed_share(model: &Model) -> Option<f64> {
    let cfg = model.config.as_ref()?;
    let (k, e) = (cfg.experts_per_token()?, cfg.num_experts()?);
    (e > 0 && k <= e).then(|| k as f64 / e as f64)
}

/// Cross-attention projections of keys and values, by the names transformers gives them.
const CROSS_KEY_VALUE: [(&str, &[&str]); 2] = [
    ("EncDecAttention", &["k", "v"]),
    ("encoder_attn", &["k_proj", "v_proj"]),
];

/// Whether `name` is a tensor of a decoder's cross-attention key or value projection
/// (`...layer.1.EncDecAttention.k.weight`, `...encoder_attn.v_proj.bias`).
fn is_cross_key_value(name: &str) -> bool {
    let mut parts = name.rsplit('.');
    let (_tensor, projection, attention) = (parts.next(), parts.next(), parts.next());
    let (Some(projection), Some(attention)) = (projection, attention) else {
        return false;
    };
    CROSS_KEY_VALUE
        .iter()
        .any(|(module, names)| *module == attention && names.contains(&projection))
}

fn role(model: &Model, t: TensorId, share: Option<f64>, encoder_decoder: bool) -> Role {
    let tensor = model.tensor(t);
    let module = model.module(tensor.module);
    // Iterators, not a collected Vec: this runs once per tensor (170k on large MoE models).
    if encoder_decoder
        && (tensor.name.split('.').any(|s| s == "encoder") || is_cross_key_value(&tensor.name))
    {
        return Role::PrefillOnly;
    }
    let mut segments = tensor.name.split('.');
    if let (Some(share), true) = (share, segments.any(|s| s == "experts")) {
        // `any` stopped at `experts`: the next segment is the expert index of an own module.
        let own_module = segments
            .next()
            .is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()));
        return if own_module {
            Role::Expert { share }
        } else {
            Role::FusedExperts { share }
        };
    }
    if tensor.kind == TensorKind::Param
        && module.class.ends_with("Embedding")
        && tensor.shape.len() == 2
    {
        return Role::Gather {
            rows: tensor.shape[0],
        };
    }
    Role::Dense
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::dtype::DType;
    use crate::model::{ModelBuilder, SizeRules};

    fn config(json: &str) -> Option<ModelConfig> {
        Some(ModelConfig {
            raw: serde_json::from_str(json).unwrap(),
        })
    }

    fn reads_of(model: &Model) -> TensorReads {
        TensorReads::new(model, &model.read_sizes(SizeRules::default()))
    }

    fn id(model: &Model, name: &str) -> TensorId {
        model.tensors().iter().position(|t| t.name == name).unwrap()
    }

    #[test]
    fn a_resident_embedding_reads_one_row_and_an_offloaded_one_is_copied_whole() {
        let m = ModelBuilder::new("t")
            .module("embed", "Embedding")
            .param("embed.weight", DType::BF16, &[1000, 64])
            .module("head", "Linear")
            .param("head.weight", DType::BF16, &[1000, 64])
            .build()
            .unwrap();
        let r = reads_of(&m);
        let (e, h) = (id(&m, "embed.weight"), id(&m, "head.weight"));
        // 1000 rows of 64 bf16 = 128 000 bytes; one row = 128 bytes.
        assert_eq!((r.resident[e], r.copied[e], r.runs[e]), (128, 128_000, 1.0));
        assert_eq!((r.resident[h], r.copied[h]), (128_000, 128_000));
    }

    #[test]
    fn experts_read_k_of_e_and_only_own_modules_are_copied_k_of_e() {
        let m = ModelBuilder::new("t")
            .module("moe", "Moe")
            .module("moe.experts", "Experts")
            .param("moe.experts.gate_up_proj", DType::BF16, &[8, 10, 10])
            .module("moe.experts.3", "Mlp")
            .param("moe.experts.3.w1.weight", DType::BF16, &[10, 10])
            .module("moe.gate", "Linear")
            .param("moe.gate.weight", DType::BF16, &[8, 10])
            .config(config(
                r#"{"num_local_experts": 8, "num_experts_per_tok": 2}"#,
            ))
            .build()
            .unwrap();
        let r = reads_of(&m);
        let fused = id(&m, "moe.experts.gate_up_proj");
        let own = id(&m, "moe.experts.3.w1.weight");
        let gate = id(&m, "moe.gate.weight");
        // 800 elements = 1600 bytes, a quarter (2 of 8) read; copied whole.
        assert_eq!(
            (r.resident[fused], r.copied[fused], r.runs[fused]),
            (400, 1600, 1.0)
        );
        // 200 bytes; runs a quarter of the steps, copied only then.
        assert_eq!(
            (r.resident[own], r.copied[own], r.runs[own]),
            (50, 50, 0.25)
        );
        assert_eq!((r.resident[gate], r.copied[gate]), (160, 160));
    }

    #[test]
    fn encoder_weights_cost_nothing_per_decode_step() {
        let m = ModelBuilder::new("t")
            .module("encoder.block.0", "Block")
            .param("encoder.block.0.w", DType::F32, &[10])
            .module("decoder.block.0", "Block")
            .param("decoder.block.0.w", DType::F32, &[10])
            .config(config(r#"{"is_encoder_decoder": true}"#))
            .build()
            .unwrap();
        let r = reads_of(&m);
        let (enc, dec) = (id(&m, "encoder.block.0.w"), id(&m, "decoder.block.0.w"));
        assert_eq!((r.resident[enc], r.copied[enc], r.runs[enc]), (0, 0, 0.0));
        assert_eq!((r.resident[dec], r.copied[dec], r.runs[dec]), (40, 40, 1.0));
        // A decoder-only model with an `encoder` path (a vision tower) is not skipped.
        let m = ModelBuilder::new("t")
            .module("encoder", "Block")
            .param("encoder.w", DType::F32, &[10])
            .build()
            .unwrap();
        assert_eq!(reads_of(&m).resident[0], 40);
    }

    #[test]
    fn cross_attention_keys_and_values_run_at_prefill_only() {
        let m = ModelBuilder::new("t")
            .module("decoder.block.0.layer.1.EncDecAttention.q", "Linear")
            .param(
                "decoder.block.0.layer.1.EncDecAttention.q.weight",
                DType::F32,
                &[10],
            )
            .module("decoder.block.0.layer.1.EncDecAttention.k", "Linear")
            .param(
                "decoder.block.0.layer.1.EncDecAttention.k.weight",
                DType::F32,
                &[10],
            )
            .module("decoder.layers.0.encoder_attn.v_proj", "Linear")
            .param(
                "decoder.layers.0.encoder_attn.v_proj.bias",
                DType::F32,
                &[10],
            )
            .module("decoder.layers.0.encoder_attn.out_proj", "Linear")
            .param(
                "decoder.layers.0.encoder_attn.out_proj.weight",
                DType::F32,
                &[10],
            )
            .module("decoder.layers.0.self_attn.k_proj", "Linear")
            .param(
                "decoder.layers.0.self_attn.k_proj.weight",
                DType::F32,
                &[10],
            )
            .config(config(r#"{"is_encoder_decoder": true}"#))
            .build()
            .unwrap();
        let r = reads_of(&m);
        let runs = |name: &str| r.runs[id(&m, name)];
        assert_eq!(
            runs("decoder.block.0.layer.1.EncDecAttention.k.weight"),
            0.0
        );
        assert_eq!(runs("decoder.layers.0.encoder_attn.v_proj.bias"), 0.0);
        // The query and output projections run every step; so does self-attention's key.
        assert_eq!(
            runs("decoder.block.0.layer.1.EncDecAttention.q.weight"),
            1.0
        );
        assert_eq!(runs("decoder.layers.0.encoder_attn.out_proj.weight"), 1.0);
        assert_eq!(runs("decoder.layers.0.self_attn.k_proj.weight"), 1.0);
        let k = id(&m, "decoder.block.0.layer.1.EncDecAttention.k.weight");
        assert_eq!((r.resident[k], r.copied[k]), (0, 0));
    }
}
