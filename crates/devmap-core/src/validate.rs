//! Checking a device map against a model and budgets: what `devmap check` reports, and the
//! invariants every strategy's output must satisfy.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::budget::{format_bytes, Device, MemoryBudgets};
use crate::device_map::DeviceMap;
use crate::model::{Model, ModuleId, Node, SizeRules, TensorId};

/// One thing wrong with (or worth knowing about) a map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A key that names no module or tensor of the model.
    UnknownKey(String),
    /// Two keys where one is a prefix of the other, so a tensor would be mapped twice.
    OverlappingKeys {
        /// The outer key.
        outer: String,
        /// The key inside it.
        inner: String,
    },
    /// Tensors no key covers, non-persistent buffers aside (at most the first 20 named; `count` is
    /// the total).
    Uncovered {
        /// Some of the tensor names.
        tensors: Vec<String>,
        /// How many there are.
        count: usize,
    },
    /// A no-split module whose tensors are on several devices other than the main GPU, cpu and disk
    /// (a split across those three is allowed: they all execute on the main GPU).
    SplitNoSplit {
        /// The module.
        module: String,
        /// The devices it spans.
        devices: Vec<Device>,
    },
    /// Tensors sharing one storage mapped to different devices (a warning: the storage is held on each).
    TiedAcrossDevices {
        /// Where each member went.
        members: Vec<(String, Device)>,
    },
    /// A device holding more than its budget.
    OverBudget {
        /// The device.
        device: Device,
        /// Bytes mapped to it.
        used: u64,
        /// Its budget.
        budget: u64,
    },
    /// A device used by the map that has no budget.
    NoBudget(Device),
}

impl Problem {
    /// Whether the problem makes the map unusable (as opposed to a warning).
    pub fn is_error(&self) -> bool {
        !matches!(self, Problem::TiedAcrossDevices { .. })
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::UnknownKey(k) => write!(f, "key {k:?} names no module or tensor of the model"),
            Problem::OverlappingKeys { outer, inner } => {
                write!(
                    f,
                    "keys {outer:?} and {inner:?} overlap: {inner:?} lies inside {outer:?}"
                )
            }
            Problem::Uncovered { tensors, count } => {
                write!(
                    f,
                    "{count} tensor(s) have no device: {}",
                    tensors.join(", ")
                )?;
                if *count > tensors.len() {
                    write!(f, ", ...")?;
                }
                Ok(())
            }
            Problem::SplitNoSplit { module, devices } => {
                let d: Vec<String> = devices.iter().map(Device::to_string).collect();
                write!(
                    f,
                    "no-split module {module:?} is divided across devices {}",
                    d.join(", ")
                )
            }
            Problem::TiedAcrossDevices { members } => {
                let m: Vec<String> = members.iter().map(|(n, d)| format!("{n} -> {d}")).collect();
                write!(
                    f,
                    "tied tensors are on different devices (storage held on each): {}",
                    m.join(", ")
                )
            }
            Problem::OverBudget {
                device,
                used,
                budget,
            } => write!(
                f,
                "device {device} holds {} but its budget is {} (over by {})",
                format_bytes(*used),
                format_bytes(*budget),
                format_bytes(used - budget)
            ),
            Problem::NoBudget(d) => {
                write!(f, "device {d} is used by the map but has no memory budget")
            }
        }
    }
}

/// The result of checking a map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Errors and warnings, errors first.
    pub problems: Vec<Problem>,
    /// Bytes per device (tied storage counted once per device that holds a member).
    pub usage: BTreeMap<Device, u64>,
    /// The device of each tensor (`None` when uncovered).
    pub tensor_devices: Vec<Option<Device>>,
}

impl Report {
    /// Whether the map has no errors.
    pub fn is_valid(&self) -> bool {
        !self.problems.iter().any(Problem::is_error)
    }
    /// The errors.
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(|p| p.is_error())
    }
}

