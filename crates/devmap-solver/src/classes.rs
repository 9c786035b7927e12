//! The class model: a world of `auto` solved over classes of interchangeable units.
//!
//! Split blocks make an instance of hundreds of module units, but they come in a few kinds (a
//! decoder layer's q/k/v/o projections, its MLP linears and norms, each repeated per layer) whose
//! units are interchangeable: the same bytes on every device, the same seconds, the same streaming
//! buffer and pins. When the data flow costs nothing to choose (every device of the world executes
//! on one GPU: one GPU with cpu and disk), or is only a lower-order term (several GPUs), the
//! placement problem only asks *how many* units of each class go where. That model has a few dozen
//! integer columns and HiGHS solves it exactly in milliseconds, where the unit model (one binary
//! per unit and device) ran for seconds (docs/strategies.md, "Split blocks").
//!
//! Columns: `n[c][b]`, the units of class `c` on the main GPU, cpu and disk (any mix: the block
//! rule lets a split block lie across them); `m[k][g]`, the blocks of block class `k` (same unit
//! classes in the same order) whole on each other GPU `g`. Rows: every unit placed; memory per
//! device exactly as [`Instance::usage`] charges it (a streamed unit's KV cache on the main GPU,
//! the largest streaming buffer of a streamed class through a binary per class, the largest disk
//! buffer on the cpu, tied storages on the devices holding a member but not the owner: tied units
//! are classes of their own). Objective: the units' seconds.
//!
//! It is a relaxation of the world: transfers (never negative) are left out, and so is the
//! main-GPU rule; so HiGHS' dual bound is a lower bound of every plan of the world. Its optimum
//! laid out along the chain (`ClassModel::lay_out`) is a plan whose cost is the model's
//! objective plus its transfers: with one execution device, none, so it is the world's optimum.

// Index loops mirror the model's subscripts (n[c][b], m[k][g]).
#![allow(clippy::needless_range_loop)]

use std::collections::BTreeMap;
use std::time::Duration;

use devmap_core::cost::Objective;
use good_lp::solvers::highs::highs;
use good_lp::{constraint, variable, Expression, ProblemVariables, SolverModel, Variable};

use crate::instance::Instance;
use crate::mip::DUAL_BOUND_SLACK;

/// Seconds → microseconds (the objective's unit, as in the unit MIP).
const SCALE: f64 = 1e6;
/// Memory rows in GiB (byte coefficients next to microsecond costs mislead HiGHS; see `mip`).
const GIB: f64 = (1u64 << 30) as f64;
/// At most this many branch-and-bound nodes: a deterministic work limit (the fixture cases need
/// under a few hundred).
const MAX_NODES: i32 = 20_000;

/// What the class model gave: a lower bound of the world and, when it lays out, a plan.
#[derive(Debug, Clone)]
pub struct ClassSolve {
    /// A valid lower bound on every feasible plan of the world, seconds.
    pub bound: f64,
    /// The model's optimum laid out along the chain, with its exact cost, when it is feasible.
    pub plan: Option<(Vec<usize>, f64)>,
    /// HiGHS' status, as text.
    pub status: String,
}

/// Whether the class model applies to `inst`: the latency objective (a sum over units), a main
/// GPU (cpu/disk execute on it) and blocks that cover the units (as `auto`'s instances do).
pub fn applies(inst: &Instance) -> bool {
    inst.cost_model.objective == Objective::Latency
        && inst.main.is_some()
        && (inst.blocks.iter().map(|r| r.len()).sum::<usize>() == inst.n())
}

/// Solve `inst`'s class model to relative gap `rel_gap` within `time_limit` (and
/// `MAX_NODES`, 20,000); `None` when HiGHS gives no usable answer (an error, or a status without a
/// bound).
pub fn solve(inst: &Instance, time_limit: Duration, rel_gap: f64) -> Option<ClassSolve> {
    let model = ClassModel::new(inst);
    model.solve(time_limit, rel_gap)
}

/// One class of interchangeable units.
#[derive(Debug, Clone)]
struct UnitClass {
    /// Its units, in chain order.
    units: Vec<usize>,
}

