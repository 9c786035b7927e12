//! The class model: a world of `auto` solved over classes of interchangeable units.
//!
//! Split blocks make an instance of hundreds of module units, but they come in a few kinds (a
//! decoder layer's q/k/v/o projections, its MLP linears and norms, each repeated per layer) whose
//! units are interchangeable: the same bytes on every device, the same seconds, the same streaming
//! buffer and pins. When the data flow costs nothing to choose (every device of the world executes
//! on one GPU: one GPU with cpu and disk), or is only a lower-order term (several GPUs), the
//! placement problem only asks *how many* units of each class go where. That model has a few dozen
//! integer columns, where the unit model (one binary per unit and device) ran for seconds
//! (docs/strategies.md, "Split blocks"). It is solved by its buffer levels (`solve_by_levels`: an
//! own branch and bound, `branch.rs`, over relaxations without binaries, `simplex.rs`) in about a
//! millisecond, and by HiGHS where that search cannot settle it.
//!
//! Columns: `n[c][b]`, the units of class `c` on the main GPU, cpu and disk (any mix: the block
//! rule lets a split block lie across them); `m[k][g]`, the blocks of block class `k` (same unit
//! classes in the same order) whole on each other GPU `g`. Rows: every unit placed; memory per
//! device exactly as [`Instance::usage`] charges it (a streamed unit's KV cache on the main GPU,
//! the largest streaming buffer of a streamed class and the largest disk buffer on the cpu, through
//! a binary per class for HiGHS and as constants per buffer level for the level search, tied
//! storages on the devices holding a member but not the owner: tied units are classes of their
//! own). Objective: the units' seconds.
//!
//! It is a relaxation of the world: transfers (never negative) are left out, and so is the
//! main-GPU rule; so its optimum (and any bound of it) is a lower bound of every plan of the world. Its optimum
//! laid out along the chain (`ClassModel::lay_out`) is a plan whose cost is the model's
//! objective plus its transfers: with one execution device, none, so it is the world's optimum.

// Index loops mirror the model's subscripts (n[c][b], m[k][g]).
#![allow(clippy::needless_range_loop)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use devmap_core::cost::Objective;
use good_lp::solvers::highs::highs;
use good_lp::{constraint, variable, Expression, ProblemVariables, SolverModel, Variable};

use crate::branch::{self, Limits, Search, Variant};
use crate::instance::Instance;
use crate::mip::DUAL_BOUND_SLACK;
use crate::simplex::{Lp, Row};

/// Seconds → microseconds (the objective's unit, as in the unit MIP).
const SCALE: f64 = 1e6;
/// Memory rows in GiB (byte coefficients next to microsecond costs mislead HiGHS; see `mip`).
const GIB: f64 = (1u64 << 30) as f64;
/// At most this many branch-and-bound nodes: a deterministic work limit (the fixture cases need
/// under a few hundred).
const MAX_NODES: i32 = 20_000;
/// At most this many relaxations in the level search before HiGHS takes over (the fixture cases
/// it settles need under 400; one that needs more is faster left to HiGHS' cuts).
const MAX_LEVEL_NODES: usize = 500;
/// The level search looks for the optimum itself (a zero gap) for this many relaxations, then
/// settles for the requested gap.
const EXACT_LEVEL_NODES: usize = 100;

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

/// Solve `inst`'s class model to relative gap `rel_gap` within `time_limit`: by its buffer levels
/// (`solve_by_levels`) and, where that cannot settle it, by HiGHS (within `MAX_NODES`, 20,000);
/// `None` when the model is infeasible or HiGHS gives no usable answer (an error, or a status
/// without a bound).
pub fn solve(inst: &Instance, time_limit: Duration, rel_gap: f64) -> Option<ClassSolve> {
    let started = Instant::now();
    let model = ClassModel::new(inst);
    trace(|| format!("class model built in {:?}", started.elapsed()));
    match model.solve_by_levels(rel_gap, started + time_limit) {
        Ok(solved) => solved,
        Err(Unsettled(why)) => {
            trace(|| format!("class model levels unsettled ({why}): HiGHS"));
            model.solve_highs(time_limit.saturating_sub(started.elapsed()), rel_gap)
        }
    }
}

