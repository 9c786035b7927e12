//! The model: a tree of modules holding tensors, as PyTorch registers them.
//!
//! Ids are indexes: module 0 is the root (`""`), a parent always has a smaller id than its children,
//! and children, direct parameters and direct buffers keep registration order. That order is what
//! Hugging Face's planner walks, so parity depends on it.

use std::collections::HashSet;

use std::hash::BuildHasher;

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;
use std::path::PathBuf;

use crate::config::ModelConfig;
use crate::dtype::{element_count, DType};
use crate::error::{Error, Result};

/// Index of a module in [`Model::modules`].
pub type ModuleId = usize;
/// Index of a tensor in [`Model::tensors`].
pub type TensorId = usize;

/// Whether a tensor is a parameter or a buffer (buffers are re-listed differently when HF splits a module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorKind {
    /// `nn.Parameter`.
    Param,
    /// A registered buffer (persistent or not).
    Buffer,
}

/// Where a tensor's bytes are in a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSource {
    /// The file.
    pub file: PathBuf,
    /// Absolute byte range of the data inside the file.
    pub byte_range: std::ops::Range<u64>,
}

/// One tensor of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Full dotted name (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// Stored element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Number of elements.
    pub numel: u64,
    /// Parameter or buffer.
    pub kind: TensorKind,
    /// The module that owns it directly.
    pub module: ModuleId,
    /// Where its bytes are, when the model was read from safetensors.
    pub source: Option<TensorSource>,
    /// Built on load from several checkpoint tensors (transformers 5's fused MoE experts, which
    /// it stacks from per-expert tensors on the target device): see
    /// [`crate::memory::conversion_fragmentation`].
    pub converted: bool,
}

impl Tensor {
    /// Stored size in bytes.
    pub fn stored_bytes(&self) -> u64 {
        self.numel.saturating_mul(self.dtype.size_bytes())
    }

    /// Size under `rules`: floats at `min(target, own)` bytes per element, integers and bools at
    /// their own size, bool at 1/8 byte (rounded up) when `bool_as_bits`.
    pub fn bytes(&self, rules: SizeRules) -> u64 {
        let own = self.dtype.size_bytes();
        if self.dtype == DType::Bool && rules.bool_as_bits {
            return self.numel.div_ceil(8);
        }
        let per = match rules.target_dtype {
            Some(target) if self.dtype.is_float() => own.min(target.size_bytes()),
            _ => own,
        };
        self.numel.saturating_mul(per)
    }
}

/// One module (`nn.Module`) of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Module {
    /// Full dotted name; `""` for the root.
    pub name: String,
    /// Class name (`LlamaDecoderLayer`); derived models use a pattern such as `model.layers.*`.
    pub class: String,
    /// Parent module (`None` for the root).
    pub parent: Option<ModuleId>,
    /// Child modules in registration order.
    pub children: Vec<ModuleId>,
    /// Direct parameters in registration order.
    pub params: Vec<TensorId>,
    /// Direct buffers in registration order.
    pub buffers: Vec<TensorId>,
    /// Whether the module must stay on one device.
    pub no_split: bool,
}

/// A name in the model: a module or a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Node {
    /// A module.
    Module(ModuleId),
    /// A tensor.
    Tensor(TensorId),
}

/// How tensor sizes are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SizeRules {
    /// Target dtype: floating tensors are counted at `min(target, own)` size (never upcast);
    /// integer and bool tensors keep their own size (Hugging Face's rule).
    pub target_dtype: Option<DType>,
    /// Count bool at 1/8 byte per element, rounded up (accelerate's `dtype_byte_size`).
    pub bool_as_bits: bool,
}

/// A model's module tree and tensor table.
#[derive(Debug, Clone)]
pub struct Model {
    /// A display name (repository id or file name).
    pub name: String,
    modules: Vec<Module>,
    tensors: Vec<Tensor>,
    tied: Vec<Vec<TensorId>>,
    tied_duplicate: Vec<bool>,
    tied_target: Vec<bool>,
    non_persistent: Vec<bool>,
    /// Every module and tensor, hashed by its name (see [`Model::node`]).
    by_name: HashTable<Node>,
    /// Width of the activations passed between blocks, when known.
    pub hidden_size: Option<u64>,
    /// The model's `config.json`, when one was found.
    pub config: Option<ModelConfig>,
    /// Its quantization (config.json's `quantization_config`, or one given to quantize on load).
    pub quantization: Option<crate::quant::Quantization>,
    /// Module facts quantizers need (from a manifest; defaults otherwise).
    pub quant_meta: crate::quant::QuantMeta,
}

