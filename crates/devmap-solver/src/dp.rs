//! An exact dynamic program for the contiguous form of the problem: devices in their order (GPUs by
//! index, then cpu, then disk) each take one contiguous run of units, possibly empty. It is the
//! pipeline-partitioning DP; `auto` uses it as a warm start and as a cross-check of the MIP's
//! contiguous mode (they must agree exactly).
//!
//! Transfers are priced on the chain edges `i → i + 1` only: the DP is exact when the instance's
//! data flow is a chain ([`Instance::is_chain`]). On other graphs (an encoder-decoder's
//! cross-attention edges) the assignment it returns is scored by [`Instance::evaluate`] and is only
//! a start candidate for the MIP.
//!
//! The streamed suffix (units on cpu/disk) decides the main GPU's reserve (the largest streamed
//! unit plus the streamed units' KV cache) and the cpu's reserve (the largest disk unit), so the DP
//! enumerates where the suffix starts and runs the GPU part once per distinct reserve.

use std::collections::HashMap;

use devmap_core::cost::Objective;

use crate::instance::Instance;

/// Largest number of units the DP is run on (its cost grows as units³ × GPUs²).
pub const DP_MAX_UNITS: usize = 400;

/// The best contiguous assignment and its cost, or `None` if none fits (or the instance is out of the
/// DP's scope: the throughput objective, tied storage across units, or more than [`DP_MAX_UNITS`] units).
pub fn solve_contiguous(inst: &Instance) -> Option<(Vec<usize>, f64)> {
    if inst.cost_model.objective != Objective::Latency
        || !inst.ties.is_empty()
        || inst.n() > DP_MAX_UNITS
    {
        return None;
    }
    let n = inst.n();
    let gpus: Vec<usize> = (0..inst.devices.len())
        .filter(|&b| inst.devices[b].is_gpu())
        .collect();
    let mut gpu_runs: HashMap<(u64, bool), GpuDp> = HashMap::new();
    let best = best_split(inst, &gpus, &mut gpu_runs);
    let (_, s, t, reduction, end) = best?;
    let mut a = gpu_runs[&(reduction, s < n)].assignment(s, end);
    for _ in s..t {
        a.push(inst.cpu?);
    }
    for _ in t..n {
        a.push(inst.disk?);
    }
    if !inst.feasible(&a) {
        return None;
    }
    let cost = inst.evaluate(&a);
    Some((a, cost))
}

/// (cost, s, t, reduction, end state of the GPU part): GPUs take [0, s), cpu [s, t), disk [t, n).
type Split = (f64, usize, usize, u64, usize);

/// The cheapest [`Split`] over every start of the streamed suffix and of the disk part;
/// `gpu_runs` caches the GPU DP per main-GPU reduction.
fn best_split(
    inst: &Instance,
    gpus: &[usize],
    gpu_runs: &mut HashMap<(u64, bool), GpuDp>,
) -> Option<Split> {
    let n = inst.n();
    let main = inst.main;
    // Suffix statistics.
    let mut suffix_read_max = vec![0u64; n + 1];
    let mut suffix_kv = vec![0u64; n + 1];
    for i in (0..n).rev() {
        suffix_read_max[i] = suffix_read_max[i + 1].max(inst.stream_buffer(i));
        suffix_kv[i] = suffix_kv[i + 1] + inst.streamed_bytes_on_main(i);
    }
    let tail = Tail::new(inst);
    let mut best: Option<Split> = None;
    for s in 0..=n {
        let streamed = s < n;
        if streamed && inst.cpu.is_none() && inst.disk.is_none() {
            continue;
        }
        // Without a GPU nothing is streamed: cpu/disk are ordinary devices executing on the host.
        let reduction = match (main, streamed) {
            (Some(_), true) => suffix_read_max[s] + suffix_kv[s],
            _ => 0,
        };
        if main.is_none() && s > 0 {
            continue;
        }
        // A streamed suffix runs on the main GPU, which then holds a unit (the main-GPU rule).
        let run = gpu_runs
            .entry((reduction, streamed))
            .or_insert_with(|| GpuDp::run(inst, gpus, reduction, streamed));
        // The way back to the main GPU (for a streamed suffix) is part of each end state's cost.
        let back_to = main.filter(|_| streamed).map(|m| inst.exec_of[m]);
        let Some((gpu_cost, end)) = run.best_at(inst, s, back_to) else {
            continue;
        };
        for t in s..=n {
            let Some(tail_seconds) = tail_cost(inst, &tail, s, t) else {
                continue;
            };
            let cost = gpu_cost + tail_seconds;
            if best.is_none_or(|b| cost < b.0) {
                best = Some((cost, s, t, reduction, end));
            }
        }
    }
    best
}

