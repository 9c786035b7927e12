//! Depth-first branch and bound for a small integer program whose nodes also carry a *key*: a
//! piece of the problem the relaxation only sees as bounds and right-hand sides (the class
//! model's buffer levels, `classes.rs`), on the certified simplex of [`crate::simplex`].
//!
//! A node is a key and bounds on the columns. Its relaxation is the linear program with the key's
//! bounds and right-hand sides ([`Family::variant`]) and the node's bounds; where the key is not
//! settled for the relaxation's optimum ([`Family::split`]) the node splits its key, else it
//! splits a fractional column, else its integral optimum is checked exactly ([`Family::accept`])
//! and kept. A node is pruned once its bound is within the gap of the incumbent. Every bound used
//! is one the simplex certified, so the search's bound holds. Anything the search cannot settle
//! (a relaxation neither solved nor proven infeasible, an integral point `accept` rejects, the node
//! or time limit) leaves it [`Search::Unsettled`], and the caller falls back to a general solver.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::rc::Rc;
use std::time::Instant;

use crate::simplex::{self, Lp, LpOutcome, Tableau};

/// A key's column bounds and right-hand sides.
#[derive(Debug, Clone)]
pub struct Variant {
    /// Lower bounds of the columns.
    pub lo: Vec<f64>,
    /// Upper bounds of the columns.
    pub hi: Vec<f64>,
    /// Right-hand sides of the rows.
    pub rhs: Vec<f64>,
}

/// The program the search solves: a linear program, its integer columns, and its keys.
pub trait Family {
    /// What a node fixes beyond column bounds.
    type Key: Clone;
    /// The linear program (its own bounds and right-hand sides are the keys').
    fn lp(&self) -> &Lp;
    /// Which columns are integral.
    fn integer(&self) -> &[bool];
    /// The key of the whole problem.
    fn root(&self) -> Self::Key;
    /// The relaxation of the points of `key`: bounds and right-hand sides.
    fn variant(&self, key: &Self::Key) -> Variant;
    /// Two keys partitioning `key`'s points, when the relaxation's optimum `x` is not one of
    /// `key`'s points as far as the key is concerned.
    fn split(&self, key: &Self::Key, x: &[f64]) -> Option<[Self::Key; 2]>;
    /// Whether an integral point (settled for its key) is feasible, checked exactly.
    fn accept(&self, x: &[f64]) -> bool;
}

/// When the search stops.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Stop once the incumbent is within this relative gap of the bound.
    pub rel_gap: f64,
    /// Until this many relaxations, search for the optimum itself (a zero gap).
    pub exact_nodes: usize,
    /// The relaxations solved at most.
    pub max_nodes: usize,
    /// Give up at this time.
    pub deadline: Instant,
}

/// What the search settled.
#[derive(Debug, Clone)]
pub enum Search {
    /// The best point found and a bound on every integral point; the point is within the gap of
    /// the bound. No point and an infinite bound: the program is infeasible.
    Settled {
        /// The best accepted integral point: its objective and columns.
        best: Option<(f64, Vec<f64>)>,
        /// A lower bound on the objective of every integral point.
        bound: f64,
        /// Relaxations solved.
        nodes: usize,
    },
    /// Not settled: why.
    Unsettled(&'static str),
}

/// Integral within this.
const INTEGRAL: f64 = 1e-6;

/// A node: its key, its column bounds, the bound of the relaxation it was split from and that
/// relaxation's tableau (to re-solve from).
struct Node<K> {
    key: K,
    /// The key's relaxation (shared by the nodes that only split columns).
    variant: Rc<Variant>,
    lo: Vec<f64>,
    hi: Vec<f64>,
    parent_bound: f64,
    parent: Option<Box<Tableau>>,
}

/// The nodes waiting, each reachable in push order (popped last first, for depth first) and by
/// parent bound; a node taken one way is left `None` for the other.
struct Queue<K> {
    nodes: Vec<Option<Node<K>>>,
    pushed: Vec<usize>,
    by_bound: BinaryHeap<(Reverse<OrderedBound>, usize)>,
}

impl<K> Default for Queue<K> {
    fn default() -> Self {
        Queue {
            nodes: Vec::new(),
            pushed: Vec::new(),
            by_bound: BinaryHeap::new(),
        }
    }
}

/// A bound ordered by `total_cmp`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct OrderedBound(f64);

impl Eq for OrderedBound {}

impl PartialOrd for OrderedBound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrderedBound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl<K> Queue<K> {
    fn push(&mut self, node: Node<K>) {
        let i = self.nodes.len();
        self.by_bound
            .push((Reverse(OrderedBound(node.parent_bound)), i));
        self.pushed.push(i);
        self.nodes.push(Some(node));
    }