/// One class of blocks: the same unit classes in the same order.
#[derive(Debug, Clone)]
struct BlockClass {
    /// Indices into `inst.blocks`, in chain order.
    blocks: Vec<usize>,
    /// How many units of each unit class one block holds.
    per_class: Vec<(usize, u64)>,
}

/// The classes of an instance and the model over them.
struct ClassModel<'a> {
    inst: &'a Instance,
    classes: Vec<UnitClass>,
    class_of: Vec<usize>,
    block_classes: Vec<BlockClass>,
    /// The main GPU, cpu and disk rows of the instance (where a unit may lie alone).
    domain: Vec<usize>,
    /// The other GPUs (where a block lies whole).
    others: Vec<usize>,
}

/// What makes two units interchangeable: bytes on each device, buffer, seconds and pins; a tied
/// unit is always alone (its tie row names it).
type UnitKey = (Vec<u64>, u64, u64, Vec<u64>, Vec<bool>, Option<usize>);

impl<'a> ClassModel<'a> {
    fn new(inst: &'a Instance) -> ClassModel<'a> {
        let k = inst.devices.len();
        let tied: Vec<bool> = (0..inst.n())
            .map(|i| (inst.ties.iter()).any(|t| t.owner == i || t.members.contains(&i)))
            .collect();
        let mut by_key: BTreeMap<UnitKey, usize> = BTreeMap::new();
        let mut classes: Vec<UnitClass> = Vec::new();
        let mut class_of = vec![0; inst.n()];
        for i in 0..inst.n() {
            let key: UnitKey = (
                (0..k).map(|b| inst.unit_bytes_on(i, b)).collect(),
                inst.stream_buffer(i),
                inst.streamed_bytes_on_main(i),
                (0..k).map(|b| inst.cost[i][b].to_bits()).collect(),
                inst.allowed[i].clone(),
                tied[i].then_some(i),
            );
            let c = *by_key.entry(key).or_insert_with(|| {
                classes.push(UnitClass { units: Vec::new() });
                classes.len() - 1
            });
            classes[c].units.push(i);
            class_of[i] = c;
        }
        let block_classes = block_classes(inst, &class_of);
        let domain = (0..k).filter(|&b| inst.in_main_domain(b)).collect();
        let others = (0..k).filter(|&b| !inst.in_main_domain(b)).collect();
        ClassModel {
            inst,
            classes,
            class_of,
            block_classes,
            domain,
            others,
        }
    }

    fn rep(&self, c: usize) -> usize {
        self.classes[c].units[0]
    }

    fn count(&self, c: usize) -> u64 {
        self.classes[c].units.len() as u64
    }

    /// Bytes one block of class `k` takes on GPU `g`, and its seconds there; `None` when a pin
    /// keeps one of its units off `g`.
    fn block_on(&self, k: usize, g: usize) -> Option<(u64, f64)> {
        let r = self.inst.blocks[self.block_classes[k].blocks[0]].clone();
        (r.clone().all(|i| self.inst.allowed[i][g])).then(|| {
            let bytes = r.clone().map(|i| self.inst.unit_bytes_on(i, g)).sum();
            let secs = r.map(|i| self.inst.cost[i][g]).sum();
            (bytes, secs)
        })
    }

    fn solve(&self, time_limit: Duration, rel_gap: f64) -> Option<ClassSolve> {
        // HiGHS' static initialisers may be deferred to the first solve (highs_init.rs).
        let deferred = crate::highs_init::ensure_highs_initialised();
        trace(|| format!("highs static initialisers deferred to the first solve: {deferred}"));
        let built = self.build();
        let (n_col, m_col) = (built.n_col.clone(), built.m_col.clone());
        let cols = built.cols;
        let mut problem = built.vars.minimise(built.objective).using(highs);
        for c in built.constraints {
            problem = problem.with(c);
        }
        let mut model = problem.try_into_inner().ok()?;
        set_options(&mut model, time_limit, rel_gap);
        let solved = model.try_solve().ok()?;
        let status = format!("{:?}", solved.status());
        let dual = solved.double_info_value(c"mip_dual_bound").ok()?;
        trace(|| {
            format!(
                "highs {status} (class model: {} unit classes, {} block classes, {cols} columns): \
                 dual bound {dual}",
                self.classes.len(),
                self.block_classes.len()
            )
        });
        if !dual.is_finite() {
            return None;
        }
        let plan = matches!(
            solved.primal_solution_status(),
            highs::HighsSolutionStatus::Feasible
        )
        .then(|| self.read(&n_col, &m_col, solved.get_solution().columns()))
        .and_then(|(n, m)| self.lay_out(&n, &m))
        // Rounding may overflow a row by HiGHS' tolerance, and the main-GPU rule is not modelled.
        .filter(|a| self.inst.feasible(a))
        .map(|a| {
            let cost = self.inst.evaluate(&a);
            (a, cost)
        });
        Some(ClassSolve {
            bound: dual / SCALE * (1.0 - DUAL_BOUND_SLACK),
            plan,
            status,
        })
    }
}

/// HiGHS' limits and tolerances for the class model.
fn set_options(model: &mut highs::Model, time_limit: Duration, rel_gap: f64) {
    crate::mip::set_common_options(model, time_limit, rel_gap);
    model.set_option("mip_max_nodes", MAX_NODES);
    // The model is tiny: restarts and most heuristics cost more than they find (fixture cases of
    // 40–52 columns: 40–90 ms with them, 15–35 ms without).
    model.set_option("mip_allow_restart", false);
    for heuristic in ["rins", "rens", "root_reduced_cost", "zi_round", "shifting"] {
        model.set_option(format!("mip_heuristic_run_{heuristic}"), false);
    }
    crate::mip::set_debug_options(model);
}

/// A solver trace line (`DEVMAP_TRACE`), in the MIP's format.
fn trace(line: impl FnOnce() -> String) {
    if std::env::var_os("DEVMAP_TRACE").is_some() {
        eprintln!("trace:   {}", line());
    }
}

/// Blocks grouped by the unit classes they hold, in order.
fn block_classes(inst: &Instance, class_of: &[usize]) -> Vec<BlockClass> {
    let mut by_key: BTreeMap<Vec<usize>, usize> = BTreeMap::new();
    let mut out: Vec<BlockClass> = Vec::new();
    for (bi, r) in inst.blocks.iter().enumerate() {
        let key: Vec<usize> = r.clone().map(|i| class_of[i]).collect();
        let k = *by_key.entry(key.clone()).or_insert_with(|| {
            let mut per: BTreeMap<usize, u64> = BTreeMap::new();
            for c in &key {
                *per.entry(*c).or_default() += 1;
            }
            out.push(BlockClass {
                blocks: Vec::new(),
                per_class: per.into_iter().collect(),
            });
            out.len() - 1
        });
        out[k].blocks.push(bi);
    }
    out
}

/// The model's columns and rows.
struct Built {
    vars: ProblemVariables,
    constraints: Vec<good_lp::Constraint>,
    objective: Expression,
    /// n[c][b] (b a row of `inst.devices`; `None` off the main domain or where not allowed).
    n: Vec<Vec<Option<Variable>>>,
    /// m[k][g] (g a row of `inst.devices`).
    m: Vec<Vec<Option<Variable>>>,
    /// The column of each n[c][b] and m[k][g] (creation rank).
    n_col: Vec<Vec<Option<usize>>>,
    m_col: Vec<Vec<Option<usize>>>,
    cols: usize,
}

impl Built {
    fn add(&mut self, def: good_lp::VariableDefinition) -> Variable {
        self.cols += 1;
        self.vars.add(def)
    }
}

impl ClassModel<'_> {
    fn build(&self) -> Built {
        let inst = self.inst;
        let k = inst.devices.len();
        let mut built = Built {
            vars: ProblemVariables::new(),
            constraints: Vec::new(),
            objective: Expression::default(),
            n: vec![vec![None; k]; self.classes.len()],
            m: vec![vec![None; k]; self.block_classes.len()],
            n_col: vec![vec![None; k]; self.classes.len()],
            m_col: vec![vec![None; k]; self.block_classes.len()],
            cols: 0,
        };
        for c in 0..self.classes.len() {
            for &b in &self.domain {
                if inst.allowed[self.rep(c)][b] {
                    built.n_col[c][b] = Some(built.cols);
                    let v = built.add(variable().integer().min(0.0).max(self.count(c) as f64));
                    built.objective += inst.cost[self.rep(c)][b] * SCALE * v;
                    built.n[c][b] = Some(v);
                }
            }
        }
        let mut mem: Vec<Expression> = vec![Expression::default(); k];
        for bk in 0..self.block_classes.len() {
            let count = self.block_classes[bk].blocks.len() as f64;
            for &g in &self.others {
                if let Some((bytes, secs)) = self.block_on(bk, g) {
                    built.m_col[bk][g] = Some(built.cols);
                    let v = built.add(variable().integer().min(0.0).max(count));
                    built.objective += secs * SCALE * v;
                    mem[g] += bytes as f64 / GIB * v;
                    built.m[bk][g] = Some(v);
                }
            }
        }
        self.placement_rows(&mut built);
        self.domain_memory(&mut built, &mut mem);
        self.tie_rows(&mut built, &mut mem);
        for (b, e) in mem.into_iter().enumerate() {
            let cap = (inst.caps[b] as f64 + 0.5) / GIB;
            built.constraints.push(constraint!(e <= cap));
        }
        built
    }

