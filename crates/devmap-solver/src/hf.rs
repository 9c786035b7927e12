//! Hugging Face parity: the greedy planner of transformers 5.23 (`integrations/accelerate.py`) and of
//! accelerate 1.15 (`utils/modeling.py`), rule for rule, so `sequential`, `balanced` and
//! `balanced_low_0` produce the maps `from_pretrained(device_map=...)` would.
//!
//! The rules reproduced (docs/strategies.md explains each):
//! - sizes: tied storage counted once under its first name; transformers counts `element_size`,
//!   accelerate counts bool as 1/8 byte and applies the target dtype without upcasting;
//! - a reserve of the largest remaining layer (a childless entry or a no-split module) on the first
//!   GPU and on the cpu only, recomputed over what is left of the work list, and counted as used when
//!   the planner leaves that device;
//! - a module that does not fit is split into its direct parameters and its children (its direct
//!   buffers are not re-listed: Hugging Face's maps then leave them uncovered), unless it is no-split
//!   or childless, in which case the planner moves to the next device and never comes back;
//! - tied modules are pulled onto the device of the first member met, their size charged there;
//!   accelerate only splits when `used + size >= cap`, transformers always does;
//! - balancing: caps of total/n plus 1.25 × (largest no-split block or largest leaf) in
//!   transformers, (first no-split block of each class or mean leaf) in accelerate; the last GPU
//!   keeps its budget; `balanced_low_0` gives GPU 0 only what the others cannot hold;
//! - an unbounded `disk` tier always follows the named devices.

use devmap_core::{
    DType, Device, DeviceMap, MemoryBudgets, Model, ModuleId, Node, SizeRules, TensorId,
};

use crate::error::Error;

/// What a transformers quantizer changes in the planning (`param_element_size`,
/// `adjust_max_memory`, `validate_environment`): bitsandbytes and FP8 quantize-on-load, GPTQ and AWQ
/// pre-quantized.
#[derive(Debug, Clone)]
pub struct HfQuantizer {
    /// Per tensor, the bytes the quantizer counts instead of the dtype's (`None`: the dtype's).
    pub tensor_bytes: Vec<Option<f64>>,
    /// `adjust_max_memory`'s factor on every key.
    pub max_memory_factor: f64,
    rule: MapRule,
}

/// The map rule of a quantizer's `validate_environment`.
#[derive(Debug, Clone)]
enum MapRule {
    Bnb(devmap_core::quant::BnbConfig),
    /// FP8 quantize-on-load: a dict map of more than one entry may not hold cpu or disk.
    Fp8,
    /// No check of the map (GPTQ, AWQ: `validate_environment` only checks installed packages).
    AnyMap,
}

/// The exact text transformers 5.23's FP8 quantizer raises (ValueError) on a quantize-on-load map
/// with cpu or disk entries.
pub const FP8_OFFLOAD_REJECTION: &str = "You are attempting to load an FP8 model with a device_map that contains a cpu/disk device.This is not supported when the model is quantized on the fly. Please use a quantized checkpoint or remove the cpu/disk device from the device_map.";

