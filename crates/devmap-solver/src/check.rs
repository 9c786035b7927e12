//! Scoring any device map, from any tool, under `auto`'s own rules: `devmap check`.
//!
//! The map is cut into pieces of `auto`'s units ([`Instance::usage_of_pieces`], the one memory
//! rule), so a map fits here exactly when `auto` would accept it as a placement; its estimate is
//! the cost model's.

use std::collections::BTreeMap;

use devmap_core::cost::Estimate;
use devmap_core::memory::{self, stream_buffer};
use devmap_core::validate::Problem;
use devmap_core::validate::{validate, Report};
use devmap_core::{format_bytes, Device, DeviceMap, MemoryBudgets, Model, SizeRules};

use crate::instance::{Instance, Piece, Usage};
use crate::{Auto, AutoOptions, Error, PlanRequest};

/// What one device holds at the peak of the workload, by term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceMemory {
    /// Weights mapped to it (tied copies included).
    pub weights: u64,
    /// Streaming buffer (main device: the largest streamed module; cpu: the largest disk module).
    pub streaming: u64,
    /// KV cache of the layers it executes.
    pub kv: u64,
    /// Activation working set and allocator allowance, when it executes units.
    pub activations: u64,
    /// `--reserve` kept free on it.
    pub reserve: u64,
    /// Its budget (`None`: unbounded, a disk without a budget).
    pub budget: Option<u64>,
    /// A GPU's peak while the quantizer converts its weights on load (quantize on load only):
    /// its weights plus the largest conversion transient among its tensors
    /// ([`devmap_core::memory::load_peak`]).
    pub load_peak: Option<u64>,
    /// Whether the runtime total fits its budget (`Instance`'s capacity rule without the load
    /// transient).
    pub fits_at_runtime: bool,
    /// Whether the load peak (when there is one) fits its budget minus `--reserve`.
    pub fits_at_load: bool,
    /// Whether it fits: both of the above.
    pub fits: bool,
}

impl DeviceMemory {
    /// Everything charged against the budget.
    pub fn total(&self) -> u64 {
        self.weights + self.streaming + self.kv + self.activations + self.reserve
    }
}

/// The verdict on a map.
#[derive(Debug, Clone)]
pub struct MapCheck {
    /// Structural problems (keys, coverage, no-split, ties, plain weight budgets).
    pub report: Report,
    /// Memory per device under the memory model.
    pub memory: BTreeMap<Device, DeviceMemory>,
    /// Whether every device fits (always true without budgets).
    pub fits: bool,
    /// The cost model's estimate of one decode step.
    pub estimate: Estimate,
}

impl MapCheck {
    /// Whether the map is structurally valid.
    pub fn valid(&self) -> bool {
        self.report.is_valid()
    }
    /// Every problem, errors first, then one line per device over its budget.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self.report.errors().map(|p| p.to_string()).collect();
        for (d, m) in &self.memory {
            if !m.fits {
                let budget = m.budget.unwrap_or(0);
                if !m.fits_at_runtime {
                    out.push(format!(
                        "device {d} holds {} (weights {}, streaming {}, KV {}, activations {}, \
                         reserve {}) but its budget is {} (over by {})",
                        format_bytes(m.total()),
                        format_bytes(m.weights),
                        format_bytes(m.streaming),
                        format_bytes(m.kv),
                        format_bytes(m.activations),
                        format_bytes(m.reserve),
                        format_bytes(budget),
                        format_bytes(m.total().saturating_sub(budget)),
                    ));
                }
                if let (false, Some(peak)) = (m.fits_at_load, m.load_peak) {
                    out.push(format!(
                        "device {d} peaks at {} while the quantizer converts its weights on load \
                         (weights {} + the largest conversion transient {}; reserve {}) but its \
                         budget is {} (over by {})",
                        format_bytes(peak),
                        format_bytes(m.weights),
                        format_bytes(peak - m.weights),
                        format_bytes(m.reserve),
                        format_bytes(budget),
                        format_bytes((peak + m.reserve).saturating_sub(budget)),
                    ));
                }
            }
        }
        out.extend(
            self.report
                .problems
                .iter()
                .filter(|p| !p.is_error())
                .map(|p| format!("warning: {p}")),
        );
        out
    }
}

/// The budgets a map is scored against: the given ones plus an unbounded disk when the map uses
/// disk without a disk budget (accelerate's rule), or, without budgets, every device the map
/// uses, unbounded.
fn scoring_budgets(map: &DeviceMap, budgets: Option<&MemoryBudgets>) -> MemoryBudgets {
    let unbounded = devmap_core::model::MAX_MODEL_BYTES;
    let mut b = budgets.cloned().unwrap_or_default();
    for (_, d) in map.entries() {
        if (budgets.is_none() || *d == Device::Disk) && !b.contains(*d) {
            b.set(*d, unbounded);
        }
    }
    b
}

