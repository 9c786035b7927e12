//! The mixed-integer program behind `auto`, built with good_lp and solved by HiGHS.
//!
//! Formulation (docs/strategies.md has the long form):
//! - `x[i][b]` binary: unit `i` on device `b`; `Σ_b x[i][b] = 1`; pins remove columns.
//! - Execution indicator `X[i][e] = Σ_{b executes on e} x[i][b]` (cpu/disk execute on the main GPU).
//! - Transfers along the data-flow edges `u → v` charged per step (`Instance::transfers`: the
//!   residual stream, an encoder's output to each cross-attention unit), one edge variable set per
//!   edge, tight per-device form: `z[uv][e] ≥ X[u][e] − X[v][e]` (|X_u − X_v| linearized), paid
//!   `t · Σ_e z[uv][e]` when every link of the edge costs the same `t`; otherwise (or for the
//!   throughput objective) a transportation form `Σ_e' f[uv][e][e'] = X[u][e]`,
//!   `Σ_e f[uv][e][e'] = X[v][e']` paying `t(e, e')` on `f[uv][e][e']`, exact for any edge.
//! - Memory rows per device; the main GPU also holds `s ≥ stream_buffer(i)·(x[i][cpu] + x[i][disk])` (the
//!   largest streamed unit) and the streamed units' KV cache; the cpu holds the largest disk unit;
//!   a tied storage is held by every device holding a member but not the owner (`y ≥ x[m][b] − x[o][b]`).
//! - Block rule: on each GPU but the main one, the units of a split block (its modules, see
//!   `Instance::blocks`) sit together: `x[j][g] = x[first][g]`.
//! - Symmetry: of two GPUs with identical profiles and capacities (neither the main GPU nor
//!   pinned), the later one may only be used after the earlier one (`x[i][b] ≤ u[i−1]`,
//!   `u[i] ≤ u[i−1] + x[i][a]`): any solution can be relabelled to satisfy this at equal cost.
//! - Contiguous mode (for cross-checking the DP): the device index is non-decreasing along the chain.
//!
//! The objective is scaled to microseconds; the solve is warm-started from the best feasible
//! candidate, bounded by a time limit and a relative gap, and HiGHS' dual bound is reported.

// Index loops mirror the formulation's subscripts (x[i][b], f[i][e][e']).
#![allow(clippy::needless_range_loop)]

use std::time::{Duration, Instant};

use good_lp::solvers::highs::highs;
use good_lp::{
    constraint, variable, Constraint, Expression, ProblemVariables, SolverModel, Variable,
};

use devmap_core::cost::Objective;

use crate::instance::Instance;
use crate::Error;

/// Solver limits and modes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MipOptions {
    /// Wall-clock limit for [`solve`]: building the model, then HiGHS.
    pub time_limit: Duration,
    /// Relative gap at which HiGHS stops (1e-4 = 0.01%).
    pub mip_rel_gap: f64,
    /// Restrict to contiguous runs in device order (what the DP solves).
    pub contiguous: bool,
    /// A proven lower bound on the objective (seconds), added as a valid cut.
    pub objective_floor: Option<f64>,
}

impl Default for MipOptions {
    fn default() -> Self {
        MipOptions {
            time_limit: Duration::from_secs(10),
            mip_rel_gap: 1e-4,
            contiguous: false,
            objective_floor: None,
        }
    }
}

/// What HiGHS returned.
#[derive(Debug, Clone, PartialEq)]
pub struct MipResult {
    /// Best assignment found (device index per unit), if any.
    pub assignment: Option<Vec<usize>>,
    /// Its objective, seconds (recomputed with the cost model).
    pub objective_seconds: f64,
    /// HiGHS' proven lower bound, seconds.
    pub bound_seconds: f64,
    /// Relative gap `(objective − bound) / objective`.
    pub gap: f64,
    /// HiGHS' status, as text.
    pub status: String,
    /// Whether the status is optimal (within the gap).
    pub optimal: bool,
    /// Whether HiGHS proved that no assignment fits.
    pub proven_infeasible: bool,
    /// Whether HiGHS stopped at the time limit.
    pub timed_out: bool,
    /// Time in HiGHS.
    pub elapsed: Duration,
    /// Columns and rows of the model.
    pub size: (usize, usize),
}

const SCALE: f64 = 1e6; // seconds -> microseconds
/// The share HiGHS' dual bound is lowered by before it is reported: HiGHS proves it up to its
/// tolerances, and a hair below keeps it a bound. `auto` allows as much when it judges a plan
/// optimal, or an optimum HiGHS proved with a zero gap would read "feasible".
pub const DUAL_BOUND_SLACK: f64 = 1e-10;
/// HiGHS' integrality (and integer-column bound) tolerance. At its default, 1e-6, a binary may sit
/// 1e-6 off 0 or 1 (even at −4e-7), and HiGHS' dual bound and its "optimal" incumbent are those of
/// that relaxed model. Since the cost model charges fixed per-unit seconds (per-tensor copy
/// latency, per-module hook and eager seconds: ~68 µs a unit on every device), the throughput
/// objective gains ~1e-6 × 68 µs per unit by splitting a unit between two execution devices to
/// balance their busy times: the bound came out 1.5e-7 (relative) below the true integer optimum
/// while HiGHS reported a zero gap, so a zero gap target ended "feasible". At 1e-9 (HiGHS'
/// minimum is 1e-10) that slack is ~7e-14 s a unit, about 1e-9 of the objective (`BOUND_EPS`).
const MIP_FEASIBILITY_TOLERANCE: f64 = 1e-9;

