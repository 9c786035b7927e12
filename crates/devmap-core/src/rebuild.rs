//! Applying a registry class ([`crate::registry`]) to a checkpoint's tensor table: the model
//! transformers builds, in its registration order, with tensorless modules, non-persistent
//! buffers, tie aliases and converted keys, and the class's `_no_split_modules`.
//!
//! The walk visits the class tree once. Parameters are listed in `named_parameters
//! (remove_duplicate=False)` order and buffers in `named_buffers()` order (both preorder), as
//! the manifests exported from live models list them, so the two sources give the same model.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::expr::{self, Lookup};
use crate::model::{ModelBuilder, TensorKind, TensorSpec};
use crate::registry::{
    ClassLine, Conversion, DescribedTensor, Dim, Op, Rebuilt, Registry, Repeat, Select,
    TensorEntry, TreeNode,
};

/// Most nested `ref`s a class may follow (a cycle in a hostile file ends here).
const MAX_REF_DEPTH: usize = 16;

/// How many names a note lists before "and N more".
const NOTE_NAMES: usize = 3;

/// Rebuild `checkpoint` as `line`'s class; `Ok(Err(reason))` when the checkpoint does not fit.
pub(crate) fn rebuild(
    registry: &Registry,
    line: &ClassLine,
    name: String,
    checkpoint: Vec<TensorSpec>,
    config: ModelConfig,
) -> Result<std::result::Result<Rebuilt, String>> {
    let ckpt: BTreeMap<String, TensorSpec> = checkpoint
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    let mut walk = Walk {
        registry,
        ckpt: &ckpt,
        used: HashSet::new(),
        modules: Vec::new(),
        params: Vec::new(),
        buffers: Vec::new(),
        non_persistent: Vec::new(),
        unknown_shapes: Vec::new(),
        aliases: Vec::new(),
        load_dtype: load_dtype(&config, &ckpt),
    };
    let scope = Scope {
        config: &config,
        prefix: String::new(),
        line,
    };
    if let Err(reason) = walk.node(&line.tree, "", &mut Vec::new(), &scope, "", 0)? {
        return Ok(Err(reason));
    }
    let Walk {
        modules,
        mut params,
        buffers,
        non_persistent,
        used,
        unknown_shapes,
        aliases,
        ..
    } = walk;
    let (mut groups, targets) = tie(line, &config, &mut params);
    let params = expand_aliases(params, &mut groups);
    let modules = alias_modules(modules, &aliases);
    let missing: Vec<&str> = params
        .iter()
        .chain(&buffers)
        .filter_map(|s| match s {
            Slot::Missing { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    if !missing.is_empty() {
        return Ok(Err(format!(
            "the checkpoint lacks {} that {} has",
            list_names(&missing),
            line.class
        )));
    }
    let mut notes = Vec::new();
    let unused: Vec<&str> = ckpt
        .keys()
        .filter(|k| !used.contains(*k))
        .map(String::as_str)
        .collect();
    if !unused.is_empty() {
        notes.push(format!(
            "{} {} not in the model transformers builds for {} (it ignores them on load): left out of the plan",
            list_names(&unused),
            if unused.len() == 1 { "is" } else { "are" },
            line.class
        ));
    }
    if !unknown_shapes.is_empty() {
        let names: Vec<&str> = unknown_shapes.iter().map(String::as_str).collect();
        notes.push(format!(
            "the registry gives no shape for {} of {} at this config: sized at the class defaults where it has them, else 0 bytes",
            list_names(&names),
            line.class
        ));
    }
    let tables = Tables {
        modules,
        params,
        buffers,
        non_persistent,
        groups,
        targets,
    };
    let model = assemble(line, name, config, tables);
    Ok(model.map(|model| Rebuilt { model, notes }))
}

/// `"a", "b", "c" and 4 more`.
fn list_names(names: &[&str]) -> String {
    let shown: Vec<String> = names
        .iter()
        .take(NOTE_NAMES)
        .map(|n| format!("{n:?}"))
        .collect();
    let more = names.len().saturating_sub(NOTE_NAMES);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// A tensor position in registration order.
#[derive(Debug, Clone)]
enum Slot {
    /// Known dtype and shape.
    Ready(TensorSpec),
    /// In the class, absent from the checkpoint (a tie may fill it).
    Missing { name: String },
    /// The same module registered a second time: its parameters repeat `target`'s.
    Alias { path: String, target: String },
}

impl Slot {
    fn name(&self) -> &str {
        match self {
            Slot::Ready(s) => &s.name,
            Slot::Missing { name, .. } => name,
            Slot::Alias { path, .. } => path,
        }
    }
}

/// Config paths as one class line sees them: `prefix` is its sub-config in config.json.
struct Scope<'a> {
    config: &'a ModelConfig,
    prefix: String,
    line: &'a ClassLine,
}

impl Lookup for Scope<'_> {
    fn value(&self, path: &str, depth: usize) -> std::result::Result<Option<f64>, String> {
        let full = format!("{}{path}", self.prefix);
        if let Some(v) = self.config.get_path(&full) {
            return v
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("config.json {full} is {v}, not a number"));
        }
        match self.line.defaults.get(path) {
            Some(serde_json::Value::Null) | None => match self.line.derived.get(path) {
                Some(text) => expr::eval_f64(text, self, depth + 1).map(Some),
                None => Ok(None),
            },
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("default of {path} is {v}, not a number")),
        }
    }
}