/// Why the level search left a class model to HiGHS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsettled(pub &'static str);

/// [`solve`] by the level search alone: `Ok(None)` when the model is infeasible, `Err` where the
/// search could not settle it (what `solve` leaves to HiGHS).
pub fn solve_by_levels(
    inst: &Instance,
    time_limit: Duration,
    rel_gap: f64,
) -> Result<Option<ClassSolve>, Unsettled> {
    ClassModel::new(inst).solve_by_levels(rel_gap, Instant::now() + time_limit)
}

/// [`solve`] by HiGHS alone (the model with a binary per streamed class): what the level search
/// falls back to, and what tests compare it with.
pub fn solve_with_highs(inst: &Instance, time_limit: Duration, rel_gap: f64) -> Option<ClassSolve> {
    ClassModel::new(inst).solve_highs(time_limit, rel_gap)
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

    fn solve_highs(&self, time_limit: Duration, rel_gap: f64) -> Option<ClassSolve> {
        // HiGHS' static initialisers may be deferred to the first solve (highs_init.rs).
        let deferred = crate::highs_init::ensure_highs_initialised();
        trace(|| format!("highs static initialisers deferred to the first solve: {deferred}"));
        let mut p = self.program();
        self.buffer_binaries(&mut p);
        let mut model = to_highs(&p)?;
        set_options(&mut model, time_limit, rel_gap);
        let solved = model.try_solve().ok()?;
        let status = format!("{:?}", solved.status());
        let dual = solved.double_info_value(c"mip_dual_bound").ok()?;
        trace(|| {
            format!(
                "highs {status} (class model: {} unit classes, {} block classes, {} columns): \
                 dual bound {dual}",
                self.classes.len(),
                self.block_classes.len(),
                p.lo.len()
            )
        });
        if !dual.is_finite() {
            return None;
        }
        let feasible = matches!(
            solved.primal_solution_status(),
            highs::HighsSolutionStatus::Feasible
        );
        let values = feasible.then(|| solved.get_solution().columns().to_vec());
        Some(ClassSolve {
            bound: dual / SCALE * (1.0 - DUAL_BOUND_SLACK),
            plan: values.and_then(|x| self.plan_of(&p, &x)),
            status,
        })
    }

    /// The plan of the model's point `x`: laid out, checked (rounding may overflow a row by a
    /// solver's tolerance, and the main-GPU rule is not modelled) and priced.
    fn plan_of(&self, p: &Program, x: &[f64]) -> Option<(Vec<usize>, f64)> {
        let (n, m) = self.read(&p.n_col, &p.m_col, x);
        let a = self.lay_out(&n, &m).filter(|a| self.inst.feasible(a))?;
        let cost = self.inst.evaluate(&a);
        Some((a, cost))
    }
}

impl ClassModel<'_> {
    /// The model solved over its buffer levels (docs/strategies.md, "The class model"): a node of
    /// the search fixes a range of levels for the main GPU's streaming buffer and the cpu's disk
    /// buffer, charges the least of each and lets a class stream (lie on disk) only where its
    /// buffer is within the range; with no binary left the relaxation is tight. `Err` when the
    /// search cannot settle it (then HiGHS solves it).
    fn solve_by_levels(
        &self,
        rel_gap: f64,
        deadline: Instant,
    ) -> Result<Option<ClassSolve>, Unsettled> {
        let t0 = Instant::now();
        let levels = Levels::new(self);
        trace(|| format!("class model levels built in {:?}", t0.elapsed()));
        let limits = Limits {
            rel_gap,
            exact_nodes: EXACT_LEVEL_NODES,
            max_nodes: MAX_LEVEL_NODES,
            deadline,
        };
        let (best, bound, nodes) = match branch::search(&levels, limits) {
            Search::Settled { best, bound, nodes } => (best, bound, nodes),
            Search::Unsettled(why) => return Err(Unsettled(why)),
        };
        trace(|| {
            format!(
                "class model by levels ({} unit classes, {} block classes, {} columns, {}×{} \
                 levels, {nodes} relaxations): best {:?}, bound {bound}",
                self.classes.len(),
                self.block_classes.len(),
                levels.p.lo.len(),
                levels.stream.len(),
                levels.disk.len(),
                best.as_ref().map(|b| b.0)
            )
        });
        let Some((_, x)) = best else {
            return Ok(None);
        };
        Ok(Some(ClassSolve {
            bound: bound / SCALE * (1.0 - DUAL_BOUND_SLACK),
            plan: self.plan_of(&levels.p, &x),
            status: "Optimal (by levels)".to_string(),
        }))
    }
}