/// The least time left for HiGHS at which its presolve runs (see `set_options`).
const MIN_PRESOLVE_TIME: Duration = Duration::from_secs(1);
/// Memory rows are written in GiB (at most, see `row_unit`): byte-sized coefficients (1e9–1e12)
/// next to microsecond costs made HiGHS declare wrong optima.
const GIB: f64 = (1u64 << 30) as f64;

/// How a memory row meets its capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caps {
    /// The capacity plus half a byte: every byte-exact fit is allowed, so HiGHS' dual bound is a
    /// bound of the real problem (a relaxation of it; HiGHS' row tolerance, 1e-6 of a row unit,
    /// about 1 KiB, only relaxes it further, and a plan it lets overflow is caught by the exact
    /// check).
    Exact,
    /// A margin kept back so HiGHS' tolerances (integrality 1e-6, rows 1e-6 of a row unit) can
    /// never let through an overflow; used only when the exact solve's plan overflowed by rounding.
    Margin,
}

/// Bytes → row units: GiB, or the largest capacity when that is smaller (then HiGHS' row tolerance
/// stays far below a byte: kilobyte instances need it). The same for every row: per-row units made
/// HiGHS much slower.
fn row_unit(inst: &Instance, _b: usize) -> f64 {
    let largest = inst.caps.iter().copied().max().unwrap_or(1).max(1) as f64;
    largest.min(GIB)
}

fn row_cap(inst: &Instance, b: usize, caps: Caps) -> f64 {
    let cap = inst.caps[b] as f64;
    let unit = row_unit(inst, b);
    let bytes = match caps {
        Caps::Exact => cap + 0.5,
        // Integrality (1e-6 of a unit's bytes) and row (1e-6 of a row unit) tolerances, doubled.
        Caps::Margin => (cap - 2e-6 * cap - 2e-6 * unit - 1.0).max(0.0),
    };
    bytes / unit
}

/// Build and solve the MIP, warm-started from `start` when it is feasible. The bound is HiGHS'
/// dual bound of the exact model; if HiGHS' plan overflows a budget by rounding (its tolerances
/// let through a few bytes), a second solve with byte margins gives the plan.
///
/// The main-GPU rule (a plan that streams holds a unit on the main GPU) is left out first: any
/// row for it made HiGHS' presolve return wrong optima. Only when the plan breaks it is the model
/// solved again with the rule, without presolve.
pub fn solve(
    inst: &Instance,
    start: Option<&[usize]>,
    opts: MipOptions,
) -> Result<MipResult, Error> {
    let started = Instant::now();
    let start = start.filter(|a| inst.feasible(a));
    let mut exact = solve_once(inst, start, opts, Caps::Exact, false, started)?;
    let main_rule = exact.main_rule_broken;
    if main_rule {
        exact = solve_once(inst, start, opts, Caps::Exact, true, started)?;
    }
    if exact.result.assignment.is_some() || !exact.rounded_overflow {
        return Ok(exact.result);
    }
    let margin = solve_once(inst, start, opts, Caps::Margin, main_rule, started)?.result;
    let mut result = MipResult {
        bound_seconds: exact.result.bound_seconds,
        status: format!(
            "{} (its plan overflowed by rounding; with byte margins: {})",
            exact.result.status, margin.status
        ),
        optimal: false,
        proven_infeasible: false,
        timed_out: exact.result.timed_out || margin.timed_out,
        elapsed: started.elapsed(),
        ..margin
    };
    result.gap = gap(result.objective_seconds, result.bound_seconds);
    Ok(result)
}

fn gap(objective: f64, bound: f64) -> f64 {
    if objective.is_finite() && objective > 0.0 {
        ((objective - bound) / objective).max(0.0)
    } else if objective.is_finite() {
        0.0
    } else {
        f64::INFINITY
    }
}

/// One HiGHS run; `rounded_overflow`: HiGHS found a plan but it overflows a budget byte-exactly;
/// `main_rule_broken`: it streams a unit but leaves the main GPU empty.
struct Once {
    result: MipResult,
    rounded_overflow: bool,
    main_rule_broken: bool,
}