/// The dtype transformers 5 loads a checkpoint in (`dtype="auto"`): config.json's `dtype`
/// (`torch_dtype` in older files), else the first floating tensor's of the checkpoint.
fn load_dtype(config: &ModelConfig, ckpt: &BTreeMap<String, TensorSpec>) -> Option<DType> {
    let named = ["dtype", "torch_dtype"]
        .iter()
        .filter_map(|k| config.get_path(k)?.as_str())
        .find_map(|name| DType::parse(name).ok().filter(|d| d.is_float()));
    named.or_else(|| ckpt.values().map(|s| s.dtype).find(|d| d.is_float()))
}

/// Whether a tensor exists at this config: an `if_listed` tensor only when its config list
/// (config.json, else the class default) holds the value (Gemma 3's per-layer-type rotary tables).
fn exists(entry: &TensorEntry, scope: &Scope) -> bool {
    let TensorEntry::Described(DescribedTensor {
        if_listed: Some(listed),
        ..
    }) = entry
    else {
        return true;
    };
    let full = format!("{}{}", scope.prefix, listed.field);
    let list = scope
        .config
        .get_path(&full)
        .or_else(|| scope.line.defaults.get(&listed.field));
    list.and_then(serde_json::Value::as_array)
        .is_none_or(|l| l.iter().any(|v| v.as_str() == Some(listed.value.as_str())))
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

type Fit<T = ()> = std::result::Result<T, String>;

struct Walk<'a> {
    registry: &'a Registry,
    ckpt: &'a BTreeMap<String, TensorSpec>,
    used: HashSet<String>,
    modules: Vec<(String, String)>,
    params: Vec<Slot>,
    buffers: Vec<Slot>,
    /// Buffers outside the state dict (`persistent: false`).
    non_persistent: Vec<String>,
    unknown_shapes: Vec<String>,
    /// (alias module, the module it registers again).
    aliases: Vec<(String, String)>,
    /// The dtype `from_pretrained` builds the model in (`load_dtype` tensors take it).
    load_dtype: Option<DType>,
}

