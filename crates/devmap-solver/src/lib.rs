//! devmap-solver: placement strategies behind one trait.
//!
//! A [`Strategy`] turns a [`PlanRequest`] (a model, memory budgets, a target dtype) into a [`Plan`]
//! (an accelerate-compatible [`DeviceMap`] plus what it uses per device). Strategies are chosen by
//! name with [`strategy_by_name`]:
//!
//! | name | what it does |
//! |---|---|
//! | `auto` | the optimal placement under the cost model ([`auto`]: MIP over HiGHS, DP cross-check) |
//! | `sequential`, `balanced`, `balanced_low_0` | Hugging Face's greedy planner, bit for bit ([`hf`]) |
//! | `single:N`, `cpu` | the whole model on one device (`{"": N}`, `{"": "cpu"}`) |
//!
//! ```
//! use devmap_core::{DType, MemoryBudgets, ModelBuilder};
//! use devmap_solver::{strategy_by_name, PlanRequest};
//!
//! let mut b = ModelBuilder::new("tiny").module("embed", "Embedding");
//! b = b.param("embed.weight", DType::F16, &[1000, 64]);
//! for i in 0..4 {
//!     b = b.module(format!("layers.{i}"), "Block")
//!         .param(format!("layers.{i}.w"), DType::F16, &[256, 256]);
//! }
//! let model = b.no_split_classes(vec!["Block".into()]).build()?;
//! let budgets = MemoryBudgets::parse("0=400KiB,1=400KiB,cpu=1GiB")?;
//! let plan = strategy_by_name("balanced", None)?.plan(&PlanRequest::new(&model, &budgets))?;
//! // GPU 0 keeps room for the largest layer (the greedy's reserve), so it takes one block.
//! assert_eq!(
//!     plan.map.to_json().to_string(),
//!     r#"{"embed":0,"layers.0":0,"layers.1":1,"layers.2":1,"layers.3":1}"#
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Writing your own strategy
//!
//! Implement [`Strategy`]; build the map with [`DeviceMap::insert`] and return it through
//! [`Plan::from_map`], which computes the per-device usage the same way every built-in strategy does:
//!
//! ```
//! use devmap_core::{Device, DeviceMap};
//! use devmap_solver::{Error, Plan, PlanRequest, Strategy};
//!
//! /// Puts every top-level module on the GPU with the most budget, round-robin on ties.
//! struct LargestGpu;
//!
//! impl Strategy for LargestGpu {
//!     fn name(&self) -> String { "largest-gpu".into() }
//!     fn plan(&self, req: &PlanRequest<'_>) -> Result<Plan, Error> {
//!         let best = req.budgets.iter().filter(|b| b.device.is_gpu()).max_by_key(|b| b.bytes)
//!             .ok_or(Error::NoDevices)?;
//!         Ok(Plan::from_map(self.name(), req, DeviceMap::whole(best.device), req.budgets.clone()))
//!     }
//! }
//! ```

pub mod auto;
pub mod bound;
mod branch;
pub mod check;
pub mod classes;
pub mod dp;
pub mod error;
pub mod hf;
pub mod highs_init;
pub mod instance;
pub mod mip;
mod simplex;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use devmap_core::validate::{device_usage, tensor_devices};
use devmap_core::{DType, Device, DeviceMap, MemoryBudgets, Model, SizeRules};

pub use auto::{Auto, AutoOptions, SolveReport, SolveStatus};
pub use check::{check_map, DeviceMemory, MapCheck};
pub use error::Error;
pub use hf::Compat;

/// What a strategy is asked to place.
#[derive(Debug, Clone, Copy)]
pub struct PlanRequest<'a> {
    /// The model.
    pub model: &'a Model,
    /// Per-device budgets.
    pub budgets: &'a MemoryBudgets,
    /// Target dtype (Hugging Face's rules: floats never upcast, ints and bools keep their size).
    pub target_dtype: Option<DType>,
}

impl<'a> PlanRequest<'a> {
    /// A request with no dtype conversion.
    pub fn new(model: &'a Model, budgets: &'a MemoryBudgets) -> Self {
        PlanRequest {
            model,
            budgets,
            target_dtype: None,
        }
    }
    /// Set the target dtype.
    pub fn with_dtype(mut self, dtype: Option<DType>) -> Self {
        self.target_dtype = dtype;
        self
    }
}

/// A strategy's answer.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The strategy that made it.
    pub strategy: String,
    /// The device map (cleaned like accelerate's).
    pub map: DeviceMap,
    /// The budgets the strategy planned against (after balancing, for balanced strategies).
    pub budgets_used: MemoryBudgets,
    /// Bytes per device (tied storage counted once per device holding a member).
    pub usage: BTreeMap<Device, u64>,
    /// Size rules used for `usage`.
    pub size_rules: SizeRules,
    /// Time spent planning.
    pub elapsed: Duration,
    /// How the optimal strategy solved it (objective, bound, gap), for `auto`.
    pub solve: Option<SolveReport>,
}

impl Plan {
    /// Wrap a map, computing usage with the request's size rules.
    pub fn from_map(
        strategy: String,
        req: &PlanRequest<'_>,
        map: DeviceMap,
        budgets_used: MemoryBudgets,
    ) -> Plan {
        let size_rules = SizeRules {
            target_dtype: req.target_dtype,
            bool_as_bits: false,
        };
        Plan::with_rules(strategy, req, map, budgets_used, size_rules)
    }

    fn with_rules(
        strategy: String,
        req: &PlanRequest<'_>,
        map: DeviceMap,
        budgets_used: MemoryBudgets,
        size_rules: SizeRules,
    ) -> Plan {
        let sizes = req.model.tensor_sizes(size_rules);
        let devices = tensor_devices(req.model, &map);
        let usage = device_usage(req.model, &sizes, &devices);
        Plan {
            strategy,
            map,
            budgets_used,
            usage,
            size_rules,
            elapsed: Duration::ZERO,
            solve: None,
        }
    }