fn solve_once(
    inst: &Instance,
    start: Option<&[usize]>,
    opts: MipOptions,
    caps: Caps,
    main_rule: bool,
    started: Instant,
) -> Result<Once, Error> {
    let model = || build(inst, start, opts, caps, main_rule, started);
    let first = model();
    if let Some(i) = first
        .x_col
        .iter()
        .position(|row| row.iter().all(Option::is_none))
    {
        // A unit that fits no device it may use: infeasible, and HiGHS (an empty model) has no
        // solution status to read.
        return Ok(Once {
            result: MipResult {
                assignment: None,
                objective_seconds: f64::INFINITY,
                bound_seconds: f64::INFINITY,
                gap: f64::INFINITY,
                status: format!("Infeasible (unit {:?} fits no device)", inst.names[i]),
                optimal: false,
                proven_infeasible: true,
                timed_out: false,
                elapsed: started.elapsed(),
                size: (first.cols.len(), first.constraints.len()),
            },
            rounded_overflow: false,
            main_rule_broken: false,
        });
    }
    // With the main-GPU rows, presolve is off (see `solve`).
    let first = run_highs(first, inst, start, opts, started, !main_rule);
    match first {
        // HiGHS' presolve can return a plan that violates a row and then fail the solve, or call
        // a feasible model infeasible (a contiguous chain on 3 GPUs whose plan skips the middle
        // one: tests/mip_vs_dp.rs' regression file): solve once more without it.
        Err(Error::Solver(_)) if !main_rule => {
            run_highs(model(), inst, start, opts, started, false)
        }
        Ok(once) if once.result.proven_infeasible && !main_rule => {
            run_highs(model(), inst, start, opts, started, false)
        }
        other => other,
    }
}

fn build<'a>(
    inst: &'a Instance,
    start: Option<&'a [usize]>,
    opts: MipOptions,
    caps: Caps,
    main_rule: bool,
    started: Instant,
) -> Builder<'a> {
    let mut m = Builder::new(inst, start, caps);
    m.assignment_rows();
    m.block_rows();
    if main_rule {
        m.main_rule_rows();
    }
    let mut busy = m.unit_costs();
    m.device_changes(&mut busy);
    m.throughput_objective(busy);
    m.memory_rows(caps);
    m.cover_cuts();
    if opts.contiguous {
        m.contiguity();
    } else {
        m.symmetry();
    }
    if let Some(floor) = opts.objective_floor.filter(|f| f.is_finite() && *f > 0.0) {
        // Slightly below the bound so rounding never cuts off the optimum.
        let objective = m.objective.clone();
        m.constraints
            .push(constraint!(objective >= floor * SCALE * (1.0 - 1e-9)));
    }
    if std::env::var_os("DEVMAP_TRACE").is_some() {
        eprintln!("trace:   mip built in {:?}", started.elapsed());
    }
    m
}

/// The model under construction: variables with their warm-start values, rows, objective.
struct Builder<'a> {
    inst: &'a Instance,
    start: Option<&'a [usize]>,
    vars: ProblemVariables,
    /// Warm-start values, in creation order.
    cols: Vec<f64>,
    constraints: Vec<Constraint>,
    objective: Expression,
    /// x[i][b]: unit i on device b (None: not allowed, or it cannot fit there).
    x: Vec<Vec<Option<Variable>>>,
    /// Column of x[i][b] (x variables are created first, so it is their creation rank).
    x_col: Vec<Vec<Option<usize>>>,
}