/// A tensor as described by a manifest or a safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Full name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Parameter or buffer.
    pub kind: TensorKind,
    /// Location in a file, if any.
    pub source: Option<TensorSource>,
    /// Built on load from several checkpoint tensors (see [`Tensor::converted`]).
    pub converted: bool,
}

/// Builds a [`Model`] from flat tables, creating missing intermediate modules on the way.
#[derive(Debug, Clone, Default)]
pub struct ModelBuilder {
    name: String,
    root_class: String,
    modules: Vec<(String, String)>,
    tensors: Vec<TensorSpec>,
    tied: Vec<Vec<String>>,
    tied_targets: Vec<String>,
    non_persistent: Vec<String>,
    no_split_classes: Vec<String>,
    hidden_size: Option<u64>,
    config: Option<ModelConfig>,
}

impl ModelBuilder {
    /// Start a model called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        ModelBuilder {
            name: name.into(),
            ..Default::default()
        }
    }
    /// Room for `modules` more modules and `tensors` more tensors (a caller that knows its table
    /// sizes spares the builder's vectors their growth copies).
    pub fn reserve(mut self, modules: usize, tensors: usize) -> Self {
        self.modules.reserve(modules);
        self.tensors.reserve(tensors);
        self
    }
    /// Class of the root module.
    pub fn root_class(mut self, class: impl Into<String>) -> Self {
        self.root_class = class.into();
        self
    }
    /// Declare a module (registration order matters).
    pub fn module(mut self, name: impl Into<String>, class: impl Into<String>) -> Self {
        self.modules.push((name.into(), class.into()));
        self
    }
    /// Add a tensor (registration order matters).
    pub fn tensor(mut self, spec: TensorSpec) -> Self {
        self.tensors.push(spec);
        self
    }
    /// Add a parameter without a source file.
    pub fn param(self, name: impl Into<String>, dtype: DType, shape: &[u64]) -> Self {
        self.tensor(TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            kind: TensorKind::Param,
            source: None,
            converted: false,
        })
    }
    /// Add a buffer without a source file.
    pub fn buffer(self, name: impl Into<String>, dtype: DType, shape: &[u64]) -> Self {
        self.tensor(TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            kind: TensorKind::Buffer,
            source: None,
            converted: false,
        })
    }
    /// Declare a group of tensor names sharing one storage.
    pub fn tied(mut self, group: Vec<String>) -> Self {
        self.tied.push(group);
        self
    }
    /// Names transformers treats as tie targets (see [`Model::is_tied_target`]).
    pub fn tied_targets(mut self, names: Vec<String>) -> Self {
        self.tied_targets = names;
        self
    }
    /// Buffers outside the state dict (see [`Model::is_non_persistent`]).
    pub fn non_persistent(mut self, names: Vec<String>) -> Self {
        self.non_persistent = names;
        self
    }
    /// Module classes that must not be split.
    pub fn no_split_classes(mut self, classes: Vec<String>) -> Self {
        self.no_split_classes = classes;
        self
    }
    /// Activation width.
    pub fn hidden_size(mut self, hidden: Option<u64>) -> Self {
        self.hidden_size = hidden;
        self
    }
    /// Attach a config.json.
    pub fn config(mut self, config: Option<ModelConfig>) -> Self {
        self.config = config;
        self
    }

    /// Check the tables and build the tree.
    pub fn build(self) -> Result<Model> {
        let mut model = Model {
            name: self.name,
            modules: Vec::with_capacity(self.modules.len() + 1),
            tensors: Vec::with_capacity(self.tensors.len()),
            tied: Vec::new(),
            tied_duplicate: Vec::new(),
            tied_target: Vec::new(),
            non_persistent: Vec::new(),
            by_name: HashTable::with_capacity(self.modules.len() + self.tensors.len() + 1),
            hidden_size: self.hidden_size,
            config: self.config,
            quantization: None,
            quant_meta: crate::quant::QuantMeta::default(),
        };
        model.modules.push(Module {
            name: String::new(),
            class: self.root_class,
            parent: None,
            children: Vec::new(),
            params: Vec::new(),
            buffers: Vec::new(),
            no_split: false,
        });
        model.index_name(Node::Module(0));
        for (name, class) in self.modules {
            check_name(&name, "module")?;
            match model.node(&name) {
                Some(Node::Module(id)) if model.modules[id].class.is_empty() => {
                    // Created implicitly by an earlier child: keep its place, give it its class.
                    model.modules[id].class = class;
                }
                Some(_) => return Err(Error::Model(format!("module {name:?} is listed twice"))),
                None => {
                    let id = model.ensure_module(&name)?;
                    model.modules[id].class = class;
                }
            }
        }
        let mut total_bytes = 0u64;
        let mut last_module: Option<ModuleId> = None;
        for spec in self.tensors {
            check_name(&spec.name, "tensor")?;
            if model.node(&spec.name).is_some() {
                return Err(Error::Model(format!(
                    "tensor {:?} is listed twice or has the name of a module",
                    spec.name
                )));
            }
            let numel = element_count(&spec.shape).ok_or_else(|| Error::ShapeOverflow {
                tensor: spec.name.clone(),
                shape: spec.shape.clone(),
            })?;
            let Some(bytes) = numel.checked_mul(spec.dtype.size_bytes()) else {
                return Err(Error::ShapeOverflow {
                    tensor: spec.name,
                    shape: spec.shape,
                });
            };
            // Bounded so that every sum planners form (usage per device with tied copies, KV
            // cache, budgets) stays far from 2⁶⁴: a manifest may declare any shape.
            total_bytes = total_bytes.saturating_add(bytes);
            if total_bytes > MAX_MODEL_BYTES {
                return Err(Error::Model(format!(
                    "the tensors up to {:?} (shape {:?}) total more than {MAX_MODEL_BYTES} bytes (1 PiB), the most devmap accepts",
                    spec.name, spec.shape
                )));
            }
            let parent_name = spec.name.rsplit_once('.').map_or("", |(p, _)| p);
            // A module's tensors are usually listed together: reuse the previous one's parent.
            let module = match last_module {
                Some(id) if model.modules[id].name == parent_name => id,
                _ => model.ensure_module(parent_name)?,
            };
            last_module = Some(module);
            let id = model.tensors.len();
            match spec.kind {
                TensorKind::Param => model.modules[module].params.push(id),
                TensorKind::Buffer => model.modules[module].buffers.push(id),
            }
            model.tensors.push(Tensor {
                name: spec.name,
                dtype: spec.dtype,
                shape: spec.shape,
                numel,
                kind: spec.kind,
                module,
                source: spec.source,
                converted: spec.converted,
            });
            model.index_name(Node::Tensor(id));
        }
        model.tied_duplicate = vec![false; model.tensors.len()];
        for group in self.tied {
            let mut ids = Vec::with_capacity(group.len());
            for name in &group {
                match model.node(name) {
                    Some(Node::Tensor(id)) => {
                        if !ids.contains(&id) {
                            ids.push(id)
                        }
                    }
                    _ => {
                        return Err(Error::Model(format!(
                        "tied group {group:?} names {name:?}, which is not a tensor of the model"
                    )))
                    }
                }
            }
            if ids.len() < 2 {
                continue;
            }
            // The first name in registration order owns the storage (PyTorch's remove_duplicate).
            let owner = *ids.iter().min().expect("non-empty");
            for &id in &ids {
                if id != owner {
                    if model.tied_duplicate[id] {
                        return Err(Error::Model(format!(
                            "tensor {:?} is in two tied groups",
                            model.tensors[id].name
                        )));
                    }
                    model.tied_duplicate[id] = true;
                }
            }
            ids.sort_by(|a, b| model.tensors[*a].name.cmp(&model.tensors[*b].name));
            model.tied.push(ids);
        }
        model.tied_target = vec![false; model.tensors.len()];
        for name in &self.tied_targets {
            match model.node(name) {
                Some(Node::Tensor(id)) => model.tied_target[id] = true,
                _ => {
                    return Err(Error::Model(format!(
                        "tied target {name:?} is not a tensor of the model"
                    )))
                }
            }
        }
        model.non_persistent = vec![false; model.tensors.len()];
        for name in &self.non_persistent {
            match model.node(name) {
                Some(Node::Tensor(id)) if model.tensors[id].kind == TensorKind::Buffer => {
                    model.non_persistent[id] = true
                }
                _ => {
                    return Err(Error::Model(format!(
                        "non-persistent buffer {name:?} is not a buffer of the model"
                    )))
                }
            }
        }
        model.apply_no_split_classes(&self.no_split_classes);
        Ok(model)
    }
}

