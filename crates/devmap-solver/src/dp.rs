//! An exact dynamic program for the contiguous form of the problem: devices in their order (GPUs by
//! index, then cpu, then disk) each take one contiguous run of units, possibly empty. It is the
//! pipeline-partitioning DP; `auto` uses it as a warm start and as a cross-check of the MIP's
//! contiguous mode (they must agree exactly).
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
    let main = inst.main;
    // Suffix statistics.
    let mut suffix_read_max = vec![0u64; n + 1];
    let mut suffix_kv = vec![0u64; n + 1];
    for i in (0..n).rev() {
        suffix_read_max[i] = suffix_read_max[i + 1].max(inst.read[i]);
        suffix_kv[i] = suffix_kv[i + 1] + inst.streamed_bytes_on_main(i);
    }
    let mut gpu_runs: HashMap<u64, GpuDp> = HashMap::new();
    let mut best: Option<(f64, usize, usize, u64)> = None; // (cost, s, t, reduction)
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
        let run = gpu_runs
            .entry(reduction)
            .or_insert_with(|| GpuDp::run(inst, &gpus, reduction));
        let Some((gpu_cost, last_exec)) = run.best_at(s) else {
            continue;
        };
        for t in s..=n {
            let Some(tail) = tail_cost(inst, s, t) else {
                continue;
            };
            let mut cost = gpu_cost + tail;
            if streamed {
                if let (Some(last), Some(m)) = (last_exec, main) {
                    cost += inst.trans[last][inst.exec_of[m]];
                }
            }
            if best.is_none_or(|b| cost < b.0) {
                best = Some((cost, s, t, reduction));
            }
        }
    }
    let (_, s, t, reduction) = best?;
    let mut a = gpu_runs[&reduction].assignment(s);
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

/// Cost of cpu taking [s, t) and disk taking [t, n), with transfers inside that stretch, or None if
/// it does not fit.
fn tail_cost(inst: &Instance, s: usize, t: usize) -> Option<f64> {
    let n = inst.n();
    if t > s && inst.cpu.is_none() || t < n && inst.disk.is_none() {
        return None;
    }
    let disk_reserve = (t..n).map(|i| inst.read[i]).max().unwrap_or(0);
    let mut cost = 0.0;
    if let Some(c) = inst.cpu {
        let mem: u64 = (s..t).map(|i| inst.unit_bytes_on(i, c)).sum();
        if mem + disk_reserve > inst.caps[c] || (s..t).any(|i| !inst.allowed[i][c]) {
            return None;
        }
        cost += (s..t).map(|i| inst.cost[i][c]).sum::<f64>();
    }
    if let Some(d) = inst.disk {
        let mem: u64 = (t..n).map(|i| inst.unit_bytes_on(i, d)).sum();
        if mem > inst.caps[d] || (t..n).any(|i| !inst.allowed[i][d]) {
            return None;
        }
        cost += (t..n).map(|i| inst.cost[i][d]).sum::<f64>();
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
    fn run(inst: &Instance, gpus: &[usize], reduction: u64) -> GpuDp {
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
                    // Empty segment.
                    if base < cost[k + 1][i][st] {
                        cost[k + 1][i][st] = base;
                        back[k + 1][i][st] = (i, st);
                    }
                    let Some(cap) = cap else { continue };
                    let enter = if st == 0 {
                        0.0
                    } else {
                        inst.trans[st - 1][exec]
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

    /// Best cost for [0, s) and the exec index of the last non-empty segment.
    fn best_at(&self, s: usize) -> Option<(f64, Option<usize>)> {
        let g = self.gpus.len();
        (0..self.n_states)
            .filter(|&st| self.cost[g][s][st].is_finite())
            .map(|st| {
                (
                    self.cost[g][s][st],
                    if st == 0 { None } else { Some(st - 1) },
                )
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
    }

    fn assignment(&self, s: usize) -> Vec<usize> {
        let g = self.gpus.len();
        let st = (0..self.n_states)
            .min_by(|&a, &b| self.cost[g][s][a].total_cmp(&self.cost[g][s][b]))
            .expect("states exist");
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
