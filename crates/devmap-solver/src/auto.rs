//! `auto`: the placement that minimises the cost model's objective under the memory rules.
//!
//! accelerate's main device is the lowest GPU id the map uses, so `auto` solves one *world* per
//! candidate main GPU ([`main_candidates`], [`Auto::instance_for_main`]), each pruned when its
//! lower bound ([`crate::bound`]) cannot beat the best plan so far. In a world: collect feasible
//! starting points (Hugging Face's greedy maps when they keep units whole and fit devmap's memory
//! rules, the contiguous DP optimum, the bound's packing), certify the best by the bound or run the
//! MIP warm-started from it, repair avoidable offload. The report carries the least bound over the
//! worlds and a [`SolveStatus`].

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use std::fmt;

use devmap_core::cost::{CostModel, Objective, Topology};
use devmap_core::{format_bytes, Device, DeviceMap, KvCacheSpec, MemoryBudgets, Model, Workload};

pub use crate::bound::lower_bound;
use crate::bound::{lower_bound_with_packing, packing_start, Packing};
use crate::classes;
use crate::instance::{candidate_devices, Instance, InstanceOptions, UnitTables};
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
    /// The workload whose KV cache and activations are charged (`None`: weights only).
    pub workload: Option<Workload>,
    /// `(map key, device)` pins.
    pub pins: Vec<(String, Device)>,
    /// Time limit of the whole solve: the work before the MIP counts against it, HiGHS gets what
    /// is left, and the offload repair after it at most a further 10%. Building the instance and
    /// the Hugging Face starting points does not watch the clock (docs/testing.md, "Limits").
    pub time_limit: Duration,
    /// Relative gap at which HiGHS stops.
    pub mip_rel_gap: f64,
    /// Let a streamed no-split block be split at module granularity between the main GPU and
    /// cpu/disk ([`InstanceOptions::split_blocks`]; docs/strategies.md, "Split blocks"). On by
    /// default: the finer units find faster plans when layers are streamed, and the class model
    /// ([`crate::classes`]) certifies them in milliseconds. Off: every no-split block is one unit.
    pub split_blocks: bool,
}

impl Default for AutoOptions {
    fn default() -> Self {
        AutoOptions {
            topology: Topology::default(),
            objective: Objective::Latency,
            reserve: Vec::new(),
            workload: None,
            pins: Vec::new(),
            time_limit: Duration::from_secs(10),
            mip_rel_gap: 5e-4,
            split_blocks: true,
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
    /// Charge a KV cache: the workload `--kv-cache` stands for ([`Workload::from_kv_cache`]).
    pub fn kv_cache(mut self, spec: Option<KvCacheSpec>) -> Self {
        self.workload = spec.as_ref().map(Workload::from_kv_cache);
        self
    }
    /// Charge a workload's KV cache and activations.
    pub fn workload(mut self, w: Option<Workload>) -> Self {
        self.workload = w;
        self
    }
    /// Pin a module or tensor to a device.
    pub fn pin(mut self, key: impl Into<String>, device: Device) -> Self {
        self.pins.push((key.into(), device));
        self
    }
    /// Whether streamed blocks may be split (see [`AutoOptions::split_blocks`]).
    pub fn split_blocks(mut self, on: bool) -> Self {
        self.split_blocks = on;
        self
    }
    /// Time limit (see [`AutoOptions::time_limit`]).
    pub fn time_limit(mut self, d: Duration) -> Self {
        self.time_limit = d;
        self
    }
}

/// How a solve ended ([`SolveReport::status`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SolveStatus {
    /// Optimal within [`AutoOptions::mip_rel_gap`]: the bound proves it.
    Optimal,
    /// Feasible, optimality not proven (the time limit ran out, or the instance was too large for
    /// the MIP).
    Feasible {
        /// The proven relative gap `(objective − bound) / objective`.
        gap: f64,
    },
}

impl SolveStatus {
    /// A stable lowercase name: `"optimal"` or `"feasible"`.
    pub fn name(&self) -> &'static str {
        match self {
            SolveStatus::Optimal => "optimal",
            SolveStatus::Feasible { .. } => "feasible",
        }
    }
}