/// Most bytes the tensors of a model may total, tied names included: 2⁵⁰ (1 PiB), several hundred
/// times the largest checkpoints. With budgets capped at [`crate::budget::MAX_BUDGET_BYTES`] it
/// keeps every sum planners form (usage with tied copies, KV cache, budgets over thousands of
/// devices) far from 2⁶⁴, whatever shapes a manifest declares.
pub const MAX_MODEL_BYTES: u64 = 1 << 50;

/// Most dotted components a tensor or module name may have. Real models stay far below it (the
/// deepest fixture name has 8); every component is a module whose name stores its whole prefix, so
/// without a bound a single 1 MB name would allocate ~10¹¹ bytes and recurse 500,000 frames deep.
pub const MAX_NAME_COMPONENTS: usize = 64;

fn check_name(name: &str, what: &str) -> Result<()> {
    // One pass over the bytes: every module and tensor name of every model read is checked.
    let (mut components, mut empty_component, mut nul) = (1usize, false, false);
    let mut previous = b'.';
    for &b in name.as_bytes() {
        if b == b'.' {
            components += 1;
            empty_component |= previous == b'.';
        }
        nul |= b == 0;
        previous = b;
    }
    if empty_component || previous == b'.' {
        return Err(Error::Model(format!(
            "{what} name {name:?} has an empty component"
        )));
    }
    if components > MAX_NAME_COMPONENTS {
        let shown: String = name.chars().take(80).collect();
        return Err(Error::Model(format!(
            "{what} name {shown:?}... ({} bytes) has {components} dotted components; devmap accepts at most {MAX_NAME_COMPONENTS}",
            name.len()
        )));
    }
    if nul {
        return Err(Error::Model(format!("{what} name {name:?} contains NUL")));
    }
    Ok(())
}

