//! Synthetic models and budgets for benches and tests.
//!
//! Every generator builds a real module tree through [`ModelBuilder`], the way the manifests in
//! `fixtures/models` describe checkpoints: modules with classes in registration order, then the
//! parameters in `named_parameters()` order, then the buffers. No weights exist; only shapes and dtypes.
//!
//! | generator | shape | tensors |
//! |---|---|---|
//! | [`dense`] | Llama: `model.embed_tokens`, `model.layers.N` (`DecoderLayer`, no-split), `model.norm`, `model.rotary_emb`, `lm_head` | `9 × layers + 4` |
//! | [`moe`] | Llama attention plus a router `mlp.gate` and one module per expert `mlp.experts.E.{gate,up,down}_proj` | `(7 + 3 × experts) × layers + 4` |
//! | [`encoder_decoder`] | T5: `shared`, `encoder.block.N` / `decoder.block.N` (`T5Block`, no-split), `lm_head`, a 4-way tied embedding | `8 × enc + 13 × dec + 8` |
//!
//! Tied names count in the tensor column (a tied `lm_head.weight` is still a tensor name) but their
//! storage is counted once. [`moe_170k`] is 48 layers × 1180 experts: `(7 + 3 × 1180) × 48 + 4 =
//! 170,260` tensors, about 181 GB in BF16.
//!
//! ```
//! use devmap_core::synthetic;
//! use devmap_core::{DType, SizeRules};
//!
//! let model = synthetic::dense(2, 64, 128, 1000, DType::F16, true);
//! assert_eq!(model.tensors().len(), 9 * 2 + 4);
//! assert_eq!(model.no_split_classes(), vec!["DecoderLayer".to_string()]);
//! let budgets = synthetic::gpu_budgets(2, 24, Some(64));
//! assert_eq!(budgets.len(), 3);
//! # let _ = model.total_bytes(SizeRules::default());
//! ```

use crate::budget::{Device, MemoryBudgets};
use crate::dtype::DType;
use crate::model::{Model, ModelBuilder};

const GIB: u64 = 1 << 30;

/// Number of layers of [`moe_170k`].
pub const MOE_170K_LAYERS: usize = 48;
/// Experts per layer of [`moe_170k`].
pub const MOE_170K_EXPERTS: usize = 1180;
/// Tensors of [`moe_170k`]: `(7 + 3 × 1180) × 48 + 4`.
pub const MOE_170K_TENSORS: usize = (7 + 3 * MOE_170K_EXPERTS) * MOE_170K_LAYERS + 4;

/// The head dimension used for the rotary `inv_freq` buffer and T5's relative attention bias.
const HEAD_DIM: u64 = 128;

fn build(builder: ModelBuilder) -> Model {
    builder
        .build()
        .expect("synthetic module and tensor tables are well formed")
}

/// Llama-style attention of one layer: modules, then parameters pushed to `params`.
fn attention(
    b: ModelBuilder,
    prefix: &str,
    hidden: u64,
    params: &mut Vec<(String, Vec<u64>)>,
) -> ModelBuilder {
    let mut b = b.module(format!("{prefix}.self_attn"), "Attention");
    for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        b = b.module(format!("{prefix}.self_attn.{p}"), "Linear");
        params.push((
            format!("{prefix}.self_attn.{p}.weight"),
            vec![hidden, hidden],
        ));
    }
    b
}

/// The tail shared by [`dense`] and [`moe`]: norms of a layer.
fn layer_norms(
    b: ModelBuilder,
    prefix: &str,
    hidden: u64,
    params: &mut Vec<(String, Vec<u64>)>,
) -> ModelBuilder {
    let mut b = b;
    for n in ["input_layernorm", "post_attention_layernorm"] {
        b = b.module(format!("{prefix}.{n}"), "RMSNorm");
        params.push((format!("{prefix}.{n}.weight"), vec![hidden]));
    }
    b
}