impl Walk<'_> {
    fn bad_line(&self, class: &str, reason: String) -> Error {
        Error::Registry {
            path: self.registry.path().to_path_buf(),
            line: self.registry.line_of(class),
            reason: format!("class {class}: {reason}"),
        }
    }

    /// Visit `node` at `path`; `key_base` prefixes the class-relative keys of a `ref`'d line.
    fn node(
        &mut self,
        node: &TreeNode,
        path: &str,
        idx: &mut Vec<u64>,
        scope: &Scope,
        key_base: &str,
        depth: usize,
    ) -> Result<Fit> {
        if let Some(class) = &node.reference {
            return self.reference(class, node, path, idx, scope, depth);
        }
        if let Some(target) = &node.alias {
            // Relative to the node holding the `ref`, like `src` templates.
            let target = join(key_base, target);
            self.modules.push((path.to_string(), String::new()));
            self.aliases.push((path.to_string(), target.clone()));
            self.params.push(Slot::Alias {
                path: path.to_string(),
                target,
            });
            return Ok(Ok(()));
        }
        if !path.is_empty() {
            self.modules.push((path.to_string(), node.c.clone()));
        }
        for e in node.p.iter().filter(|e| exists(e, scope)) {
            let slot = self.tensor(e, path, TensorKind::Param, idx, scope, key_base)?;
            self.params.push(slot);
        }
        for e in node.b.iter().filter(|e| exists(e, scope)) {
            let slot = self.tensor(e, path, TensorKind::Buffer, idx, scope, key_base)?;
            self.buffers.push(slot);
        }
        for child in &node.m {
            let fit = self.node(child, &join(path, &child.n), idx, scope, key_base, depth)?;
            if fit.is_err() {
                return Ok(fit);
            }
        }
        match &node.repeat {
            Some(r) => self.repeat(r, path, idx, scope, key_base, depth),
            None => Ok(Ok(())),
        }
    }

    /// A subtree stored as another class line, under its own config scope.
    fn reference(
        &mut self,
        class: &str,
        node: &TreeNode,
        path: &str,
        idx: &mut Vec<u64>,
        scope: &Scope,
        depth: usize,
    ) -> Result<Fit> {
        if depth >= MAX_REF_DEPTH {
            return Err(self.bad_line(
                &scope.line.class,
                format!("more than {MAX_REF_DEPTH} nested refs (a cycle?) at {path:?}"),
            ));
        }
        let line = self.registry.class_line(class)?;
        let prefix = match node.cfg.as_deref() {
            Some(cfg) if !cfg.is_empty() => format!("{}{cfg}.", scope.prefix),
            _ => scope.prefix.clone(),
        };
        let sub = Scope {
            config: scope.config,
            prefix,
            line: &line,
        };
        let mut root = line.tree.clone();
        root.n = node.n.clone();
        self.node(&root, path, idx, &sub, path, depth + 1)
    }

    fn repeat(
        &mut self,
        r: &Repeat,
        path: &str,
        idx: &mut Vec<u64>,
        scope: &Scope,
        key_base: &str,
        depth: usize,
    ) -> Result<Fit> {
        let count = match self.repeat_count(r, path, scope) {
            Ok(c) => c,
            Err(reason) => return Ok(Err(reason)),
        };
        for i in 0..count {
            let v = match self.select(r, i, path, idx, scope, key_base)? {
                Ok(v) => v,
                Err(reason) => return Ok(Err(reason)),
            };
            idx.push(i);
            let fit = self.node(
                &r.variants[v],
                &join(path, &r.child_name(i)),
                idx,
                scope,
                key_base,
                depth,
            );
            idx.pop();
            if fit.as_ref().map_or(true, |f| f.is_err()) {
                return fit;
            }
        }
        Ok(Ok(()))
    }

    /// The count from config.json (or the class default), else the checkpoint's indices.
    fn repeat_count(
        &self,
        r: &Repeat,
        path: &str,
        scope: &Scope,
    ) -> std::result::Result<u64, String> {
        match &r.count {
            Some(Dim::Int(n)) => Ok(*n),
            Some(Dim::Expr(e)) => expr::eval(e, scope, 0).and_then(|n| {
                u64::try_from(n).map_err(|_| format!("repeat count {e} of {path:?} is {n}"))
            }),
            None => Ok(self.checkpoint_indices(r, path)),
        }
    }

    /// max index + 1 over the checkpoint keys `path.N...` (`path.expert_N...` for named children).
    fn checkpoint_indices(&self, r: &Repeat, path: &str) -> u64 {
        let prefix = format!("{path}.");
        self.ckpt
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, _)| r.index_of(k[prefix.len()..].split('.').next()?))
            .map(|i| i + 1)
            .max()
            .unwrap_or(0)
    }

    fn select(
        &self,
        r: &Repeat,
        i: u64,
        path: &str,
        idx: &mut Vec<u64>,
        scope: &Scope,
        key_base: &str,
    ) -> Result<Fit<usize>> {
        let check = |v: usize| -> Result<usize> {
            if v < r.variants.len() {
                Ok(v)
            } else {
                Err(self.bad_line(
                    scope.line.class.as_str(),
                    format!("{path:?} selects variant {v} of {}", r.variants.len()),
                ))
            }
        };
        match &r.select {
            Select::All { variant } => check(*variant).map(Ok),
            Select::List { field, values } => {
                let full = format!("{}{field}", scope.prefix);
                let entry = scope
                    .config
                    .get_path(&full)
                    .and_then(|l| l.get(i as usize))
                    .and_then(serde_json::Value::as_str);
                match entry.and_then(|e| values.get(e)) {
                    Some(v) => check(*v).map(Ok),
                    None => Ok(Err(format!(
                        "config.json {full}[{i}] ({}) names no variant of {path:?}",
                        entry.unwrap_or("absent")
                    ))),
                }
            }
            Select::Checkpoint => Ok(self.variant_by_checkpoint(r, i, path, idx, key_base)),
        }
    }

    /// The variant whose checkpoint tensors are all present for index `i` (nested repeats
    /// included), trying the variants with the most tensors first.
    fn variant_by_checkpoint(
        &self,
        r: &Repeat,
        i: u64,
        path: &str,
        idx: &mut Vec<u64>,
        key_base: &str,
    ) -> Fit<usize> {
        let child = join(path, &r.child_name(i));
        let mut order: Vec<usize> = (0..r.variants.len()).collect();
        order.sort_by_key(|&v| (std::cmp::Reverse(tensor_entries(&r.variants[v])), v));
        idx.push(i);
        let found = order
            .into_iter()
            .find(|&v| self.fits(&r.variants[v], &child, idx, key_base));
        idx.pop();
        found.ok_or_else(|| {
            format!("no variant of {path:?} fits the checkpoint tensors of index {i}")
        })
    }

    /// Whether every checkpoint tensor `node` needs at `path` is present (refs and aliases are
    /// left to the walk).
    fn fits(&self, node: &TreeNode, path: &str, idx: &mut Vec<u64>, key_base: &str) -> bool {
        let tensors_present = node.p.iter().chain(&node.b).all(|e| match e {
            TensorEntry::Plain(n) => self.has_key(&join(path, n)),
            TensorEntry::Described(d) => {
                let own = join(path, &d.n);
                match &d.src {
                    Some(src) => {
                        self.has_key(&own)
                            || src
                                .keys
                                .iter()
                                .flatten()
                                .all(|t| self.has_key(&join(key_base, &fill_indices(t, idx))))
                    }
                    None => !d.ckpt || self.has_key(&own),
                }
            }
        });
        if !tensors_present {
            return false;
        }
        let children_fit = node.m.iter().all(|c| {
            c.reference.is_some()
                || c.alias.is_some()
                || self.fits(c, &join(path, &c.n), idx, key_base)
        });
        children_fit
            && node
                .repeat
                .as_ref()
                .is_none_or(|r| self.repeat_fits(r, path, idx, key_base))
    }

    /// A nested repeat fits when every index has a variant that fits (count from the checkpoint
    /// when no config field is given: a nested count rarely comes from config.json).
    fn repeat_fits(&self, r: &Repeat, path: &str, idx: &mut Vec<u64>, key_base: &str) -> bool {
        let count = match &r.count {
            Some(Dim::Int(n)) => *n,
            _ => self.checkpoint_indices(r, path),
        };
        (0..count).all(|i| {
            let child = join(path, &r.child_name(i));
            idx.push(i);
            let ok = match &r.select {
                Select::All { variant } => r
                    .variants
                    .get(*variant)
                    .is_some_and(|v| self.fits(v, &child, idx, key_base)),
                _ => r
                    .variants
                    .iter()
                    .any(|v| self.fits(v, &child, idx, key_base)),
            };
            idx.pop();
            ok
        })
    }

    /// A key template with `{e}` matches when any index is present.
    fn has_key(&self, key: &str) -> bool {
        match key.split_once("{e}") {
            None => self.ckpt.contains_key(key),
            Some((pre, post)) => !self.expert_keys(pre, post).is_empty(),
        }
    }

    /// `pre N post` keys of the checkpoint, by N ascending.
    fn expert_keys(&self, pre: &str, post: &str) -> Vec<String> {
        let mut found: Vec<(u64, String)> = self
            .ckpt
            .range(pre.to_string()..)
            .take_while(|(k, _)| k.starts_with(pre))
            .filter_map(|(k, _)| {
                let rest = &k[pre.len()..];
                let digits =
                    rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
                let n = rest[..digits].parse::<u64>().ok()?;
                (&rest[digits..] == post).then(|| (n, k.clone()))
            })
            .collect();
        found.sort();
        found.into_iter().map(|(_, k)| k).collect()
    }

    fn tensor(
        &mut self,
        entry: &TensorEntry,
        path: &str,
        kind: TensorKind,
        idx: &[u64],
        scope: &Scope,
        key_base: &str,
    ) -> Result<Slot> {
        let d = match entry {
            TensorEntry::Plain(n) => return Ok(self.checkpoint_tensor(join(path, n), kind)),
            TensorEntry::Described(d) => d,
        };
        let name = join(path, &d.n);
        if kind == TensorKind::Buffer && !d.persistent {
            self.non_persistent.push(name.clone());
        }
        if let Some(src) = &d.src {
            // A checkpoint saved in transformers 5's own layout already holds the model key.
            if self.ckpt.contains_key(&name) {
                return Ok(self.checkpoint_tensor(name, kind));
            }
            return Ok(self.converted(name, kind, src, idx, key_base));
        }
        if d.ckpt {
            return Ok(self.checkpoint_tensor(name, kind));
        }
        self.described(name, kind, d, scope)
    }

    fn checkpoint_tensor(&mut self, name: String, kind: TensorKind) -> Slot {
        match self.ckpt.get(&name) {
            Some(spec) => {
                self.used.insert(name);
                let mut spec = spec.clone();
                spec.kind = kind;
                Slot::Ready(spec)
            }
            None => Slot::Missing { name },
        }
    }

    /// A tensor the checkpoint never holds: dtype and shape from the registry.
    fn described(
        &mut self,
        name: String,
        kind: TensorKind,
        d: &DescribedTensor,
        scope: &Scope,
    ) -> Result<Slot> {
        let class = scope.line.class.as_str();
        let dtype_name = d.dtype.as_deref().ok_or_else(|| {
            self.bad_line(
                class,
                format!("tensor {:?} has ckpt:false and no dtype", d.n),
            )
        })?;
        let built = DType::parse(dtype_name).map_err(|_| {
            self.bad_line(
                class,
                format!("tensor {:?} has unknown dtype {dtype_name:?}", d.n),
            )
        })?;
        let dtype = match self.load_dtype {
            Some(load) if d.load_dtype => load,
            _ => built,
        };
        let shape = match self.shape(d, scope) {
            Some(shape) => shape,
            None => {
                // `"?"` (or a config without the fields): the size at the class defaults if the
                // registry has it, else nothing; either way the tensor exists and gets a device.
                self.unknown_shapes.push(name.clone());
                d.shape_default.clone().unwrap_or_else(|| vec![0])
            }
        };
        Ok(Slot::Ready(TensorSpec {
            name,
            dtype,
            shape,
            kind,
            source: None,
            converted: false,
        }))
    }

    /// Every dimension of a described tensor, `None` if one is unknown.
    fn shape(&self, d: &DescribedTensor, scope: &Scope) -> Option<Vec<u64>> {
        d.shape
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|dim| match dim {
                Dim::Int(n) => Some(*n),
                Dim::Expr(e) if e == "?" => None,
                Dim::Expr(e) => expr::eval(e, scope, 0)
                    .ok()
                    .and_then(|n| u64::try_from(n).ok()),
            })
            .collect()
    }

    /// A tensor transformers builds on load from other checkpoint keys.
    fn converted(
        &mut self,
        name: String,
        kind: TensorKind,
        src: &Conversion,
        idx: &[u64],
        key_base: &str,
    ) -> Slot {
        let mut groups: Vec<Vec<TensorSpec>> = Vec::with_capacity(src.keys.len());
        for group in &src.keys {
            let mut specs = Vec::new();
            for template in group {
                let key = join(key_base, &fill_indices(template, idx));
                let keys = match key.split_once("{e}") {
                    None => vec![key],
                    Some((pre, post)) => self.expert_keys(pre, post),
                };
                for k in keys {
                    match self.ckpt.get(&k) {
                        Some(s) => specs.push(s.clone()),
                        None => return Slot::Missing { name },
                    }
                }
            }
            if specs.is_empty() {
                return Slot::Missing { name };
            }
            groups.push(specs);
        }
        let Some(shape) = apply_ops(&groups, &src.ops) else {
            return Slot::Missing { name };
        };
        for s in groups.iter().flatten() {
            self.used.insert(s.name.clone());
        }
        let first = &groups[0][0];
        let plain_rename = groups.len() == 1
            && groups[0].len() == 1
            && src.ops.iter().all(|op| matches!(op, Op::Same));
        Slot::Ready(TensorSpec {
            name,
            dtype: first.dtype,
            shape,
            kind,
            source: if plain_rename {
                first.source.clone()
            } else {
                None
            },
            converted: groups.iter().map(Vec::len).sum::<usize>() > 1,
        })
    }
}