/// The name a node of the index stands for.
fn node_name<'a>(modules: &'a [Module], tensors: &'a [Tensor], node: Node) -> &'a str {
    match node {
        Node::Module(id) => &modules[id].name,
        Node::Tensor(id) => &tensors[id].name,
    }
}

/// The name index's hash (FxHash: deterministic and fast on short names; model names are not
/// adversarial, and SipHash was a visible share of reading a manifest).
fn name_hash(name: &str) -> u64 {
    FxBuildHasher.hash_one(name)
}

impl Model {
    fn ensure_module(&mut self, name: &str) -> Result<ModuleId> {
        match self.node(name) {
            Some(Node::Module(id)) => return Ok(id),
            Some(Node::Tensor(_)) => {
                return Err(Error::Model(format!(
                    "{name:?} is both a tensor and a module"
                )))
            }
            None => {}
        }
        let parent_name = name.rsplit_once('.').map_or("", |(p, _)| p);
        let parent = self.ensure_module(parent_name)?;
        let id = self.modules.len();
        self.modules.push(Module {
            name: name.to_string(),
            class: String::new(),
            parent: Some(parent),
            children: Vec::new(),
            params: Vec::new(),
            buffers: Vec::new(),
            no_split: false,
        });
        self.modules[parent].children.push(id);
        self.index_name(Node::Module(id));
        Ok(id)
    }

    /// Adds `node`, already pushed and not yet indexed, to the name index.
    fn index_name(&mut self, node: Node) {
        let Model {
            by_name,
            modules,
            tensors,
            ..
        } = self;
        let hash = name_hash(node_name(modules, tensors, node));
        by_name.insert_unique(hash, node, |&n| name_hash(node_name(modules, tensors, n)));
    }

    fn apply_no_split_classes(&mut self, classes: &[String]) {
        let set: HashSet<&str> = classes.iter().map(String::as_str).collect();
        for m in &mut self.modules {
            m.no_split = !m.class.is_empty() && set.contains(m.class.as_str());
        }
    }

