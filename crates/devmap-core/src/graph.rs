//! The model as a petgraph DAG: containment edges parent → child between modules, and data-flow
//! edges between placement units ([`Flow`]s, [`flows`]).
//!
//! A placement unit is a no-split module, or, outside no-split modules, a module's direct tensors
//! (a `Linear` with its bias). Units are what strategies move between devices.
//!
//! Data flow, detected from module names and classes (docs/strategies.md, "Transfers along the
//! DAG"):
//! - the residual stream between consecutive units of a stack (registration order);
//! - encoder-decoders (a module `encoder` with a sibling `decoder`): the encoder's last unit feeds
//!   every decoder unit holding a cross-attention module (`cross_attn`, `encoder_attn`,
//!   `EncDecAttention`, `crossattention`, or a class with `CrossAttention`), and not the decoder's
//!   first unit (which reads token ids);
//! - vision-language models (a `vision_tower` / `vision_model` / `visual` module and an optional
//!   `multi_modal_projector` / `mm_projector`): tower → projector → the first language-model unit
//!   after them, while the language model's own residual stream skips the tower;
//! - tied weights: between the units holding the names of one storage.
//!
//! Per decode step only the decoder's residual stream and the encoder output cross their edges
//! (accelerate's hooks send every input, `encoder_hidden_states` included, to the device of each
//! layer on every call); the encoder's and the vision tower's flows happen at prefill, and a tied
//! storage is copied once at load (the memory model charges the copy).

use petgraph::graph::{DiGraph, NodeIndex};

use crate::dtype::DType;
use crate::model::{Model, ModuleId, TensorId};

/// A placement unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// The module the unit belongs to.
    pub module: ModuleId,
    /// Whether the unit is the whole subtree of `module` (a no-split block or a childless module),
    /// as opposed to only its direct tensors.
    pub whole: bool,
    /// The tensors in the unit.
    pub tensors: Vec<TensorId>,
}

/// An edge of the model graph.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Edge {
    /// Parent module contains child module.
    Contains,
    /// Activations (or a tied storage) flow from one unit to another.
    DataFlow {
        /// Bytes of activation per token crossing the edge (hidden size × activation dtype bytes).
        bytes_per_token: u64,
        /// What flows.
        kind: FlowKind,
    },
}

/// What a data-flow edge carries, which decides how often it crosses per decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowKind {
    /// The residual stream between consecutive units of the decoding stack: one token per step.
    Residual,
    /// An encoder's output to a decoder unit with cross-attention: the whole encoded sequence on
    /// every step (accelerate's hook sends `encoder_hidden_states` to the layer's device).
    EncoderOutput,
    /// A flow that happens only at prefill (inside an encoder or a vision tower, the image
    /// features into the language model): nothing per decode step.
    Prefill,
    /// Units holding names of one tied storage: copied once at load (a memory charge), nothing
    /// per decode step.
    Tied,
}

/// A data-flow edge between two placement units (indices into [`units`]' order, `from < to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// The upstream unit.
    pub from: usize,
    /// The downstream unit.
    pub to: usize,
    /// What flows.
    pub kind: FlowKind,
}

impl Flow {
    /// Tokens of activation crossing the edge per decode step, or `None` when nothing crosses it
    /// per step (prefill and tied flows). `encoder_tokens` is the encoded sequence length.
    pub fn tokens_per_step(&self, encoder_tokens: u64) -> Option<u64> {
        match self.kind {
            FlowKind::Residual => Some(1),
            FlowKind::EncoderOutput => Some(encoder_tokens),
            FlowKind::Prefill | FlowKind::Tied => None,
        }
    }
}

/// Which part of the model a unit belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// The decoding stack and everything else.
    Main,
    /// The encoder of an encoder-decoder.
    Encoder,
    /// A vision tower or its projector.
    Vision,
}

