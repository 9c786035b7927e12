//! A dense bounded-variable simplex (dual, then primal) for small linear programs (tens of rows
//! and columns), with bounds that hold whatever its floating point did.
//!
//! The class model's relaxations have 20–40 rows and 40–70 columns; HiGHS spends milliseconds
//! setting up each one, this solves one in microseconds. Its answers are certified rather than
//! trusted: the lower bound it reports is the Lagrangian value of its final duals (valid for any
//! duals of the right sign, so a pivot gone inexact only weakens it), and "infeasible" is only
//! reported with a Farkas certificate checked the same way. Anything else is [`LpOutcome::Unknown`].

// Index loops mirror the tableau's subscripts.
#![allow(clippy::needless_range_loop)]

/// A linear program: minimise `Σ cost·x` subject to `rows`, `lo ≤ x ≤ hi` (bounds given per solve).
#[derive(Debug, Clone, Default)]
pub struct Lp {
    /// The objective coefficient of each column.
    pub cost: Vec<f64>,
    /// The rows.
    pub rows: Vec<Row>,
}

/// One row: `Σ terms (≤ or =) rhs`.
#[derive(Debug, Clone)]
pub struct Row {
    /// `(column, coefficient)` pairs.
    pub terms: Vec<(usize, f64)>,
    /// Whether the row is an equality (else `≤`).
    pub equal: bool,
    /// The right-hand side.
    pub rhs: f64,
}

/// What a solve proved.
#[derive(Debug, Clone)]
pub enum LpOutcome {
    /// An optimal point and a certified lower bound on the objective over the feasible set.
    Optimal {
        /// The columns' values.
        x: Vec<f64>,
        /// A lower bound that holds for every feasible point (the Lagrangian of the final duals).
        bound: f64,
    },
    /// No point satisfies the rows and bounds (a checked Farkas certificate).
    Infeasible,
    /// Neither could be certified (iteration limit, numerical trouble).
    Unknown,
}

/// Reduced costs below this are zero.
const TOL: f64 = 1e-9;
/// Pivots below this are zero (smaller ones blow the tableau up: a 512-byte unit is 5·10⁻⁷ GiB).
const PIVOT_TOL: f64 = 1e-7;
/// Bound violations below this are zero (the bounds hold whatever the point; an integral point is
/// checked to the byte).
const FEASIBILITY_TOL: f64 = 1e-7;
/// A Farkas value above this proves infeasibility.
const FARKAS_TOL: f64 = 1e-7;
/// Consecutive degenerate pivots before Bland's rule (which cannot cycle) takes over.
const DEGENERATE_BEFORE_BLAND: usize = 30;

/// Solve `lp` with the column bounds `lo`/`hi` (finite `lo`; `hi` may be infinite) and the
/// right-hand sides `rhs` (one per row, replacing the rows' own); with the optimal tableau, to
/// re-solve from ([`Tableau::resolve`]). Every column starts at the bound its cost prefers, so the
/// slack basis is dual feasible and the dual simplex solves from there (a column of negative cost
/// and no upper bound makes it [`LpOutcome::Unknown`]).
pub fn solve(lp: &Lp, lo: &[f64], hi: &[f64], rhs: &[f64]) -> (LpOutcome, Option<Tableau>) {
    if (lp.cost.iter().zip(hi)).any(|(c, h)| *c < 0.0 && h.is_infinite()) {
        return (LpOutcome::Unknown, None);
    }
    let mut t = Tableau::new(lp);
    for j in 0..t.n {
        t.at_upper[j] = lp.cost[j] < 0.0;
    }
    let outcome = t.resolve(lp, lo, hi, rhs);
    let solved = matches!(outcome, LpOutcome::Optimal { .. });
    (outcome, solved.then_some(t))
}

/// The tableau `B⁻¹[A | I]` over the structurals and one slack per row (bounds `[0, 0]` on an
/// equality row, `[0, ∞)` on a `≤` row); the slack columns hold `B⁻¹`, and their reduced costs
/// the duals.
#[derive(Debug, Clone)]
pub struct Tableau {
    m: usize,
    n: usize,
    width: usize,
    t: Vec<f64>,
    beta: Vec<f64>,
    basis: Vec<usize>,
    basic: Vec<bool>,
    at_upper: Vec<bool>,
    lo: Vec<f64>,
    hi: Vec<f64>,
    /// Reduced costs of every column.
    d: Vec<f64>,
}