    /// Replace the no-split units: each entry is a class name, or a module-name pattern where `*`
    /// matches any run of characters (`model.layers.*`). An entry that matches nothing is an error.
    pub fn set_no_split(&mut self, classes_or_patterns: &[String]) -> Result<()> {
        let mut flags = vec![false; self.modules.len()];
        for entry in classes_or_patterns {
            let mut matched = false;
            for (id, m) in self.modules.iter().enumerate() {
                if (!m.class.is_empty() && m.class == *entry)
                    || (id != 0 && glob_match(entry, &m.name))
                {
                    flags[id] = true;
                    matched = true;
                }
            }
            if !matched {
                return Err(Error::NoSplitUnmatched(entry.clone()));
            }
        }
        for (m, f) in self.modules.iter_mut().zip(flags) {
            m.no_split = f;
        }
        Ok(())
    }

    /// Mark as no-split the outermost repeated numbered blocks (`*.layers.N`, `*.h.N`, `*.block.N`):
    /// children named by a number of a module that has at least two such children, and giving
    /// each such block the class `<container>.*`. Used when a checkpoint carries no classes.
    pub fn infer_no_split_blocks(&mut self) {
        fn is_number(name: &str) -> bool {
            let last = name.rsplit('.').next().unwrap_or(name);
            !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit())
        }
        let mut stack = vec![0usize];
        while let Some(id) = stack.pop() {
            let numbered: Vec<ModuleId> = self.modules[id]
                .children
                .iter()
                .copied()
                .filter(|&c| is_number(&self.modules[c].name))
                .collect();
            let container = self.modules[id].name.clone();
            for &c in &self.modules[id].children.clone() {
                // `is_number`, not `numbered.contains`: that was quadratic in the children (a
                // header of 10⁶ tensors `x.N.w` took minutes).
                if numbered.len() >= 2 && is_number(&self.modules[c].name) {
                    let m = &mut self.modules[c];
                    m.no_split = true;
                    if m.class.is_empty() {
                        m.class = format!("{container}.*");
                    }
                } else {
                    stack.push(c);
                }
            }
        }
    }

    /// All modules; index 0 is the root.
    pub fn modules(&self) -> &[Module] {
        &self.modules
    }
    /// One module.
    pub fn module(&self, id: ModuleId) -> &Module {
        &self.modules[id]
    }
    /// All tensors in registration order (parameters, then buffers, as listed).
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }
    /// One tensor.
    pub fn tensor(&self, id: TensorId) -> &Tensor {
        &self.tensors[id]
    }
    /// The dtype of the first floating-point tensor: what activations and the KV cache run in
    /// when no `--dtype` says otherwise (`None` for a model without floating tensors).
    pub fn float_dtype(&self) -> Option<DType> {
        self.tensors.iter().map(|t| t.dtype).find(|d| d.is_float())
    }
    /// Tied groups, each sorted by name.
    pub fn tied_groups(&self) -> &[Vec<TensorId>] {
        &self.tied
    }
    /// Whether the tensor is a second (or later) name of a shared storage.
    pub fn is_tied_duplicate(&self, id: TensorId) -> bool {
        self.tied_duplicate[id]
    }
    /// Whether transformers treats the tensor as a tie target (`all_tied_weights_keys`), whose size
    /// it never counts.
    pub fn is_tied_target(&self, id: TensorId) -> bool {
        self.tied_target[id]
    }
    /// Whether the tensor is a non-persistent buffer: outside `state_dict()`, so accelerate's
    /// `check_device_map` never asks a device for it (transformers' planner drops such buffers of a
    /// module it splits).
    pub fn is_non_persistent(&self, id: TensorId) -> bool {
        self.non_persistent[id]
    }
    /// Look a name up.
    pub fn node(&self, name: &str) -> Option<Node> {
        self.by_name
            .find(name_hash(name), |&n| {
                node_name(&self.modules, &self.tensors, n) == name
            })
            .copied()
    }
    /// The classes of the no-split modules, in first-seen order.
    pub fn no_split_classes(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for m in &self.modules {
            if m.no_split && !out.contains(&m.class) {
                out.push(m.class.clone());
            }
        }
        out
    }
    /// Name of a node.
    pub fn node_name(&self, node: Node) -> &str {
        match node {
            Node::Module(id) => &self.modules[id].name,
            Node::Tensor(id) => &self.tensors[id].name,
        }
    }

    /// Size in bytes of every tensor under `rules`; tied duplicates count 0 (the storage is counted once,
    /// under its first name).
    pub fn tensor_sizes(&self, rules: SizeRules) -> Vec<u64> {
        self.tensors
            .iter()
            .enumerate()
            .map(|(id, t)| {
                if self.tied_duplicate[id] {
                    0
                } else {
                    t.bytes(rules)
                }
            })
            .collect()
    }

    /// Bytes read through every tensor name under `rules`, tied duplicates included (`lm_head`
    /// reads the embedding matrix): what a forward pass moves, as opposed to what memory holds.
    pub fn read_sizes(&self, rules: SizeRules) -> Vec<u64> {
        self.tensors.iter().map(|t| t.bytes(rules)).collect()
    }

    /// Size of every module (sum over its subtree) given per-tensor sizes.
    pub fn module_sizes(&self, tensor_sizes: &[u64]) -> Vec<u64> {
        let mut sizes = vec![0u64; self.modules.len()];
        for (t, &s) in self.tensors.iter().zip(tensor_sizes) {
            sizes[t.module] = sizes[t.module].saturating_add(s);
        }
        // Parents have smaller ids than their children: fold bottom-up.
        for id in (1..self.modules.len()).rev() {
            let parent = self.modules[id].parent.expect("non-root has a parent");
            sizes[parent] = sizes[parent].saturating_add(sizes[id]);
        }
        sizes
    }

    /// Total bytes under `rules`.
    pub fn total_bytes(&self, rules: SizeRules) -> u64 {
        self.tensor_sizes(rules).iter().sum()
    }

    /// Whether `module` is `ancestor` or lies under it.
    pub fn is_within(&self, mut module: ModuleId, ancestor: ModuleId) -> bool {
        loop {
            if module == ancestor {
                return true;
            }
            match self.modules[module].parent {
                Some(p) => module = p,
                None => return false,
            }
        }
    }

    /// The outermost no-split module containing `module` (itself included), if any.
    pub fn no_split_ancestor(&self, module: ModuleId) -> Option<ModuleId> {
        let mut found = None;
        let mut cur = Some(module);
        while let Some(id) = cur {
            if self.modules[id].no_split {
                found = Some(id);
            }
            cur = self.modules[id].parent;
        }
        found
    }
}