/// A decoder-only model: the embedding, then `layers` blocks produced by `layer`, then the final norm,
/// the rotary embedding (an F32 `inv_freq` buffer) and `lm_head` (tied to the embedding if `tied`).
fn decoder_only(
    name: String,
    layers: usize,
    hidden: u64,
    vocab: u64,
    dtype: DType,
    tied: bool,
    mut layer: impl FnMut(ModelBuilder, &str, &mut Vec<(String, Vec<u64>)>) -> ModelBuilder,
) -> Model {
    let mut params: Vec<(String, Vec<u64>)> = Vec::new();
    let mut b = ModelBuilder::new(name)
        .root_class("ForCausalLM")
        .module("model", "Model")
        .module("model.embed_tokens", "Embedding")
        .module("model.layers", "ModuleList");
    params.push(("model.embed_tokens.weight".into(), vec![vocab, hidden]));
    for i in 0..layers {
        let prefix = format!("model.layers.{i}");
        b = b.module(prefix.clone(), "DecoderLayer");
        b = layer(b, &prefix, &mut params);
    }
    b = b
        .module("model.norm", "RMSNorm")
        .module("model.rotary_emb", "RotaryEmbedding")
        .module("lm_head", "Linear");
    params.push(("model.norm.weight".into(), vec![hidden]));
    params.push(("lm_head.weight".into(), vec![vocab, hidden]));
    for (name, shape) in params {
        b = b.param(name, dtype, &shape);
    }
    b = b.buffer("model.rotary_emb.inv_freq", DType::F32, &[HEAD_DIM / 2]);
    if tied {
        b = b.tied(vec![
            "model.embed_tokens.weight".into(),
            "lm_head.weight".into(),
        ]);
    }
    build(
        b.no_split_classes(vec!["DecoderLayer".into()])
            .hidden_size(Some(hidden)),
    )
}

/// A Llama-shaped dense decoder.
///
/// Modules in registration order: `model.embed_tokens`; for each layer `model.layers.N` (class
/// `DecoderLayer`, the no-split class) with `self_attn.{q,k,v,o}_proj` (`[hidden, hidden]`, no
/// grouped-query attention), `mlp.{gate,up}_proj` (`[intermediate, hidden]`), `mlp.down_proj`
/// (`[hidden, intermediate]`), `mlp.act_fn` (no tensors), `input_layernorm` and
/// `post_attention_layernorm` (`[hidden]`); then `model.norm`, `model.rotary_emb` (an F32 buffer
/// `inv_freq` of 64 elements) and `lm_head` (`[vocab, hidden]`, tied to the embedding if `tied`).
///
/// Tensors: `9 × layers + 4`. Stored bytes (tied storage once):
/// `dtype × (vocab·hidden·(2 − tied) + layers·(4·hidden² + 3·hidden·intermediate + 2·hidden) + hidden) + 256`.
///
/// # Panics
/// If a tensor's byte size overflows `u64`.
pub fn dense(
    layers: usize,
    hidden: u64,
    intermediate: u64,
    vocab: u64,
    dtype: DType,
    tied: bool,
) -> Model {
    decoder_only(
        format!("synthetic/dense-{layers}x{hidden}"),
        layers,
        hidden,
        vocab,
        dtype,
        tied,
        |b, prefix, params| {
            let mut b = attention(b, prefix, hidden, params);
            b = b.module(format!("{prefix}.mlp"), "MLP");
            for (p, shape) in [
                ("gate_proj", [intermediate, hidden]),
                ("up_proj", [intermediate, hidden]),
                ("down_proj", [hidden, intermediate]),
            ] {
                b = b.module(format!("{prefix}.mlp.{p}"), "Linear");
                params.push((format!("{prefix}.mlp.{p}.weight"), shape.to_vec()));
            }
            b = b.module(format!("{prefix}.mlp.act_fn"), "SiLUActivation");
            layer_norms(b, prefix, hidden, params)
        },
    )
}