    /// Every unit of a class placed: alone on the main domain, or in a block on another GPU; no
    /// more blocks of a class on the other GPUs than it has.
    fn placement_rows(&self, built: &mut Built) {
        for c in 0..self.classes.len() {
            let mut placed: Expression = built.n[c].iter().flatten().map(|v| *v * 1.0).sum();
            for (bk, class) in self.block_classes.iter().enumerate() {
                if let Some(&(_, per)) = class.per_class.iter().find(|(cc, _)| *cc == c) {
                    for v in built.m[bk].iter().flatten() {
                        placed += per as f64 * *v;
                    }
                }
            }
            let count = self.count(c) as f64;
            built.constraints.push(constraint!(placed == count));
        }
        // At most the class's blocks on the other GPUs (the rest lie on the main domain).
        for (bk, class) in self.block_classes.iter().enumerate() {
            let whole: Expression = built.m[bk].iter().flatten().map(|v| *v * 1.0).sum();
            let count = class.blocks.len() as f64;
            built.constraints.push(constraint!(whole <= count));
        }
    }

    /// The main GPU, cpu and disk rows' unit terms: bytes where placed, a streamed unit's KV cache
    /// on the main GPU, the largest streamed buffer (`s`) on the main GPU and the largest disk
    /// buffer (`r`) on the cpu, each through a binary per class ("some unit of it is there").
    fn domain_memory(&self, built: &mut Built, mem: &mut [Expression]) {
        let inst = self.inst;
        let main = inst.main.expect("applies() checked");
        let s = built.add(variable().min(0.0));
        let r = built.add(variable().min(0.0));
        mem[main] += s;
        if let Some(cpu) = inst.cpu {
            mem[cpu] += r;
        }
        for c in 0..self.classes.len() {
            let (rep, count) = (self.rep(c), self.count(c) as f64);
            let (mut streamed, mut streams) = (Expression::default(), false);
            for &b in &self.domain {
                let Some(v) = built.n[c][b] else { continue };
                mem[b] += inst.unit_bytes_on(rep, b) as f64 / GIB * v;
                if inst.is_streamed(b) {
                    mem[main] += inst.streamed_bytes_on_main(rep) as f64 / GIB * v;
                    streamed += v;
                    streams = true;
                }
            }
            let buffer = inst.stream_buffer(rep) as f64 / GIB;
            if buffer > 0.0 && streams {
                let y = built.add(variable().binary());
                built.constraints.push(constraint!(count * y >= streamed));
                built.constraints.push(constraint!(s >= buffer * y));
            }
            if let (Some(_), Some(d)) = (inst.cpu, inst.disk) {
                if let Some(v) = built.n[c][d].filter(|_| buffer > 0.0) {
                    let z = built.add(variable().binary());
                    built.constraints.push(constraint!(count * z >= v));
                    built.constraints.push(constraint!(r >= buffer * z));
                }
            }
        }
    }