    /// Bytes placed on `device`.
    pub fn bytes_on(&self, device: Device) -> u64 {
        self.usage.get(&device).copied().unwrap_or(0)
    }
}

/// A placement strategy.
pub trait Strategy: Send + Sync {
    /// The name it is chosen by.
    fn name(&self) -> String;
    /// Place the model.
    fn plan(&self, request: &PlanRequest<'_>) -> Result<Plan, Error>;
}

/// Hugging Face's three string strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfKind {
    /// Fill devices in order.
    Sequential,
    /// Balance over the GPUs (Hugging Face's `"auto"` is the same).
    Balanced,
    /// Balance over GPUs 1.., leaving GPU 0 as empty as possible.
    BalancedLow0,
}

impl HfKind {
    fn name(self) -> &'static str {
        match self {
            HfKind::Sequential => "sequential",
            HfKind::Balanced => "balanced",
            HfKind::BalancedLow0 => "balanced_low_0",
        }
    }
}

/// Hugging Face's greedy planner (see [`hf`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HfGreedy {
    /// Which of the three strategies.
    pub kind: HfKind,
    /// Which implementation to reproduce.
    pub compat: Compat,
    /// Spill what does not fit to disk even without a disk budget, as Hugging Face does.
    /// When false (devmap's default), that is a [`Error::DoesNotFit`].
    pub spill_to_disk: bool,
}

impl Strategy for HfGreedy {
    fn name(&self) -> String {
        self.kind.name().to_string()
    }

    fn plan(&self, req: &PlanRequest<'_>) -> Result<Plan, Error> {
        let start = Instant::now();
        if req.budgets.is_empty() {
            return Err(Error::NoDevices);
        }
        let quantizer = hf::HfQuantizer::for_model(req.model, self.compat)?;
        let tensor_bytes = quantizer.as_ref().map(|q| q.tensor_bytes.as_slice());
        let sizes =
            hf::HfSizes::with_quantizer(req.model, self.compat, req.target_dtype, tensor_bytes);
        let mut budgets = match self.kind {
            HfKind::Sequential => hf::HfCaps::from_budgets(req.budgets),
            HfKind::Balanced | HfKind::BalancedLow0 => hf::balanced_budgets(
                req.model,
                req.budgets,
                &sizes,
                self.compat,
                self.kind == HfKind::BalancedLow0,
            )?,
        };
        if let Some(q) = &quantizer {
            budgets = budgets.scaled(q.max_memory_factor);
        }
        let map = hf::infer_auto_device_map(req.model, &budgets, &sizes, self.compat)?;
        if let Some(q) = &quantizer {
            q.validate(&map)?;
        }
        let mut plan = Plan::with_rules(
            self.name(),
            req,
            map,
            budgets.to_budgets(),
            self.compat.size_rules(req.target_dtype),
        );
        if !self.spill_to_disk && !req.budgets.contains(Device::Disk) {
            let spilled = plan.bytes_on(Device::Disk);
            if spilled > 0 {
                return Err(Error::DoesNotFit {
                    shortfall: spilled,
                    devices: req.budgets.iter().map(|b| (b.device, b.bytes)).collect(),
                });
            }
        }
        plan.elapsed = start.elapsed();
        Ok(plan)
    }
}

/// The whole model on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SingleDevice(pub Device);

impl Strategy for SingleDevice {
    fn name(&self) -> String {
        match self.0 {
            Device::Gpu(i) => format!("single:{i}"),
            other => other.to_string(),
        }
    }

    fn plan(&self, req: &PlanRequest<'_>) -> Result<Plan, Error> {
        let start = Instant::now();
        let mut plan = Plan::from_map(
            self.name(),
            req,
            DeviceMap::whole(self.0),
            req.budgets.clone(),
        );
        let need = plan.bytes_on(self.0);
        if let Some(budget) = req.budgets.get(self.0) {
            if need > budget {
                return Err(Error::DoesNotFit {
                    shortfall: need - budget,
                    devices: vec![(self.0, budget)],
                });
            }
        }
        plan.elapsed = start.elapsed();
        Ok(plan)
    }
}

/// Names [`strategy_by_name`] accepts.
pub const STRATEGY_NAMES: &str = "auto, sequential, balanced, balanced_low_0, single:N, cpu";

/// Choose a strategy by name. `compat` selects the Hugging Face implementation to reproduce; when it
/// is given, what does not fit spills to disk as in Hugging Face, otherwise it is an error.
pub fn strategy_by_name(name: &str, compat: Option<Compat>) -> Result<Box<dyn Strategy>, Error> {
    let hf = |kind| -> Box<dyn Strategy> {
        Box::new(HfGreedy {
            kind,
            compat: compat.unwrap_or_default(),
            spill_to_disk: compat.is_some(),
        })
    };
    match name {
        "sequential" => return Ok(hf(HfKind::Sequential)),
        "balanced" => return Ok(hf(HfKind::Balanced)),
        "balanced_low_0" => return Ok(hf(HfKind::BalancedLow0)),
        "cpu" => return Ok(Box::new(SingleDevice(Device::Cpu))),
        "auto" => return Ok(Box::new(Auto::default())),
        _ => {}
    }
    if let Some(rest) = name.strip_prefix("single:") {
        if let Ok(device) = Device::parse(rest) {
            return Ok(Box::new(SingleDevice(device)));
        }
    }
    Err(Error::UnknownStrategy {
        name: name.to_string(),
        note: String::new(),
        available: STRATEGY_NAMES.to_string(),
    })
}