/// A mixture-of-experts decoder with one module per expert (the layout of transformers 4's Qwen2-MoE
/// and Mixtral, before experts were fused).
///
/// Each layer `model.layers.N` (class `DecoderLayer`, no-split) holds Llama attention, then
/// `mlp` (class `SparseMoeBlock`) with a router `mlp.gate` (`[experts, hidden]`) and
/// `mlp.experts.E.{gate,up}_proj` (`[expert_intermediate, hidden]`) and `mlp.experts.E.down_proj`
/// (`[hidden, expert_intermediate]`) for every expert, then the two layer norms. The rest is as in
/// [`dense`] with an untied `lm_head`.
///
/// Tensors: `(7 + 3 × experts) × layers + 4`.
///
/// # Panics
/// If a tensor's byte size overflows `u64`.
pub fn moe(
    layers: usize,
    experts: usize,
    hidden: u64,
    expert_intermediate: u64,
    vocab: u64,
    dtype: DType,
) -> Model {
    decoder_only(
        format!("synthetic/moe-{layers}x{experts}"),
        layers,
        hidden,
        vocab,
        dtype,
        false,
        |b, prefix, params| {
            let mut b = attention(b, prefix, hidden, params);
            b = b
                .module(format!("{prefix}.mlp"), "SparseMoeBlock")
                .module(format!("{prefix}.mlp.gate"), "Linear")
                .module(format!("{prefix}.mlp.experts"), "ModuleList");
            params.push((
                format!("{prefix}.mlp.gate.weight"),
                vec![experts as u64, hidden],
            ));
            for e in 0..experts {
                let ep = format!("{prefix}.mlp.experts.{e}");
                b = b.module(ep.clone(), "MLP");
                for (p, shape) in [
                    ("gate_proj", [expert_intermediate, hidden]),
                    ("up_proj", [expert_intermediate, hidden]),
                    ("down_proj", [hidden, expert_intermediate]),
                ] {
                    b = b.module(format!("{ep}.{p}"), "Linear");
                    params.push((format!("{ep}.{p}.weight"), shape.to_vec()));
                }
            }
            layer_norms(b, prefix, hidden, params)
        },
    )
}

/// The 170k-tensor MoE: `moe(48, 1180, 2048, 256, 151936, BF16)`.
///
/// [`MOE_170K_TENSORS`] = `(7 + 3 × 1180) × 48 + 4` = **170,260 tensors**; 48 no-split layers of
/// about 3.74 GB each (1180 experts × 3 × 2048 × 256 × 2 B plus 33.6 MB of attention), about
/// 181 GB (168 GiB) in all.
pub fn moe_170k() -> Model {
    moe(
        MOE_170K_LAYERS,
        MOE_170K_EXPERTS,
        2048,
        256,
        151_936,
        DType::BF16,
    )
}

/// An 80-layer Llama-70B-sized dense decoder: `dense(80, 8192, 28672, 128256, BF16, false)`
/// (full-width k/v projections, so about 160 GB rather than Llama-3-70B's 141 GB): 724 tensors.
pub fn dense_80() -> Model {
    dense(80, 8192, 28_672, 128_256, DType::BF16, false)
}

