//! `auto`: the placement that minimises the cost model's objective under the memory rules.
//!
//! Steps: build the [`Instance`]; collect feasible starting points (Hugging Face's three greedy maps
//! when they keep units whole and fit devmap's memory rules, and the contiguous DP optimum); run the
//! MIP warm-started from the best of them; return the best plan found with HiGHS' bound and gap.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use devmap_core::cost::{CostModel, Objective, Topology};
use devmap_core::{format_bytes, Device, KvCacheSpec, Model};

use crate::instance::{Instance, InstanceOptions};
use crate::mip::{self, MipOptions};
use crate::{dp, Compat, Error, HfGreedy, HfKind, Plan, PlanRequest, Strategy};

/// Above this many unit × device cells `auto` does not build the MIP: building it alone would
/// outrun any reasonable time limit. It returns its best start with the lower bound's proven gap.
pub const MIP_MAX_CELLS: usize = 60_000;

/// Options of the `auto` strategy (a builder).
#[derive(Debug, Clone)]
pub struct AutoOptions {
    /// Device profiles and links.
    pub topology: Topology,
    /// What to minimise.
    pub objective: Objective,
    /// Bytes to keep free per device.
    pub reserve: Vec<(Device, u64)>,
    /// KV cache to charge per decoder layer.
    pub kv_cache: Option<KvCacheSpec>,
    /// `(map key, device)` pins.
    pub pins: Vec<(String, Device)>,
    /// Time limit of the whole solve: the work before the MIP counts against it, HiGHS gets what
    /// is left, and the offload repair after it at most a further 10%. Building the instance and
    /// the Hugging Face starting points does not watch the clock (docs/testing.md, "Limits").
    pub time_limit: Duration,
    /// Relative gap at which HiGHS stops.
    pub mip_rel_gap: f64,
}

impl Default for AutoOptions {
    fn default() -> Self {
        AutoOptions {
            topology: Topology::default(),
            objective: Objective::Latency,
            reserve: Vec::new(),
            kv_cache: None,
            pins: Vec::new(),
            time_limit: Duration::from_secs(10),
            mip_rel_gap: 5e-4,
        }
    }
}

impl AutoOptions {
    /// Set the topology.
    pub fn topology(mut self, t: Topology) -> Self {
        self.topology = t;
        self
    }
    /// Set the objective.
    pub fn objective(mut self, o: Objective) -> Self {
        self.objective = o;
        self
    }
    /// Keep `bytes` free on `device`.
    pub fn reserve(mut self, device: Device, bytes: u64) -> Self {
        self.reserve.push((device, bytes));
        self
    }
    /// Charge a KV cache.
    pub fn kv_cache(mut self, spec: Option<KvCacheSpec>) -> Self {
        self.kv_cache = spec;
        self
    }
    /// Pin a module or tensor to a device.
    pub fn pin(mut self, key: impl Into<String>, device: Device) -> Self {
        self.pins.push((key.into(), device));
        self
    }
    /// Time limit (see [`AutoOptions::time_limit`]).
    pub fn time_limit(mut self, d: Duration) -> Self {
        self.time_limit = d;
        self
    }
}

/// How `auto` solved a case.
#[derive(Debug, Clone, PartialEq)]
pub struct SolveReport {
    /// Objective of the returned plan, seconds.
    pub objective_seconds: f64,
    /// Proven lower bound, seconds.
    pub bound_seconds: f64,
    /// Relative gap.
    pub gap: f64,
    /// HiGHS status (or why HiGHS was not needed).
    pub status: String,
    /// Which start the solve began from.
    pub start: String,
    /// Number of units.
    pub units: usize,
    /// MIP columns and rows.
    pub size: (usize, usize),
    /// Reserved bytes per device (KV cache, streaming reserve, tied copies, `--reserve`).
    pub overhead: BTreeMap<Device, u64>,
}

/// devmap's optimal strategy.
#[derive(Debug, Clone, Default)]
pub struct Auto {
    /// Its options.
    pub options: AutoOptions,
}

impl Auto {
    /// `auto` with options.
    pub fn new(options: AutoOptions) -> Auto {
        Auto { options }
    }