impl HfQuantizer {
    /// The quantizer `model.quantization` calls for under `compat`; `None` for an unquantized model.
    pub fn for_model(model: &Model, compat: Compat) -> Result<Option<HfQuantizer>, Error> {
        let Some(q) = &model.quantization else {
            return Ok(None);
        };
        if compat == Compat::Accelerate {
            return Err(Error::QuantUnsupported(
                "accelerate's infer_auto_device_map takes no quantizer; plan quantized models with --compat transformers".into(),
            ));
        }
        if let (true, devmap_core::QuantConfig::Gptq(config)) = (q.pre_quantized, &q.config) {
            return Ok(Some(HfQuantizer {
                tensor_bytes: devmap_core::quant_size::gptq_hf_tensor_bytes(model, config),
                max_memory_factor: 1.0,
                rule: MapRule::AnyMap,
            }));
        }
        if let (true, devmap_core::QuantConfig::Awq(config)) = (q.pre_quantized, &q.config) {
            return Ok(Some(HfQuantizer {
                tensor_bytes: devmap_core::quant_size::awq_hf_tensor_bytes(model, config)?,
                max_memory_factor: 1.0,
                rule: MapRule::AnyMap,
            }));
        }
        if let (
            true,
            devmap_core::QuantConfig::Mxfp4 {
                modules_to_not_convert,
                dequantize,
            },
        ) = (q.pre_quantized, &q.config)
        {
            return Ok(Some(HfQuantizer {
                tensor_bytes: devmap_core::quant_size::mxfp4_hf_tensor_bytes(
                    model,
                    modules_to_not_convert.as_deref(),
                    *dequantize,
                )?,
                max_memory_factor: 1.0,
                rule: MapRule::AnyMap,
            }));
        }
        if q.pre_quantized {
            return Err(Error::QuantUnsupported(format!(
                "Hugging Face parity for pre-quantized {} checkpoints is not implemented yet (gptq, awq and mxfp4 are); \
                 quantize on load with --quantization-config over the full-precision checkpoint, \
                 or plan with --strategy auto",
                q.config.method()
            )));
        }
        let quantizer = match &q.config {
            devmap_core::QuantConfig::Bnb(config) => HfQuantizer {
                tensor_bytes: per_tensor_total(model, config.hf_element_sizes(model)?),
                max_memory_factor: 0.9,
                rule: MapRule::Bnb(config.clone()),
            },
            devmap_core::QuantConfig::Fp8 {
                weight_block_size,
                modules_to_not_convert,
            } => HfQuantizer {
                tensor_bytes: devmap_core::quant_size::fp8_hf_tensor_bytes(
                    model,
                    *weight_block_size,
                    modules_to_not_convert.as_deref(),
                )?,
                max_memory_factor: 1.0,
                rule: MapRule::Fp8,
            },
            other => {
                return Err(Error::QuantUnsupported(format!(
                    "Hugging Face parity for quant_method {:?} is not implemented yet (bitsandbytes and fp8 quantize-on-load are)",
                    other.method()
                )))
            }
        };
        Ok(Some(quantizer))
    }

    /// `validate_environment(device_map=map)`: the quantizer's verdict on the computed map.
    pub fn validate(&self, map: &DeviceMap) -> Result<(), Error> {
        let devices: Vec<Device> = map.entries().iter().map(|(_, d)| *d).collect();
        let offloaded = devices
            .iter()
            .any(|&d| d == Device::Cpu || d == Device::Disk);
        let (method, message) = match &self.rule {
            MapRule::Bnb(config) => {
                let all_cpu = devices.iter().all(|&d| d == Device::Cpu);
                ("bitsandbytes", config.map_verdict(offloaded, all_cpu))
            }
            MapRule::Fp8 => (
                "fp8",
                (offloaded && devices.len() > 1).then_some(FP8_OFFLOAD_REJECTION),
            ),
            MapRule::AnyMap => ("gptq/awq/mxfp4", None),
        };
        match message {
            None => Ok(()),
            Some(message) => Err(Error::QuantizerRejects {
                method: method.into(),
                message: message.to_string(),
                map: Box::new(map.clone()),
            }),
        }
    }
}

/// Per-element sizes as per-tensor bytes.
fn per_tensor_total(model: &Model, per_element: Vec<Option<f64>>) -> Vec<Option<f64>> {
    per_element
        .into_iter()
        .enumerate()
        .map(|(t, per)| per.map(|p| model.tensor(t).numel as f64 * p))
        .collect()
}

/// Which Hugging Face implementation to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compat {
    /// transformers 5.23's own copy of the planner (what `from_pretrained` uses).
    #[default]
    Transformers,
    /// accelerate 1.15 (`get_balanced_memory` + `infer_auto_device_map`).
    Accelerate,
}

impl Compat {
    /// Parse `transformers` or `accelerate`.
    pub fn parse(text: &str) -> Result<Compat, Error> {
        match text {
            "transformers" => Ok(Compat::Transformers),
            "accelerate" => Ok(Compat::Accelerate),
            other => Err(Error::UnknownCompat(other.to_string())),
        }
    }