impl<'a> Builder<'a> {
    fn new(inst: &'a Instance, start: Option<&'a [usize]>, caps: Caps) -> Builder<'a> {
        let (n, k) = (inst.n(), inst.devices.len());
        let mut m = Builder {
            inst,
            start,
            vars: ProblemVariables::new(),
            cols: Vec::new(),
            constraints: Vec::new(),
            objective: Expression::default(),
            x: vec![vec![None; k]; n],
            x_col: vec![vec![None; k]; n],
        };
        for i in 0..n {
            for b in 0..k {
                // A unit larger than a device's row can never sit there: no column.
                let fits =
                    inst.unit_bytes_on(i, b) as f64 / row_unit(inst, b) <= row_cap(inst, b, caps);
                if inst.allowed[i][b] && fits {
                    let v = start.map_or(0.0, |a| f64::from(u8::from(a[i] == b)));
                    m.x_col[i][b] = Some(m.cols.len());
                    m.x[i][b] = Some(m.add(variable().binary(), v));
                }
            }
        }
        m
    }

    fn add(&mut self, def: good_lp::VariableDefinition, value: f64) -> Variable {
        self.cols.push(value);
        self.vars.add(def)
    }

    /// A continuous variable in [0, 1].
    fn unit_interval(&mut self, value: f64) -> Variable {
        self.add(variable().min(0.0).max(1.0), value)
    }

    fn xe(&self, i: usize, b: usize) -> Expression {
        self.x[i][b].map_or_else(Expression::default, Expression::from)
    }

    /// Whether unit `i` executes on `e`: Σ over devices executing on `e`.
    fn exec_expr(&self, i: usize, e: usize) -> Expression {
        (0..self.inst.devices.len())
            .filter(|&b| self.inst.exec_of[b] == e)
            .map(|b| self.xe(i, b))
            .sum()
    }

    fn exec_start(&self, i: usize, e: usize) -> f64 {
        self.start
            .map_or(0.0, |a| f64::from(u8::from(self.inst.exec_of[a[i]] == e)))
    }

    /// Each unit on one device.
    fn assignment_rows(&mut self) {
        let (n, k) = (self.inst.n(), self.inst.devices.len());
        for i in 0..n {
            let one: Expression = (0..k).map(|b| self.xe(i, b)).sum();
            self.constraints.push(constraint!(one == 1));
        }
    }

    /// The block rule ([`Instance::blocks_hold`]): on each GPU other than the main one, every unit
    /// of a split block sits there exactly when its first unit does (`x[j][g] = x[first][g]`);
    /// what is left of each unit is then on the main GPU, cpu or disk.
    fn block_rows(&mut self) {
        let inst = self.inst;
        let others: Vec<usize> = (0..inst.devices.len())
            .filter(|&b| !inst.in_main_domain(b))
            .collect();
        for r in inst.split_blocks() {
            for &g in &others {
                let first = self.xe(r.start, g);
                for j in r.start + 1..r.end {
                    let here = self.xe(j, g);
                    self.constraints.push(constraint!(here == first.clone()));
                }
            }
        }
    }

    /// When a unit is streamed, the main GPU (which executes it, the lowest GPU the map uses)
    /// holds a unit: `on_i ≤ used ≤ Σ_j x[j][main]`.
    fn main_rule_rows(&mut self) {
        let inst = self.inst;
        let (n, k) = (inst.n(), inst.devices.len());
        let streamed: Vec<usize> = (0..k).filter(|&b| inst.is_streamed(b)).collect();
        let Some(m) = inst.main.filter(|_| !streamed.is_empty()) else {
            return;
        };
        let used0 = self
            .start
            .map_or(0.0, |a| f64::from(u8::from(a.contains(&m))));
        let used = self.unit_interval(used0);
        let on_main: Expression = (0..n).map(|i| self.xe(i, m)).sum();
        self.constraints.push(constraint!(used <= on_main));
        for i in 0..n {
            let on: Expression = streamed.iter().map(|&b| self.xe(i, b)).sum();
            self.constraints.push(constraint!(on <= used));
        }
    }

    /// Unit costs into the objective (latency) or per execution device (throughput's `busy`).
    fn unit_costs(&mut self) -> Vec<Expression> {
        let inst = self.inst;
        let mut busy = vec![Expression::default(); inst.execs.len()];
        for i in 0..inst.n() {
            for b in 0..inst.devices.len() {
                if let Some(v) = self.x[i][b] {
                    let c = inst.cost[i][b] * SCALE;
                    if self.throughput() {
                        busy[inst.exec_of[b]] += c * v;
                    } else {
                        self.objective += c * v;
                    }
                }
            }
        }
        busy
    }

    fn throughput(&self) -> bool {
        self.inst.cost_model.objective == Objective::Throughput
    }

    /// Transfers along the data-flow edges charged per step (`Instance::transfers`): for edge
    /// `u → v`, the tight per-device form `z ≥ X[u][e] − X[v][e]` (a linearized |X_u − X_v|)
    /// when every link of the edge costs the same (latency), else the transportation form, exact
    /// for any edge.
    fn device_changes(&mut self, busy: &mut [Expression]) {
        let inst = self.inst;
        let ne = inst.execs.len();
        if ne < 2 {
            return;
        }
        for (k, tr) in inst.transfers.iter().enumerate() {
            let off_diag: Vec<f64> = (0..ne)
                .flat_map(|a| (0..ne).filter(move |&b| b != a).map(move |b| (a, b)))
                .map(|(a, b)| tr.seconds[a][b])
                .collect();
            let uniform = off_diag
                .windows(2)
                .all(|w| (w[0] - w[1]).abs() <= 1e-15 * w[0].abs().max(1e-30));
            if uniform && !self.throughput() {
                self.uniform_change(tr.from, tr.to, off_diag[0] * SCALE);
            } else {
                self.transport_change(k, busy);
            }
        }
    }

    /// `z[e] ≥ X[u][e] − X[v][e]`, paid `t` each.
    fn uniform_change(&mut self, u: usize, v: usize, t: f64) {
        for e in 0..self.inst.execs.len() {
            let z0 = (self.exec_start(u, e) - self.exec_start(v, e)).max(0.0);
            let z = self.unit_interval(z0);
            let (here, next) = (self.exec_expr(u, e), self.exec_expr(v, e));
            self.constraints.push(constraint!(z >= here - next));
            self.objective += t * z;
        }
    }

    /// For transfer `k` (edge `u → v`): `Σ_e' f[e][e'] = X[u][e]`, `Σ_e f[e][e'] = X[v][e']`,
    /// paying `t(e, e')` on `f[e][e']` (into the receiving device's busy time for throughput).
    fn transport_change(&mut self, k: usize, busy: &mut [Expression]) {
        let tr = &self.inst.transfers[k];
        let (u, v) = (tr.from, tr.to);
        let ne = self.inst.execs.len();
        let mut f = vec![vec![None; ne]; ne];
        for a in 0..ne {
            for b in 0..ne {
                let f0 = self.exec_start(u, a) * self.exec_start(v, b);
                let var = self.unit_interval(f0);
                if a != b {
                    let t = tr.seconds[a][b] * SCALE;
                    if self.throughput() {
                        busy[b] += t * var;
                    } else {
                        self.objective += t * var;
                    }
                }
                f[a][b] = Some(var);
            }
        }
        let flow = |cells: &mut dyn Iterator<Item = Option<Variable>>| -> Expression {
            cells.map(|v| Expression::from(v.expect("set"))).sum()
        };
        for a in 0..ne {
            let out = flow(&mut (0..ne).map(|b| f[a][b]));
            let here = self.exec_expr(u, a);
            self.constraints.push(constraint!(out == here));
            let inn = flow(&mut (0..ne).map(|b| f[b][a]));
            let next = self.exec_expr(v, a);
            self.constraints.push(constraint!(inn == next));
        }
    }

    /// Throughput: minimise `t ≥ busy[e]` for every execution device.
    fn throughput_objective(&mut self, busy: Vec<Expression>) {
        if !self.throughput() {
            return;
        }
        let inst = self.inst;
        let start_busy = self.start.map(|a| inst.evaluate(a) * SCALE).unwrap_or(0.0);
        let t = self.add(variable().min(0.0), start_busy);
        for e in busy {
            self.constraints.push(constraint!(t >= e));
        }
        self.objective = Expression::from(t);
    }

    /// Memory rows per device (in row units, see `row_unit`): the units' bytes there;
    /// on the main GPU also the largest streamed unit (`s`) and the streamed units' bytes on it;
    /// on the cpu the largest disk unit; tied storages on every device holding a member but not
    /// the owner (`y ≥ x[m][b] − x[o][b]`).
    fn memory_rows(&mut self, caps: Caps) {
        let inst = self.inst;
        let (n, k) = (inst.n(), inst.devices.len());
        let mut mem: Vec<Expression> = (0..k)
            .map(|b| {
                let u = row_unit(inst, b);
                (0..n)
                    .filter_map(|i| self.x[i][b].map(|v| (i, v)))
                    .map(|(i, v)| inst.unit_bytes_on(i, b) as f64 / u * v)
                    .sum()
            })
            .collect();
        self.stream_reserve(&mut mem);
        self.disk_reserve(&mut mem);
        self.tied_copies(&mut mem);
        for (b, e) in mem.into_iter().enumerate() {
            self.constraints
                .push(constraint!(e <= row_cap(inst, b, caps)));
        }
    }

    /// The main GPU's streaming buffer `s ≥ stream_buffer(i)·(x[i][cpu] + x[i][disk])` and the streamed
    /// units' bytes on it.
    fn stream_reserve(&mut self, mem: &mut [Expression]) {
        let inst = self.inst;
        let streamed: Vec<usize> = (0..inst.devices.len())
            .filter(|&b| inst.is_streamed(b))
            .collect();
        let Some(m) = inst.main.filter(|_| !streamed.is_empty()) else {
            return;
        };
        let u = row_unit(inst, m);
        let s0 = self.start.map_or(0.0, |a| {
            let most = (0..inst.n())
                .filter(|&i| inst.is_streamed(a[i]))
                .map(|i| inst.stream_buffer(i))
                .max();
            most.unwrap_or(0) as f64 / u
        });
        // Valid lower bound on the buffer: see `forced_stream_reserve`.
        let s = self.add(variable().min(forced_stream_reserve(inst) as f64 / u), s0);
        for i in 0..inst.n() {
            let on: Expression = streamed.iter().map(|&b| self.xe(i, b)).sum();
            self.constraints.push(constraint!(
                s >= inst.stream_buffer(i) as f64 / u * on.clone()
            ));
            let on_main = inst.streamed_bytes_on_main(i);
            if on_main > 0 {
                mem[m] += on_main as f64 / u * on;
            }
        }
        mem[m] += s;
    }

    /// The cpu holds the largest disk unit on its way to the GPU (and, without a GPU, the disk
    /// units' KV cache).
    fn disk_reserve(&mut self, mem: &mut [Expression]) {
        let inst = self.inst;
        let (Some(c), Some(d)) = (inst.cpu, inst.disk) else {
            return;
        };
        let u = row_unit(inst, c);
        let s0 = self.start.map_or(0.0, |a| {
            let most = (0..inst.n())
                .filter(|&i| a[i] == d)
                .map(|i| inst.stream_buffer(i))
                .max();
            most.unwrap_or(0) as f64 / u
        });
        let s = self.add(variable().min(0.0), s0);
        let host_runs_disk = inst.exec_row(d) == c;
        for i in 0..inst.n() {
            let on = self.xe(i, d);
            // Without a GPU the cpu executes disk units and holds their KV cache.
            let kv = inst.streamed_bytes_on_main(i);
            if host_runs_disk && kv > 0 {
                mem[c] += kv as f64 / u * on.clone();
            }
            self.constraints
                .push(constraint!(s >= inst.stream_buffer(i) as f64 / u * on));
        }
        mem[c] += s;
    }

    fn tied_copies(&mut self, mem: &mut [Expression]) {
        let inst = self.inst;
        for tie in &inst.ties {
            for b in 0..inst.devices.len() {
                let held = self
                    .start
                    .is_some_and(|a| a[tie.owner] != b && tie.members.iter().any(|&u| a[u] == b));
                let y = self.unit_interval(f64::from(u8::from(held)));
                for &u in &tie.members {
                    let (member, owner) = (self.xe(u, b), self.xe(tie.owner, b));
                    self.constraints.push(constraint!(y >= member - owner));
                }
                mem[b] += tie.storage as f64 / row_unit(inst, b) * y;
            }
        }
    }

    /// Lifted cover cuts (valid inequalities, see `lifted_cuts`): they close most of the LP gap
    /// when many equal blocks compete for a few devices.
    fn cover_cuts(&mut self) {
        let inst = self.inst;
        for b in 0..inst.devices.len() {
            for (coeff, bound) in lifted_cuts(inst, b) {
                let lhs: Expression = (0..inst.n())
                    .filter(|&i| coeff[i] > 0.0)
                    .map(|i| coeff[i] * self.xe(i, b))
                    .sum();
                self.constraints.push(constraint!(lhs <= bound));
            }
        }
    }

    /// Contiguous mode: device index non-decreasing, `Σ_{b' ≥ b} x[i][b'] ≤ Σ_{b' ≥ b} x[i+1][b']`.
    fn contiguity(&mut self) {
        let (n, k) = (self.inst.n(), self.inst.devices.len());
        for i in 0..n.saturating_sub(1) {
            for b in 1..k {
                let here: Expression = (b..k).map(|c| self.xe(i, c)).sum();
                let next: Expression = (b..k).map(|c| self.xe(i + 1, c)).sum();
                self.constraints.push(constraint!(here <= next));
            }
        }
    }

    /// Of two identical GPUs the later is used only after the earlier (`x[i][b] ≤ u[i−1]`,
    /// `u[i] ≤ u[i−1] + x[i][a]`).
    fn symmetry(&mut self) {
        for (a, b) in identical_gpu_pairs(self.inst) {
            let mut prev: Option<Variable> = None;
            let mut used_a = false;
            for i in 0..self.inst.n() {
                let (xa, xb) = (self.xe(i, a), self.xe(i, b));
                match prev {
                    None => self.constraints.push(constraint!(xb <= 0)),
                    Some(u) => self.constraints.push(constraint!(xb <= u)),
                }
                used_a = used_a || self.start.is_some_and(|s| s[i] == a);
                let u = self.unit_interval(f64::from(u8::from(used_a)));
                match prev {
                    None => self.constraints.push(constraint!(u <= xa)),
                    Some(p) => self.constraints.push(constraint!(u <= p + xa)),
                }
                prev = Some(u);
            }
        }
    }
}