/// Match `name` against `pattern`, where `*` matches any (possibly empty) run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    if !pattern.contains('*') {
        return pattern == name;
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(pos) => rest = &rest[pos + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Model {
        ModelBuilder::new("t")
            .module("linear1", "Linear")
            .module("batchnorm", "BatchNorm1d")
            .module("linear2", "Linear")
            .param("linear1.weight", DType::F32, &[4, 3])
            .param("linear1.bias", DType::F32, &[4])
            .param("batchnorm.weight", DType::F32, &[4])
            .param("batchnorm.bias", DType::F32, &[4])
            .param("linear2.weight", DType::F32, &[5, 4])
            .param("linear2.bias", DType::F32, &[5])
            .buffer("batchnorm.running_mean", DType::F32, &[4])
            .buffer("batchnorm.running_var", DType::F32, &[4])
            .buffer("batchnorm.num_batches_tracked", DType::I64, &[])
            .build()
            .unwrap()
    }

    /// Tensors only, so that every module is created implicitly and the name index grows far
    /// past the capacity it was built with (each growth rehashes by the stored names).
    #[test]
    fn the_name_index_finds_every_module_and_tensor_after_growing() {
        let mut b = ModelBuilder::new("t");
        for layer in 0..300 {
            for part in ["attn.q", "attn.k", "mlp.up"] {
                b = b.param(
                    format!("model.layers.{layer}.{part}.weight"),
                    DType::F16,
                    &[2],
                );
            }
        }
        let m = b.param("lm_head.weight", DType::F16, &[2]).build().unwrap();
        assert_eq!(m.tensors().len(), 901);
        for (id, t) in m.tensors().iter().enumerate() {
            assert_eq!(m.node(&t.name), Some(Node::Tensor(id)), "{}", t.name);
        }
        for (id, module) in m.modules().iter().enumerate() {
            assert_eq!(
                m.node(&module.name),
                Some(Node::Module(id)),
                "{:?}",
                module.name
            );
        }
        let layer7 = match m.node("model.layers.7") {
            Some(Node::Module(id)) => id,
            other => panic!("{other:?}"),
        };
        let attn = m.module(m.module(layer7).children[0]);
        assert_eq!(attn.name, "model.layers.7.attn");
        assert_eq!(m.node("model.layers.300"), None);
        assert_eq!(m.node("model.layers.7.attn.q.weigh"), None);
    }

    #[test]
    fn names_with_an_empty_component_or_nul_are_refused() {
        for bad in ["", ".", "a.", ".a", "a..b", "a.b."] {
            let e = check_name(bad, "tensor").unwrap_err().to_string();
            assert!(e.contains("empty component"), "{bad:?}: {e}");
        }
        let e = check_name("a.b\0c", "module").unwrap_err().to_string();
        assert!(e.contains("contains NUL"), "{e}");
        let deep = vec!["x"; MAX_NAME_COMPONENTS + 1].join(".");
        let e = check_name(&deep, "tensor").unwrap_err().to_string();
        assert!(e.contains("65 dotted components"), "{e}");
        let deepest = vec!["x"; MAX_NAME_COMPONENTS].join(".");
        assert!(check_name(&deepest, "tensor").is_ok());
        assert!(check_name("model.layers.0.weight", "tensor").is_ok());
    }

    #[test]
    fn sizes_match_accelerates_example() {
        let m = small();
        let ts = m.tensor_sizes(SizeRules::default());
        let ms = m.module_sizes(&ts);
        assert_eq!(ms[0], 236);
        let id = |n: &str| match m.node(n).unwrap() {
            Node::Module(i) => i,
            _ => panic!(),
        };
        assert_eq!(ms[id("linear1")], 64);
        assert_eq!(ms[id("batchnorm")], 72);
        assert_eq!(ms[id("linear2")], 100);
    }

    #[test]
    fn target_dtype_never_upcasts_and_keeps_ints() {
        let m = small();
        let half = m.total_bytes(SizeRules {
            target_dtype: Some(DType::F16),
            bool_as_bits: false,
        });
        // 57 floats at 2 bytes + the i64 counter at 8.
        assert_eq!(half, 57 * 2 + 8);
        let wide = m.total_bytes(SizeRules {
            target_dtype: Some(DType::F64),
            bool_as_bits: false,
        });
        assert_eq!(wide, 236);
    }

    #[test]
    fn tied_storage_counted_once_under_first_name() {
        let m = ModelBuilder::new("t")
            .param("a.weight", DType::F16, &[10])
            .param("b.weight", DType::F16, &[10])
            .tied(vec!["b.weight".into(), "a.weight".into()])
            .build()
            .unwrap();
        assert_eq!(m.tensor_sizes(SizeRules::default()), vec![20, 0]);
        assert!(m.is_tied_duplicate(1));
    }

    #[test]
    fn bad_tables_are_named() {
        let e = ModelBuilder::new("t")
            .param("a.w", DType::F16, &[1])
            .param("a.w", DType::F16, &[1])
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"a.w\""), "{e}");
        let e = ModelBuilder::new("t")
            .param("a.w", DType::F16, &[u64::MAX, 4])
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"a.w\"") && e.contains("overflow"), "{e}");
        let e = ModelBuilder::new("t")
            .param("a..w", DType::F16, &[1])
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("a..w"), "{e}");
    }

    #[test]
    fn inferred_blocks_are_outermost_numbered_children() {
        let mut m = ModelBuilder::new("t")
            .param("model.embed.weight", DType::F16, &[4])
            .param("model.layers.0.mlp.experts.0.w", DType::F16, &[4])
            .param("model.layers.0.mlp.experts.1.w", DType::F16, &[4])
            .param("model.layers.1.mlp.experts.0.w", DType::F16, &[4])
            .build()
            .unwrap();
        m.infer_no_split_blocks();
        let flagged: Vec<&str> = m
            .modules()
            .iter()
            .filter(|x| x.no_split)
            .map(|x| x.name.as_str())
            .collect();
        assert_eq!(flagged, vec!["model.layers.0", "model.layers.1"]);
        assert_eq!(m.no_split_classes(), vec!["model.layers.*".to_string()]);
    }

    #[test]
    fn glob() {
        assert!(glob_match("model.layers.*", "model.layers.3"));
        assert!(glob_match("*.mlp", "model.layers.3.mlp"));
        assert!(!glob_match("*.mlp", "model.layers.3.mlp.up"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "ac"));
    }
}