    /// How this implementation counts tensor sizes.
    pub fn size_rules(self, target_dtype: Option<DType>) -> SizeRules {
        SizeRules {
            target_dtype,
            bool_as_bits: self == Compat::Accelerate,
        }
    }
}

/// Sizes as Hugging Face sees them: per tensor and per module (subtree sums). Bytes as `f64`, as
/// Python has them once a quantizer counts half a byte per element (exact: multiples of 0.5 far
/// below 2^52).
#[derive(Debug, Clone)]
pub struct HfSizes {
    /// Per tensor (tied duplicates 0).
    pub tensors: Vec<f64>,
    /// Per module.
    pub modules: Vec<f64>,
}

impl HfSizes {
    /// Compute sizes for `model` under `compat`'s rules.
    pub fn new(model: &Model, compat: Compat, target_dtype: Option<DType>) -> HfSizes {
        HfSizes::with_quantizer(model, compat, target_dtype, None)
    }

    /// Sizes with a quantizer's `param_element_size`: `tensor_bytes[t]`, when set, replaces
    /// tensor `t`'s bytes (transformers only).
    pub fn with_quantizer(
        model: &Model,
        compat: Compat,
        target_dtype: Option<DType>,
        tensor_bytes: Option<&[Option<f64>]>,
    ) -> HfSizes {
        let mut tensors: Vec<f64> = model
            .tensor_sizes(compat.size_rules(target_dtype))
            .into_iter()
            .map(|b| b as f64)
            .collect();
        for (t, bytes) in tensor_bytes.unwrap_or(&[]).iter().enumerate() {
            if let (Some(bytes), false) = (bytes, model.is_tied_duplicate(t)) {
                tensors[t] = *bytes;
            }
        }
        if compat == Compat::Transformers {
            // transformers skips every tie target by name; when a target is the first name
            // registered, the shared storage is never counted at all.
            for (t, size) in tensors.iter_mut().enumerate() {
                if model.is_tied_target(t) {
                    *size = 0.0;
                }
            }
        }
        let mut modules = vec![0.0; model.modules().len()];
        for (t, size) in tensors.iter().enumerate() {
            let mut cur = Some(model.tensor(t).module);
            while let Some(m) = cur {
                modules[m] += size;
                cur = model.module(m).parent;
            }
        }
        HfSizes { tensors, modules }
    }

    fn of(&self, e: Entry) -> f64 {
        match e {
            Entry::Module(m) => self.modules[m],
            Entry::Tensor(t) => self.tensors[t],
        }
    }
}

/// Per-device caps as Hugging Face holds them (`max_memory` values: ints, or floats once a
/// quantizer scales them), in budget order.
#[derive(Debug, Clone, PartialEq)]
pub struct HfCaps(pub Vec<(Device, f64)>);

impl HfCaps {
    /// The user's budgets.
    pub fn from_budgets(budgets: &MemoryBudgets) -> HfCaps {
        HfCaps(budgets.iter().map(|b| (b.device, b.bytes as f64)).collect())
    }
    /// The caps rounded down to whole bytes (for reporting).
    pub fn to_budgets(&self) -> MemoryBudgets {
        let mut out = MemoryBudgets::default();
        for &(d, v) in &self.0 {
            out.set(d, v.max(0.0).floor() as u64);
        }
        out
    }
    fn get(&self, d: Device) -> Option<f64> {
        self.0.iter().find(|c| c.0 == d).map(|c| c.1)
    }
    fn set(&mut self, d: Device, v: f64) {
        if let Some(c) = self.0.iter_mut().find(|c| c.0 == d) {
            c.1 = v;
        }
    }
    /// `adjust_max_memory` of bitsandbytes (and quanto, BitNet, torchao): every key × 0.9.
    pub fn scaled(mut self, factor: f64) -> HfCaps {
        for c in &mut self.0 {
            c.1 *= factor;
        }
        self
    }
}