    /// Whether unit `u` (alone in its class) is on row `b`: its class's column there, or, on a GPU
    /// off the main domain, its block class's.
    fn on(&self, built: &Built, u: usize, b: usize) -> Expression {
        let c = self.class_of[u];
        if let Some(v) = built.n[c][b] {
            return v.into();
        }
        (self.block_classes.iter().enumerate())
            .filter(|(_, k)| k.per_class.iter().any(|(cc, _)| *cc == c))
            .filter_map(|(bk, _)| built.m[bk][b])
            .map(|v| v * 1.0)
            .sum()
    }

    /// A tied storage on every row holding a member but not the owner (`w ≥ x[m] − x[o]`).
    fn tie_rows(&self, built: &mut Built, mem: &mut [Expression]) {
        let inst = self.inst;
        for tie in &inst.ties {
            for b in 0..inst.devices.len() {
                let w = built.add(variable().min(0.0).max(1.0));
                let owner = self.on(built, tie.owner, b);
                for &u in &tie.members {
                    let member = self.on(built, u, b);
                    built
                        .constraints
                        .push(constraint!(w >= member - owner.clone()));
                }
                mem[b] += tie.storage as f64 / GIB * w;
            }
        }
    }

    /// The rounded column values: (n[c][b], m[k][g]), from their columns.
    #[allow(clippy::type_complexity)]
    fn read(
        &self,
        n: &[Vec<Option<usize>>],
        m: &[Vec<Option<usize>>],
        values: &[f64],
    ) -> (Vec<Vec<u64>>, Vec<Vec<u64>>) {
        let round = |row: &Vec<Option<usize>>| -> Vec<u64> {
            row.iter()
                .map(|v| v.map_or(0, |c| values[c].round().max(0.0) as u64))
                .collect()
        };
        (n.iter().map(round).collect(), m.iter().map(round).collect())
    }