/// The class model's buffer levels, as [`branch::Family`] keys: a key is an inclusive range of
/// indices into `stream` (the main GPU's streaming buffer) and one into `disk` (the cpu's disk
/// buffer).
struct Levels<'m, 'a> {
    model: &'m ClassModel<'a>,
    /// The program without buffers.
    p: Program,
    /// 0 and the buffer of each class that may stream, ascending.
    stream: Vec<u64>,
    /// 0 and the buffer of each class that may lie on disk where the cpu holds that buffer.
    disk: Vec<u64>,
    /// The disk's row when the cpu holds a disk buffer (there are both).
    disk_row: Option<usize>,
}

/// Ranges of buffer levels: `(stream_lo, stream_hi, disk_lo, disk_hi)`, indices, inclusive.
type LevelRange = (usize, usize, usize, usize);

impl<'m, 'a> Levels<'m, 'a> {
    fn new(model: &'m ClassModel<'a>) -> Levels<'m, 'a> {
        let inst = model.inst;
        let mut p = model.program();
        model.symmetry_rows(&mut p);
        model.pattern_rows(&mut p);
        let disk_row = inst.cpu.and(inst.disk);
        let buffers = |on: &dyn Fn(usize) -> bool| -> Vec<u64> {
            let may = |c: usize| {
                model
                    .domain
                    .iter()
                    .any(|&b| on(b) && p.n_col[c][b].is_some())
            };
            let set: BTreeSet<u64> = (0..model.classes.len())
                .filter(|&c| may(c))
                .map(|c| inst.stream_buffer(model.rep(c)))
                .chain([0])
                .collect();
            set.into_iter().collect()
        };
        let stream = buffers(&|b| inst.is_streamed(b));
        let disk = buffers(&|b| Some(b) == disk_row);
        Levels {
            model,
            p,
            stream,
            disk,
            disk_row,
        }
    }

    /// The largest buffer of a class with a share of `x` on the rows `on` (0 when none).
    fn needed(&self, x: &[f64], on: impl Fn(usize) -> bool) -> u64 {
        let m = self.model;
        (0..m.classes.len())
            .filter(|&c| {
                let cols = m
                    .domain
                    .iter()
                    .filter(|&&b| on(b))
                    .filter_map(|&b| self.p.n_col[c][b]);
                cols.map(|v| x[v]).sum::<f64>() > 1e-9
            })
            .map(|c| m.inst.stream_buffer(m.rep(c)))
            .max()
            .unwrap_or(0)
    }
}

/// `levels[lo..=hi]` split where `need` (one of them) begins, when it is above the least: the
/// range from `need` first.
fn split_range(levels: &[u64], (lo, hi): (usize, usize), need: u64) -> Option<[(usize, usize); 2]> {
    (need > levels[lo]).then(|| {
        let at = levels.partition_point(|&l| l < need);
        [(lo, at - 1), (at, hi)]
    })
}

impl branch::Family for Levels<'_, '_> {
    type Key = LevelRange;

    fn lp(&self) -> &Lp {
        &self.p.lp
    }

    fn integer(&self) -> &[bool] {
        &self.p.integer
    }

    fn root(&self) -> LevelRange {
        (0, self.stream.len() - 1, 0, self.disk.len() - 1)
    }