/// Hand the model to HiGHS, solve, and read back the plan (checked exactly) and the bound.
fn run_highs(
    m: Builder<'_>,
    inst: &Instance,
    start: Option<&[usize]>,
    opts: MipOptions,
    started: Instant,
    presolve: bool,
) -> Result<Once, Error> {
    let deferred_inits = crate::highs_init::ensure_highs_initialised();
    if std::env::var_os("DEVMAP_TRACE").is_some() {
        eprintln!(
            "trace:   highs static initialisers deferred to the first solve: {deferred_inits}"
        );
    }
    let size = (m.cols.len(), m.constraints.len());
    let x_col = m.x_col;
    let mut problem = m.vars.minimise(m.objective).using(highs);
    for c in m.constraints {
        problem = problem.with(c);
    }
    let mut model = problem
        .try_into_inner()
        .map_err(|e| Error::Solver(format!("HiGHS could not build the model: {e}")))?;
    set_options(&mut model, opts, started, presolve);
    // A start that violates the symmetry rows is relabelled by HiGHS' own check; skip it then.
    if start.is_some_and(|a| symmetry_respected(inst, a, opts.contiguous)) {
        let _ = model.try_set_solution(Some(&m.cols), None, None, None);
    }
    if std::env::var_os("DEVMAP_TRACE").is_some() {
        eprintln!("trace:   highs model ready in {:?}", started.elapsed());
    }
    let solved = model
        .try_solve()
        .map_err(|e| Error::Solver(format!("HiGHS failed on the placement model: {e:?}")))?;
    Ok(read_solution(&solved, inst, &x_col, started, size))
}