    /// The least-bound node when `best_first`, else the last pushed.
    fn pop(&mut self, best_first: bool) -> Option<Node<K>> {
        loop {
            let i = if best_first {
                self.by_bound.pop()?.1
            } else {
                self.pushed.pop()?
            };
            if let Some(node) = self.nodes[i].take() {
                return Some(node);
            }
        }
    }
}

/// Search the integral points of `family` to `limits`.
pub fn search<F: Family>(family: &F, limits: Limits) -> Search {
    let lp = family.lp();
    let n = lp.cost.len();
    let mut state = State {
        family,
        limits,
        best: None,
        pruned: f64::INFINITY,
        nodes: 0,
    };
    let key = family.root();
    let root = Node {
        variant: Rc::new(family.variant(&key)),
        key,
        lo: vec![f64::NEG_INFINITY; n],
        hi: vec![f64::INFINITY; n],
        parent_bound: f64::NEG_INFINITY,
        parent: None,
    };
    if let Err(why) = state.run(root) {
        return Search::Unsettled(why);
    }
    let best_value = state.best.as_ref().map_or(f64::INFINITY, |b| b.0);
    Search::Settled {
        bound: state.pruned.min(best_value),
        best: state.best,
        nodes: state.nodes,
    }
}

/// A relaxation's outcome.
enum Relaxed {
    Solved(Vec<f64>, f64, Box<Tableau>),
    Infeasible,
    Unknown,
}

/// The search's incumbent and the least bound of the nodes it pruned by the gap.
struct State<'a, F> {
    family: &'a F,
    limits: Limits,
    best: Option<(f64, Vec<f64>)>,
    pruned: f64,
    nodes: usize,
}

impl<F: Family> State<'_, F> {
    /// The relaxation of `node`, re-solved from its parent's tableau where it has one (and from
    /// scratch if that fails).
    fn relax(&mut self, node: &mut Node<F::Key>) -> Relaxed {
        self.nodes += 1;
        let v = Rc::clone(&node.variant);
        let mut lo: Vec<f64> = v.lo.iter().zip(&node.lo).map(|(a, b)| a.max(*b)).collect();
        let mut hi: Vec<f64> = v.hi.iter().zip(&node.hi).map(|(a, b)| a.min(*b)).collect();
        let lp = self.family.lp();
        if !propagate(lp, self.family.integer(), &mut lo, &mut hi, &v.rhs) {
            return Relaxed::Infeasible;
        }
        if let Some(mut t) = node.parent.take() {
            match t.resolve(lp, &lo, &hi, &v.rhs) {
                LpOutcome::Optimal { x, bound } => return Relaxed::Solved(x, bound, t),
                LpOutcome::Infeasible => return Relaxed::Infeasible,
                LpOutcome::Unknown => {}
            }
        }
        match simplex::solve(lp, &lo, &hi, &v.rhs) {
            (LpOutcome::Optimal { x, bound }, Some(t)) => Relaxed::Solved(x, bound, Box::new(t)),
            (LpOutcome::Infeasible, _) => Relaxed::Infeasible,
            _ => Relaxed::Unknown,
        }
    }

    /// Whether a node of bound `bound` cannot improve the incumbent by more than the gap; if so
    /// its bound counts toward the search's.
    fn prunes(&mut self, bound: f64) -> bool {
        let Some((best, _)) = &self.best else {
            return false;
        };
        // Exact while the search is small, so that cheap cases get the optimum itself.
        let gap = if self.nodes < self.limits.exact_nodes {
            0.0
        } else {
            self.limits.rel_gap
        };
        let within = bound >= best / (1.0 + gap) - 1e-12 * best.abs() - 1e-9;
        if within {
            self.pruned = self.pruned.min(bound);
        }
        within
    }

    /// Best first with plunging from `root`: a node's first child is searched next, its second
    /// waits in the queue (least parent bound first); until there is an incumbent, depth first.
    fn run(&mut self, root: Node<F::Key>) -> Result<(), &'static str> {
        let mut queue = Queue::default();
        let mut next = Some(root);
        while let Some(mut node) = next.take().or_else(|| queue.pop(self.best.is_some())) {
            if self.prunes(node.parent_bound) {
                continue;
            }
            if self.nodes >= self.limits.max_nodes || Instant::now() > self.limits.deadline {
                return Err("the node or time limit");
            }
            let (x, bound, t) = match self.relax(&mut node) {
                Relaxed::Solved(x, b, t) => (x, b, t),
                Relaxed::Infeasible => continue,
                Relaxed::Unknown => return Err("a relaxation was not solved"),
            };
            if self.prunes(bound) {
                continue;
            }
            let children = if let Some([a, b]) = self.family.split(&node.key, &x) {
                let child = |key: F::Key, t: Box<Tableau>| Node {
                    variant: Rc::new(self.family.variant(&key)),
                    key,
                    lo: node.lo.clone(),
                    hi: node.hi.clone(),
                    parent_bound: bound,
                    parent: Some(t),
                };
                let copy = t.clone();
                [child(a, t), child(b, copy)]
            } else if let Some(j) = self.fractional(&x) {
                split_column(node, j, x[j], bound, t)
            } else {
                self.take(x)?;
                continue;
            };
            let [first, second] = children;
            queue.push(second);
            next = Some(first);
        }
        Ok(())
    }

    /// The integer column farthest from integral, if any.
    fn fractional(&self, x: &[f64]) -> Option<usize> {
        let integer = self.family.integer();
        let frac = |j: usize| (x[j] - x[j].round()).abs();
        let cost = &self.family.lp().cost;
        let score = |j: usize| cost[j].abs() * frac(j).max(0.1);
        (0..x.len())
            .filter(|&j| integer[j] && frac(j) > INTEGRAL)
            .max_by(|&a, &b| score(a).total_cmp(&score(b)))
    }

    /// An integral relaxation optimum: rounded, checked exactly, and kept if it is the best.
    fn take(&mut self, mut x: Vec<f64>) -> Result<(), &'static str> {
        let integer = self.family.integer();
        for j in (0..x.len()).filter(|&j| integer[j]) {
            x[j] = x[j].round();
        }
        if !self.family.accept(&x) {
            return Err("an integral point failed the exact check");
        }
        let value: f64 = x
            .iter()
            .zip(&self.family.lp().cost)
            .map(|(v, c)| v * c)
            .sum();
        if self.best.as_ref().is_none_or(|b| value < b.0) {
            self.best = Some((value, x));
        }
        Ok(())
    }
}

