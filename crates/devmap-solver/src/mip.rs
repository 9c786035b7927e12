//! The mixed-integer program behind `auto`, built with good_lp and solved by HiGHS.
//!
//! Formulation (docs/strategies.md has the long form):
//! - `x[i][b]` binary: unit `i` on device `b`; `Σ_b x[i][b] = 1`; pins remove columns.
//! - Execution indicator `X[i][e] = Σ_{b executes on e} x[i][b]` (cpu/disk execute on the main GPU).
//! - Device changes along the chain, tight per-device form: `z[i][e] ≥ X[i][e] − X[i+1][e]`, paid
//!   `t · Σ_e z[i][e]` when every link costs the same `t`; otherwise (or for the throughput
//!   objective) a transportation form `Σ_e' f[i][e][e'] = X[i][e]`, `Σ_e f[i][e][e'] = X[i+1][e']`
//!   paying `t(e, e')` on `f[i][e][e']`, which is exact for chains.
//! - Memory rows per device; the main GPU also holds `s ≥ read[i]·(x[i][cpu] + x[i][disk])` (the
//!   largest streamed unit) and the streamed units' KV cache; the cpu holds the largest disk unit;
//!   a tied storage is held by every device holding a member but not the owner (`y ≥ x[m][b] − x[o][b]`).
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
    /// Time in HiGHS.
    pub elapsed: Duration,
    /// Columns and rows of the model.
    pub size: (usize, usize),
}

const SCALE: f64 = 1e6; // seconds -> microseconds
/// Memory rows are written in GiB: byte-sized coefficients (1e9–1e12) next to microsecond costs
/// made HiGHS declare wrong optima.
const GIB: f64 = (1u64 << 30) as f64;
/// Capacity kept back in the MIP rows so HiGHS' feasibility tolerance (1e-6 of a GiB-scaled row)
/// can never let through a byte-exact overflow.
fn mip_cap(bytes: u64) -> f64 {
    let cap = bytes as f64 / GIB;
    (cap - 1e-7 * cap - 4096.0 / GIB).max(0.0)
}