impl Tableau {
    /// The slack basis of `lp` (bounds and basic values come with [`Tableau::resolve`]).
    fn new(lp: &Lp) -> Tableau {
        let (m, n) = (lp.rows.len(), lp.cost.len());
        let width = n + m;
        let mut t = vec![0.0; m * width];
        let (mut lo, mut hi) = (vec![0.0; width], vec![0.0; width]);
        for (i, row) in lp.rows.iter().enumerate() {
            for &(j, a) in &row.terms {
                t[i * width + j] += a;
            }
            t[i * width + n + i] = 1.0;
            (lo[n + i], hi[n + i]) = (0.0, if row.equal { 0.0 } else { f64::INFINITY });
        }
        let mut cost = lp.cost.clone();
        cost.resize(width, 0.0);
        let basis: Vec<usize> = (n..width).collect();
        let mut basic = vec![false; width];
        basis.iter().for_each(|&j| basic[j] = true);
        Tableau {
            m,
            n,
            width,
            t,
            beta: vec![0.0; m],
            basis,
            basic,
            at_upper: vec![false; width],
            lo,
            hi,
            d: cost,
        }
    }

    /// Re-solve from this tableau's basis with other column bounds and right-hand sides: the
    /// reduced costs still hold, so the dual simplex restores feasibility (a few pivots where a
    /// bound or two changed), then the primal simplex cleans up.
    pub fn resolve(&mut self, lp: &Lp, lo: &[f64], hi: &[f64], rhs: &[f64]) -> LpOutcome {
        self.lo[..self.n].copy_from_slice(lo);
        self.hi[..self.n].copy_from_slice(hi);
        for j in 0..self.width {
            self.at_upper[j] &= self.hi[j].is_finite();
        }
        self.recompute_beta(rhs);
        match self.dual() {
            Dual::Feasible => self.optimise(lp, rhs),
            Dual::Infeasible(r) => self.farkas(lp, rhs, &self.row_certificate(r)),
            Dual::Stuck => LpOutcome::Unknown,
        }
    }

    /// The primal simplex to optimality, then the certified bound.
    fn optimise(&mut self, lp: &Lp, rhs: &[f64]) -> LpOutcome {
        if !self.primal() {
            return LpOutcome::Unknown;
        }
        let bound = self.lagrangian(lp, rhs, &lp.cost, &self.duals());
        if !bound.is_finite() {
            return LpOutcome::Unknown;
        }
        LpOutcome::Optimal {
            x: self.structurals(),
            bound,
        }
    }

    /// The value of nonbasic column `j`: the bound it is at.
    fn nonbasic_value(&self, j: usize) -> f64 {
        if self.at_upper[j] {
            self.hi[j]
        } else {
            self.lo[j]
        }
    }

    /// The basic values from the right-hand sides and the nonbasic values:
    /// `β = B⁻¹ rhs − Σ_{j nonbasic} (B⁻¹A)_j x_j`.
    fn recompute_beta(&mut self, rhs: &[f64]) {
        let (w, n) = (self.width, self.n);
        let off_zero: Vec<(usize, f64)> = (0..w)
            .filter(|&j| !self.basic[j])
            .map(|j| (j, self.nonbasic_value(j)))
            .filter(|&(_, x)| x != 0.0)
            .collect();
        for i in 0..self.m {
            let row = &self.t[i * w..(i + 1) * w];
            let from_rhs: f64 = row[n..].iter().zip(rhs).map(|(b, r)| b * r).sum();
            let from_bounds: f64 = off_zero.iter().map(|&(j, x)| row[j] * x).sum();
            self.beta[i] = from_rhs - from_bounds;
        }
    }

    /// Pivot until optimal; false at the iteration limit or when a step is unbounded.
    fn primal(&mut self) -> bool {
        let mut degenerate = 0;
        for _ in 0..self.max_iter() {
            let bland = degenerate >= DEGENERATE_BEFORE_BLAND;
            let Some(q) = self.entering(bland) else {
                return true;
            };
            match self.step(q, bland) {
                None => return false,
                Some(moved) => degenerate = if moved > TOL { 0 } else { degenerate + 1 },
            }
        }
        false
    }