    /// The instance `auto` solves for a request.
    pub fn instance(&self, req: &PlanRequest<'_>) -> Result<Instance, Error> {
        let devices = req.budgets.devices();
        let cost_model = CostModel::new(
            req.model,
            &devices,
            self.options.topology.clone(),
            self.options.objective,
        );
        let opts = InstanceOptions {
            reserve: self.options.reserve.clone(),
            kv_cache: self.options.kv_cache,
            pins: self.options.pins.clone(),
            rules: devmap_core::SizeRules {
                target_dtype: req.target_dtype,
                bool_as_bits: false,
            },
        };
        Instance::new(req.model, req.budgets, cost_model, &opts)
    }

    /// Feasible starting points: (label, assignment, cost).
    fn candidates(&self, req: &PlanRequest<'_>, inst: &Instance) -> Vec<(String, Vec<usize>, f64)> {
        let mut out = Vec::new();
        for compat in [Compat::Transformers, Compat::Accelerate] {
            for kind in [HfKind::Sequential, HfKind::Balanced, HfKind::BalancedLow0] {
                let s = HfGreedy {
                    kind,
                    compat,
                    spill_to_disk: true,
                };
                let Ok(plan) = s.plan(req) else { continue };
                if let Some(a) = inst.from_map(req.model, &plan.map) {
                    if inst.feasible(&a) {
                        let cost = inst.evaluate(&a);
                        out.push((format!("{} ({compat:?})", s.name()), a, cost));
                    }
                }
            }
        }
        if let Some((a, cost)) = dp::solve_contiguous(inst) {
            out.push(("contiguous DP".to_string(), a, cost));
        }
        out
    }
}

impl Strategy for Auto {
    fn name(&self) -> String {
        "auto".into()
    }