/// Build and solve the MIP, warm-started from `start` when it is feasible.
pub fn solve(
    inst: &Instance,
    start: Option<&[usize]>,
    opts: MipOptions,
) -> Result<MipResult, Error> {
    let started = Instant::now();
    let n = inst.n();
    let k = inst.devices.len();
    let ne = inst.execs.len();
    let throughput = inst.cost_model.objective == Objective::Throughput;
    let mut vars = ProblemVariables::new();
    let mut cols: Vec<f64> = Vec::new(); // warm-start values, in creation order
    let start = start.filter(|a| inst.feasible(a));
    let mut add =
        |vars: &mut ProblemVariables, def: good_lp::VariableDefinition, value: f64| -> Variable {
            cols.push(value);
            vars.add(def)
        };

    // x variables are created first, so x[i][b]'s column is its creation rank.
    let mut x_col: Vec<Vec<Option<usize>>> = vec![vec![None; k]; n];
    let mut next_col = 0usize;
    let x: Vec<Vec<Option<Variable>>> = (0..n)
        .map(|i| {
            (0..k)
                .map(|b| {
                    inst.allowed[i][b].then(|| {
                        let v = start.map_or(0.0, |a| f64::from(u8::from(a[i] == b)));
                        x_col[i][b] = Some(next_col);
                        next_col += 1;
                        add(&mut vars, variable().binary(), v)
                    })
                })
                .collect()
        })
        .collect();
    let xe = |i: usize, b: usize| -> Expression {
        x[i][b].map_or_else(Expression::default, Expression::from)
    };
    let exec_expr = |i: usize, e: usize| -> Expression {
        (0..k)
            .filter(|&b| inst.exec_of[b] == e)
            .map(|b| xe(i, b))
            .sum()
    };
    let exec_start = |i: usize, e: usize| -> f64 {
        start.map_or(0.0, |a| f64::from(u8::from(inst.exec_of[a[i]] == e)))
    };

    let mut constraints: Vec<Constraint> = Vec::new();
    let mut objective = Expression::default();
    for i in 0..n {
        constraints.push(constraint!(
            (0..k).map(|b| xe(i, b)).sum::<Expression>() == 1
        ));
        for b in 0..k {
            if let Some(v) = x[i][b] {
                objective += inst.cost[i][b] * SCALE * v;
            }
        }
    }

    // Device changes.
    let off_diag: Vec<f64> = (0..ne)
        .flat_map(|a| (0..ne).filter(move |&b| b != a).map(move |b| (a, b)))
        .map(|(a, b)| inst.trans[a][b])
        .collect();
    let uniform = off_diag
        .windows(2)
        .all(|w| (w[0] - w[1]).abs() <= 1e-15 * w[0].abs().max(1e-30));
    let mut busy: Vec<Expression> = vec![Expression::default(); ne];
    if throughput {
        for i in 0..n {
            for b in 0..k {
                if let Some(v) = x[i][b] {
                    busy[inst.exec_of[b]] += inst.cost[i][b] * SCALE * v;
                }
            }
        }
    }
    if ne > 1 {
        for i in 0..n.saturating_sub(1) {
            if uniform && !throughput {
                let t = off_diag[0] * SCALE;
                for e in 0..ne {
                    let v = (exec_start(i, e) - exec_start(i + 1, e)).max(0.0);
                    let z = add(&mut vars, variable().min(0.0).max(1.0), v);
                    constraints.push(constraint!(z >= exec_expr(i, e) - exec_expr(i + 1, e)));
                    objective += t * z;
                }
            } else {
                let mut f = vec![vec![None; ne]; ne];
                for (a, row) in f.iter_mut().enumerate() {
                    for (b, cell) in row.iter_mut().enumerate() {
                        let v = exec_start(i, a) * exec_start(i + 1, b);
                        let var = add(&mut vars, variable().min(0.0).max(1.0), v);
                        if a != b {
                            let t = inst.trans[a][b] * SCALE;
                            if throughput {
                                busy[b] += t * var;
                            } else {
                                objective += t * var;
                            }
                        }
                        *cell = Some(var);
                    }
                }
                for a in 0..ne {
                    let out: Expression = (0..ne)
                        .map(|b| Expression::from(f[a][b].expect("set")))
                        .sum();
                    constraints.push(constraint!(out == exec_expr(i, a)));
                    let inn: Expression = (0..ne)
                        .map(|b| Expression::from(f[b][a].expect("set")))
                        .sum();
                    constraints.push(constraint!(inn == exec_expr(i + 1, a)));
                }
            }
        }
    }
    if throughput {
        let start_busy = start.map(|a| inst.evaluate(a) * SCALE).unwrap_or(0.0);
        let t = add(&mut vars, variable().min(0.0), start_busy);
        for e in 0..ne {
            constraints.push(constraint!(t >= busy[e].clone()));
        }
        objective = Expression::from(t);
    }

    // Memory.
    let streamed: Vec<usize> = (0..k).filter(|&b| inst.is_streamed(b)).collect();
    let mut mem: Vec<Expression> = (0..k)
        .map(|b| {
            (0..n)
                .filter_map(|i| x[i][b].map(|v| (i, v)))
                .map(|(i, v)| inst.unit_bytes_on(i, b) as f64 / GIB * v)
                .sum()
        })
        .collect();
    if let Some(m) = inst.main {
        if !streamed.is_empty() {
            let s0 = start.map_or(0.0, |a| {
                (0..n)
                    .filter(|&i| inst.is_streamed(a[i]))
                    .map(|i| inst.read[i])
                    .max()
                    .unwrap_or(0) as f64
                    / GIB
            });
            // Valid lower bound on the reserve: when the GPUs cannot hold everything, the streamed
            // set must cover the excess, so it contains a unit at least as large as the one where
            // the sizes (ascending) first add up to the excess.
            let s = add(
                &mut vars,
                variable().min(forced_stream_reserve(inst) as f64 / GIB),
                s0,
            );
            for i in 0..n {
                let on: Expression = streamed.iter().map(|&b| xe(i, b)).sum();
                constraints.push(constraint!(s >= inst.read[i] as f64 / GIB * on.clone()));
                let on_main = inst.streamed_bytes_on_main(i);
                if on_main > 0 {
                    mem[m] += on_main as f64 / GIB * on;
                }
            }
            mem[m] += s;
        }
    }
    if let (Some(c), Some(d)) = (inst.cpu, inst.disk) {
        let s0 = start.map_or(0.0, |a| {
            (0..n)
                .filter(|&i| a[i] == d)
                .map(|i| inst.read[i])
                .max()
                .unwrap_or(0) as f64
                / GIB
        });
        let s = add(&mut vars, variable().min(0.0), s0);
        for i in 0..n {
            constraints.push(constraint!(s >= inst.read[i] as f64 / GIB * xe(i, d)));
        }
        mem[c] += s;
    }
    for tie in &inst.ties {
        for b in 0..k {
            let held =
                start.is_some_and(|a| a[tie.owner] != b && tie.members.iter().any(|&u| a[u] == b));
            let y = add(
                &mut vars,
                variable().min(0.0).max(1.0),
                f64::from(u8::from(held)),
            );
            for &u in &tie.members {
                constraints.push(constraint!(y >= xe(u, b) - xe(tie.owner, b)));
            }
            mem[b] += tie.storage as f64 / GIB * y;
        }
    }
    for (b, e) in mem.into_iter().enumerate() {
        constraints.push(constraint!(e <= mip_cap(inst.caps[b])));
    }
    // Lifted cover cuts (valid inequalities, see `lifted_cuts`): they close most of the LP gap when
    // many equal blocks compete for a few devices.
    for b in 0..k {
        for (coeff, bound) in lifted_cuts(inst, b) {
            let lhs: Expression = (0..n)
                .filter(|&i| coeff[i] > 0.0)
                .map(|i| coeff[i] * xe(i, b))
                .sum();
            constraints.push(constraint!(lhs <= bound));
        }
    }

    if opts.contiguous {
        // Device index non-decreasing along the chain: Σ_{b' ≥ b} x[i][b'] ≤ Σ_{b' ≥ b} x[i+1][b'].
        for i in 0..n.saturating_sub(1) {
            for b in 1..k {
                let here: Expression = (b..k).map(|c| xe(i, c)).sum();
                let next: Expression = (b..k).map(|c| xe(i + 1, c)).sum();
                constraints.push(constraint!(here <= next));
            }
        }
    } else {
        // Symmetry of identical GPUs.
        for (a, b) in identical_gpu_pairs(inst) {
            let mut prev: Option<Variable> = None;
            let mut used_a = false;
            for i in 0..n {
                match prev {
                    None => constraints.push(constraint!(xe(i, b) <= 0)),
                    Some(u) => constraints.push(constraint!(xe(i, b) <= u)),
                }
                used_a = used_a || start.is_some_and(|s| s[i] == a);
                let u = add(
                    &mut vars,
                    variable().min(0.0).max(1.0),
                    f64::from(u8::from(used_a)),
                );
                match prev {
                    None => constraints.push(constraint!(u <= xe(i, a))),
                    Some(p) => constraints.push(constraint!(u <= p + xe(i, a))),
                }
                prev = Some(u);
            }
        }
    }

    if std::env::var_os("DEVMAP_TRACE").is_some() {
        eprintln!("trace:   mip built in {:?}", started.elapsed());
    }
    if let Some(floor) = opts.objective_floor.filter(|f| f.is_finite() && *f > 0.0) {
        // Slightly below the bound so rounding never cuts off the optimum.
        constraints.push(constraint!(
            objective.clone() >= floor * SCALE * (1.0 - 1e-9)
        ));
    }
    let rows = constraints.len();
    let ncols = cols.len();
    let mut problem = vars.minimise(objective).using(highs);
    for c in constraints {
        problem = problem.with(c);
    }
    let mut model = problem
        .try_into_inner()
        .map_err(|e| Error::Solver(format!("HiGHS could not build the model: {e}")))?;
    model.make_quiet();
    // The limit covers building the model too (1–3 s on a million columns).
    model.set_option(
        "time_limit",
        opts.time_limit
            .saturating_sub(started.elapsed())
            .as_secs_f64(),
    );
    model.set_option("mip_rel_gap", opts.mip_rel_gap);
    model.set_option("threads", 1);
    if let Ok(extra) = std::env::var("DEVMAP_HIGHS_OPTIONS") {
        // Debugging aid: `name=value,...` passed to HiGHS as is.
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
    // A start that violates the symmetry rows is relabelled by HiGHS' own check; skip it then.
    let warm_ok =
        start.is_some() && symmetry_respected(inst, start.expect("checked"), opts.contiguous);
    if warm_ok {
        let _ = model.try_set_solution(Some(&cols), None, None, None);
    }
    if std::env::var_os("DEVMAP_TRACE").is_some() {
        eprintln!("trace:   highs model ready in {:?}", started.elapsed());
    }
    let solved = model.solve();
    if std::env::var("DEVMAP_MIP_DEBUG").is_ok() {
        eprintln!(
            "highs obj {} status {:?}",
            solved.objective_value() / SCALE,
            solved.status()
        );
    }
    let status = solved.status();
    let status_text = format!("{status:?}");
    let has_solution = matches!(
        solved.primal_solution_status(),
        highs::HighsSolutionStatus::Feasible
    );
    let bound_scaled = solved
        .double_info_value(c"mip_dual_bound")
        .unwrap_or(f64::NEG_INFINITY);
    let mut result = MipResult {
        assignment: None,
        objective_seconds: f64::INFINITY,
        bound_seconds: bound_scaled / SCALE,
        gap: f64::INFINITY,
        status: status_text,
        optimal: matches!(status, highs::HighsModelStatus::Optimal),
        elapsed: started.elapsed(),
        size: (ncols, rows),
    };
    if has_solution {
        let sol = solved.get_solution();
        let values = sol.columns();
        let mut a = vec![usize::MAX; n];
        for i in 0..n {
            let mut best = (0.0, usize::MAX);
            for b in 0..k {
                if let Some(c) = x_col[i][b] {
                    let val = values[c];
                    if val > best.0 {
                        best = (val, b);
                    }
                }
            }
            a[i] = best.1;
        }
        if inst.feasible(&a) {
            result.objective_seconds = inst.evaluate(&a);
            result.assignment = Some(a);
        }
    }
    if result.assignment.is_some() {
        let obj = result.objective_seconds;
        let bound = result.bound_seconds.min(obj);
        result.bound_seconds = bound;
        result.gap = if obj > 0.0 {
            ((obj - bound) / obj).max(0.0)
        } else {
            0.0
        };
    }
    Ok(result)
}

/// Lifted cover cuts for device `b`: `Σ_i α(w_i) x[i][b] ≤ L0`, one per base size class `w_s`
/// among the largest distinct unit sizes. Units of the base class count 1, larger classes are lifted
/// one after another (largest last) to the strongest coefficient that keeps every packing of
/// capacity `C` valid, smaller units count 0. Each returned cut is (coefficient per unit, bound).
fn lifted_cuts(inst: &Instance, b: usize) -> Vec<(Vec<f64>, f64)> {
    let n = inst.n();
    let w: Vec<u64> = (0..n).map(|i| inst.unit_bytes(i)).collect();
    let mut classes = inst.size_classes();
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
                .map(|u| inst.read[u])
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