    fn max_iter(&self) -> usize {
        50 * (self.m + self.width)
    }

    /// The entering column: the largest reduced cost that improves (the lowest index under Bland).
    fn entering(&self, bland: bool) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for j in 0..self.width {
            if self.basic[j] || self.hi[j] <= self.lo[j] {
                continue;
            }
            let gain = if self.at_upper[j] {
                self.d[j]
            } else {
                -self.d[j]
            };
            if gain > TOL && best.is_none_or(|(_, g)| gain > g) {
                best = Some((j, gain));
                if bland {
                    break;
                }
            }
        }
        best.map(|(j, _)| j)
    }

    /// Move column `q` off its bound as far as the basis allows; the step length, or `None`
    /// when nothing limits it.
    fn step(&mut self, q: usize, bland: bool) -> Option<f64> {
        let dir = if self.at_upper[q] { -1.0 } else { 1.0 };
        let leave = self.ratio_test(q, dir, bland);
        let flip = self.hi[q] - self.lo[q];
        let step = leave.map_or(flip, |(_, room)| room.min(flip));
        if !step.is_finite() {
            return None;
        }
        for i in 0..self.m {
            self.beta[i] -= dir * self.t[i * self.width + q] * step;
        }
        match leave {
            Some((r, room)) if room <= flip => {
                let out_at_upper = dir * self.t[r * self.width + q] < 0.0;
                let value = self.nonbasic_value(q) + dir * step;
                self.pivot(r, q, out_at_upper, value);
            }
            _ => self.at_upper[q] = !self.at_upper[q],
        }
        Some(step)
    }

    /// The row whose basic column first reaches a bound as column `q` moves in direction `dir`,
    /// and how far `q` moves until then: among near-ties the largest pivot (the lowest basic
    /// column under Bland).
    fn ratio_test(&self, q: usize, dir: f64, bland: bool) -> Option<(usize, f64)> {
        let mut leave: Option<(usize, f64, f64)> = None;
        for i in 0..self.m {
            let alpha = dir * self.t[i * self.width + q];
            let b = self.basis[i];
            let room = if alpha > PIVOT_TOL {
                (self.beta[i] - self.lo[b]).max(0.0) / alpha
            } else if alpha < -PIVOT_TOL && self.hi[b].is_finite() {
                (self.hi[b] - self.beta[i]).max(0.0) / -alpha
            } else {
                continue;
            };
            let better = match leave {
                None => true,
                Some((r, best, a)) => {
                    room < best - 1e-12
                        || (room <= best + 1e-12
                            && if bland {
                                b < self.basis[r]
                            } else {
                                alpha.abs() > a
                            })
                }
            };
            if better {
                leave = Some((i, room, alpha.abs()));
            }
        }
        leave.map(|(r, room, _)| (r, room))
    }

    /// The dual simplex: while a basic column is out of its bounds, pivot it out at the bound it
    /// violates, keeping the reduced costs' signs.
    fn dual(&mut self) -> Dual {
        for _ in 0..self.max_iter() {
            let Some((r, below)) = self.most_violated() else {
                return Dual::Feasible;
            };
            let Some(q) = self.dual_entering(r, below) else {
                return Dual::Infeasible(r);
            };
            let out = self.basis[r];
            let target = if below { self.lo[out] } else { self.hi[out] };
            let delta = (self.beta[r] - target) / self.t[r * self.width + q];
            let value = self.nonbasic_value(q) + delta;
            for i in 0..self.m {
                self.beta[i] -= self.t[i * self.width + q] * delta;
            }
            self.pivot(r, q, !below, value);
        }
        Dual::Stuck
    }

    /// The row whose basic column is farthest out of its bounds, and whether it is below them.
    fn most_violated(&self) -> Option<(usize, bool)> {
        let mut worst: Option<(usize, bool, f64)> = None;
        for i in 0..self.m {
            let b = self.basis[i];
            let (below, above) = (self.lo[b] - self.beta[i], self.beta[i] - self.hi[b]);
            let (v, is_below) = if below > above {
                (below, true)
            } else {
                (above, false)
            };
            if v > FEASIBILITY_TOL && worst.is_none_or(|w| v > w.2) {
                worst = Some((i, is_below, v));
            }
        }
        worst.map(|(i, b, _)| (i, b))
    }

    /// The column entering at row `r` (whose basic column must rise when `below`, else fall):
    /// among the nonbasic columns that can move it that way, the one whose reduced cost allows
    /// the least dual step (ties: the largest pivot).
    fn dual_entering(&self, r: usize, below: bool) -> Option<usize> {
        let row = &self.t[r * self.width..(r + 1) * self.width];
        let mut best: Option<(usize, f64, f64)> = None;
        for j in 0..self.width {
            if self.basic[j] || self.hi[j] <= self.lo[j] {
                continue;
            }
            // Raising x_j changes the basic column by −row[j].
            let a = if below { -row[j] } else { row[j] };
            let moves = if self.at_upper[j] {
                a < -PIVOT_TOL
            } else {
                a > PIVOT_TOL
            };
            if !moves {
                continue;
            }
            let ratio = self.d[j].abs() / a.abs();
            let better = best.is_none_or(|(_, br, ba)| {
                ratio < br - 1e-12 || (ratio <= br + 1e-12 && a.abs() > ba)
            });
            if better {
                best = Some((j, ratio, a.abs()));
            }
        }
        best.map(|(j, _, _)| j)
    }

    /// Column `q` enters at row `r` with value `value`; the row's basic column leaves, at its
    /// upper bound when `out_at_upper`.
    fn pivot(&mut self, r: usize, q: usize, out_at_upper: bool, value: f64) {
        let w = self.width;
        let out = self.basis[r];
        self.at_upper[out] = out_at_upper;
        (self.basic[out], self.basic[q]) = (false, true);
        self.at_upper[q] = false;
        self.basis[r] = q;
        self.beta[r] = value;
        let p = self.t[r * w + q];
        let (before, rest) = self.t.split_at_mut(r * w);
        let (pivot_row, after) = rest.split_at_mut(w);
        for v in pivot_row.iter_mut() {
            *v /= p;
        }
        for row in before.chunks_exact_mut(w).chain(after.chunks_exact_mut(w)) {
            let f = row[q];
            if f != 0.0 {
                for (v, p) in row.iter_mut().zip(pivot_row.iter()) {
                    *v -= f * p;
                }
            }
        }
        let f = self.d[q];
        for (d, p) in self.d.iter_mut().zip(pivot_row.iter()) {
            *d -= f * p;
        }
    }

    /// The structural columns' values.
    fn structurals(&self) -> Vec<f64> {
        let mut x: Vec<f64> = (0..self.n).map(|j| self.nonbasic_value(j)).collect();
        for (i, &b) in self.basis.iter().enumerate() {
            if b < self.n {
                x[b] = self.beta[i];
            }
        }
        x
    }

    /// The duals `y = c_B B⁻¹`, read off the slacks' reduced costs (a slack costs nothing).
    fn duals(&self) -> Vec<f64> {
        self.d[self.n..].iter().map(|d| -d).collect()
    }

    /// Row `r` of `B⁻¹`, signed so that its Farkas value is positive when row `r`'s basic column
    /// cannot reach its bounds.
    fn row_certificate(&self, r: usize) -> Vec<f64> {
        let below = self.beta[r] < self.lo[self.basis[r]];
        let sign = if below { -1.0 } else { 1.0 };
        let row = &self.t[r * self.width..(r + 1) * self.width];
        row[self.n..].iter().map(|b| sign * b).collect()
    }

    /// `Infeasible` when the duals `y` prove it (a positive Farkas value), else `Unknown`.
    fn farkas(&self, lp: &Lp, rhs: &[f64], y: &[f64]) -> LpOutcome {
        let zero = vec![0.0; self.n];
        if self.lagrangian(lp, rhs, &zero, y) > FARKAS_TOL {
            LpOutcome::Infeasible
        } else {
            LpOutcome::Unknown
        }
    }

    /// The Lagrangian value `y·rhs + Σ_j min over [lo, hi] of (cost_j − y·A_j) x_j`, each `≤`
    /// row's `y` made non-positive: a lower bound on `cost·x` over every feasible point for any
    /// such `y`, so it holds however inexact `y` is (with zero costs, a value above zero proves
    /// that no point is feasible).
    fn lagrangian(&self, lp: &Lp, rhs: &[f64], cost: &[f64], y: &[f64]) -> f64 {
        let mut reduced = cost.to_vec();
        let mut value = 0.0;
        for (i, row) in lp.rows.iter().enumerate() {
            let yi = if row.equal { y[i] } else { y[i].min(0.0) };
            value += yi * rhs[i];
            for &(j, a) in &row.terms {
                reduced[j] -= yi * a;
            }
        }
        for j in 0..self.n {
            value += if reduced[j] >= 0.0 {
                reduced[j] * self.lo[j]
            } else if self.hi[j].is_finite() {
                reduced[j] * self.hi[j]
            } else {
                return f64::NEG_INFINITY;
            };
        }
        value
    }
}