/// The budgets `balanced` / `balanced_low_0` hand to the greedy pass (`get_balanced_memory`).
pub fn balanced_budgets(
    model: &Model,
    budgets: &MemoryBudgets,
    sizes: &HfSizes,
    compat: Compat,
    low_zero: bool,
) -> Result<HfCaps, Error> {
    if compat == Compat::Accelerate && budgets.contains(Device::Disk) {
        // accelerate resolves every non-integer key with torch.device(), which rejects "disk".
        return Err(Error::HfRaises(
            "accelerate's get_balanced_memory raises on a \"disk\" key in max_memory \
             (torch.device(\"disk\") is not a device); use --strategy sequential or drop the disk budget"
                .into(),
        ));
    }
    let mut out = HfCaps::from_budgets(budgets);
    let gpus: Vec<u32> = budgets
        .iter()
        .filter_map(|b| match b.device {
            Device::Gpu(i) if b.bytes > 0 => Some(i),
            _ => None,
        })
        .collect();
    let num_devices = gpus.len() as u64;
    if num_devices == 0 {
        return Ok(out);
    }
    let low_zero = low_zero && num_devices > 1;
    let total = sizes.modules[0];
    let divisor = if low_zero {
        num_devices - 1
    } else {
        num_devices
    };
    // Python's `//` on a multiple of 0.5: exact in half-byte units.
    let mut per_gpu = ((total * 2.0) as u64 / (2 * divisor)) as f64;

    let buffer_base = match compat {
        Compat::Transformers => transformers_buffer_base(model, sizes),
        Compat::Accelerate => accelerate_buffer_base(model, sizes),
    };
    per_gpu += (1.25 * buffer_base).trunc();

    let mut gpus_sorted = gpus.clone();
    gpus_sorted.sort_unstable();
    let original_zero = out.get(Device::Gpu(0));
    for &idx in &gpus_sorted[..gpus_sorted.len() - 1] {
        let current = out.get(Device::Gpu(idx)).unwrap_or(0.0);
        let cap = if low_zero && idx == 0 {
            original_zero.unwrap_or(0.0)
        } else {
            per_gpu
        };
        out.set(Device::Gpu(idx), py_min(cap, current));
    }
    if low_zero {
        let mut others = 0.0;
        for i in 1..num_devices as u32 {
            others += out.get(Device::Gpu(i)).ok_or_else(|| {
                Error::HfRaises(format!(
                    "balanced_low_0 assumes GPUs 0..{} are all present; GPU {i} has no budget (Hugging Face raises KeyError)",
                    num_devices - 1
                ))
            })?;
        }
        let zero = out.get(Device::Gpu(0)).ok_or_else(|| {
            Error::HfRaises(
                "balanced_low_0 needs a budget for GPU 0 (Hugging Face raises KeyError)".into(),
            )
        })?;
        out.set(Device::Gpu(0), py_min((total - others).max(0.0), zero));
    }
    Ok(out)
}

/// Python's `min(a, b)`: `a` unless `b < a`.
fn py_min(a: f64, b: f64) -> f64 {
    if b < a {
        b
    } else {
        a
    }
}

/// transformers 5.23's margin: max(largest no-split block, largest leaf), before × 1.25.
fn transformers_buffer_base(model: &Model, sizes: &HfSizes) -> f64 {
    let biggest_no_split = model
        .modules()
        .iter()
        .enumerate()
        .filter(|(_, m)| m.no_split)
        .map(|(id, _)| sizes.modules[id])
        .fold(0.0, f64::max);
    // Leaves: modules owning tensors directly, by the tensors they own (top-level tensors excluded).
    let mut leaf = vec![0.0; model.modules().len()];
    for (id, t) in model.tensors().iter().enumerate() {
        if !model.is_tied_duplicate(id) && !model.is_tied_target(id) && t.module != 0 {
            leaf[t.module] += sizes.tensors[id];
        }
    }
    biggest_no_split.max(leaf.into_iter().fold(0.0, f64::max))
}