/// Prefix sums over the units for one host device (cpu or disk): bytes, seconds and disallowed
/// units of `[0, i)`, so a stretch's totals cost O(1) (the DP tries every `(s, t)`).
struct HostPrefix {
    bytes: Vec<u64>,
    seconds: Vec<f64>,
    barred: Vec<usize>,
}

impl HostPrefix {
    fn new(inst: &Instance, row: usize) -> HostPrefix {
        let n = inst.n();
        let mut p = HostPrefix {
            bytes: vec![0; n + 1],
            seconds: vec![0.0; n + 1],
            barred: vec![0; n + 1],
        };
        for i in 0..n {
            p.bytes[i + 1] = p.bytes[i] + inst.unit_bytes_on(i, row);
            p.seconds[i + 1] = p.seconds[i] + inst.cost[i][row];
            p.barred[i + 1] = p.barred[i] + usize::from(!inst.allowed[i][row]);
        }
        p
    }

    /// `(bytes, seconds)` of `[s, t)`, or `None` when a unit in it may not use the device.
    fn stretch(&self, s: usize, t: usize) -> Option<(u64, f64)> {
        (self.barred[t] == self.barred[s]).then(|| {
            (
                self.bytes[t] - self.bytes[s],
                self.seconds[t] - self.seconds[s],
            )
        })
    }
}

/// What [`tail_cost`] reads: per host device its prefix sums, and per start `t` of the disk part
/// the cpu's reserve for it (the largest disk unit's buffer) and, without a GPU, its KV cache.
struct Tail {
    cpu: Option<(usize, HostPrefix)>,
    disk: Option<(usize, HostPrefix)>,
    disk_reserve: Vec<u64>,
    disk_kv: Vec<u64>,
}

impl Tail {
    fn new(inst: &Instance) -> Tail {
        let n = inst.n();
        let mut disk_reserve = vec![0u64; n + 1];
        let mut disk_kv = vec![0u64; n + 1];
        // Without a GPU the cpu executes the disk units and holds their KV cache.
        let cpu_runs_disk =
            matches!((inst.cpu, inst.disk), (Some(c), Some(d)) if inst.exec_row(d) == c);
        for i in (0..n).rev() {
            disk_reserve[i] = disk_reserve[i + 1].max(inst.stream_buffer(i));
            let kv = if cpu_runs_disk {
                inst.streamed_bytes_on_main(i)
            } else {
                0
            };
            disk_kv[i] = disk_kv[i + 1] + kv;
        }
        Tail {
            cpu: inst.cpu.map(|c| (c, HostPrefix::new(inst, c))),
            disk: inst.disk.map(|d| (d, HostPrefix::new(inst, d))),
            disk_reserve,
            disk_kv,
        }
    }
}

/// Cost of cpu taking [s, t) and disk taking [t, n), with transfers inside that stretch, or None if
/// it does not fit.
fn tail_cost(inst: &Instance, tail: &Tail, s: usize, t: usize) -> Option<f64> {
    let n = inst.n();
    if t > s && inst.cpu.is_none() || t < n && inst.disk.is_none() {
        return None;
    }
    let mut cost = 0.0;
    if let Some((c, prefix)) = &tail.cpu {
        let (mem, seconds) = prefix.stretch(s, t)?;
        if mem + tail.disk_reserve[t] + tail.disk_kv[t] > inst.caps[*c] {
            return None;
        }
        cost += seconds;
    }
    if let Some((d, prefix)) = &tail.disk {
        let (mem, seconds) = prefix.stretch(t, n)?;
        if mem > inst.caps[*d] {
            return None;
        }
        cost += seconds;
        // cpu and disk execute on the same device, so no transfer between them.
    }
    Some(cost)
}