/// How the dual simplex ended.
enum Dual {
    /// Every basic column within its bounds.
    Feasible,
    /// This row's basic column cannot be brought within its bounds.
    Infeasible(usize),
    /// The iteration limit.
    Stuck,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(terms: &[(usize, f64)], equal: bool, rhs: f64) -> Row {
        Row {
            terms: terms.to_vec(),
            equal,
            rhs,
        }
    }

    fn run(lp: &Lp, lo: &[f64], hi: &[f64]) -> LpOutcome {
        let rhs: Vec<f64> = lp.rows.iter().map(|r| r.rhs).collect();
        solve(lp, lo, hi, &rhs).0
    }

    /// min −x − y, x + 2y ≤ 4, 3x + y ≤ 6, 0 ≤ x, y ≤ 10: optimum (1.6, 1.2), −2.8.
    #[test]
    fn solves_a_textbook_program() {
        let lp = Lp {
            cost: vec![-1.0, -1.0],
            rows: vec![
                row(&[(0, 1.0), (1, 2.0)], false, 4.0),
                row(&[(0, 3.0), (1, 1.0)], false, 6.0),
            ],
        };
        let LpOutcome::Optimal { x, bound } = run(&lp, &[0.0; 2], &[10.0; 2]) else {
            panic!("not optimal");
        };
        assert!(
            (x[0] - 1.6).abs() < 1e-9 && (x[1] - 1.2).abs() < 1e-9,
            "{x:?}"
        );
        assert!((bound + 2.8).abs() < 1e-9, "{bound}");
    }