/// `{i0}`, `{i1}`... replaced by the enclosing repeat indices (outermost first); `{i}` is the
/// innermost.
fn fill_indices(template: &str, idx: &[u64]) -> String {
    let mut out = template.to_string();
    for (d, i) in idx.iter().enumerate() {
        out = out.replace(&format!("{{i{d}}}"), &i.to_string());
    }
    if let Some(last) = idx.last() {
        out = out.replace("{i}", &last.to_string());
    }
    out
}

/// Tensor entries in a subtree, every variant of nested repeats included: the order in which
/// checkpoint selection tries variants (the fullest first, so T5's block 0 with its relative
/// attention bias is not taken for a plain block).
fn tensor_entries(node: &TreeNode) -> usize {
    node.p.len()
        + node.b.len()
        + node.m.iter().map(tensor_entries).sum::<usize>()
        + node
            .repeat
            .as_ref()
            .map_or(0, |r| r.variants.iter().map(tensor_entries).sum())
}

/// The shape after a conversion's ops (`None` when the parts do not fit together).
fn apply_ops(groups: &[Vec<TensorSpec>], ops: &[Op]) -> Option<Vec<u64>> {
    let mut shapes: Vec<Vec<Vec<u64>>> = groups
        .iter()
        .map(|g| g.iter().map(|s| s.shape.clone()).collect())
        .collect();
    for op in ops {
        match op {
            Op::Stack { dim } => {
                for g in &mut shapes {
                    let first = g.first()?.clone();
                    if g.iter().any(|s| *s != first) || *dim > first.len() {
                        return None;
                    }
                    let mut stacked = first;
                    stacked.insert(*dim, g.len() as u64);
                    *g = vec![stacked];
                }
            }
            Op::Concat { dim } => {
                let parts: Vec<Vec<u64>> = shapes.iter().flatten().cloned().collect();
                let mut out = parts.first()?.clone();
                if *dim >= out.len() {
                    return None;
                }
                out[*dim] = 0;
                for p in &parts {
                    if p.len() != out.len() {
                        return None;
                    }
                    out[*dim] = out[*dim].checked_add(p[*dim])?;
                }
                shapes = vec![vec![out]];
            }
            Op::Chunk { dim, n, part } => {
                for s in shapes.iter_mut().flatten() {
                    if *dim >= s.len() || *n == 0 || part >= n || s[*dim] % n != 0 {
                        return None;
                    }
                    s[*dim] /= n;
                }
            }
            Op::Transpose { dim0, dim1 } => {
                for s in shapes.iter_mut().flatten() {
                    if *dim0 >= s.len() || *dim1 >= s.len() {
                        return None;
                    }
                    s.swap(*dim0, *dim1);
                }
            }
            Op::Same => {}
        }
    }
    shapes.first()?.first().cloned()
}