    fn plan(&self, req: &PlanRequest<'_>) -> Result<Plan, Error> {
        let started = Instant::now();
        let deadline = started + self.options.time_limit;
        let trace = std::env::var_os("DEVMAP_TRACE").is_some();
        let inst = self.instance(req)?;
        check_pins(&inst)?;
        // When the budgets together are short, say so before any search.
        let need: u64 = (0..inst.n()).map(|i| inst.mem[i] + inst.kv[i]).sum();
        if need > inst.caps.iter().sum::<u64>() {
            return Err(infeasible(req.model, &inst));
        }
        if trace {
            eprintln!("trace: instance {:?}", started.elapsed());
        }
        let mut candidates = self.candidates(req, &inst);
        if trace {
            eprintln!("trace: candidates {:?}", started.elapsed());
        }
        let (lower, packing) = lower_bound_with_packing(&inst);
        // The bound's own packing, laid along the chain, is often the best start when offloading.
        if let Some(a) = packing.as_ref().and_then(|p| packing_start(&inst, p)) {
            let a = repair_offload(&inst, a, Instant::now() + Duration::from_millis(20));
            if inst.feasible(&a) {
                let cost = inst.evaluate(&a);
                candidates.push(("packing bound".to_string(), a, cost));
            }
        }
        candidates.sort_by(|a, b| a.2.total_cmp(&b.2));
        let best_start = candidates
            .first()
            .map(|(l, a, c)| (l.clone(), mip::canonical(&inst, a), *c));
        let opts = MipOptions {
            time_limit: self.options.time_limit,
            mip_rel_gap: self.options.mip_rel_gap,
            contiguous: false,
            objective_floor: Some(lower),
        };
        // A start that meets the combinatorial lower bound is optimal: no MIP needed.
        let certified = best_start
            .as_ref()
            .is_some_and(|(_, _, c)| *c <= lower * (1.0 + self.options.mip_rel_gap) + 1e-12);
        // Not certified: polish the best start by local search before handing it to HiGHS.
        let best_start = if certified {
            best_start
        } else {
            best_start.map(|(label, a, c)| {
                // A short polish: HiGHS takes over if it does not reach the bound.
                let budget = (self.options.time_limit / 4).min(Duration::from_millis(20));
                let (b, cb) = local_search(&inst, a.clone(), c, Instant::now() + budget);
                if cb < c {
                    (
                        format!("{label} + local search"),
                        mip::canonical(&inst, &b),
                        cb,
                    )
                } else {
                    (label, a, c)
                }
            })
        };
        let certified = certified
            || best_start
                .as_ref()
                .is_some_and(|(_, _, c)| *c <= lower * (1.0 + self.options.mip_rel_gap) + 1e-12);
        if trace {
            eprintln!(
                "trace: local search {:?}; lower bound {lower}, best start {:?}",
                started.elapsed(),
                best_start.as_ref().map(|s| (s.0.clone(), s.2))
            );
        }
        let result = if certified {
            let (label, a, c) = best_start.clone().expect("certified implies a start");
            mip::MipResult {
                assignment: Some(a),
                objective_seconds: c,
                bound_seconds: lower,
                gap: 0.0,
                status: format!("Optimal (start {label} meets the lower bound)"),
                optimal: true,
                elapsed: Duration::ZERO,
                size: (0, 0),
            }
        } else if inst.n() * inst.devices.len() > MIP_MAX_CELLS && best_start.is_some() {
            // Too large to even build the MIP within a time limit (a 22k-unit × 16-device model
            // takes seconds to build): return the best start with the bound's proven gap.
            let (label, a, c) = best_start.clone().expect("checked");
            mip::MipResult {
                assignment: Some(a),
                objective_seconds: c,
                bound_seconds: lower,
                gap: if c > 0.0 {
                    ((c - lower) / c).max(0.0)
                } else {
                    0.0
                },
                status: format!(
                    "start {label} with the combinatorial bound (no MIP: {} units × {} devices)",
                    inst.n(),
                    inst.devices.len()
                ),
                optimal: false,
                elapsed: Duration::ZERO,
                size: (0, 0),
            }
        } else {
            // HiGHS gets what is left of the limit (the model build inside `solve` counts too).
            let opts = MipOptions {
                time_limit: deadline.saturating_duration_since(Instant::now()),
                ..opts
            };
            mip::solve(&inst, best_start.as_ref().map(|s| s.1.as_slice()), opts)?
        };
        if trace {
            eprintln!(
                "trace: mip {:?} (highs {:?}, {:?})",
                started.elapsed(),
                result.elapsed,
                result.size
            );
        }
        let (assignment, start_label) = match (&result.assignment, &best_start) {
            (Some(_), Some((label, s, c))) if *c < result.objective_seconds => {
                (s.clone(), label.clone())
            }
            (Some(a), start) => (
                a.clone(),
                start.as_ref().map_or("none".into(), |s| s.0.clone()),
            ),
            (None, Some((label, s, _))) => (s.clone(), label.clone()),
            (None, None) => return Err(infeasible(req.model, &inst)),
        };
        // The repair is exact but costs O(streamed units × GPUs × units): 7 s on 22k units. It
        // gets what is left of the limit plus 10% of it (microseconds on ordinary instances).
        let repair_deadline = deadline.max(Instant::now()) + self.options.time_limit / 10;
        let assignment = repair_offload(&inst, assignment, repair_deadline);
        let objective = inst.evaluate(&assignment);
        let bound = result.bound_seconds.min(objective);
        let gap = if objective > 0.0 && bound.is_finite() {
            ((objective - bound) / objective).max(0.0)
        } else if bound.is_finite() {
            0.0
        } else {
            1.0
        };
        let usage = inst.usage(&assignment);
        let mut overhead = BTreeMap::new();
        for (b, d) in inst.devices.iter().enumerate() {
            let reserve: u64 = self
                .options
                .reserve
                .iter()
                .filter(|(x, _)| x == d)
                .map(|(_, r)| *r)
                .sum();
            overhead.insert(*d, usage.overhead[b] + reserve);
        }
        let map = inst.to_map(req.model, &assignment);
        let mut plan = Plan::from_map(self.name(), req, map, req.budgets.clone());
        plan.elapsed = started.elapsed();
        plan.solve = Some(SolveReport {
            objective_seconds: objective,
            bound_seconds: bound,
            gap,
            status: result.status.clone(),
            start: start_label,
            units: inst.n(),
            size: result.size,
            overhead,
        });
        Ok(plan)
    }
}