/// accelerate 1.15's margin: max(first no-split block of each class, mean leaf module), before × 1.25.
fn accelerate_buffer_base(model: &Model, sizes: &HfSizes) -> f64 {
    // A module "has a size entry" iff a non-duplicate tensor lies under it; entries appear in the
    // order their first tensor is met (parameters, then buffers, as listed).
    let classes: Vec<&str> = {
        let mut c: Vec<&str> = Vec::new();
        for m in model.modules() {
            if m.no_split && !c.contains(&m.class.as_str()) {
                c.push(&m.class);
            }
        }
        c
    };
    let mut present = vec![false; model.modules().len()];
    let mut first_of_class: Vec<(&str, f64)> = Vec::new();
    for (id, t) in model.tensors().iter().enumerate() {
        if model.is_tied_duplicate(id) {
            continue;
        }
        let mut chain = Vec::new();
        let mut cur = Some(t.module);
        while let Some(m) = cur {
            chain.push(m);
            cur = model.module(m).parent;
        }
        for &m in chain.iter().rev() {
            if present[m] {
                continue;
            }
            present[m] = true;
            let module = model.module(m);
            if m != 0
                && first_of_class.len() < classes.len()
                && module.no_split
                && !first_of_class.iter().any(|(c, _)| *c == module.class)
            {
                first_of_class.push((&module.class, sizes.modules[m]));
            }
        }
    }
    let no_split = first_of_class.iter().map(|(_, s)| *s).fold(0.0, f64::max);
    // Leaves after dropping tensor entries: present modules with no present child module.
    let mut has_child = vec![false; model.modules().len()];
    for (id, m) in model.modules().iter().enumerate().skip(1) {
        if present[id] {
            if let Some(p) = m.parent {
                // accelerate only registers children whose name contains a dot.
                if m.name.contains('.') {
                    has_child[p] = true;
                }
            }
        }
    }
    let (mut sum, mut count) = (0.0f64, 0u64);
    for id in 1..model.modules().len() {
        if present[id] && !has_child[id] {
            sum += sizes.modules[id];
            count += 1;
        }
    }
    let mean = (sum / count.max(1) as f64).trunc();
    no_split.max(mean)
}

/// A work-list entry: a module or a bare tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Entry {
    Module(ModuleId),
    Tensor(TensorId),
}

impl Entry {
    fn name(self, model: &Model) -> &str {
        match self {
            Entry::Module(m) => &model.module(m).name,
            Entry::Tensor(t) => &model.tensor(t).name,
        }
    }
    fn is_module(self) -> bool {
        matches!(self, Entry::Module(_))
    }
}

/// The entries a split module is replaced by: direct parameters, then child modules (not buffers).
fn split_children(model: &Model, m: ModuleId) -> Vec<Entry> {
    let module = model.module(m);
    module
        .params
        .iter()
        .map(|&t| Entry::Tensor(t))
        .chain(module.children.iter().map(|&c| Entry::Module(c)))
        .collect()
}

/// A work list whose front is the end of the vector.
struct WorkList(Vec<Entry>);

impl WorkList {
    fn pop_front(&mut self) -> Option<Entry> {
        self.0.pop()
    }
    fn push_front(&mut self, e: Entry) {
        self.0.push(e);
    }
    fn prepend(&mut self, entries: &[Entry]) {
        self.0.extend(entries.iter().rev());
    }
    /// Entries front to back.
    fn iter(&self) -> impl Iterator<Item = Entry> + '_ {
        self.0.iter().rev().copied()
    }
    fn position(&self, e: Entry) -> Option<usize> {
        self.iter().position(|x| x == e)
    }
    fn remove_at(&mut self, front_index: usize) -> Entry {
        let back = self.0.len() - 1 - front_index;
        self.0.remove(back)
    }
    fn replace_at(&mut self, front_index: usize, with: &[Entry]) {
        let back = self.0.len() - 1 - front_index;
        self.0.splice(back..back + 1, with.iter().rev().copied());
    }
}