    /// An assignment with these counts: blocks in chain order fill the main domain first, then the
    /// other GPUs in order (each block where its class has quota left, from the current target
    /// on), so each GPU holds a run of consecutive blocks; on the main domain each class's units
    /// take the main GPU first, then cpu, then disk. `None` when the counts do not add up.
    fn lay_out(&self, n: &[Vec<u64>], m: &[Vec<u64>]) -> Option<Vec<usize>> {
        let inst = self.inst;
        let targets: Vec<Option<usize>> = std::iter::once(None)
            .chain(self.others.iter().map(|&g| Some(g)))
            .collect();
        // quota[k][t]: blocks of class k left for target t (0: the main domain).
        let mut quota: Vec<Vec<u64>> = (0..self.block_classes.len())
            .map(|bk| {
                let on_others: Vec<u64> = self.others.iter().map(|&g| m[bk][g]).collect();
                let total = self.block_classes[bk].blocks.len() as u64;
                let rest = total.checked_sub(on_others.iter().sum())?;
                Some(std::iter::once(rest).chain(on_others).collect())
            })
            .collect::<Option<_>>()?;
        let mut block_of = vec![0; inst.blocks.len()];
        for (bk, class) in self.block_classes.iter().enumerate() {
            for &b in &class.blocks {
                block_of[b] = bk;
            }
        }
        let mut left: Vec<Vec<u64>> = n.to_vec();
        let mut a = vec![usize::MAX; inst.n()];
        let mut current = 0usize;
        for (bi, r) in inst.blocks.iter().enumerate() {
            let bk = block_of[bi];
            let t = (current..targets.len())
                .chain(0..current)
                .find(|&t| quota[bk][t] > 0)?;
            quota[bk][t] -= 1;
            current = t;
            match targets[t] {
                Some(g) => r.clone().for_each(|i| a[i] = g),
                None => {
                    for i in r.clone() {
                        let c = self.class_of[i];
                        let b = self.domain.iter().copied().find(|&b| left[c][b] > 0)?;
                        left[c][b] -= 1;
                        a[i] = b;
                    }
                }
            }
        }
        Some(a)
    }
}