/// HiGHS' limits, gaps and tolerances for one solve.
fn set_options(model: &mut highs::Model, opts: MipOptions, started: Instant, presolve: bool) {
    // The limit covers building the model too (1–3 s on a million columns).
    let left = opts.time_limit.saturating_sub(started.elapsed());
    set_common_options(model, left, opts.mip_rel_gap);
    // HiGHS' presolve reads the clock only between its passes, and one pass over a split-block
    // MIP of ~7,000 columns took 0.88 s (tests/limits.rs: a 300 ms limit ran 1.2 s): with less
    // than that left, the root LP (which checks the clock as it iterates) gets the time instead.
    if !presolve || left < MIN_PRESOLVE_TIME {
        model.set_option("presolve", "off");
    }
    set_debug_options(model);
}

/// HiGHS' status, dual bound and plan (rounded, then checked exactly by the instance).
fn read_solution(
    solved: &highs::SolvedModel,
    inst: &Instance,
    x_col: &[Vec<Option<usize>>],
    started: Instant,
    size: (usize, usize),
) -> Once {
    let status = solved.status();
    let bound_scaled = solved
        .double_info_value(c"mip_dual_bound")
        .unwrap_or(f64::NEG_INFINITY);
    if std::env::var_os("DEVMAP_TRACE").is_some() {
        eprintln!(
            "trace:   highs {status:?}: objective {:?} dual bound {bound_scaled} gap {:?}",
            solved.double_info_value(c"objective_function_value"),
            solved.double_info_value(c"mip_gap"),
        );
    }
    let mut result = MipResult {
        assignment: None,
        objective_seconds: f64::INFINITY,
        bound_seconds: bound_scaled / SCALE * (1.0 - DUAL_BOUND_SLACK),
        gap: f64::INFINITY,
        status: format!("{status:?}"),
        optimal: matches!(status, highs::HighsModelStatus::Optimal),
        proven_infeasible: matches!(status, highs::HighsModelStatus::Infeasible),
        timed_out: matches!(status, highs::HighsModelStatus::ReachedTimeLimit),
        elapsed: started.elapsed(),
        size,
    };
    let (mut rounded_overflow, mut main_rule_broken) = (false, false);
    if matches!(
        solved.primal_solution_status(),
        highs::HighsSolutionStatus::Feasible
    ) {
        let values = solved.get_solution();
        let a = rounded_assignment(x_col, values.columns());
        if inst.feasible(&a) {
            result.objective_seconds = inst.evaluate(&a);
            result.assignment = Some(a);
        } else if !inst.main_rule_holds(&a) {
            main_rule_broken = true;
        } else {
            rounded_overflow = true;
        }
    }
    result.gap = gap(result.objective_seconds, result.bound_seconds);
    Once {
        result,
        rounded_overflow,
        main_rule_broken,
    }
}