/// Apply the class's ties whose condition holds: fill a missing side from the present one
/// (transformers ties symmetrically on load) and return the groups (source first) and the targets.
fn tie(
    line: &ClassLine,
    config: &ModelConfig,
    params: &mut [Slot],
) -> (Vec<Vec<String>>, Vec<String>) {
    let position: HashMap<String, usize> = params
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name().to_string(), i))
        .collect();
    let mut root_of: HashMap<String, String> = HashMap::new();
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut targets = Vec::new();
    for t in &line.tied {
        if !t
            .when
            .as_ref()
            .is_none_or(|c| c.holds(config, &line.defaults))
        {
            continue;
        }
        let (Some(&ti), Some(&si)) = (position.get(&t.t), position.get(&t.s)) else {
            continue;
        };
        match (&params[ti], &params[si]) {
            (Slot::Missing { .. }, Slot::Ready(s)) => params[ti] = Slot::Ready(renamed(s, &t.t)),
            (Slot::Ready(tt), Slot::Missing { .. }) => params[si] = Slot::Ready(renamed(tt, &t.s)),
            _ => {}
        }
        let root = root_of.get(&t.s).cloned().unwrap_or_else(|| t.s.clone());
        root_of.insert(t.t.clone(), root.clone());
        let group = groups.entry(root.clone()).or_insert_with(|| vec![root]);
        group.push(t.t.clone());
        targets.push(t.t.clone());
    }
    (groups.into_values().collect(), targets)
}