/// Last component of a dotted module name.
fn leaf(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// Module names of cross-attention blocks (T5, BART/Whisper, BLIP/BERT-generation, mllama).
const CROSS_ATTENTION: [&str; 5] = [
    "EncDecAttention",
    "encoder_attn",
    "cross_attn",
    "crossattention",
    "cross_attention",
];
/// Module names of vision towers and multimodal projectors.
const VISION: [&str; 7] = [
    "vision_tower",
    "vision_model",
    "visual",
    "vision_encoder",
    "multi_modal_projector",
    "mm_projector",
    "vision_projection",
];

/// The encoder of an encoder-decoder: a module named `encoder` with a sibling named `decoder`.
fn encoder_module(model: &Model) -> Option<ModuleId> {
    let mods = model.modules();
    // The name test first: scanning every module's siblings is quadratic in wide modules (an
    // MoE layer's experts).
    mods.iter().enumerate().find_map(|(id, m)| {
        let parent = m.parent.filter(|_| leaf(&m.name) == "encoder")?;
        let has_decoder = (mods[parent].children.iter()).any(|&c| leaf(&mods[c].name) == "decoder");
        has_decoder.then_some(id)
    })
}

/// The part of each unit (see [`Part`]).
fn parts(model: &Model, units: &[Unit]) -> Vec<Part> {
    let encoder = encoder_module(model);
    units
        .iter()
        .map(|u| {
            if encoder.is_some_and(|e| model.is_within(u.module, e)) {
                Part::Encoder
            } else if in_vision(model, u.module) {
                Part::Vision
            } else {
                Part::Main
            }
        })
        .collect()
}

/// Whether `module` or one of its ancestors is a vision tower or projector (walking up the unit's
/// ancestors, not scanning every module of the model: MoE models have tens of thousands).
fn in_vision(model: &Model, module: ModuleId) -> bool {
    let mut at = Some(module);
    while let Some(id) = at {
        let m = model.module(id);
        if VISION.contains(&leaf(&m.name)) {
            return true;
        }
        at = m.parent;
    }
    false
}

/// Whether a unit holds a cross-attention module (its own module, or one below a whole unit).
fn has_cross_attention(model: &Model, unit: &Unit) -> bool {
    let is_cross = |id: ModuleId| {
        let m = model.module(id);
        CROSS_ATTENTION.contains(&leaf(&m.name)) || m.class.contains("CrossAttention")
    };
    if !unit.whole {
        return is_cross(unit.module);
    }
    let mut stack = vec![unit.module];
    while let Some(id) = stack.pop() {
        if is_cross(id) {
            return true;
        }
        stack.extend(&model.module(id).children);
    }
    false
}

/// Chain `members` (unit indices, ascending) with edges of `kind`.
fn chain(members: &[usize], kind: FlowKind, out: &mut Vec<Flow>) {
    out.extend(members.windows(2).map(|w| Flow {
        from: w[0],
        to: w[1],
        kind,
    }));
}

/// The data-flow edges between `units` (the model's units in execution order), as the module doc
/// describes: residual chains per part, encoder output to cross-attention, vision features into
/// the language model, tied storages. A model without an encoder-decoder or a vision tower is a
/// chain of residual edges.
pub fn flows(model: &Model, units: &[Unit]) -> Vec<Flow> {
    let parts = parts(model, units);
    let of = |p: Part| -> Vec<usize> { (0..units.len()).filter(|&i| parts[i] == p).collect() };
    let (main, encoder, vision) = (of(Part::Main), of(Part::Encoder), of(Part::Vision));
    let mut out = Vec::new();
    chain(&main, FlowKind::Residual, &mut out);
    chain(&encoder, FlowKind::Prefill, &mut out);
    chain(&vision, FlowKind::Prefill, &mut out);
    if let Some(&last) = encoder.last() {
        let cross = main
            .iter()
            .filter(|&&i| i > last && has_cross_attention(model, &units[i]));
        out.extend(cross.map(|&i| Flow {
            from: last,
            to: i,
            kind: FlowKind::EncoderOutput,
        }));
    }
    // The image features enter the language model at its first unit after the tower.
    if let Some(&last) = vision.last() {
        if let Some(&next) = main.iter().find(|&&i| i > last) {
            out.push(Flow {
                from: last,
                to: next,
                kind: FlowKind::Prefill,
            });
        }
    }
    out.extend(tied_flows(model, units));
    out.sort_by_key(|f| (f.to, f.from));
    out
}

/// Per tensor of `model`, the index of the unit of `units` holding it (`usize::MAX`: none).
pub fn unit_of_tensor(model: &Model, units: &[Unit]) -> Vec<usize> {
    let mut unit_of = vec![usize::MAX; model.tensors().len()];
    for (i, u) in units.iter().enumerate() {
        for &t in &u.tensors {
            unit_of[t] = i;
        }
    }
    unit_of
}

/// One [`FlowKind::Tied`] edge from the first unit holding a name of a tied storage to each other.
fn tied_flows(model: &Model, units: &[Unit]) -> Vec<Flow> {
    let unit_of = unit_of_tensor(model, units);
    let mut out = Vec::new();
    for group in model.tied_groups() {
        let mut holders: Vec<usize> = group
            .iter()
            .map(|&t| unit_of[t])
            .filter(|&u| u != usize::MAX)
            .collect();
        holders.sort_unstable();
        holders.dedup();
        out.extend(holders.iter().skip(1).map(|&to| Flow {
            from: holders[0],
            to,
            kind: FlowKind::Tied,
        }));
    }
    out
}

/// The module DAG with its units.
#[derive(Debug, Clone)]
pub struct ModelGraph {
    /// Nodes are module ids; edges are [`Edge`]s.
    pub graph: DiGraph<ModuleId, Edge>,
    /// Node of each module (indexed by module id).
    pub nodes: Vec<NodeIndex>,
    /// Placement units in execution order.
    pub units: Vec<Unit>,
    /// Data-flow edges between units ([`flows`]).
    pub flows: Vec<Flow>,
}

/// Split the model into placement units, in execution order.
pub fn units(model: &Model) -> Vec<Unit> {
    fn collect(model: &Model, id: ModuleId, out: &mut Vec<Unit>) {
        let m = model.module(id);
        if m.no_split || m.children.is_empty() {
            let mut tensors = Vec::new();
            let mut stack = vec![id];
            while let Some(x) = stack.pop() {
                let mm = model.module(x);
                tensors.extend(mm.params.iter().chain(&mm.buffers));
                stack.extend(mm.children.iter().rev());
            }
            if !tensors.is_empty() {
                tensors.sort_unstable();
                out.push(Unit {
                    module: id,
                    whole: true,
                    tensors,
                });
            }
            return;
        }
        let direct: Vec<TensorId> = m.params.iter().chain(&m.buffers).copied().collect();
        if !direct.is_empty() {
            out.push(Unit {
                module: id,
                whole: false,
                tensors: direct,
            });
        }
        for &c in &m.children {
            collect(model, c, out);
        }
    }
    let mut out = Vec::new();
    collect(model, 0, &mut out);
    out
}

/// The modules of a whole unit that hold direct tensors, each as a unit of its own, in execution
/// (module) order: the granularity accelerate streams a block at (one hook per module with direct
/// tensors), and the one `auto` may split a no-split block at between the main GPU and cpu/disk.
/// A childless module is a whole unit; a module with children contributes its direct tensors. A unit
/// that is already one module's direct tensors (not `whole`) is returned as it is.
pub fn module_units(model: &Model, unit: &Unit) -> Vec<Unit> {
    if !unit.whole {
        return vec![unit.clone()];
    }
    let mut out = Vec::new();
    let mut stack = vec![unit.module];
    while let Some(id) = stack.pop() {
        let m = model.module(id);
        let mut tensors: Vec<TensorId> = m.params.iter().chain(&m.buffers).copied().collect();
        if !tensors.is_empty() {
            tensors.sort_unstable();
            out.push(Unit {
                module: id,
                whole: m.children.is_empty(),
                tensors,
            });
        }
        stack.extend(m.children.iter().rev());
    }
    out
}

impl ModelGraph {
    /// Build the graph; `activation` is the dtype of activations (defaults to the model's first float dtype).
    pub fn build(model: &Model, activation: Option<DType>) -> ModelGraph {
        let mut graph = DiGraph::with_capacity(model.modules().len(), model.modules().len() * 2);
        let nodes: Vec<NodeIndex> = (0..model.modules().len())
            .map(|id| graph.add_node(id))
            .collect();
        for (id, m) in model.modules().iter().enumerate() {
            for &c in &m.children {
                graph.add_edge(nodes[id], nodes[c], Edge::Contains);
            }
        }
        let act = activation
            .or_else(|| model.float_dtype())
            .unwrap_or(DType::F16);
        // Saturating: `hidden_size` comes from a manifest or config.json.
        let bytes_per_token = model
            .hidden_size
            .unwrap_or(0)
            .saturating_mul(act.size_bytes());
        let units = units(model);
        let flows = flows(model, &units);
        for &flow in &flows {
            let (a, b) = (units[flow.from].module, units[flow.to].module);
            if a != b {
                graph.add_edge(
                    nodes[a],
                    nodes[b],
                    Edge::DataFlow {
                        bytes_per_token,
                        kind: flow.kind,
                    },
                );
            }
        }
        ModelGraph {
            graph,
            nodes,
            units,
            flows,
        }
    }

    /// Whether the graph (containment plus data flow) is acyclic.
    pub fn is_acyclic(&self) -> bool {
        !petgraph::algo::is_cyclic_directed(&self.graph)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelBuilder;

    #[test]
    fn module_units_are_a_blocks_modules_with_direct_tensors() {
        let m = ModelBuilder::new("t")
            .module("layers.0", "Block")
            .module("layers.0.attn", "Attention")
            .module("layers.0.attn.q", "Linear")
            .module("layers.0.attn.k", "Linear")
            .module("layers.0.mlp", "Linear")
            .param("layers.0.scale", DType::F16, &[2])
            .param("layers.0.attn.q.weight", DType::F16, &[2, 2])
            .param("layers.0.attn.q.bias", DType::F16, &[2])
            .param("layers.0.attn.k.weight", DType::F16, &[2, 2])
            .param("layers.0.mlp.weight", DType::F16, &[2, 2])
            .no_split_classes(vec!["Block".into()])
            .build()
            .unwrap();
        let block = &units(&m)[0];
        let parts = module_units(&m, block);
        let named: Vec<(&str, bool, usize)> = (parts.iter())
            .map(|u| (m.module(u.module).name.as_str(), u.whole, u.tensors.len()))
            .collect();
        // `attn` holds no tensor of its own; the block's direct `scale` is a part, not whole.
        assert_eq!(
            named,
            [
                ("layers.0", false, 1),
                ("layers.0.attn.q", true, 2),
                ("layers.0.attn.k", true, 1),
                ("layers.0.mlp", true, 1)
            ]
        );
        let mut all: Vec<TensorId> = parts.iter().flat_map(|u| u.tensors.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, block.tensors);
        assert_eq!(module_units(&m, &parts[0]), vec![parts[0].clone()]);
    }

    #[test]
    fn units_follow_no_split_and_leaves() {
        let m = ModelBuilder::new("t")
            .module("embed", "Embedding")
            .module("layers", "ModuleList")
            .module("layers.0", "Block")
            .module("layers.0.a", "Linear")
            .module("layers.1", "Block")
            .module("layers.1.a", "Linear")
            .module("head", "Linear")
            .param("embed.weight", DType::F16, &[4, 2])
            .param("layers.0.a.weight", DType::F16, &[2, 2])
            .param("layers.0.scale", DType::F16, &[2])
            .param("layers.1.a.weight", DType::F16, &[2, 2])
            .param("layers.1.scale", DType::F16, &[2])
            .param("head.weight", DType::F16, &[4, 2])
            .no_split_classes(vec!["Block".into()])
            .hidden_size(Some(2))
            .build()
            .unwrap();
        let g = ModelGraph::build(&m, None);
        let names: Vec<&str> = g
            .units
            .iter()
            .map(|u| m.module(u.module).name.as_str())
            .collect();
        assert_eq!(names, vec!["embed", "layers.0", "layers.1", "head"]);
        assert_eq!(g.units[1].tensors.len(), 2);
        assert!(g.is_acyclic());
        let flows = g
            .graph
            .edge_weights()
            .filter(|e| {
                matches!(
                    e,
                    Edge::DataFlow {
                        bytes_per_token: 4,
                        kind: FlowKind::Residual
                    }
                )
            })
            .count();
        assert_eq!(flows, 3);
    }
}