/// A T5-shaped encoder-decoder.
///
/// Modules: `shared` (`[vocab, hidden]`), `encoder` with `embed_tokens`, `block.N` (class `T5Block`,
/// the no-split class) each with `layer.0` self-attention (`SelfAttention.{q,k,v,o}`, `[hidden, hidden]`;
/// block 0 adds `relative_attention_bias`, `[32, hidden/128]`), `layer.0.layer_norm`, `layer.1`
/// feed-forward (`DenseReluDense.wi` `[ff, hidden]`, `wo` `[hidden, ff]`), `layer.1.layer_norm`, and
/// `final_layer_norm`; `decoder` likewise with a cross-attention `layer.1.EncDecAttention.{q,k,v,o}` and
/// the feed-forward in `layer.2`; then `lm_head`. `shared.weight`, `encoder.embed_tokens.weight`,
/// `decoder.embed_tokens.weight` and `lm_head.weight` are one storage (a 4-way tied group).
///
/// Tensors: `8 × enc_layers + 13 × dec_layers + 8` when both stacks have at least one block (the `8`
/// counts the six embeddings, final norms and head plus one relative attention bias per stack).
///
/// # Panics
/// If a tensor's byte size overflows `u64`.
pub fn encoder_decoder(
    enc_layers: usize,
    dec_layers: usize,
    hidden: u64,
    ff: u64,
    vocab: u64,
    dtype: DType,
) -> Model {
    let heads = (hidden / HEAD_DIM).max(1);
    let mut params: Vec<(String, Vec<u64>)> = Vec::new();
    let mut b = ModelBuilder::new(format!(
        "synthetic/encoder-decoder-{enc_layers}+{dec_layers}x{hidden}"
    ))
    .root_class("T5ForConditionalGeneration")
    .module("shared", "Embedding");
    params.push(("shared.weight".into(), vec![vocab, hidden]));
    for (stack, layers) in [("encoder", enc_layers), ("decoder", dec_layers)] {
        b = b
            .module(stack, "T5Stack")
            .module(format!("{stack}.embed_tokens"), "Embedding")
            .module(format!("{stack}.block"), "ModuleList");
        params.push((format!("{stack}.embed_tokens.weight"), vec![vocab, hidden]));
        for i in 0..layers {
            let blk = format!("{stack}.block.{i}");
            b = b
                .module(blk.clone(), "T5Block")
                .module(format!("{blk}.layer"), "ModuleList");
            let mut attn: Vec<(String, &str)> = vec![(format!("{blk}.layer.0"), "SelfAttention")];
            if stack == "decoder" {
                attn.push((format!("{blk}.layer.1"), "EncDecAttention"));
            }
            for (n, (layer, attr)) in attn.iter().enumerate() {
                let class = if *attr == "SelfAttention" {
                    "T5LayerSelfAttention"
                } else {
                    "T5LayerCrossAttention"
                };
                b = b
                    .module(layer.clone(), class)
                    .module(format!("{layer}.{attr}"), "T5Attention");
                for p in ["q", "k", "v", "o"] {
                    b = b.module(format!("{layer}.{attr}.{p}"), "Linear");
                    params.push((format!("{layer}.{attr}.{p}.weight"), vec![hidden, hidden]));
                }
                if n == 0 && i == 0 {
                    b = b.module(
                        format!("{layer}.{attr}.relative_attention_bias"),
                        "Embedding",
                    );
                    params.push((
                        format!("{layer}.{attr}.relative_attention_bias.weight"),
                        vec![32, heads],
                    ));
                }
                b = b
                    .module(format!("{layer}.layer_norm"), "T5LayerNorm")
                    .module(format!("{layer}.dropout"), "Dropout");
                params.push((format!("{layer}.layer_norm.weight"), vec![hidden]));
            }
            let ffl = format!("{blk}.layer.{}", attn.len());
            b = b
                .module(ffl.clone(), "T5LayerFF")
                .module(format!("{ffl}.DenseReluDense"), "T5DenseActDense")
                .module(format!("{ffl}.DenseReluDense.wi"), "Linear")
                .module(format!("{ffl}.DenseReluDense.wo"), "Linear")
                .module(format!("{ffl}.DenseReluDense.dropout"), "Dropout")
                .module(format!("{ffl}.DenseReluDense.act"), "ReLU")
                .module(format!("{ffl}.layer_norm"), "T5LayerNorm")
                .module(format!("{ffl}.dropout"), "Dropout");
            params.push((format!("{ffl}.DenseReluDense.wi.weight"), vec![ff, hidden]));
            params.push((format!("{ffl}.DenseReluDense.wo.weight"), vec![hidden, ff]));
            params.push((format!("{ffl}.layer_norm.weight"), vec![hidden]));
        }
        b = b
            .module(format!("{stack}.final_layer_norm"), "T5LayerNorm")
            .module(format!("{stack}.dropout"), "Dropout");
        params.push((format!("{stack}.final_layer_norm.weight"), vec![hidden]));
    }
    b = b.module("lm_head", "Linear");
    params.push(("lm_head.weight".into(), vec![vocab, hidden]));
    for (name, shape) in params {
        b = b.param(name, dtype, &shape);
    }
    build(
        b.tied(vec![
            "shared.weight".into(),
            "encoder.embed_tokens.weight".into(),
            "decoder.embed_tokens.weight".into(),
            "lm_head.weight".into(),
        ])
        .no_split_classes(vec!["T5Block".into()])
        .hidden_size(Some(hidden)),
    )
}