/// What every HiGHS solve of the solver sets: quiet, one thread, `time_limit`, `rel_gap`, and
/// the absolute gap and integrality tolerance the bounds rely on.
pub(crate) fn set_common_options(model: &mut highs::Model, time_limit: Duration, rel_gap: f64) {
    model.make_quiet();
    model.set_option("time_limit", time_limit.as_secs_f64());
    model.set_option("mip_rel_gap", rel_gap);
    // HiGHS' default absolute gap (1e-6 µs) would stop short of small objectives' optima.
    model.set_option("mip_abs_gap", 1e-9);
    // HiGHS' dual bound is the optimum of the model relaxed by its integrality tolerance, and so is
    // its "optimal" incumbent: see `MIP_FEASIBILITY_TOLERANCE`.
    model.set_option("mip_feasibility_tolerance", MIP_FEASIBILITY_TOLERANCE);
    model.set_option("threads", 1);
}

/// Each unit on its device with the largest x value.
fn rounded_assignment(x_col: &[Vec<Option<usize>>], values: &[f64]) -> Vec<usize> {
    x_col
        .iter()
        .map(|row| {
            let mut best = (0.0, usize::MAX);
            for (b, c) in row.iter().enumerate() {
                if let Some(c) = c {
                    if values[*c] > best.0 {
                        best = (values[*c], b);
                    }
                }
            }
            best.1
        })
        .collect()
}

/// Debugging aid: `DEVMAP_HIGHS_OPTIONS=name=value,...` passed to HiGHS as is.
pub(crate) fn set_debug_options(model: &mut highs::Model) {
    let Ok(extra) = std::env::var("DEVMAP_HIGHS_OPTIONS") else {
        return;
    };
    for kv in extra.split(',').filter(|s| !s.is_empty()) {
        if let Some((k, v)) = kv.split_once('=') {
            if let Ok(i) = v.parse::<i32>() {
                model.set_option(k, i);
            } else if let Ok(f) = v.parse::<f64>() {
                model.set_option(k, f);
            } else if let Ok(b) = v.parse::<bool>() {
                model.set_option(k, b);
            } else {
                model.set_option(k, v);
            }
        }
    }
}

/// Lifted cover cuts for device `b`: `Σ_i α(w_i) x[i][b] ≤ L0`, one per base size class `w_s`
/// among the largest distinct unit sizes. Units of the base class count 1, larger classes are lifted
/// one after another (largest last) to the strongest coefficient that keeps every packing of
/// capacity `C` valid, smaller units count 0. Each returned cut is (coefficient per unit, bound).
fn lifted_cuts(inst: &Instance, b: usize) -> Vec<(Vec<f64>, f64)> {
    let n = inst.n();
    // Sizes as this device holds them (a streamed unit's KV cache is on the main GPU, not here).
    let w: Vec<u64> = (0..n).map(|i| inst.unit_bytes_on(i, b)).collect();
    let mut classes = size_classes(&w);
    classes.truncate(4);
    let cap = inst.caps[b];
    let mut cuts = Vec::new();
    for base in 0..classes.len() {
        let (ws, ns) = classes[base];
        let l0 = (cap / ws).min(ns);
        // Lift larger classes, nearest in size first.
        let mut lifted: Vec<(u64, u64, f64)> = vec![(ws, ns, 1.0)];
        let total_big: u64 = classes[..=base].iter().map(|c| c.1).sum();
        if l0 >= total_big {
            continue; // every big unit fits at once: the cut is implied
        }
        for j in (0..base).rev() {
            let (wj, nj) = classes[j];
            let mut alpha = f64::INFINITY;
            for count in 1..=nj.min(cap / wj) {
                let rest = cap - count * wj;
                let z = best_value(&lifted, rest);
                alpha = alpha.min((l0 as f64 - z) / count as f64);
            }
            if !alpha.is_finite() {
                // Not even one unit of this class fits: it can take any weight; use the count bound.
                alpha = l0 as f64 + 1.0;
            }
            lifted.push((wj, nj, alpha.max(0.0)));
        }
        let coeff: Vec<f64> = w
            .iter()
            .map(|&x| lifted.iter().find(|(s, _, _)| *s == x).map_or(0.0, |l| l.2))
            .collect();
        cuts.push((coeff, l0 as f64));
    }
    cuts
}