/// Largest "layer" among `entries` (childless entries and no-split modules), with every entry reaching it.
fn max_layer(
    model: &Model,
    sizes: &HfSizes,
    entries: impl Iterator<Item = Entry>,
) -> (f64, Vec<Entry>) {
    let mut max = 0.0f64;
    let mut names: Vec<Entry> = Vec::new();
    let mut stack: Vec<Entry> = entries.collect();
    stack.reverse();
    while let Some(e) = stack.pop() {
        let is_layer = match e {
            Entry::Tensor(_) => true,
            Entry::Module(m) => {
                let module = model.module(m);
                module.children.is_empty() || module.no_split
            }
        };
        if is_layer {
            let s = sizes.of(e);
            if s > max {
                max = s;
                names.clear();
                names.push(e);
            } else if s == max {
                names.push(e);
            }
        } else if let Entry::Module(m) = e {
            stack.extend(
                model
                    .module(m)
                    .children
                    .iter()
                    .rev()
                    .map(|&c| Entry::Module(c)),
            );
        }
    }
    (max, names)
}

fn contains_dotted(haystack: &str, needle: &str) -> bool {
    // Python: `name + "." in k + "."` (a substring test, quirks included): an occurrence of
    // `needle` followed by a dot or by the end of `haystack`.
    haystack.match_indices(needle).any(|(i, _)| {
        let end = i + needle.len();
        end == haystack.len() || haystack.as_bytes()[end] == b'.'
    })
}

fn starts_with_dotted(name: &str, prefix: &str) -> bool {
    name.len() > prefix.len() && name.starts_with(prefix) && name.as_bytes()[prefix.len()] == b'.'
}