/// Move every unit left on cpu or disk onto a GPU that still has room for it (exact byte check,
/// reserves included), choosing the GPU that costs least. The MIP stops within its relative gap and
/// keeps a few KiB of margin per device, so a unit whose offload costs microseconds can be left
/// behind; devmap promises no avoidable offload, so this pass finishes the job (unless it reaches
/// `deadline`: then it returns the moves made so far, each of which kept the plan feasible). Moves
/// that would raise the objective by more than 0.04% in all are not made (see `SLACK`).
pub fn repair_offload(inst: &Instance, mut a: Vec<usize>, deadline: Instant) -> Vec<usize> {
    // A move may cost at most this share of the objective: on kilobyte-sized units the device
    // changes a move adds can outweigh the streaming it saves, and the plan must stay within the
    // promised 0.1% of optimal. On real models a streamed unit costs far more than a device change.
    const SLACK: f64 = 4e-4;
    let limit = inst.evaluate(&a) * (1.0 + SLACK);
    loop {
        let mut moved = false;
        let mut streamed: Vec<usize> = (0..inst.n())
            .filter(|&i| !inst.devices[a[i]].is_gpu())
            .collect();
        streamed.sort_by_key(|&i| std::cmp::Reverse(inst.mem[i]));
        for i in streamed {
            if Instant::now() > deadline {
                return a;
            }
            let mut best: Option<(f64, usize)> = None;
            for g in
                (0..inst.devices.len()).filter(|&g| inst.devices[g].is_gpu() && inst.allowed[i][g])
            {
                let from = a[i];
                a[i] = g;
                if inst.feasible(&a) {
                    let c = inst.evaluate(&a);
                    if best.is_none_or(|b| c < b.0) {
                        best = Some((c, g));
                    }
                }
                a[i] = from;
            }
            if let Some((_, g)) = best.filter(|(c, _)| *c <= limit) {
                a[i] = g;
                moved = true;
            }
        }
        if !moved {
            return a;
        }
    }
}

/// A lower bound on any feasible placement's latency objective (0 for other objectives):
/// every unit on its cheapest allowed device; plus, when the GPUs cannot hold everything, the
/// excess bytes streamed at the cheapest streaming rate; plus, when no single execution device can
/// hold the model, one device change per extra device needed, at the cheapest link.
pub fn lower_bound(inst: &Instance) -> f64 {
    lower_bound_with_packing(inst).0
}

/// [`lower_bound`], with the packing its streaming term found (when something must be streamed).
fn lower_bound_with_packing(inst: &Instance) -> (f64, Option<Packing>) {
    if inst.cost_model.objective != devmap_core::Objective::Latency {
        return (0.0, None);
    }
    let n = inst.n();
    let gpu_rows: Vec<usize> = (0..inst.devices.len())
        .filter(|&b| inst.devices[b].is_gpu())
        .collect();
    let mut lb: f64 = (0..n)
        .map(|i| {
            (0..inst.devices.len())
                .filter(|&b| inst.allowed[i][b])
                .map(|b| inst.cost[i][b])
                .fold(f64::INFINITY, f64::min)
        })
        .sum();
    let total: u64 = (0..n).map(|i| inst.mem[i] + inst.kv[i]).sum();
    let gpu_total: u64 = gpu_rows.iter().map(|&b| inst.caps[b]).sum();
    let mut packing = None;
    if inst.main.is_some() && !gpu_rows.is_empty() && total > gpu_total {
        let (extra, p) = streaming_extra(inst, &gpu_rows, total);
        lb += extra;
        packing = p;
    }
    // Device changes: with k execution devices needed, at least k − 1 changes.
    let mut caps: Vec<u64> = gpu_rows.iter().map(|&b| inst.caps[b]).collect();
    caps.sort_unstable_by(|a, b| b.cmp(a));
    let gpu_demand = total.min(gpu_total);
    let mut k = 0usize;
    let mut held = 0u64;
    for c in caps {
        if held >= gpu_demand {
            break;
        }
        held += c;
        k += 1;
    }
    if k > 1 {
        let t_min = (0..inst.execs.len())
            .flat_map(|a| {
                (0..inst.execs.len())
                    .filter(move |&b| b != a)
                    .map(move |b| (a, b))
            })
            .map(|(a, b)| inst.trans[a][b])
            .fold(f64::INFINITY, f64::min);
        if t_min.is_finite() {
            lb += (k - 1) as f64 * t_min;
        }
    }
    (lb, packing)
}