    /// The least buffers of the ranges charged, and a class kept off the streamed rows (off disk)
    /// when its buffer is above the stream (disk) range.
    fn variant(&self, &(s_lo, s_hi, d_lo, d_hi): &LevelRange) -> Variant {
        let (m, inst) = (self.model, self.model.inst);
        let main = inst.main.expect("applies() checked");
        let (mut hi, mut rhs) = (self.p.hi.clone(), self.p.rhs());
        rhs[self.p.mem_row[main]] -= self.stream[s_lo] as f64 / GIB;
        if let Some(cpu) = inst.cpu.filter(|_| self.disk_row.is_some()) {
            rhs[self.p.mem_row[cpu]] -= self.disk[d_lo] as f64 / GIB;
        }
        for c in 0..m.classes.len() {
            let buffer = inst.stream_buffer(m.rep(c));
            for &b in m.domain.iter().filter(|&&b| inst.is_streamed(b)) {
                let Some(v) = self.p.n_col[c][b] else {
                    continue;
                };
                let disk_limit = (Some(b) == self.disk_row).then(|| self.disk[d_hi]);
                if buffer > self.stream[s_hi] || disk_limit.is_some_and(|l| buffer > l) {
                    hi[v] = 0.0;
                }
            }
        }
        Variant {
            lo: self.p.lo.clone(),
            hi,
            rhs,
        }
    }

    /// Split the stream range where the buffers `x` streams need more than it charges, else the
    /// disk range likewise.
    fn split(&self, &(s_lo, s_hi, d_lo, d_hi): &LevelRange, x: &[f64]) -> Option<[LevelRange; 2]> {
        let inst = self.model.inst;
        let stream_need = self.needed(x, |b| inst.is_streamed(b));
        if let Some([a, b]) = split_range(&self.stream, (s_lo, s_hi), stream_need) {
            return Some([(a.0, a.1, d_lo, d_hi), (b.0, b.1, d_lo, d_hi)]);
        }
        let row = self.disk_row?;
        let disk_need = self.needed(x, |b| b == row);
        let [a, b] = split_range(&self.disk, (d_lo, d_hi), disk_need)?;
        Some([(s_lo, s_hi, a.0, a.1), (s_lo, s_hi, b.0, b.1)])
    }

    fn accept(&self, x: &[f64]) -> bool {
        self.model.fits(&self.p, x)
    }
}

impl ClassModel<'_> {
    /// Each other GPU's blocks within the hull of what fits it whole: `m[k][g] ≤ Σ_p count_pk λ_p`,
    /// `Σ_p λ_p ≤ 1` over the maximal patterns `p` (block counts to which no block can be added).
    /// Every integral point is under a pattern, so the optimum stays; without it the relaxation
    /// filled a GPU's remainder with fractions of blocks (2% below the optimum on Llama-3.1-70B
    /// 4x24G+cpu128: an embedding spread in thirds over three GPUs). Only where the row holds
    /// nothing but blocks (no tied copy) and the patterns are few.
    fn pattern_rows(&self, p: &mut Program) {
        if !self.inst.ties.is_empty() {
            return;
        }
        for &g in &self.others {
            let items: Vec<(usize, u64, u64)> = (0..self.block_classes.len())
                .filter_map(|k| {
                    let col = p.m_col[k][g]?;
                    Some((
                        col,
                        self.block_on(k, g)?.0,
                        self.block_classes[k].blocks.len() as u64,
                    ))
                })
                .collect();
            let sizes: Vec<(u64, u64)> = items.iter().map(|&(_, b, n)| (b, n)).collect();
            let Some(patterns) = maximal_patterns(&sizes, self.inst.caps[g]) else {
                continue;
            };
            let lambdas: Vec<usize> = (patterns.iter())
                .map(|_| p.add_col((0.0, 1.0), 0.0, false))
                .collect();
            for (i, &(col, _, _)) in items.iter().enumerate() {
                let mut row = vec![(col, 1.0)];
                row.extend((lambdas.iter().zip(&patterns)).map(|(&l, pat)| (l, -(pat[i] as f64))));
                p.add_row(row, false, 0.0);
            }
            p.add_row(lambdas.iter().map(|&l| (l, 1.0)).collect(), false, 1.0);
        }
    }

    /// Of two other GPUs that are interchangeable (same capacity, and every block class the same
    /// bytes and seconds on both), the later holds no more block bytes than the earlier: any
    /// point permuted that way is one, so the optimum stays, and the search skips the permutations.
    fn symmetry_rows(&self, p: &mut Program) {
        let same = |g: usize, h: usize| {
            self.inst.caps[g] == self.inst.caps[h]
                && (0..self.block_classes.len()).all(|k| {
                    let (a, b) = (self.block_on(k, g), self.block_on(k, h));
                    a.map(|(bytes, secs)| (bytes, secs.to_bits()))
                        == b.map(|(bytes, secs)| (bytes, secs.to_bits()))
                })
                && (self.inst.ties.is_empty())
        };
        for pair in self.others.windows(2) {
            let (g, h) = (pair[0], pair[1]);
            if !same(g, h) {
                continue;
            }
            let mut terms = Vec::new();
            for k in 0..self.block_classes.len() {
                if let (Some(a), Some(b), Some((bytes, _))) =
                    (p.m_col[k][g], p.m_col[k][h], self.block_on(k, g))
                {
                    terms.push((b, bytes as f64 / GIB));
                    terms.push((a, -(bytes as f64) / GIB));
                }
            }
            p.add_row(terms, false, 0.0);
        }
    }

    /// Whether the model's integral point `x` lays out within every device's capacity, exactly
    /// (the relaxation's rows are floating point; the main-GPU rule is not the model's).
    fn fits(&self, p: &Program, x: &[f64]) -> bool {
        let (n, m) = self.read(&p.n_col, &p.m_col, x);
        let Some(a) = self.lay_out(&n, &m) else {
            return false;
        };
        let usage = self.inst.usage(&a);
        (0..self.inst.devices.len()).all(|b| usage.total(b) <= self.inst.caps[b])
    }
}