/// Hugging Face's `infer_auto_device_map` over `budgets` (already balanced for balanced strategies).
/// Returns the cleaned map.
pub fn infer_auto_device_map(
    model: &Model,
    budgets: &HfCaps,
    sizes: &HfSizes,
    compat: Compat,
) -> Result<DeviceMap, Error> {
    let mut devices: Vec<(Device, Option<f64>)> = budgets
        .0
        .iter()
        .map(|&(d, v)| (d, (d != Device::Disk).then_some(v)))
        .collect();
    if budgets.get(Device::Disk).is_none() {
        devices.push((Device::Disk, None));
    }
    let first_gpu = devices.iter().map(|d| d.0).find(|d| d.is_gpu());
    let is_main = |d: Device| match first_gpu {
        Some(g) => d == g || d == Device::Cpu,
        None => d == Device::Cpu,
    };
    let tied_names: Vec<Vec<&str>> = model
        .tied_groups()
        .iter()
        .map(|g| g.iter().map(|&t| model.tensor(t).name.as_str()).collect())
        .collect();

    let root = model.module(0);
    let mut initial: Vec<Entry> = root.params.iter().map(|&t| Entry::Tensor(t)).collect();
    initial.extend(root.children.iter().map(|&c| Entry::Module(c)));
    initial.extend(root.buffers.iter().map(|&t| Entry::Tensor(t)));
    let mut work = WorkList(Vec::new());
    work.prepend(&initial);

    let mut placed: Vec<(Entry, Device)> = Vec::new();
    let mut placed_index: std::collections::HashMap<Entry, usize> =
        std::collections::HashMap::new();
    let mut place =
        |e: Entry, d: Device, placed: &mut Vec<(Entry, Device)>| match placed_index.get(&e) {
            Some(&i) => placed[i].1 = d,
            None => {
                placed_index.insert(e, placed.len());
                placed.push((e, d));
            }
        };
    let mut current = 0usize;
    let mut used: Vec<f64> = vec![0.0; devices.len()];
    let (mut max_layer_size, mut max_layer_names) = max_layer(model, sizes, work.iter());

    while let Some(entry) = work.pop_front() {
        let name = entry.name(model);
        max_layer_names.retain(|&n| {
            let nn = n.name(model);
            nn != name && !starts_with_dotted(nn, name)
        });
        if max_layer_names.is_empty() {
            (max_layer_size, max_layer_names) =
                max_layer(model, sizes, work.iter().filter(|e| e.is_module()));
        }
        let module_size = sizes.of(entry);

        // Tied parameters outside the entry whose group has a member inside it.
        let mut tied_params: Vec<&str> = Vec::new();
        for group in &tied_names {
            let inside = group.iter().filter(|k| contains_dotted(k, name)).count();
            if inside > 0 && inside < group.len() {
                tied_params.extend(group.iter().filter(|p| !contains_dotted(p, name)));
            }
        }

        let Some(&(device, cap)) = devices.get(current) else {
            return Err(Error::HfRaises(
                "ran out of devices (Hugging Face raises IndexError)".into(),
            ));
        };
        let mut current_max: Option<f64> = cap;
        let mut reserved = 0.0;
        if is_main(device) {
            if let Some(c) = current_max.as_mut() {
                *c -= max_layer_size;
            }
            reserved = max_layer_size;
        }

        // Size with ties: each tied parameter's first enclosing work-list entry.
        let mut tied_entries: Vec<Entry> = Vec::new();
        let mut size_with_ties = module_size;
        for p in &tied_params {
            let found = work
                .iter()
                .find(|e| starts_with_dotted(p, e.name(model)))
                .ok_or_else(|| {
                    Error::HfRaises(format!(
                        "tied parameter {p:?} has no enclosing entry left to place (Hugging Face raises IndexError in get_module_size_with_ties)"
                    ))
                })?;
            match compat {
                Compat::Transformers => {
                    if !tied_entries.contains(&found) {
                        tied_entries.push(found);
                        size_with_ties += sizes.of(found);
                    }
                }
                Compat::Accelerate => {
                    tied_entries.push(found);
                    let param_size = match model.node(p) {
                        Some(Node::Tensor(t)) => sizes.tensors[t],
                        _ => 0.0,
                    };
                    size_with_ties += sizes.of(found) - param_size;
                }
            }
        }

        let d = current;
        if current_max.is_none_or(|c| used[d] + size_with_ties <= c) {
            used[d] += size_with_ties;
            place(entry, device, &mut placed);
            for &t in &tied_entries {
                if let Some(pos) = work.position(t) {
                    work.remove_at(pos);
                }
                place(t, device, &mut placed);
            }
            continue;
        }
        let c = current_max.expect("disk always fits");

        if !tied_params.is_empty() && used[d] + module_size <= c {
            let mut split = false;
            for &t in &tied_entries {
                let Entry::Module(tm) = t else {
                    return Err(Error::HfRaises(format!(
                        "tied entry {:?} is a bare tensor (Hugging Face raises AttributeError)",
                        t.name(model)
                    )));
                };
                let tmod = model.module(tm);
                if tmod.children.is_empty() || tmod.no_split {
                    continue;
                }
                let children = split_children(model, tm);
                let pos = work.position(t).expect("tied entry is in the work list");
                work.replace_at(pos, &children);
                work.push_front(entry);
                (max_layer_size, max_layer_names) =
                    max_layer(model, sizes, work.iter().filter(|e| e.is_module()));
                split = true;
                break;
            }
            if split {
                continue;
            }
        }

        let try_split = match compat {
            Compat::Transformers => true,
            Compat::Accelerate => used[d] + module_size >= c,
        };
        if try_split {
            if let Entry::Module(m) = entry {
                let module = model.module(m);
                if !module.children.is_empty() && !module.no_split {
                    let children = split_children(model, m);
                    work.prepend(&children);
                    (max_layer_size, max_layer_names) =
                        max_layer(model, sizes, work.iter().filter(|e| e.is_module()));
                    continue;
                }
            }
        }

        // Move on; the reserve counts as used on the device we leave.
        used[d] += reserved;
        current += 1;
        work.push_front(entry);
    }

    let mut raw = DeviceMap::new();
    for (e, d) in &placed {
        raw.push_unchecked(e.name(model).to_string(), *d);
    }
    Ok(raw.clean())
}