/// The DP over GPUs for one main-GPU reduction: best cost of placing units [0, i) on the GPUs.
struct GpuDp {
    gpus: Vec<usize>,
    /// cost[k][i][state]: k GPUs used, i units placed, state = last non-empty exec + 1 (0 = none).
    cost: Vec<Vec<Vec<f64>>>,
    /// back[k][i][state] = (previous i, previous state).
    back: Vec<Vec<Vec<(usize, usize)>>>,
    n_states: usize,
}

impl GpuDp {
    /// `main_used`: the main GPU's segment must not be empty.
    fn run(inst: &Instance, gpus: &[usize], reduction: u64, main_used: bool) -> GpuDp {
        let n = inst.n();
        let g = gpus.len();
        let n_states = inst.execs.len() + 1;
        let mut cost = vec![vec![vec![f64::INFINITY; n_states]; n + 1]; g + 1];
        let mut back = vec![vec![vec![(usize::MAX, usize::MAX); n_states]; n + 1]; g + 1];
        cost[0][0][0] = 0.0;
        for (k, &b) in gpus.iter().enumerate() {
            let cap = if Some(b) == inst.main {
                inst.caps[b].checked_sub(reduction)
            } else {
                Some(inst.caps[b])
            };
            let exec = inst.exec_of[b];
            for i in 0..=n {
                for st in 0..n_states {
                    let base = cost[k][i][st];
                    if !base.is_finite() {
                        continue;
                    }
                    // Empty segment (not on the main GPU when it must be used).
                    let must_use = main_used && Some(b) == inst.main;
                    if !must_use && base < cost[k + 1][i][st] {
                        cost[k + 1][i][st] = base;
                        back[k + 1][i][st] = (i, st);
                    }
                    let Some(cap) = cap else { continue };
                    let enter = if st == 0 {
                        0.0
                    } else {
                        inst.next_seconds(i - 1, st - 1, exec)
                    };
                    let (mut used, mut run) = (0u64, 0.0);
                    for j in i..n {
                        if !inst.allowed[j][b] {
                            break;
                        }
                        used += inst.unit_bytes_on(j, b);
                        if used > cap {
                            break;
                        }
                        run += inst.cost[j][b];
                        let c = base + enter + run;
                        let ns = exec + 1;
                        if c < cost[k + 1][j + 1][ns] {
                            cost[k + 1][j + 1][ns] = c;
                            back[k + 1][j + 1][ns] = (i, st);
                        }
                    }
                }
            }
        }
        GpuDp {
            gpus: gpus.to_vec(),
            cost,
            back,
            n_states,
        }
    }

    /// Best cost for [0, s) plus the transfer from its last execution device to `back_to` (the
    /// main GPU's, when a streamed suffix follows), and the end state that gives it.
    fn best_at(&self, inst: &Instance, s: usize, back_to: Option<usize>) -> Option<(f64, usize)> {
        let g = self.gpus.len();
        let way_back = |st: usize| match (st, back_to) {
            (0, _) | (_, None) => 0.0,
            (st, Some(m)) => inst.next_seconds(s - 1, st - 1, m),
        };
        (0..self.n_states)
            .filter(|&st| self.cost[g][s][st].is_finite())
            .map(|st| (self.cost[g][s][st] + way_back(st), st))
            .min_by(|a, b| a.0.total_cmp(&b.0))
    }

    /// The GPU part [0, s) that ends in state `st`.
    fn assignment(&self, s: usize, st: usize) -> Vec<usize> {
        let g = self.gpus.len();
        let mut out = vec![usize::MAX; s];
        let (mut i, mut st) = (s, st);
        for k in (1..=g).rev() {
            let (pi, pst) = self.back[k][i][st];
            for slot in out.iter_mut().take(i).skip(pi) {
                *slot = self.gpus[k - 1];
            }
            i = pi;
            st = pst;
        }
        out
    }
}