/// The maximal ways to fill `cap` with whole items (`(bytes, count)`): counts per item to which
/// no item can be added; `None` when there are more than `MAX_PATTERNS`.
fn maximal_patterns(items: &[(u64, u64)], cap: u64) -> Option<Vec<Vec<u64>>> {
    const MAX_PATTERNS: usize = 32;
    fn walk(
        items: &[(u64, u64)],
        cap: u64,
        at: &mut Vec<u64>,
        used: u64,
        out: &mut Vec<Vec<u64>>,
    ) -> bool {
        let i = at.len();
        if i == items.len() {
            let room = cap - used;
            let maximal = (items.iter().zip(at.iter())).all(|(&(b, n), &k)| k == n || b > room);
            if maximal {
                out.push(at.clone());
            }
            return out.len() <= MAX_PATTERNS;
        }
        let (bytes, count) = items[i];
        let most = (cap - used)
            .checked_div(bytes)
            .map_or(count, |n| n.min(count));
        for k in (0..=most).rev() {
            at.push(k);
            let fine = walk(items, cap, at, used + k * bytes, out);
            at.pop();
            if !fine {
                return false;
            }
        }
        true
    }
    let mut out = Vec::new();
    walk(items, cap, &mut Vec::new(), 0, &mut out).then_some(out)
}