/// The two children of `node` split at column `j` (value `at`; its relaxation's bound `bound`
/// and tableau `t`): `x_j ≤ ⌊at⌋` and `x_j ≥ ⌈at⌉`, the nearer side first.
fn split_column<K: Clone>(
    node: Node<K>,
    j: usize,
    at: f64,
    bound: f64,
    t: Box<Tableau>,
) -> [Node<K>; 2] {
    let mut down = Node {
        key: node.key.clone(),
        variant: Rc::clone(&node.variant),
        lo: node.lo.clone(),
        hi: node.hi.clone(),
        parent_bound: bound,
        parent: Some(t.clone()),
    };
    down.hi[j] = at.floor();
    let mut up = Node {
        key: node.key,
        variant: node.variant,
        lo: node.lo,
        hi: node.hi,
        parent_bound: bound,
        parent: Some(t),
    };
    up.lo[j] = at.ceil();
    if at - at.floor() < 0.5 {
        [down, up]
    } else {
        [up, down]
    }
}

/// Bound propagation (passes over the rows): a column's bounds tightened to what each row allows
/// with every other column at its least activity, rounded for an integer column (slightly
/// outward, so floating point never cuts off a point). False when some bounds cross.
fn propagate(lp: &Lp, integer: &[bool], lo: &mut [f64], hi: &mut [f64], rhs: &[f64]) -> bool {
    for _ in 0..PROPAGATION_PASSES {
        for (row, &b) in lp.rows.iter().zip(rhs) {
            tighten(&row.terms, b, integer, lo, hi, 1.0);
            if row.equal {
                tighten(&row.terms, b, integer, lo, hi, -1.0);
            }
        }
    }
    lo.iter().zip(hi.iter()).all(|(l, h)| *l <= *h)
}

/// Passes of bound propagation per relaxation.
const PROPAGATION_PASSES: usize = 2;

/// Tighten bounds by `sign · Σ terms ≤ sign · b`.
fn tighten(
    terms: &[(usize, f64)],
    b: f64,
    integer: &[bool],
    lo: &mut [f64],
    hi: &mut [f64],
    sign: f64,
) {
    let least = |j: usize, a: f64| if a > 0.0 { a * lo[j] } else { a * hi[j] };
    let min_activity: f64 = terms.iter().map(|&(j, a)| least(j, sign * a)).sum();
    if !min_activity.is_finite() {
        return;
    }
    let slack = sign * b - min_activity;
    for &(j, a) in terms {
        let a = sign * a;
        if a.abs() < 1e-12 {
            continue;
        }
        let room = slack / a.abs();
        let margin = 1e-9 * room.abs().max(1.0) + 1e-7;
        if a > 0.0 {
            let bound = lo[j] + room + margin;
            hi[j] = hi[j].min(if integer[j] { bound.floor() } else { bound });
        } else {
            let bound = hi[j] - room - margin;
            lo[j] = lo[j].max(if integer[j] { bound.ceil() } else { bound });
        }
    }
}