impl fmt::Display for SolveStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How `auto` solved a case.
#[derive(Debug, Clone, PartialEq)]
pub struct SolveReport {
    /// Objective of the returned plan, seconds.
    pub objective_seconds: f64,
    /// Proven lower bound on the objective of every feasible plan (every main device considered),
    /// seconds. Never clipped: it is at most the objective up to rounding.
    pub bound_seconds: f64,
    /// Relative gap `(objective − bound) / objective`.
    pub gap: f64,
    /// Optimal or feasible.
    pub status: SolveStatus,
    /// How the status was reached: HiGHS' status, or why HiGHS was not needed.
    pub detail: String,
    /// Which start the solve began from.
    pub start: String,
    /// accelerate's main device of the plan (the lowest GPU id it uses); `None`: the host executes.
    pub main_gpu: Option<u32>,
    /// Number of units.
    pub units: usize,
    /// Whether the data flow between units is a chain (`Instance::is_chain`): the contiguous DP is
    /// exact on it; on other graphs (encoder-decoders) the DP is only a start candidate.
    pub chain: bool,
    /// MIP columns and rows.
    pub size: (usize, usize),
    /// Reserved bytes per device (KV cache, streaming reserve, tied copies, `--reserve`).
    pub overhead: BTreeMap<Device, u64>,
}

impl SolveReport {
    /// The status's stable lowercase name (`"optimal"`, `"feasible"`), for reports and JSON.
    pub fn status(&self) -> &'static str {
        self.status.name()
    }
}

/// Relative slack allowed between a bound and an objective computed along different float paths
/// (HiGHS' tolerances, sums in another order). A bound above `objective · (1 + BOUND_EPS)` is a bug.
pub const BOUND_EPS: f64 = 1e-9;

/// Whether `bound` is a valid lower bound of `objective` up to [`BOUND_EPS`].
pub fn bound_holds(bound: f64, objective: f64) -> bool {
    bound <= objective + BOUND_EPS * objective.abs() + 1e-15
}

/// A starting point: (label, assignment, cost).
type Start = (String, Vec<usize>, f64);

/// The best plan of one world (one main device) and what proves its quality.
#[derive(Debug, Clone)]
struct WorldSolve {
    assignment: Vec<usize>,
    objective: f64,
    detail: String,
    start: String,
    size: (usize, usize),
}

/// What solving one world gave: maybe a plan, always a valid bound (infinite: no plan exists).
#[derive(Debug, Clone)]
struct WorldOutcome {
    solve: Option<WorldSolve>,
    bound: f64,
    timed_out: bool,
}

impl WorldOutcome {
    fn without_plan(bound: f64, timed_out: bool) -> WorldOutcome {
        WorldOutcome {
            solve: None,
            bound,
            timed_out,
        }
    }
}

/// Whether `device` takes part in the world of main device `main`: GPUs from `main` on (none
/// without a main GPU), cpu and disk always.
fn in_world(device: Device, main: Option<u32>) -> bool {
    match (device, main) {
        (Device::Gpu(i), Some(m)) => i >= m,
        (Device::Gpu(_), None) => false,
        _ => true,
    }
}