fn renamed(spec: &TensorSpec, name: &str) -> TensorSpec {
    TensorSpec {
        name: name.to_string(),
        source: None,
        ..spec.clone()
    }
}

/// Replace each alias by its target's parameters under the alias's name, tied to them.
fn expand_aliases(params: Vec<Slot>, groups: &mut Vec<Vec<String>>) -> Vec<Slot> {
    if !params.iter().any(|s| matches!(s, Slot::Alias { .. })) {
        return params;
    }
    let ready: Vec<TensorSpec> = params
        .iter()
        .filter_map(|s| match s {
            Slot::Ready(spec) => Some(spec.clone()),
            _ => None,
        })
        .collect();
    let mut out = Vec::with_capacity(params.len());
    for slot in params {
        let Slot::Alias { path, target } = &slot else {
            out.push(slot);
            continue;
        };
        let prefix = format!("{target}.");
        for spec in ready.iter().filter(|s| s.name.starts_with(&prefix)) {
            let name = format!("{path}.{}", &spec.name[prefix.len()..]);
            match groups.iter_mut().find(|g| g.contains(&spec.name)) {
                Some(g) => g.push(name.clone()),
                None => groups.push(vec![spec.name.clone(), name.clone()]),
            }
            out.push(Slot::Ready(renamed(spec, &name)));
        }
    }
    out
}