/// First-improvement local search over single-unit moves and two-unit swaps, with exact feasibility
/// and cost; stops at a local optimum or at `deadline`.
pub fn local_search(
    inst: &Instance,
    mut a: Vec<usize>,
    mut cost: f64,
    deadline: Instant,
) -> (Vec<usize>, f64) {
    let n = inst.n();
    let k = inst.devices.len();
    // Apply `changes` (unit, device); keep them if the result fits and costs less, else undo.
    let try_changes = |a: &mut Vec<usize>, cost: &mut f64, changes: &[(usize, usize)]| -> bool {
        let before: Vec<(usize, usize)> = changes.iter().map(|&(i, _)| (i, a[i])).collect();
        for &(i, b) in changes {
            a[i] = b;
        }
        if inst.feasible(a) {
            let c = inst.evaluate(a);
            if c < *cost * (1.0 - 1e-12) {
                *cost = c;
                return true;
            }
        }
        for &(i, b) in &before {
            a[i] = b;
        }
        false
    };
    loop {
        let mut improved = false;
        for i in 0..n {
            if Instant::now() > deadline {
                return (a, cost);
            }
            for b in 0..k {
                if b != a[i] && inst.allowed[i][b] {
                    improved |= try_changes(&mut a, &mut cost, &[(i, b)]);
                }
            }
        }
        for i in 0..n {
            if Instant::now() > deadline {
                return (a, cost);
            }
            for j in i + 1..n {
                let (bi, bj) = (a[i], a[j]);
                // Swapping equal sizes changes nothing but the transfers; moves cover that.
                if bi != bj
                    && inst.mem[i] != inst.mem[j]
                    && inst.allowed[i][bj]
                    && inst.allowed[j][bi]
                {
                    improved |= try_changes(&mut a, &mut cost, &[(i, bj), (j, bi)]);
                }
            }
        }
        if !improved || Instant::now() > deadline {
            return (a, cost);
        }
    }
}

/// A lower bound on the extra seconds streaming costs when the GPUs cannot hold everything.
///
/// Tiers are the streamed devices ordered by their cheapest extra seconds per byte; the most
/// expensive one (disk, usually) is the sink and is treated as unbounded. Every other device is a
/// bin (GPUs save the sink's whole rate per byte, cpu the difference): an exact multiple-knapsack
/// over the (at most four) largest unit-size classes maximises the saving, smaller units count as
/// fluid at the best rate. Capacities lose the reserves any feasible placement needs.
fn streaming_extra(inst: &Instance, gpu_rows: &[usize], total: u64) -> (f64, Option<Packing>) {
    // The main GPU's reserve R is the largest streamed unit: enumerate R over the unit sizes at or
    // above the forced minimum; units larger than R must then stay on GPUs.
    let gpu_total: u64 = gpu_rows.iter().map(|&b| inst.caps[b]).sum();
    let forced = crate::mip::forced_reserve(inst, gpu_total);
    let mut levels: Vec<u64> = (0..inst.n())
        .map(|i| inst.read[i])
        .filter(|&r| r >= forced)
        .collect();
    levels.sort_unstable();
    levels.dedup();
    levels.truncate(8);
    if levels.is_empty() {
        levels.push(forced);
    }
    levels
        .into_iter()
        .map(|r| streaming_extra_at(inst, gpu_rows, total, r))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap_or((0.0, None))
}

/// The lowest extra seconds per byte over any set of units holding at least `min_bytes`: the
/// cheapest fractional cover of `min_bytes` by units taken in order of extra seconds per byte,
/// divided by `min_bytes` (the minimum per-byte rate when `min_bytes` is 0 or not reachable).
/// Units' fixed costs (accelerate's copies and hooks) make small units dearer per byte, so with a
/// single streamed device, where every placement streams at least `min_bytes`, this is tighter
/// than the cheapest unit's rate and still a bound: cover cost over bytes grows with the bytes.
fn cover_rate(mut per_unit: Vec<(f64, u64)>, min_bytes: u64) -> f64 {
    per_unit.sort_by(|a, b| (a.0 / a.1 as f64).total_cmp(&(b.0 / b.1 as f64)));
    let cheapest = per_unit
        .first()
        .map_or(f64::INFINITY, |&(e, r)| e / r as f64);
    let available: u64 = per_unit.iter().map(|u| u.1).sum();
    if min_bytes == 0 || available < min_bytes {
        return cheapest;
    }
    let (mut left, mut cost) = (min_bytes, 0.0);
    for (e, r) in per_unit {
        let take = r.min(left);
        cost += e * take as f64 / r as f64;
        left -= take;
        if left == 0 {
            break;
        }
    }
    cheapest.max(cost / min_bytes as f64)
}