/// `n_gpus` GPUs of `gib_each` GiB each, plus `cpu_gib` GiB of host RAM when given.
pub fn gpu_budgets(n_gpus: u32, gib_each: u64, cpu_gib: Option<u64>) -> MemoryBudgets {
    let gpus: Vec<u64> = vec![gib_each; n_gpus as usize];
    hetero(&gpus, cpu_gib, None)
}

/// GPUs `0..` with the given sizes in GiB, plus optional cpu and disk budgets in GiB.
pub fn hetero(gpu_gib: &[u64], cpu_gib: Option<u64>, disk_gib: Option<u64>) -> MemoryBudgets {
    let mut pairs: Vec<(Device, u64)> = gpu_gib
        .iter()
        .enumerate()
        .map(|(i, g)| (Device::Gpu(i as u32), g.saturating_mul(GIB)))
        .collect();
    if let Some(c) = cpu_gib {
        pairs.push((Device::Cpu, c.saturating_mul(GIB)));
    }
    if let Some(d) = disk_gib {
        pairs.push((Device::Disk, d.saturating_mul(GIB)));
    }
    MemoryBudgets::new(pairs).expect("devices are distinct by construction")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Node, SizeRules, TensorKind};
    use crate::{validate, DeviceMap};

    fn module_id(m: &Model, name: &str) -> usize {
        match m.node(name).unwrap() {
            Node::Module(i) => i,
            Node::Tensor(_) => panic!("{name} is a tensor"),
        }
    }

    #[test]
    fn dense_counts_bytes_and_order() {
        let m = dense(2, 8, 16, 10, DType::F16, false);
        assert_eq!(m.tensors().len(), 9 * 2 + 4);
        // embed 80 + lm_head 80 + per layer (4·64 + 3·128 + 2·8 = 656) + norm 8, at 2 B; inv_freq 64 × 4 B.
        let by_hand = 2 * (80 + 80 + 2 * 656 + 8) + 64 * 4;
        assert_eq!(m.total_bytes(SizeRules::default()), by_hand);
        assert_eq!(m.tensors()[0].name, "model.embed_tokens.weight");
        assert_eq!(
            m.tensors()[1].name,
            "model.layers.0.self_attn.q_proj.weight"
        );
        let last = m.tensors().last().unwrap();
        assert_eq!(last.name, "model.rotary_emb.inv_freq");
        assert_eq!((last.kind, last.dtype), (TensorKind::Buffer, DType::F32));
        assert_eq!(m.hidden_size, Some(8));
        assert_eq!(m.no_split_classes(), vec!["DecoderLayer".to_string()]);
        assert!(m.module(module_id(&m, "model.layers.1")).no_split);
        assert!(!m.module(module_id(&m, "model.layers.1.mlp")).no_split);
        let top: Vec<&str> = m
            .module(module_id(&m, "model"))
            .children
            .iter()
            .map(|&c| m.module(c).name.as_str())
            .collect();
        assert_eq!(
            top,
            [
                "model.embed_tokens",
                "model.layers",
                "model.norm",
                "model.rotary_emb"
            ]
        );
        let layer: Vec<&str> = m
            .module(module_id(&m, "model.layers.0"))
            .children
            .iter()
            .map(|&c| m.module(c).name.as_str())
            .collect();
        assert_eq!(
            layer,
            [
                "model.layers.0.self_attn",
                "model.layers.0.mlp",
                "model.layers.0.input_layernorm",
                "model.layers.0.post_attention_layernorm"
            ]
        );
    }

    #[test]
    fn dense_tied_counts_the_embedding_once() {
        let untied = dense(2, 8, 16, 10, DType::F16, false);
        let tied = dense(2, 8, 16, 10, DType::F16, true);
        assert_eq!(tied.tensors().len(), untied.tensors().len());
        assert_eq!(
            untied.total_bytes(SizeRules::default()) - tied.total_bytes(SizeRules::default()),
            80 * 2
        );
        assert_eq!(tied.tied_groups().len(), 1);
        let Some(Node::Tensor(head)) = tied.node("lm_head.weight") else {
            panic!()
        };
        assert!(tied.is_tied_duplicate(head));
        // A map putting both names on one GPU is valid and charges the storage once.
        let mut map = DeviceMap::new();
        map.insert("", Device::Gpu(0));
        let report = validate(&tied, &map, None, SizeRules::default());
        assert!(report.is_valid());
        assert_eq!(
            report.usage[&Device::Gpu(0)],
            tied.total_bytes(SizeRules::default())
        );
    }

    #[test]
    fn moe_counts_and_layout() {
        let m = moe(3, 5, 8, 4, 10, DType::BF16);
        assert_eq!(m.tensors().len(), (7 + 3 * 5) * 3 + 4);
        // Per layer: attention 4·64, router 5·8, experts 5·3·32, norms 2·8 → 256+40+480+16 = 792.
        let by_hand = 2 * (80 + 80 + 3 * 792 + 8) + 64 * 4;
        assert_eq!(m.total_bytes(SizeRules::default()), by_hand);
        assert!(m
            .node("model.layers.2.mlp.experts.4.down_proj.weight")
            .is_some());
        assert!(m.node("model.layers.0.mlp.gate.weight").is_some());
        let experts = m.module(module_id(&m, "model.layers.1.mlp.experts"));
        assert_eq!(experts.children.len(), 5);
        assert_eq!(m.no_split_classes(), vec!["DecoderLayer".to_string()]);
        assert!(m.tied_groups().is_empty());
    }

    #[test]
    fn moe_170k_has_the_documented_count() {
        assert_eq!(MOE_170K_TENSORS, 170_260);
        // The generator's formula, checked on a smaller model to keep the test fast in debug builds.
        let m = moe(4, MOE_170K_EXPERTS, 16, 8, 100, DType::BF16);
        assert_eq!(m.tensors().len(), (7 + 3 * MOE_170K_EXPERTS) * 4 + 4);
    }

    #[test]
    fn encoder_decoder_ties_four_names() {
        let m = encoder_decoder(2, 3, 128, 256, 100, DType::BF16);
        assert_eq!(m.tensors().len(), 8 * 2 + 13 * 3 + 8);
        assert_eq!(m.tied_groups().len(), 1);
        assert_eq!(m.tied_groups()[0].len(), 4);
        let Some(Node::Tensor(shared)) = m.node("shared.weight") else {
            panic!()
        };
        assert!(!m.is_tied_duplicate(shared));
        for n in [
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
            "lm_head.weight",
        ] {
            let Some(Node::Tensor(t)) = m.node(n) else {
                panic!("{n}")
            };
            assert!(m.is_tied_duplicate(t), "{n}");
        }
        // Embedding once (100·128); encoder blocks 4·128² + 2·128·256 + 2·128, decoder blocks
        // 8·128² + 2·128·256 + 3·128; one relative bias (32·1) per stack; two final norms.
        let enc = 4 * 128 * 128 + 2 * 128 * 256 + 2 * 128;
        let dec = 8 * 128 * 128 + 2 * 128 * 256 + 3 * 128;
        let elements = 100 * 128 + 2 * enc + 3 * dec + 2 * 32 + 2 * 128;
        assert_eq!(m.total_bytes(SizeRules::default()), 2 * elements);
        assert_eq!(m.no_split_classes(), vec!["T5Block".to_string()]);
        assert!(m.module(module_id(&m, "decoder.block.2")).no_split);
        assert!(m
            .node("decoder.block.1.layer.1.EncDecAttention.q.weight")
            .is_some());
        assert!(m
            .node("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
            .is_some());
        assert!(m
            .node("decoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight")
            .is_none());
        assert_eq!(m.hidden_size, Some(128));
    }

    #[test]
    fn budgets() {
        let b = gpu_budgets(2, 24, Some(64));
        assert_eq!(
            b.devices(),
            vec![Device::Gpu(0), Device::Gpu(1), Device::Cpu]
        );
        assert_eq!(b.get(Device::Gpu(1)), Some(24 * GIB));
        assert_eq!(b.get(Device::Cpu), Some(64 * GIB));
        assert_eq!(gpu_budgets(4, 80, None).len(), 4);
        let h = hetero(&[80, 24], None, Some(1024));
        assert_eq!(
            h.devices(),
            vec![Device::Gpu(0), Device::Gpu(1), Device::Disk]
        );
        assert_eq!(h.get(Device::Disk), Some(1024 * GIB));
    }
}