/// An alias module takes its target's class, and its target's submodules repeat under it.
fn alias_modules(
    modules: Vec<(String, String)>,
    aliases: &[(String, String)],
) -> Vec<(String, String)> {
    if aliases.is_empty() {
        return modules;
    }
    let classes: HashMap<String, String> = modules.iter().cloned().collect();
    let mut out = Vec::with_capacity(modules.len());
    for (name, class) in &modules {
        let Some((_, target)) = aliases.iter().find(|(a, _)| a == name) else {
            out.push((name.clone(), class.clone()));
            continue;
        };
        out.push((
            name.clone(),
            classes.get(target).cloned().unwrap_or_default(),
        ));
        let prefix = format!("{target}.");
        for (m, c) in modules.iter().filter(|(m, _)| m.starts_with(&prefix)) {
            out.push((format!("{name}.{}", &m[prefix.len()..]), c.clone()));
        }
    }
    out
}

/// What the walk and the ties produced, in registration order.
struct Tables {
    modules: Vec<(String, String)>,
    params: Vec<Slot>,
    buffers: Vec<Slot>,
    non_persistent: Vec<String>,
    groups: Vec<Vec<String>>,
    targets: Vec<String>,
}

fn assemble(
    line: &ClassLine,
    name: String,
    config: ModelConfig,
    tables: Tables,
) -> std::result::Result<crate::model::Model, String> {
    let Tables {
        modules,
        params,
        buffers,
        non_persistent,
        groups,
        targets,
    } = tables;
    let mut b = ModelBuilder::new(name)
        .root_class(line.tree.c.clone())
        .hidden_size(config.hidden_size())
        .config(Some(config))
        .no_split_classes(line.no_split.clone());
    for (m, class) in modules {
        b = b.module(m, class);
    }
    for slot in params.into_iter().chain(buffers) {
        if let Slot::Ready(spec) = slot {
            b = b.tensor(spec);
        }
    }
    for g in groups {
        b = b.tied(g);
    }
    b.tied_targets(targets)
        .non_persistent(non_persistent)
        .build()
        .map_err(|e| format!("{} does not fit the checkpoint: {e}", line.class))
}