/// How the packing bound filled the devices: per bin (a device) the count of each big size class.
#[derive(Debug, Clone)]
struct Packing {
    /// Device index of each bin, GPUs first.
    bins: Vec<usize>,
    /// The big class sizes.
    classes: Vec<u64>,
    /// quotas[bin][class].
    quotas: Vec<Vec<u64>>,
    /// The device that takes everything else.
    sink: usize,
}

/// [`streaming_extra`] for a given main-GPU reserve `reserve` (see there).
fn streaming_extra_at(
    inst: &Instance,
    gpu_rows: &[usize],
    total: u64,
    reserve: u64,
) -> (f64, Option<Packing>) {
    let n = inst.n();
    let streamed: Vec<usize> = (0..inst.devices.len())
        .filter(|&b| inst.is_streamed(b))
        .collect();
    // Extra seconds of streaming unit i through device b instead of its cheapest GPU.
    let extra = |i: usize, b: usize| -> f64 {
        let gpu_min = gpu_rows
            .iter()
            .map(|&g| inst.cost[i][g])
            .fold(f64::INFINITY, f64::min);
        inst.cost[i][b] - gpu_min
    };
    let gpu_total: u64 = gpu_rows.iter().map(|&b| inst.caps[b]).sum();
    let kv_total: u64 = inst.kv.iter().sum();
    // Every placement streams at least this many read bytes (read ≥ mem = w − kv per unit).
    let min_streamed = total.saturating_sub(gpu_total).saturating_sub(kv_total);
    let rate = |b: usize| -> f64 {
        let per_unit: Vec<(f64, u64)> = (0..n)
            .filter(|&i| inst.read[i] > 0)
            .map(|i| (extra(i, b), inst.read[i]))
            .collect();
        if streamed.len() == 1 {
            cover_rate(per_unit, min_streamed)
        } else {
            per_unit
                .iter()
                .map(|&(e, r)| e / r as f64)
                .fold(f64::INFINITY, f64::min)
        }
    };
    let mut tiers: Vec<(f64, usize)> = streamed
        .iter()
        .map(|&b| (rate(b), b))
        .filter(|(r, _)| r.is_finite() && *r > 0.0)
        .collect();
    if tiers.is_empty() {
        return (0.0, None);
    }
    tiers.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (sink_rate, sink) = *tiers.last().expect("non-empty");
    let mut bin_devices: Vec<usize> = gpu_rows.to_vec();
    bin_devices.extend(tiers[..tiers.len() - 1].iter().map(|t| t.1));
    // Bins: (capacity, saving per byte).
    let mut bins: Vec<(u64, f64)> = gpu_rows
        .iter()
        .map(|&b| {
            let cap = if Some(b) == inst.main {
                inst.caps[b].saturating_sub(reserve)
            } else {
                inst.caps[b]
            };
            (cap, sink_rate)
        })
        .collect();
    let mut before = gpu_total;
    for &(r, b) in &tiers[..tiers.len() - 1] {
        // A tier ahead of the sink keeps room for the largest unit the sink will stream through it
        // (the cpu for disk units), which the sink must take once these capacities are full.
        let cap = inst.caps[b];
        let reserve = if inst.devices[b] == devmap_core::Device::Cpu {
            crate::mip::forced_reserve(inst, before + cap)
        } else {
            0
        };
        bins.push((cap.saturating_sub(reserve), sink_rate - r));
        before += cap;
    }
    let w: Vec<u64> = (0..n).map(|i| inst.mem[i] + inst.kv[i]).collect();
    let classes = inst.size_classes();
    // A class is pinned to the GPU bins when every unit of it reads more than the reserve.
    let on_gpu = |size: u64| {
        (0..n)
            .filter(|&i| w[i] == size)
            .all(|i| inst.read[i] > reserve)
    };
    let smallest_cap = bins
        .iter()
        .map(|b| b.0)
        .filter(|&c| c > 0)
        .min()
        .unwrap_or(0);
    let mut big: Vec<(u64, u64)> = Vec::new();
    let mut states = 1u64;
    for &(size, count) in &classes {
        if big.len() == 4 || size.saturating_mul(100) < smallest_cap || states * (count + 1) > 5_000
        {
            break;
        }
        states *= count + 1;
        big.push((size, count));
    }
    let big_total: u64 = big.iter().map(|(s, c)| s * c).sum();
    let fluid = total - big_total;
    let best_rate = bins.iter().map(|b| b.1).fold(0.0, f64::max);
    let radix: Vec<u64> = big.iter().map(|(_, c)| c + 1).collect();
    let n_states = radix.iter().product::<u64>().max(1) as usize;
    let decode = |mut idx: usize| -> Vec<u64> {
        radix
            .iter()
            .map(|&r| {
                let v = idx as u64 % r;
                idx /= r as usize;
                v
            })
            .collect()
    };
    let encode = |v: &[u64]| -> usize {
        radix
            .iter()
            .zip(v)
            .rev()
            .fold(0usize, |acc, (&r, &x)| acc * r as usize + x as usize)
    };
    let bytes_of = |v: &[u64]| -> u64 { v.iter().zip(&big).map(|(c, (s, _))| c * s).sum() };
    let vectors: Vec<Vec<u64>> = (0..n_states).map(decode).collect();
    let mut best = vec![f64::NEG_INFINITY; n_states];
    best[0] = 0.0;
    // back[bin][state] = the state before this bin (for reconstructing the packing).
    let mut back: Vec<Vec<usize>> = Vec::with_capacity(bins.len());
    let gpu_bins = gpu_rows.len();
    let forced_full: Vec<bool> = big.iter().map(|(s, _)| on_gpu(*s)).collect();
    // Once past the GPU bins, states that left a GPU-only class incomplete are dropped.
    let drop_incomplete = |best: &mut Vec<f64>| {
        for (st, v) in best.iter_mut().enumerate() {
            let full = vectors[st]
                .iter()
                .zip(&big)
                .zip(&forced_full)
                .all(|((x, (_, c)), f)| !f || x == c);
            if !full {
                *v = f64::NEG_INFINITY;
            }
        }
    };
    // Units larger than the reserve but too small to be "big" classes are not tracked (relaxation).
    for (bin, &(cap, saving)) in bins.iter().enumerate() {
        if bin == gpu_bins {
            drop_incomplete(&mut best);
        }
        // Only maximal packings of this bin matter: sums are clamped to the class counts, which
        // covers every smaller packing (the saving grows with the bytes placed).
        let fits: Vec<usize> = (0..n_states)
            .filter(|&i| {
                let v = &vectors[i];
                let bytes = bytes_of(v);
                bytes <= cap
                    && big
                        .iter()
                        .zip(v)
                        .all(|((size, count), x)| x == count || bytes + size > cap)
            })
            .collect();
        let mut next = best.clone(); // an empty bin
        let mut from: Vec<usize> = (0..n_states).collect();
        for st in (0..n_states).filter(|&st| best[st].is_finite()) {
            for &f in &fits {
                let sum: Vec<u64> = vectors[st]
                    .iter()
                    .zip(&vectors[f])
                    .zip(&big)
                    .map(|((a, b), (_, c))| (a + b).min(*c))
                    .collect();
                let added = bytes_of(&sum) - bytes_of(&vectors[st]);
                let v = best[st] + saving * added as f64;
                let t = encode(&sum);
                if v > next[t] {
                    next[t] = v;
                    from[t] = st;
                }
            }
        }
        best = next;
        back.push(from);
    }
    if bins.len() == gpu_bins {
        drop_incomplete(&mut best);
    }
    if best.iter().all(|v| !v.is_finite()) {
        return (f64::INFINITY, None); // this reserve level admits no placement
    }
    let (mut state, big_saving) = best
        .iter()
        .copied()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .expect("states exist");
    let cap_saving: f64 = bins.iter().map(|(c, s)| *c as f64 * s).sum();
    let saving = (big_saving + fluid as f64 * best_rate).min(cap_saving);
    let mut quotas = vec![Vec::new(); bins.len()];
    for bin in (0..bins.len()).rev() {
        let prev = back[bin][state];
        quotas[bin] = vectors[state]
            .iter()
            .zip(&vectors[prev])
            .map(|(a, b)| a - b)
            .collect();
        state = prev;
    }
    let packing = Packing {
        bins: bin_devices,
        classes: big.iter().map(|(size, _)| *size).collect(),
        quotas,
        sink,
    };
    ((sink_rate * total as f64 - saving).max(0.0), Some(packing))
}