/// The device of every tensor under `map` (longest matching key).
///
/// Every dotted prefix of a tensor name is a module of the tree, so the longest matching key is the
/// nearest keyed ancestor: keys are looked up once and devices flow down the tree (parents have
/// smaller ids than their children). Keys that name nothing cover nothing.
pub fn tensor_devices(model: &Model, map: &DeviceMap) -> Vec<Option<Device>> {
    let mut module_device: Vec<Option<Device>> = vec![None; model.modules().len()];
    let mut tensor_device: Vec<Option<Device>> = vec![None; model.tensors().len()];
    for (k, d) in map.entries() {
        match model.node(k) {
            Some(Node::Module(m)) => module_device[m] = Some(*d),
            Some(Node::Tensor(t)) => tensor_device[t] = Some(*d),
            None => {}
        }
    }
    for m in 1..module_device.len() {
        if module_device[m].is_none() {
            let parent = model
                .module(m)
                .parent
                .expect("non-root modules have a parent");
            module_device[m] = module_device[parent];
        }
    }
    for (t, tensor) in model.tensors().iter().enumerate() {
        if tensor_device[t].is_none() {
            tensor_device[t] = module_device[tensor.module];
        }
    }
    tensor_device
}

/// The tensors without a device (`devices` from [`tensor_devices`]) that accelerate's
/// `check_device_map` asks one for: it checks `state_dict()` keys, so a non-persistent buffer
/// needs none.
pub fn uncovered_tensors(model: &Model, devices: &[Option<Device>]) -> Vec<TensorId> {
    (0..devices.len())
        .filter(|&i| devices[i].is_none() && !model.is_non_persistent(i))
        .collect()
}

/// A device to give the uncovered tensor `id`: that of the first mapped tensor (registration
/// order) under its module, else under the nearest enclosing module that has one (where
/// transformers would have put it had its planner not dropped it); `None` when nothing is mapped.
pub fn neighbour_device(model: &Model, devices: &[Option<Device>], id: TensorId) -> Option<Device> {
    let mut module = Some(model.tensor(id).module);
    while let Some(m) = module {
        let prefix = &model.module(m).name;
        let inside = |name: &str| {
            prefix.is_empty()
                || name
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
        };
        let found = model
            .tensors()
            .iter()
            .zip(devices)
            .find_map(|(t, d)| d.filter(|_| inside(&t.name)));
        if found.is_some() {
            return found;
        }
        module = model.module(m).parent;
    }
    None
}

/// Bytes per device given each tensor's device; a tied storage counts once on every device holding a member.
pub fn device_usage(
    model: &Model,
    sizes: &[u64],
    devices: &[Option<Device>],
) -> BTreeMap<Device, u64> {
    let mut usage: BTreeMap<Device, u64> = BTreeMap::new();
    for (id, d) in devices.iter().enumerate() {
        if let Some(d) = d {
            *usage.entry(*d).or_default() += sizes[id];
        }
    }
    for group in model.tied_groups() {
        let owner = *group.iter().min().expect("tied groups are non-empty");
        let storage = sizes[owner];
        let mut held: Vec<Device> = group.iter().filter_map(|&t| devices[t]).collect();
        held.sort();
        held.dedup();
        for d in held {
            if Some(d) != devices[owner] {
                *usage.entry(d).or_default() += storage;
            }
        }
    }
    usage
}