/// The main devices a plan on `budgets` can have, in the order `auto` tries them: each GPU with a
/// non-zero budget by index (a 0-byte GPU holds nothing, so it is never the lowest GPU a map
/// uses), then none (every unit on cpu/disk, executed by the host; `auto` plans so only when no
/// GPU can hold a unit).
pub fn main_candidates(budgets: &MemoryBudgets) -> Vec<Option<u32>> {
    let mut out: Vec<Option<u32>> = budgets
        .iter()
        .filter(|b| b.bytes > 0)
        .filter_map(|b| match b.device {
            Device::Gpu(i) => Some(Some(i)),
            _ => None,
        })
        .collect();
    out.push(None);
    out
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

    /// The instance `auto` solves first: plans whose main device is the lowest GPU with a budget
    /// (see [`Auto::instance_for_main`]).
    pub fn instance(&self, req: &PlanRequest<'_>) -> Result<Instance, Error> {
        let first = main_candidates(req.budgets)[0];
        self.instance_for_main(req, first)
    }

    /// The instance of plans whose main device is GPU `main` (`None`: no GPU, the host executes).
    /// accelerate's main device is the lowest GPU id a map uses, so GPUs below `main` are left
    /// out, and the instance's [`Instance::feasible`] asks for a unit on `main`.
    pub fn instance_for_main(
        &self,
        req: &PlanRequest<'_>,
        main: Option<u32>,
    ) -> Result<Instance, Error> {
        let tables = UnitTables::new(req.model, &self.instance_options(req, main))?;
        self.world_instance(req, &tables, main)
    }

    /// [`Auto::instance_for_main`] from the request's device-independent tables.
    fn world_instance(
        &self,
        req: &PlanRequest<'_>,
        tables: &UnitTables,
        main: Option<u32>,
    ) -> Result<Instance, Error> {
        let budgets = MemoryBudgets::new(
            req.budgets
                .iter()
                .filter(|b| in_world(b.device, main))
                .map(|b| (b.device, b.bytes)),
        )?;
        let cost_model = CostModel::new(
            req.model,
            &budgets.devices(),
            self.options.topology.clone(),
            self.options.objective,
        )
        .with_main_gpu(main);
        let opts = self.instance_options(req, main);
        let inst = Instance::from_tables(req.model, tables, &budgets, cost_model, &opts)?;
        debug_assert_eq!(inst.main.map(|b| inst.devices[b]), main.map(Device::Gpu));
        Ok(inst)
    }

    /// The instance options of the world of main device `main` (its reserves).
    fn instance_options(&self, req: &PlanRequest<'_>, main: Option<u32>) -> InstanceOptions {
        InstanceOptions {
            reserve: (self.options.reserve.iter().copied())
                .filter(|(d, _)| in_world(*d, main))
                .collect(),
            workload: self.options.workload,
            pins: self.options.pins.clone(),
            rules: devmap_core::SizeRules {
                target_dtype: req.target_dtype,
                bool_as_bits: false,
            },
            split_blocks: self.options.split_blocks,
        }
    }

    /// One instance per main device a plan can have (see [`main_candidates`]), all from one set
    /// of device-independent tables. The first one's errors are the request's; a later world that
    /// cannot exist (a pin to a GPU it leaves out, no device at all) is skipped, and so is one
    /// the first world dominates ([`Auto::dominated_by_first`]).
    fn worlds(&self, req: &PlanRequest<'_>) -> Result<Vec<Instance>, Error> {
        let candidates = main_candidates(req.budgets);
        let tables = UnitTables::new(req.model, &self.instance_options(req, candidates[0]))?;
        let mut worlds = vec![self.world_instance(req, &tables, candidates[0])?];
        for &main in &candidates[1..] {
            if self.dominated_by_first(req, main) {
                continue;
            }
            if let Ok(inst) = self.world_instance(req, &tables, main) {
                worlds.push(inst);
            }
        }
        Ok(worlds)
    }

    /// Whether the world of main GPU `main` can be skipped: the first world holds a copy of each
    /// of its plans that costs the same. So it is when the GPUs from `main` on, shifted down to
    /// the first GPUs, land on GPUs with at least their room and the same profile (memory
    /// bandwidth, host links, peer links pairwise), and no pin names a GPU. Skipping it keeps
    /// the reported bound valid: its optimum is at least the first world's.
    fn dominated_by_first(&self, req: &PlanRequest<'_>, main: Option<u32>) -> bool {
        let Some(main) = main else { return false };
        if (self.options.pins.iter()).any(|(_, d)| d.is_gpu()) {
            return false;
        }
        let Ok((devices, rooms)) = candidate_devices(req.budgets, &self.options.reserve) else {
            return false;
        };
        let (gpus, room): (Vec<u32>, Vec<u64>) = (devices.iter().zip(rooms))
            .filter_map(|(d, r)| match d {
                Device::Gpu(g) => Some((*g, r)),
                _ => None,
            })
            .unzip();
        let Some(k) = gpus.iter().position(|&g| g == main) else {
            return false;
        };
        let t = &self.options.topology;
        let same_profile = |a: u32, b: u32| {
            t.gpu_bandwidth(a) == t.gpu_bandwidth(b)
                && t.host_link(a) == t.host_link(b)
                && t.pageable_host_link(a) == t.pageable_host_link(b)
        };
        let shifted = &gpus[k..];
        (0..shifted.len()).all(|i| room[i] >= room[k + i] && same_profile(shifted[i], gpus[i]))
            && (0..shifted.len()).all(|i| {
                (0..shifted.len()).all(|j| {
                    i == j || t.peer_link(shifted[i], shifted[j]) == t.peer_link(gpus[i], gpus[j])
                })
            })
    }

    /// Hugging Face's greedy maps (both compat paths, three kinds), each a possible start.
    fn hf_maps(&self, req: &PlanRequest<'_>) -> Vec<(String, DeviceMap)> {
        let mut out = Vec::new();
        for compat in [Compat::Transformers, Compat::Accelerate] {
            for kind in [HfKind::Sequential, HfKind::Balanced, HfKind::BalancedLow0] {
                let s = HfGreedy {
                    kind,
                    compat,
                    spill_to_disk: true,
                };
                if let Ok(plan) = s.plan(req) {
                    out.push((format!("{} ({compat:?})", s.name()), plan.map));
                }
            }
        }
        out
    }

    /// Feasible starting points in `inst`: the contiguous DP optimum and the packing bound's own
    /// layout, and the class model's plan (first where blocks are split; its bound raises
    /// `lower`), then, unless one of those meets `lower` already, the Hugging Face maps that keep
    /// units whole and fit (computed on first use, once per plan: six greedy runs take 0.3 s on a
    /// 170k-tensor model), listed first.
    fn starts(
        &self,
        req: &PlanRequest<'_>,
        inst: &Instance,
        hf_maps: &OnceCell<Vec<(String, DeviceMap)>>,
        packing: Option<&Packing>,
        lower: &mut f64,
    ) -> Vec<Start> {
        // Split blocks leave the combinatorial bound loose and the class model is what
        // certifies: it goes first there, after the own starts elsewhere.
        let class_first = inst.split_blocks().next().is_some();
        let mut own = Vec::new();
        for class_step in [class_first, !class_first] {
            if class_step {
                if let Some(class) = self.class_solve(inst) {
                    *lower = lower.max(class.bound);
                    own.extend(class.plan.map(|(a, c)| ("class model".to_string(), a, c)));
                }
            } else {
                own.extend(self.own_starts(inst, packing));
            }
            if own.iter().any(|s| self.meets(s.2, *lower)) {
                return own;
            }
        }
        let maps = hf_maps.get_or_init(|| {
            let t0 = Instant::now();
            let maps = self.hf_maps(req);
            trace_phase("hf_maps", t0);
            maps
        });
        let mut out = Vec::new();
        for (label, map) in maps {
            if let Some(a) = inst.from_map(req.model, map).filter(|a| inst.feasible(a)) {
                let cost = inst.evaluate(&a);
                out.push((label.clone(), a, cost));
            }
        }
        out.extend(own);
        out
    }

    /// The class model of `inst` ([`classes`]) where it applies: a bound and often the optimum.
    /// It gets a tenth of the time limit (and a node limit): it needs milliseconds.
    fn class_solve(&self, inst: &Instance) -> Option<classes::ClassSolve> {
        if !classes::applies(inst) {
            return None;
        }
        let t0 = Instant::now();
        // A quarter of the gap: the plan pays its transfers on top of the model's objective.
        let gap = self.options.mip_rel_gap / 4.0;
        let solved = classes::solve(inst, self.options.time_limit / 10, gap);
        if let Some(c) = solved
            .as_ref()
            .filter(|_| std::env::var_os("DEVMAP_TRACE").is_some())
        {
            let plan = c.plan.as_ref().map(|p| p.1);
            eprintln!("trace:   class model bound {:.6e}, plan {plan:?}", c.bound);
        }
        trace_phase("class model", t0);
        solved
    }

    /// The starts `auto` finds itself: the contiguous DP optimum and the packing bound's layout.
    fn own_starts(&self, inst: &Instance, packing: Option<&Packing>) -> Vec<Start> {
        let mut out = Vec::new();
        if let Some((a, cost)) = dp::solve_contiguous(inst) {
            let label = if !inst.is_chain() {
                "contiguous DP (a start only: the data flow is not a chain)"
            } else if inst.block_rule_binds() {
                "contiguous DP (a start only: split blocks on several GPUs)"
            } else {
                "contiguous DP"
            };
            out.push((label.to_string(), a, cost));
        }
        // The bound's own packing, laid along the chain, is often the best start when offloading;
        // streaming what costs least per byte is, when some units cost nothing streamed (an
        // encoder runs at prefill only) and the packing has nothing to pack.
        let laid_out = [
            (
                "packing bound",
                packing.and_then(|p| packing_start(inst, p, &p.quotas)),
            ),
            (
                "packing bound (per byte)",
                packing.and_then(|p| packing_start(inst, p, &p.byte_quotas)),
            ),
            ("cheapest streamed", cheapest_streamed_start(inst)),
        ];
        for (label, a) in laid_out {
            let Some(a) = a else { continue };
            let a = repair_offload(inst, a, Instant::now() + Duration::from_millis(20));
            if inst.feasible(&a) {
                let cost = inst.evaluate(&a);
                out.push((label.to_string(), a, cost));
            }
        }
        out
    }

    /// Whether `cost` is within the relative gap of `lower` (and the slack HiGHS' reported bound
    /// is lowered by, [`mip::DUAL_BOUND_SLACK`]).
    fn meets(&self, cost: f64, lower: f64) -> bool {
        cost <= lower * (1.0 + self.options.mip_rel_gap + mip::DUAL_BOUND_SLACK) + 1e-12
    }

    /// The cheapest start, polished by a short local search unless it already meets the bound.
    fn best_start(&self, inst: &Instance, mut starts: Vec<Start>, lower: f64) -> Option<Start> {
        starts.sort_by(|a, b| a.2.total_cmp(&b.2));
        let (label, a, c) = starts.into_iter().next()?;
        let a = mip::canonical(inst, &a);
        if self.meets(c, lower) {
            return Some((label, a, c));
        }
        // A short polish: HiGHS takes over if it does not reach the bound.
        let budget = (self.options.time_limit / 4).min(Duration::from_millis(20));
        let (b, cb) = local_search(inst, a.clone(), c, Instant::now() + budget);
        Some(if cb < c {
            (
                format!("{label} + local search"),
                mip::canonical(inst, &b),
                cb,
            )
        } else {
            (label, a, c)
        })
    }

    /// Solve the plans of one main device (one instance); `incumbent` is the best objective of
    /// the worlds before, which prunes this one when its bound cannot beat it.
    fn solve_world(
        &self,
        req: &PlanRequest<'_>,
        inst: &Instance,
        hf_maps: &OnceCell<Vec<(String, DeviceMap)>>,
        deadline: Instant,
        incumbent: Option<f64>,
    ) -> Result<WorldOutcome, Error> {
        // When the budgets together are short, no search can help.
        let need: u64 = (0..inst.n()).map(|i| inst.unit_bytes(i)).sum();
        if check_pins(inst).is_err() || need > inst.caps.iter().sum::<u64>() {
            return Ok(WorldOutcome::without_plan(f64::INFINITY, false));
        }
        let t0 = Instant::now();
        let (mut lower, packing) = lower_bound_with_packing(inst);
        // The MIP's floor cut stays the combinatorial bound: the class model's (higher) bound as a
        // floor made HiGHS overrun its time limit 3-fold on tests/limits.rs' hard instance.
        let floor = lower;
        trace_phase("bound", t0);
        // An infinite bound: no placement fits this world.
        if lower == f64::INFINITY || incumbent.is_some_and(|c| self.meets(c, lower)) {
            return Ok(WorldOutcome::without_plan(lower, false));
        }
        let t0 = Instant::now();
        let starts = self.starts(req, inst, hf_maps, packing.as_ref(), &mut lower);
        if std::env::var_os("DEVMAP_TRACE").is_some() {
            for s in &starts {
                eprintln!("trace:   start {} {:.6e} (lower {lower:.6e})", s.0, s.2);
            }
        }
        trace_phase("starts", t0);
        let t0 = Instant::now();
        let start = self.best_start(inst, starts, lower);
        trace_phase("best_start", t0);
        let t0 = Instant::now();
        let (mip, bound, timed_out) =
            self.search(inst, start.as_ref(), (lower, floor), deadline)?;
        trace_phase("search", t0);
        let chosen = match (mip, start) {
            (Some(m), Some(s)) if s.2 < m.objective => WorldSolve {
                assignment: s.1,
                objective: s.2,
                start: s.0,
                ..m
            },
            (Some(m), _) => m,
            (None, Some((label, a, c))) => WorldSolve {
                assignment: a,
                objective: c,
                detail: format!("start {label} (the MIP found nothing better)"),
                start: label,
                size: (0, 0),
            },
            (None, None) => return Ok(WorldOutcome::without_plan(bound, timed_out)),
        };
        let t0 = Instant::now();
        let finished = self.finish(inst, chosen, deadline);
        trace_phase("finish", t0);
        Ok(WorldOutcome {
            solve: Some(finished),
            bound,
            timed_out,
        })
    }

    /// Certify the start by the bound, or return it with the bound when the MIP is out of reach,
    /// or run the MIP: (its plan, a valid bound, whether the time limit cut the search short).
    /// `(lower, floor)`: the world's best bound, and the one the MIP gets as its floor cut.
    fn search(
        &self,
        inst: &Instance,
        start: Option<&Start>,
        (lower, floor): (f64, f64),
        deadline: Instant,
    ) -> Result<(Option<WorldSolve>, f64, bool), Error> {
        let from_start = |(label, a, c): &Start, detail: String| WorldSolve {
            assignment: a.clone(),
            objective: *c,
            detail,
            start: label.clone(),
            size: (0, 0),
        };
        if let Some(s) = start.filter(|s| self.meets(s.2, lower)) {
            let detail = format!("start {} meets the lower bound", s.0);
            return Ok((Some(from_start(s, detail)), lower, false));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let too_large = inst.n() * inst.devices.len() > MIP_MAX_CELLS;
        if let Some(s) = start.filter(|_| too_large || left.is_zero()) {
            // Too large to even build the MIP within a time limit (a 22k-unit × 16-device model
            // takes seconds to build), or no time left: the start with the bound's proven gap.
            let detail = if too_large {
                format!(
                    "start {} with the combinatorial bound (no MIP: {} units × {} devices)",
                    s.0,
                    inst.n(),
                    inst.devices.len()
                )
            } else {
                format!("start {} (time limit reached before the MIP)", s.0)
            };
            return Ok((Some(from_start(s, detail)), lower, !too_large));
        }
        let opts = MipOptions {
            time_limit: left,
            mip_rel_gap: self.options.mip_rel_gap,
            contiguous: false,
            objective_floor: Some(floor),
        };
        let result = mip::solve(inst, start.map(|s| s.1.as_slice()), opts)?;
        // Both bounds are valid: keep the stronger (HiGHS may stop before reaching the floor).
        let bound = if result.proven_infeasible {
            f64::INFINITY
        } else {
            result.bound_seconds.max(lower)
        };
        let solve = result.assignment.map(|a| WorldSolve {
            assignment: a,
            objective: result.objective_seconds,
            detail: format!("HiGHS: {}", result.status),
            start: start.map_or("none".into(), |s| s.0.clone()),
            size: result.size,
        });
        Ok((solve, bound, result.timed_out))
    }

    /// The offload repair, then the plan's exact objective.
    fn finish(&self, inst: &Instance, mut solve: WorldSolve, deadline: Instant) -> WorldSolve {
        // The repair is exact but costs O(streamed units × GPUs × units): 7 s on 22k units. It
        // gets what is left of the limit plus 10% of it (microseconds on ordinary instances).
        let repair_deadline = deadline.max(Instant::now()) + self.options.time_limit / 10;
        solve.assignment = repair_offload(inst, solve.assignment, repair_deadline);
        solve.objective = inst.evaluate(&solve.assignment);
        solve
    }

    /// The plan and its report from the best world's plan and the bound over all worlds.
    fn report(
        &self,
        req: &PlanRequest<'_>,
        inst: &Instance,
        solve: WorldSolve,
        bound: f64,
        started: Instant,
    ) -> Plan {
        let objective = solve.objective;
        debug_assert!(
            bound_holds(bound, objective),
            "lower bound {bound} above a feasible objective {objective}"
        );
        let gap = if objective > 0.0 {
            ((objective - bound) / objective).max(0.0)
        } else {
            0.0
        };
        let status = if self.meets(objective, bound) {
            SolveStatus::Optimal
        } else {
            SolveStatus::Feasible { gap }
        };
        let usage = inst.usage(&solve.assignment);
        let mut overhead = BTreeMap::new();
        for (b, d) in inst.devices.iter().enumerate() {
            let reserve: u64 = (self.options.reserve.iter())
                .filter(|(x, _)| x == d)
                .map(|(_, r)| *r)
                .sum();
            overhead.insert(*d, usage.overhead[b] + reserve);
        }
        let map = inst.to_map(req.model, &solve.assignment);
        let mut plan = Plan::from_map(self.name(), req, map, req.budgets.clone());
        if req.model.quantization.is_some() {
            // Weights as the quantized runtime holds them, not at their nominal dtype.
            plan.usage = (inst.devices.iter().zip(&usage.weights))
                .filter(|(_, w)| **w > 0)
                .map(|(d, w)| (*d, *w))
                .collect();
        }
        plan.elapsed = started.elapsed();
        plan.solve = Some(SolveReport {
            objective_seconds: objective,
            bound_seconds: bound,
            gap,
            status,
            detail: solve.detail,
            start: solve.start,
            main_gpu: devmap_core::cost::main_gpu_of(
                solve.assignment.iter().map(|&b| inst.devices[b]),
            ),
            units: inst.n(),
            chain: inst.is_chain(),
            size: solve.size,
            overhead,
        });
        plan
    }
}

impl Strategy for Auto {
    fn name(&self) -> String {
        "auto".into()
    }

    /// Solve every world (main device) in turn, each pruned when its bound cannot beat the best
    /// plan so far; the reported bound is the least over the worlds considered.
    fn plan(&self, req: &PlanRequest<'_>) -> Result<Plan, Error> {
        let started = Instant::now();
        let deadline = started + self.options.time_limit;
        let t0 = Instant::now();
        let worlds = self.worlds(req)?;
        trace_phase("worlds", t0);
        // Pins that overfill a device are the request's error (reported for the first world).
        check_pins(&worlds[0])?;
        let hf_maps = OnceCell::new();
        let mut best: Option<(usize, WorldSolve)> = None;
        let mut bound = f64::INFINITY;
        let mut timed_out = false;
        for (w, inst) in worlds.iter().enumerate() {
            // The host-only world (the last) only when no GPU can hold a unit: devmap promises no
            // avoidable offload, even where the cost model rates host execution above streaming.
            // Nor when the quantizer keeps weights off the host (the GPU worlds dropped cpu/disk).
            if inst.main.is_none() && (best.is_some() || worlds[0].gpu_only_rule.is_some()) {
                break;
            }
            let incumbent = best.as_ref().map(|(_, s)| s.objective);
            let outcome = self.solve_world(req, inst, &hf_maps, deadline, incumbent)?;
            if std::env::var_os("DEVMAP_TRACE").is_some() {
                let plan = outcome
                    .solve
                    .as_ref()
                    .map(|s| (s.objective, s.detail.clone()));
                eprintln!(
                    "trace: world main {:?}: bound {}, plan {plan:?}, {:?}",
                    inst.cost_model.main_gpu,
                    outcome.bound,
                    started.elapsed()
                );
            }
            bound = bound.min(outcome.bound);
            timed_out |= outcome.timed_out;
            if let Some(s) = outcome.solve {
                if best.as_ref().is_none_or(|(_, b)| s.objective < b.objective) {
                    best = Some((w, s));
                }
            }
        }
        match best {
            Some((w, solve)) => Ok(self.report(req, &worlds[w], solve, bound, started)),
            None if timed_out => Err(Error::NoPlanInTime(self.options.time_limit)),
            None => Err(infeasible(req.model, &worlds[0])),
        }
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
        let mut room = move_room(inst, &a);
        for i in streamed {
            if Instant::now() > deadline {
                return a;
            }
            if inst.devices[a[i]].is_gpu() {
                continue; // moved with its block
            }
            let mut best: Option<(f64, usize)> = None;
            for g in (0..inst.devices.len()).filter(|&g| inst.devices[g].is_gpu()) {
                // Onto another GPU than the main one a split block moves whole (the block rule).
                let moving = inst.moving_with(i, g);
                if moving.clone().any(|j| !inst.allowed[j][g]) {
                    continue;
                }
                // Surely too big for g: skip the exact check (the whole usage, O(units)).
                let adds: u64 = moving.clone().map(|j| inst.weights_on(j, g)).sum();
                if adds > room.free[g] + room.buffer_freed(inst, &a, moving.clone(), g) {
                    continue;
                }
                let from: Vec<usize> = a[moving.clone()].to_vec();
                a[moving.clone()].fill(g);
                if inst.feasible(&a) {
                    let c = inst.evaluate(&a);
                    if best.is_none_or(|b| c < b.0) {
                        best = Some((c, g));
                    }
                }
                a[moving].copy_from_slice(&from);
            }
            if let Some((_, g)) = best.filter(|(c, _)| *c <= limit) {
                a[inst.moving_with(i, g)].fill(g);
                moved = true;
                room = move_room(inst, &a);
            }
        }
        if !moved {
            return a;
        }
    }
}

/// What a move onto a device can use: per device its free bytes plus every tied copy (a move can
/// free those), and the main GPU's streaming buffer with the streamed units that hold it (a move
/// of all of them frees it).
struct MoveRoom {
    free: Vec<u64>,
    buffer: u64,
    holders: usize,
}

/// The room of assignment `a` ([`MoveRoom`]).
fn move_room(inst: &Instance, a: &[usize]) -> MoveRoom {
    let usage = inst.usage(a);
    let ties: u64 = inst.ties.iter().map(|t| t.storage).sum();
    let free = (0..inst.devices.len())
        .map(|b| inst.caps[b].saturating_sub(usage.total(b)) + ties)
        .collect();
    let streamed = || (0..inst.n()).filter(|&j| inst.is_streamed(a[j]));
    let buffer = streamed().map(|j| inst.stream_buffer(j)).max().unwrap_or(0);
    let holders = streamed()
        .filter(|&j| inst.stream_buffer(j) == buffer)
        .count();
    MoveRoom {
        free,
        buffer,
        holders,
    }
}

impl MoveRoom {
    /// The buffer bytes moving `moving` onto `g` can free there: all of the main GPU's buffer
    /// when the move takes every unit that holds it, else none.
    fn buffer_freed(&self, inst: &Instance, a: &[usize], moving: Range<usize>, g: usize) -> u64 {
        let takes = (moving.filter(|&j| inst.is_streamed(a[j])))
            .filter(|&j| inst.stream_buffer(j) == self.buffer)
            .count();
        if Some(g) == inst.main && takes == self.holders {
            self.buffer
        } else {
            0
        }
    }
}

/// A start that streams the units whose streaming costs least per byte, just enough that the
/// rest fits the GPUs, and lays the rest along the chain over the GPUs in order (pinned units at
/// their pin). `None` without a main GPU or a streamed device, or when it does not fit; the
/// caller repairs its offload.
pub fn cheapest_streamed_start(inst: &Instance) -> Option<Vec<usize>> {
    let main = inst.main?;
    let k = inst.devices.len();
    let streamed: Vec<usize> = (0..k).filter(|&b| inst.is_streamed(b)).collect();
    let gpus: Vec<usize> = (0..k).filter(|&b| inst.devices[b].is_gpu()).collect();
    let pin = |i: usize| {
        let mut allowed = (0..k).filter(|&b| inst.allowed[i][b]);
        match (allowed.next(), allowed.next()) {
            (Some(b), None) => Some(b),
            _ => None,
        }
    };
    let cheapest = |i: usize| {
        (streamed.iter().copied())
            .min_by(|&x, &y| inst.cost[i][x].total_cmp(&inst.cost[i][y]))
            .map(|b| (b, inst.cost[i][b] - inst.cost[i][main]))
    };
    let mut a: Vec<usize> = (0..inst.n())
        .map(|i| pin(i).unwrap_or(usize::MAX))
        .collect();
    let mut order: Vec<(f64, usize, usize)> = (0..inst.n())
        .filter(|&i| a[i] == usize::MAX)
        .filter_map(|i| cheapest(i).map(|(b, e)| (e / inst.mem[i].max(1) as f64, i, b)))
        .collect();
    order.sort_by(|x, y| x.0.total_cmp(&y.0));
    // Stream in that order until what is left fits the GPUs beside the main GPU's buffer.
    let room: u64 = gpus.iter().map(|&g| inst.caps[g]).sum();
    let mut on_gpus: u64 = (0..inst.n())
        .filter(|&i| a[i] == usize::MAX || inst.devices[a[i]].is_gpu())
        .map(|i| inst.unit_bytes(i))
        .sum();
    let mut buffer = 0u64;
    for &(_, i, b) in &order {
        if on_gpus + buffer <= room {
            break;
        }
        a[i] = b;
        on_gpus -= inst.unit_bytes(i);
        buffer = buffer.max(inst.stream_buffer(i)) + inst.streamed_bytes_on_main(i);
    }
    lay_along_gpus(inst, &mut a, &gpus, buffer)?;
    inst.feasible(&a).then_some(a)
}

/// Place every unit of `a` still without a device (`usize::MAX`) on the GPUs in chain order, each
/// GPU filled before the next (the main GPU keeps `reserve` free); `None` if they do not fit.
fn lay_along_gpus(inst: &Instance, a: &mut [usize], gpus: &[usize], reserve: u64) -> Option<()> {
    let mut used: Vec<u64> = vec![0; inst.devices.len()];
    for (i, &b) in a.iter().enumerate() {
        if b != usize::MAX {
            used[b] += inst.unit_bytes_on(i, b);
        }
    }
    let room = |g: usize| {
        let reserve = if Some(g) == inst.main { reserve } else { 0 };
        inst.caps[g].saturating_sub(reserve)
    };
    let mut current = 0;
    for (i, slot) in a.iter_mut().enumerate() {
        if *slot != usize::MAX {
            continue;
        }
        while used[gpus[current]] + inst.unit_bytes_on(i, gpus[current]) > room(gpus[current]) {
            current += 1;
            if current == gpus.len() {
                return None;
            }
        }
        *slot = gpus[current];
        used[gpus[current]] += inst.unit_bytes_on(i, gpus[current]);
    }
    Some(())
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

fn check_pins(inst: &Instance) -> Result<(), Error> {
    for (b, d) in inst.devices.iter().enumerate() {
        // Pinned: a pin removed every other device (a lone device restricts nothing).
        let pinned: u64 = (0..inst.n())
            .filter(|&i| inst.allowed[i].iter().any(|x| !*x) && inst.allowed[i][b])
            .map(|i| inst.unit_bytes_on(i, b))
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
    let devices: Vec<(Device, u64)> = inst
        .devices
        .iter()
        .copied()
        .zip(inst.caps.clone())
        .collect();
    if let (Some(rule), true) = (&inst.gpu_only_rule, total > caps) {
        return Error::QuantizedDoesNotFit {
            shortfall: total - caps,
            need: total,
            gpus: devices,
            rule: rule.clone(),
            load_transient: inst.load_transient.iter().copied().max().unwrap_or(0),
        };
    }
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
        .max_by_key(|&i| inst.unit_bytes(i))
        .map(|i| inst.names[i].clone())
        .unwrap_or_default();
    let rule = inst
        .gpu_only_rule
        .as_ref()
        .map(|r| format!("; cpu and disk are not used: {r}"))
        .unwrap_or_default();
    Error::Infeasible(format!(
        "{} needs {} and the budgets total {}, but no packing of its units fits (the largest unit is {:?}; \
         streamed units also need room on the main GPU){rule}",
        model.name,
        format_bytes(total),
        format_bytes(caps),
        largest
    ))
}

/// With `DEVMAP_TRACE` set, print how long a phase of `auto` took (since `since`).
fn trace_phase(phase: &str, since: Instant) {
    if std::env::var_os("DEVMAP_TRACE").is_some() {
        eprintln!("trace: {phase} {:?}", since.elapsed());
    }
}