/// A placement that follows the packing bound's per-device class counts: units in chain order take
/// the first device (GPUs first, from the current one on) with quota left for their size class;
/// small units stay with the device before them; what is left goes to the sink. The result is
/// repaired and polished by the caller; `None` if it does not fit.
// Index loops: units are addressed by index in every per-unit table of the instance.
#[allow(clippy::needless_range_loop)]
fn packing_start(inst: &Instance, packing: &Packing) -> Option<Vec<usize>> {
    let n = inst.n();
    let mut quotas = packing.quotas.clone();
    let mut a = vec![packing.sink; n];
    let mut current = 0usize;
    for i in 0..n {
        let w = inst.mem[i] + inst.kv[i];
        let allowed = |b: usize| inst.allowed[i][b];
        match packing.classes.iter().position(|&c| c == w) {
            Some(c) => {
                let order = (current..quotas.len()).chain(0..current);
                if let Some(bin) = order
                    .into_iter()
                    .find(|&bin| quotas[bin][c] > 0 && allowed(packing.bins[bin]))
                {
                    quotas[bin][c] -= 1;
                    a[i] = packing.bins[bin];
                    if inst.devices[a[i]].is_gpu() {
                        current = bin;
                    }
                } else if !allowed(packing.sink) {
                    return None;
                }
            }
            None => {
                let here = packing.bins.get(current).copied().unwrap_or(packing.sink);
                a[i] = if allowed(here) { here } else { packing.sink };
            }
        }
    }
    if inst.feasible(&a) {
        return Some(a);
    }
    // Small units may not fit where they were put: send them to the sink and let the repair place them.
    for i in 0..n {
        let w = inst.mem[i] + inst.kv[i];
        if !packing.classes.contains(&w) && inst.allowed[i][packing.sink] {
            a[i] = packing.sink;
        }
    }
    inst.feasible(&a).then_some(a)
}