/// Score `map` for `model` under `options` (workload, reserves, topology) and `budgets`.
pub fn check_map(
    model: &Model,
    map: &DeviceMap,
    budgets: Option<&MemoryBudgets>,
    options: &AutoOptions,
    target_dtype: Option<devmap_core::DType>,
) -> Result<MapCheck, Error> {
    let rules = SizeRules {
        target_dtype,
        bool_as_bits: false,
    };
    let mut report = validate(model, map, budgets, rules);
    // The memory model below judges budgets with every term, not the weights alone.
    report
        .problems
        .retain(|p| !matches!(p, Problem::OverBudget { .. }));
    let scoring = scoring_budgets(map, budgets);
    let mut options = options.clone();
    options.pins.clear();
    let req = PlanRequest::new(model, &scoring).with_dtype(target_dtype);
    let inst = instance_for_map(&Auto::new(options.clone()), &req, map)?;
    let (pieces, unit_device) = pieces_of_map(model, &inst, map);
    let usage = inst.usage_of_pieces(&pieces, &unit_device);
    let transients = load_transients(model, &inst, map);
    let memory = per_device(&inst, &usage, &transients, &options, budgets);
    let fits = budgets.is_none() || memory.values().all(|m| m.fits);
    let estimate = inst.cost_model.evaluate(model, map, rules);
    Ok(MapCheck {
        report,
        memory,
        fits,
        estimate,
    })
}

/// The instance `auto` judges `map` in: the world whose main device is the map's (accelerate's
/// rule, [`devmap_core::memory::main_device`], among GPUs with a budget; `None`, the host
/// executes, when the map uses none).
pub fn instance_for_map(
    auto: &Auto,
    req: &PlanRequest<'_>,
    map: &DeviceMap,
) -> Result<Instance, Error> {
    let candidates = crate::auto::main_candidates(req.budgets);
    let used = map
        .entries()
        .iter()
        .map(|(_, d)| *d)
        .filter(|d| matches!(d, Device::Gpu(i) if candidates.contains(&Some(*i))));
    let main = devmap_core::memory::main_device(used).and_then(|d| match d {
        Device::Gpu(i) => Some(i),
        _ => None,
    });
    auto.instance_for_main(req, main)
}

/// Cut `map` into pieces of the instance's units: per unit, its tensors grouped by device (devices
/// without a row, i.e. without a budget, are left out: validation reports them).
fn pieces_of_map(model: &Model, inst: &Instance, map: &DeviceMap) -> (Vec<Piece>, Vec<usize>) {
    let devices = devmap_core::validate::tensor_devices(model, map);
    let bytes = &inst.tensor_bytes;
    let mut pieces = Vec::new();
    let mut unit_device = vec![usize::MAX; inst.n()];
    for (i, unit) in inst.units.iter().enumerate() {
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for &t in &unit.tensors {
            let Some(row) = devices[t].and_then(|d| inst.devices.iter().position(|x| *x == d))
            else {
                continue;
            };
            match groups.iter_mut().find(|(r, _)| *r == row) {
                Some(g) => g.1.push(t),
                None => groups.push((row, vec![t])),
            }
        }
        if let Some((row, _)) = groups.first() {
            unit_device[i] = *row;
        }
        for (row, tensors) in groups {
            let held = if inst.is_streamed(row) {
                &bytes.offloaded
            } else {
                &bytes.on_gpu
            };
            pieces.push(Piece {
                unit: i,
                device: row,
                weights: tensors.iter().map(|&t| held[t]).sum(),
                stream: stream_buffer(model, &tensors, &bytes.offloaded_read),
            });
        }
    }
    (pieces, unit_device)
}

/// Per device row, the largest quantize-on-load transient among the tensors `map` puts on it
/// (`None` on cpu/disk and for a model not quantized on load).
fn load_transients(model: &Model, inst: &Instance, map: &DeviceMap) -> Vec<Option<u64>> {
    let transient = &inst.tensor_bytes.load_transient;
    let mut out = vec![None; inst.devices.len()];
    if transient.iter().all(|&b| b == 0) {
        return out;
    }
    for (row, slot) in out.iter_mut().enumerate() {
        if inst.devices[row].is_gpu() {
            *slot = Some(0);
        }
    }
    let devices = devmap_core::validate::tensor_devices(model, map);
    for (t, dev) in devices.iter().enumerate() {
        let Some(row) = dev.and_then(|d| inst.devices.iter().position(|x| *x == d)) else {
            continue;
        };
        if let Some(largest) = out[row].as_mut() {
            *largest = (*largest).max(transient[t]);
        }
    }
    out
}

/// The per-device breakdown of a usage, with reserves and budgets.
fn per_device(
    inst: &Instance,
    usage: &Usage,
    transients: &[Option<u64>],
    options: &AutoOptions,
    budgets: Option<&MemoryBudgets>,
) -> BTreeMap<Device, DeviceMemory> {
    let mut out = BTreeMap::new();
    for (b, &d) in inst.devices.iter().enumerate() {
        let reserve: u64 = options
            .reserve
            .iter()
            .filter(|(x, _)| *x == d)
            .map(|(_, r)| *r)
            .sum();
        let budget = budgets.and_then(|given| given.get(d));
        let tied = usage.overhead[b] - usage.kv[b] - usage.streaming[b];
        let weights = usage.weights[b] + tied;
        let load_peak = transients[b].map(|l| memory::load_peak(weights, l));
        // The runtime rule and the load rule separately (auto's caps join them, conservatively).
        let unbounded = budget.is_none();
        let fits_at_runtime =
            unbounded || usage.total(b) <= inst.room[b].saturating_sub(inst.fixed[b]);
        let fits_at_load = unbounded || load_peak.is_none_or(|p| p <= inst.room[b]);
        out.insert(
            d,
            DeviceMemory {
                weights,
                streaming: usage.streaming[b],
                kv: usage.kv[b],
                activations: usage.activations[b],
                reserve,
                budget,
                load_peak,
                fits_at_runtime,
                fits_at_load,
                fits: fits_at_runtime && fits_at_load,
            },
        );
    }
    out
}