/// Check `map` against `model` and, when given, `budgets`.
pub fn validate(
    model: &Model,
    map: &DeviceMap,
    budgets: Option<&MemoryBudgets>,
    rules: SizeRules,
) -> Report {
    let mut problems = Vec::new();
    let key_set: HashMap<&str, Device> = map
        .entries()
        .iter()
        .map(|(k, d)| (k.as_str(), *d))
        .collect();
    for (k, _) in map.entries() {
        if !k.is_empty() && model.node(k).is_none() {
            problems.push(Problem::UnknownKey(k.clone()));
        }
        // Any proper prefix of k that is also a key overlaps with it.
        if !k.is_empty() {
            if key_set.contains_key("") {
                problems.push(Problem::OverlappingKeys {
                    outer: String::new(),
                    inner: k.clone(),
                });
            }
            let mut end = k.len();
            while let Some(pos) = k[..end].rfind('.') {
                if key_set.contains_key(&k[..pos]) {
                    problems.push(Problem::OverlappingKeys {
                        outer: k[..pos].to_string(),
                        inner: k.clone(),
                    });
                }
                end = pos;
            }
        }
    }
    let devices = tensor_devices(model, map);
    let uncovered = uncovered_tensors(model, &devices);
    if !uncovered.is_empty() {
        problems.push(Problem::Uncovered {
            tensors: uncovered
                .iter()
                .take(20)
                .map(|&i| model.tensor(i).name.clone())
                .collect(),
            count: uncovered.len(),
        });
    }
    // No-split modules: every tensor under the outermost no-split module on one device, or on the
    // main GPU, cpu and disk.
    let mut spans: BTreeMap<ModuleId, Vec<Device>> = BTreeMap::new();
    for (id, t) in model.tensors().iter().enumerate() {
        if let (Some(ns), Some(d)) = (model.no_split_ancestor(t.module), devices[id]) {
            let v = spans.entry(ns).or_default();
            if !v.contains(&d) {
                v.push(d);
            }
        }
    }
    // A no-split module may lie across the main GPU (the lowest GPU the map uses), cpu and disk:
    // accelerate executes cpu/disk modules on the main GPU, so the block runs on one device.
    let main = devices
        .iter()
        .flatten()
        .filter(|d| d.is_gpu())
        .min()
        .copied();
    let on_main_side = |d: &Device| !d.is_gpu() || Some(*d) == main;
    for (m, mut ds) in spans {
        if ds.len() > 1 && !ds.iter().all(on_main_side) {
            ds.sort();
            problems.push(Problem::SplitNoSplit {
                module: model.module(m).name.clone(),
                devices: ds,
            });
        }
    }
    let sizes = model.tensor_sizes(rules);
    let usage = device_usage(model, &sizes, &devices);
    if let Some(b) = budgets {
        for (&d, &used) in &usage {
            match b.get(d) {
                // A disk tier without a budget is unbounded, as in accelerate.
                None if d == Device::Disk => {}
                None => problems.push(Problem::NoBudget(d)),
                Some(budget) if used > budget => problems.push(Problem::OverBudget {
                    device: d,
                    used,
                    budget,
                }),
                Some(_) => {}
            }
        }
    }
    for group in model.tied_groups() {
        let members: Vec<(String, Device)> = group
            .iter()
            .filter_map(|&t| devices[t].map(|d| (model.tensor(t).name.clone(), d)))
            .collect();
        if members.iter().any(|(_, d)| *d != members[0].1) {
            problems.push(Problem::TiedAcrossDevices { members });
        }
    }
    problems.sort_by_key(|p| !p.is_error());
    Report {
        problems,
        usage,
        tensor_devices: devices,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::model::ModelBuilder;

    /// An embedding module with a weight, a persistent buffer and a non-persistent one, beside a head.
    fn embeddings(non_persistent: &[&str]) -> Model {
        ModelBuilder::new("t")
            .module("emb", "Embeddings")
            .module("emb.word", "Embedding")
            .module("head", "Linear")
            .param("emb.word.weight", DType::F32, &[8, 4])
            .param("head.weight", DType::F32, &[8, 4])
            .buffer("emb.token_type_ids", DType::I64, &[1, 16])
            .buffer("emb.position_ids", DType::I64, &[1, 16])
            .non_persistent(non_persistent.iter().map(|s| s.to_string()).collect())
            .build()
            .unwrap()
    }

    /// The map transformers makes when it splits `emb`: its direct buffers get no key.
    fn split_map() -> DeviceMap {
        DeviceMap::from_json_str(r#"{"emb.word": 0, "head": "cpu"}"#).unwrap()
    }

    #[test]
    fn an_uncovered_non_persistent_buffer_is_no_error() {
        let model = embeddings(&["emb.position_ids", "emb.token_type_ids"]);
        let report = validate(&model, &split_map(), None, SizeRules::default());
        assert!(report.is_valid(), "{:?}", report.problems);
        let pos = match model.node("emb.position_ids") {
            Some(Node::Tensor(t)) => t,
            other => panic!("{other:?}"),
        };
        assert_eq!(report.tensor_devices[pos], None);
    }

    #[test]
    fn an_uncovered_persistent_buffer_is_named() {
        let model = embeddings(&["emb.position_ids"]);
        let report = validate(&model, &split_map(), None, SizeRules::default());
        assert_eq!(
            report.errors().cloned().collect::<Vec<_>>(),
            vec![Problem::Uncovered {
                tensors: vec!["emb.token_type_ids".to_string()],
                count: 1
            }]
        );
    }

    #[test]
    fn an_uncovered_buffer_gets_its_modules_device() {
        let model = embeddings(&["emb.position_ids"]);
        let map = DeviceMap::from_json_str(r#"{"emb.word": 1, "head": "cpu"}"#).unwrap();
        let devices = tensor_devices(&model, &map);
        let uncovered = uncovered_tensors(&model, &devices);
        let names: Vec<&str> = uncovered
            .iter()
            .map(|&t| model.tensor(t).name.as_str())
            .collect();
        assert_eq!(names, ["emb.token_type_ids"]);
        // The first mapped tensor under `emb` is `emb.word.weight`, on GPU 1 (not the head's cpu).
        assert_eq!(
            neighbour_device(&model, &devices, uncovered[0]),
            Some(Device::Gpu(1))
        );
        let nothing = DeviceMap::from_json_str("{}").unwrap();
        let none = tensor_devices(&model, &nothing);
        assert_eq!(neighbour_device(&model, &none, uncovered[0]), None);
    }

    /// A no-split block of two linears beside another layer.
    fn two_layers() -> Model {
        ModelBuilder::new("t")
            .module("layers.0", "Block")
            .module("layers.0.a", "Linear")
            .module("layers.0.b", "Linear")
            .module("layers.1", "Block")
            .param("layers.0.a.weight", DType::F32, &[4])
            .param("layers.0.b.weight", DType::F32, &[4])
            .param("layers.1.weight", DType::F32, &[4])
            .no_split_classes(vec!["Block".into()])
            .build()
            .unwrap()
    }

    fn split_errors(map: &str) -> Vec<Problem> {
        let map = DeviceMap::from_json_str(map).unwrap();
        let report = validate(&two_layers(), &map, None, SizeRules::default());
        report
            .errors()
            .filter(|p| matches!(p, Problem::SplitNoSplit { .. }))
            .cloned()
            .collect()
    }

    #[test]
    fn a_block_may_lie_across_the_main_gpu_cpu_and_disk_only() {
        // GPU 1 is the main GPU here (the lowest the map uses).
        assert_eq!(
            split_errors(r#"{"layers.0.a": 1, "layers.0.b": "cpu", "layers.1": 2}"#),
            []
        );
        assert_eq!(
            split_errors(r#"{"layers.0.a": "disk", "layers.0.b": "cpu", "layers.1": 0}"#),
            []
        );
        let across = |devices: Vec<Device>| {
            vec![Problem::SplitNoSplit {
                module: "layers.0".into(),
                devices,
            }]
        };
        assert_eq!(
            split_errors(r#"{"layers.0.a": 1, "layers.0.b": "cpu", "layers.1": 0}"#),
            across(vec![Device::Gpu(1), Device::Cpu])
        );
        assert_eq!(
            split_errors(r#"{"layers.0.a": 0, "layers.0.b": 1, "layers.1": 0}"#),
            across(vec![Device::Gpu(0), Device::Gpu(1)])
        );
    }

    #[test]
    fn only_buffers_can_be_non_persistent() {
        let err = ModelBuilder::new("t")
            .param("w", DType::F32, &[2])
            .non_persistent(vec!["w".to_string()])
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("\"w\""), "{err}");
    }
}