/// The program as a HiGHS model (through good_lp).
fn to_highs(p: &Program) -> Option<highs::Model> {
    let mut vars = ProblemVariables::new();
    let cols: Vec<Variable> = (0..p.lo.len())
        .map(|j| {
            let def = variable().min(p.lo[j]).max(p.hi[j]);
            vars.add(if p.integer[j] { def.integer() } else { def })
        })
        .collect();
    let objective: Expression = (cols.iter().zip(&p.lp.cost))
        .filter(|(_, c)| **c != 0.0)
        .map(|(v, c)| *c * *v)
        .sum();
    let mut problem = vars.minimise(objective).using(highs);
    for row in &p.lp.rows {
        let e: Expression = row.terms.iter().map(|&(j, a)| a * cols[j]).sum();
        problem = problem.with(if row.equal {
            constraint!(e == row.rhs)
        } else {
            constraint!(e <= row.rhs)
        });
    }
    problem.try_into_inner().ok()
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

/// The model's columns and rows, for either solver: the linear program, each column's bounds and
/// integrality, and where each n[c][b], m[k][g] and memory row is.
#[derive(Debug, Clone, Default)]
struct Program {
    lp: Lp,
    lo: Vec<f64>,
    hi: Vec<f64>,
    integer: Vec<bool>,
    /// The column of each n[c][b] (b a row of `inst.devices`; `None` off the main domain or where
    /// not allowed) and m[k][g] (g a row of `inst.devices`).
    n_col: Vec<Vec<Option<usize>>>,
    m_col: Vec<Vec<Option<usize>>>,
    /// Each device's memory row.
    mem_row: Vec<usize>,
}

impl Program {
    fn add_col(&mut self, (lo, hi): (f64, f64), cost: f64, integer: bool) -> usize {
        self.lp.cost.push(cost);
        self.lo.push(lo);
        self.hi.push(hi);
        self.integer.push(integer);
        self.lp.cost.len() - 1
    }

    fn add_row(&mut self, terms: Vec<(usize, f64)>, equal: bool, rhs: f64) -> usize {
        self.lp.rows.push(Row { terms, equal, rhs });
        self.lp.rows.len() - 1
    }

    /// The right-hand sides of the rows.
    fn rhs(&self) -> Vec<f64> {
        self.lp.rows.iter().map(|r| r.rhs).collect()
    }
}

/// Terms of a row: `(column, coefficient)`.
type Terms = Vec<(usize, f64)>;

impl ClassModel<'_> {
    /// The model without its streaming and disk buffers (which `buffer_binaries` or a level adds):
    /// columns, placement rows, the unit terms of every memory row, tie rows.
    fn program(&self) -> Program {
        let inst = self.inst;
        let k = inst.devices.len();
        let mut p = Program {
            n_col: vec![vec![None; k]; self.classes.len()],
            m_col: vec![vec![None; k]; self.block_classes.len()],
            ..Program::default()
        };
        for c in 0..self.classes.len() {
            for &b in &self.domain {
                if inst.allowed[self.rep(c)][b] {
                    let cost = inst.cost[self.rep(c)][b] * SCALE;
                    p.n_col[c][b] = Some(p.add_col((0.0, self.count(c) as f64), cost, true));
                }
            }
        }
        let mut mem: Vec<Terms> = vec![Vec::new(); k];
        for bk in 0..self.block_classes.len() {
            let count = self.block_classes[bk].blocks.len() as f64;
            for &g in &self.others {
                if let Some((bytes, secs)) = self.block_on(bk, g) {
                    let v = p.add_col((0.0, count), secs * SCALE, true);
                    mem[g].push((v, bytes as f64 / GIB));
                    p.m_col[bk][g] = Some(v);
                }
            }
        }
        self.placement_rows(&mut p);
        self.domain_memory(&p, &mut mem);
        self.tie_rows(&mut p, &mut mem);
        for (b, terms) in mem.into_iter().enumerate() {
            let cap = (inst.caps[b] as f64 + 0.5) / GIB;
            let row = p.add_row(terms, false, cap);
            p.mem_row.push(row);
        }
        p
    }

    /// Every unit of a class placed: alone on the main domain, or in a block on another GPU; no
    /// more blocks of a class on the other GPUs than it has.
    fn placement_rows(&self, p: &mut Program) {
        for c in 0..self.classes.len() {
            let mut placed: Terms = p.n_col[c].iter().flatten().map(|&v| (v, 1.0)).collect();
            for (bk, class) in self.block_classes.iter().enumerate() {
                if let Some(&(_, per)) = class.per_class.iter().find(|(cc, _)| *cc == c) {
                    placed.extend(p.m_col[bk].iter().flatten().map(|&v| (v, per as f64)));
                }
            }
            p.add_row(placed, true, self.count(c) as f64);
        }
        // At most the class's blocks on the other GPUs (the rest lie on the main domain).
        for (bk, class) in self.block_classes.iter().enumerate() {
            let whole: Terms = p.m_col[bk].iter().flatten().map(|&v| (v, 1.0)).collect();
            p.add_row(whole, false, class.blocks.len() as f64);
        }
    }

    /// The main GPU, cpu and disk rows' unit terms: bytes where placed, and a streamed unit's KV
    /// cache on the main GPU.
    fn domain_memory(&self, p: &Program, mem: &mut [Terms]) {
        let inst = self.inst;
        let main = inst.main.expect("applies() checked");
        for c in 0..self.classes.len() {
            let rep = self.rep(c);
            for &b in &self.domain {
                let Some(v) = p.n_col[c][b] else { continue };
                mem[b].push((v, inst.unit_bytes_on(rep, b) as f64 / GIB));
                if inst.is_streamed(b) {
                    mem[main].push((v, inst.streamed_bytes_on_main(rep) as f64 / GIB));
                }
            }
        }
    }

    /// The buffers as HiGHS' model has them: the largest streamed buffer (`s`) on the main GPU and
    /// the largest disk buffer (`r`) on the cpu, each through a binary per class ("some unit of it
    /// is there").
    fn buffer_binaries(&self, p: &mut Program) {
        let inst = self.inst;
        let main = inst.main.expect("applies() checked");
        let s = p.add_col((0.0, f64::INFINITY), 0.0, false);
        let r = p.add_col((0.0, f64::INFINITY), 0.0, false);
        p.lp.rows[p.mem_row[main]].terms.push((s, 1.0));
        if let Some(cpu) = inst.cpu {
            p.lp.rows[p.mem_row[cpu]].terms.push((r, 1.0));
        }
        for c in 0..self.classes.len() {
            let count = self.count(c) as f64;
            let buffer = inst.stream_buffer(self.rep(c)) as f64 / GIB;
            let streamed: Terms = (self.domain.iter())
                .filter(|&&b| inst.is_streamed(b))
                .filter_map(|&b| p.n_col[c][b])
                .map(|v| (v, -1.0))
                .collect();
            if buffer > 0.0 && !streamed.is_empty() {
                self.indicator(p, streamed, count, (s, buffer));
            }
            if let (Some(_), Some(d)) = (inst.cpu, inst.disk) {
                if let Some(v) = p.n_col[c][d].filter(|_| buffer > 0.0) {
                    self.indicator(p, vec![(v, -1.0)], count, (r, buffer));
                }
            }
        }
    }

    /// A binary `y` with `count · y ≥ Σ columns` (`negated`: those columns, coefficient −1) and
    /// `buffer_col ≥ buffer · y`.
    fn indicator(&self, p: &mut Program, mut negated: Terms, count: f64, buffer: (usize, f64)) {
        let y = p.add_col((0.0, 1.0), 0.0, true);
        negated.push((y, count));
        p.add_row(
            negated.into_iter().map(|(v, a)| (v, -a)).collect(),
            false,
            0.0,
        );
        p.add_row(vec![(y, buffer.1), (buffer.0, -1.0)], false, 0.0);
    }

    /// The columns saying whether unit `u` (alone in its class) is on row `b`: its class's column
    /// there, or, on a GPU off the main domain, its block class's.
    fn on(&self, p: &Program, u: usize, b: usize) -> Terms {
        let c = self.class_of[u];
        if let Some(v) = p.n_col[c][b] {
            return vec![(v, 1.0)];
        }
        (self.block_classes.iter().enumerate())
            .filter(|(_, k)| k.per_class.iter().any(|(cc, _)| *cc == c))
            .filter_map(|(bk, _)| p.m_col[bk][b])
            .map(|v| (v, 1.0))
            .collect()
    }

    /// A tied storage on every row holding a member but not the owner (`w ≥ x[m] − x[o]`).
    fn tie_rows(&self, p: &mut Program, mem: &mut [Terms]) {
        let inst = self.inst;
        for tie in &inst.ties {
            for b in 0..inst.devices.len() {
                let w = p.add_col((0.0, 1.0), 0.0, false);
                let owner = self.on(p, tie.owner, b);
                for &u in &tie.members {
                    let mut row = self.on(p, u, b);
                    row.extend(owner.iter().map(|&(v, a)| (v, -a)));
                    row.push((w, -1.0));
                    p.add_row(row, false, 0.0);
                }
                mem[b].push((w, tie.storage as f64 / GIB));
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