    /// An equality with a negative right-hand side and bounds that bind: min −2x + y with
    /// x + y = −1, x ∈ [−3, 0], y ∈ [−0.5, 2].
    #[test]
    fn handles_equalities_and_bounds() {
        let lp = Lp {
            cost: vec![-2.0, 1.0],
            rows: vec![row(&[(0, 1.0), (1, 1.0)], true, -1.0)],
        };
        // −2x + y with x + y = −1: y = −1 − x, objective −3x − 1, x as large as allowed: x = 0,
        // y = −1 is below y's bound −0.5, so x = −0.5, y = −0.5: objective 0.5.
        let LpOutcome::Optimal { x, bound } = run(&lp, &[-3.0, -0.5], &[0.0, 2.0]) else {
            panic!("not optimal");
        };
        assert!(
            (x[0] + 0.5).abs() < 1e-9 && (x[1] + 0.5).abs() < 1e-9,
            "{x:?}"
        );
        assert!((bound - 0.5).abs() < 1e-9, "{bound}");
    }

    #[test]
    fn proves_infeasibility() {
        // x + y ≥ 3 (as −x − y ≤ −3) with x, y ≤ 1.
        let lp = Lp {
            cost: vec![1.0, 1.0],
            rows: vec![row(&[(0, -1.0), (1, -1.0)], false, -3.0)],
        };
        assert!(matches!(
            run(&lp, &[0.0; 2], &[1.0; 2]),
            LpOutcome::Infeasible
        ));
    }
}