fn check_pins(inst: &Instance) -> Result<(), Error> {
    for (b, d) in inst.devices.iter().enumerate() {
        // Pinned: a pin removed every other device (a lone device restricts nothing).
        let pinned: u64 = (0..inst.n())
            .filter(|&i| inst.allowed[i].iter().any(|x| !*x) && inst.allowed[i][b])
            .map(|i| inst.mem[i] + inst.kv[i])
            .sum();
        if pinned > inst.caps[b] {
            return Err(Error::BadPin(format!(
                "the units pinned to device {d} need {} but its budget is {} (short by {})",
                format_bytes(pinned),
                format_bytes(inst.caps[b]),
                format_bytes(pinned - inst.caps[b])
            )));
        }
    }
    Ok(())
}

fn infeasible(model: &Model, inst: &Instance) -> Error {
    let total: u64 = inst.mem.iter().sum::<u64>() + inst.kv.iter().sum::<u64>();
    let caps: u64 = inst.caps.iter().sum();
    if total > caps {
        return Error::DoesNotFit {
            shortfall: total - caps,
            devices: inst
                .devices
                .iter()
                .zip(&inst.caps)
                .map(|(d, c)| (*d, *c))
                .collect(),
        };
    }
    let largest = (0..inst.n())
        .max_by_key(|&i| inst.mem[i] + inst.kv[i])
        .map(|i| inst.names[i].clone())
        .unwrap_or_default();
    Error::Infeasible(format!(
        "{} needs {} and the budgets total {}, but no packing of its units fits (the largest unit is {:?}; \
         streamed units also need room on the main GPU)",
        model.name,
        format_bytes(total),
        format_bytes(caps),
        largest
    ))
}

#[cfg(test)]
mod tests {
    use super::cover_rate;

    #[test]
    fn cover_rate_takes_the_cheapest_bytes_first() {
        // Per byte: 1.0 (10 bytes), 2.0 (10 bytes), 0.5 (4 bytes).
        let units = vec![(10.0, 10), (20.0, 10), (2.0, 4)];
        // 4 bytes at 0.5 + 10 at 1.0 + 2 at 2.0 = 16 s over 16 bytes.
        assert_eq!(cover_rate(units.clone(), 16), 1.0);
        // Nothing forced, or more than the units hold: the cheapest unit's rate.
        assert_eq!(cover_rate(units.clone(), 0), 0.5);
        assert_eq!(cover_rate(units, 100), 0.5);
    }
}