/// Sizes grouped into `(size, count)` classes, largest first, zero sizes left out.
pub(crate) fn size_classes(sizes: &[u64]) -> Vec<(u64, u64)> {
    let mut sorted: Vec<u64> = sizes.iter().copied().filter(|&x| x > 0).collect();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let mut classes: Vec<(u64, u64)> = Vec::new();
    for x in sorted {
        match classes.last_mut() {
            Some((s, c)) if *s == x => *c += 1,
            _ => classes.push((x, 1)),
        }
    }
    classes
}

/// The smallest streaming reserve any feasible placement needs (0 if the GPUs could hold everything).
pub(crate) fn forced_stream_reserve(inst: &Instance) -> u64 {
    let gpu_caps: u64 = (0..inst.devices.len())
        .filter(|&b| inst.devices[b].is_gpu())
        .map(|b| inst.caps[b])
        .sum();
    forced_reserve(inst, gpu_caps)
}

/// When devices of total capacity `capacity` cannot hold every unit, the units left over must cover
/// the excess, so they include one at least as large as the unit where ascending sizes first add up
/// to it: the read size of the smallest such unit (0 when nothing is left over).
pub(crate) fn forced_reserve(inst: &Instance, capacity: u64) -> u64 {
    let total: u64 = (0..inst.n()).map(|i| inst.unit_bytes(i)).sum();
    let Some(excess) = total.checked_sub(capacity).filter(|e| *e > 0) else {
        return 0;
    };
    let mut order: Vec<u64> = (0..inst.n()).map(|i| inst.unit_bytes(i)).collect();
    order.sort_unstable();
    let mut cum = 0u64;
    for w in order {
        cum += w;
        if cum >= excess {
            return (0..inst.n())
                .filter(|&u| inst.unit_bytes(u) >= w)
                .map(|u| inst.stream_buffer(u))
                .min()
                .unwrap_or(0);
        }
    }
    0
}

/// Largest Σ α·count over the classes with Σ size·count ≤ cap (small exhaustive search).
fn best_value(classes: &[(u64, u64, f64)], cap: u64) -> f64 {
    fn go(classes: &[(u64, u64, f64)], cap: u64) -> f64 {
        let Some(((w, n, a), rest)) = classes.split_first() else {
            return 0.0;
        };
        let mut best = 0.0f64;
        for c in 0..=(*n).min(cap / w) {
            best = best.max(c as f64 * a + go(rest, cap - c * w));
        }
        best
    }
    go(classes, cap)
}

/// Pairs (a, b), a before b, of GPUs interchangeable in every respect.
fn identical_gpu_pairs(inst: &Instance) -> Vec<(usize, usize)> {
    let topo = &inst.cost_model.topology;
    let customised = !topo.peer_links.is_empty();
    let gpus: Vec<usize> = (0..inst.devices.len())
        .filter(|&b| inst.devices[b].is_gpu() && Some(b) != inst.main)
        .filter(|&b| {
            (0..inst.n())
                .all(|i| inst.allowed[i].iter().filter(|x| **x).count() > 1 || !inst.allowed[i][b])
        })
        .collect();
    let profile = |b: usize| {
        let devmap_core::Device::Gpu(g) = inst.devices[b] else {
            unreachable!()
        };
        (
            inst.caps[b],
            topo.gpu_bandwidth(g).to_bits(),
            topo.host_link(g).bandwidth.to_bits(),
        )
    };
    let mut pairs = Vec::new();
    if customised {
        return pairs;
    }
    for w in gpus.windows(2) {
        if profile(w[0]) == profile(w[1]) {
            pairs.push((w[0], w[1]));
        }
    }
    pairs
}

fn symmetry_respected(inst: &Instance, a: &[usize], contiguous: bool) -> bool {
    if contiguous {
        return a.windows(2).all(|w| w[0] <= w[1]);
    }
    identical_gpu_pairs(inst).iter().all(|&(p, q)| {
        let first = |d: usize| a.iter().position(|&x| x == d);
        match (first(p), first(q)) {
            (_, None) => true,
            (Some(fp), Some(fq)) => fp < fq,
            (None, Some(_)) => false,
        }
    })
}

/// Relabel identical GPUs so an assignment respects the symmetry rows (same cost, same feasibility).
pub fn canonical(inst: &Instance, a: &[usize]) -> Vec<usize> {
    let mut a = a.to_vec();
    let pairs = identical_gpu_pairs(inst);
    // Bubble: repeat swaps until every pair is ordered by first use.
    for _ in 0..pairs.len() + 1 {
        let mut changed = false;
        for &(p, q) in &pairs {
            let first =
                |a: &[usize], d: usize| a.iter().position(|&x| x == d).unwrap_or(usize::MAX);
            if first(&a, q) < first(&a, p) {
                for v in a.iter_mut() {
                    if *v == p {
                        *v = q;
                    } else if *v == q {
                        *v = p;
                    }
                }
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    a
}
