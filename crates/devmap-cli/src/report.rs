//! The readable `table` output of `devmap plan`.

use std::fmt::Write;

use devmap_core::cost::Estimate;
use devmap_core::{format_bytes, Device, MemoryBudgets, Model};
use devmap_solver::{Compat, Plan};

const BAR: usize = 24;

/// Render a plan: per device the bytes used against the budget with a bar, its map keys, and the offload.
pub fn plan_table(
    model: &Model,
    plan: &Plan,
    budgets: &MemoryBudgets,
    compat: Option<Compat>,
    estimate: &Estimate,
) -> String {
    let mut s = String::new();
    let total: u64 = model.tensor_sizes(plan.size_rules).iter().sum();
    let _ = writeln!(
        s,
        "model    {} ({} tensors, {})",
        model.name,
        model.tensors().len(),
        format_bytes(total)
    );
    let rules = match compat {
        Some(Compat::Transformers) => " (exactly as transformers 5.23)",
        Some(Compat::Accelerate) => " (exactly as accelerate 1.15)",
        None => "",
    };
    let _ = writeln!(
        s,
        "strategy {}{rules}, planned in {:.2} ms",
        plan.strategy,
        plan.elapsed.as_secs_f64() * 1e3
    );
    match &plan.solve {
        Some(solve) => {
            let _ = writeln!(
                s,
                "estimate {:.3} ms/token (objective), lower bound {:.3} ms, gap {:.4}%, {} units, {} ({})",
                solve.objective_seconds * 1e3,
                solve.bound_seconds * 1e3,
                solve.gap * 100.0,
                solve.units,
                solve.status(),
                solve.detail
            );
        }
        None => {
            let _ = writeln!(
                s,
                "estimate {:.3} ms/token under devmap's cost model ({} device changes, {} streamed per token)",
                estimate.objective_seconds * 1e3,
                estimate.device_changes,
                format_bytes(estimate.streamed_bytes)
            );
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<6} {:>11}   {:>11}   {:<w$}  units",
        "device",
        "used",
        "budget",
        "",
        w = BAR + 2
    );
    let mut devices: Vec<Device> = budgets.devices();
    for d in plan.usage.keys() {
        if !devices.contains(d) {
            devices.push(*d);
        }
    }
    devices.sort();
    for d in devices {
        let used = plan.bytes_on(d);
        let budget = budgets.get(d);
        let planned_cap = plan.budgets_used.get(d).filter(|c| Some(*c) != budget);
        let bar = match budget {
            Some(b) if b > 0 => {
                let filled = ((used as f64 / b as f64) * BAR as f64)
                    .round()
                    .min(BAR as f64) as usize;
                format!("[{}{}]", "#".repeat(filled), ".".repeat(BAR - filled))
            }
            _ => format!("[{}]", " ".repeat(BAR)),
        };
        let budget_text = budget.map_or_else(|| "unbounded".to_string(), format_bytes);
        let keys: Vec<&str> = plan
            .map
            .entries()
            .iter()
            .filter(|(_, dev)| *dev == d)
            .map(|(k, _)| {
                if k.is_empty() {
                    "<whole model>"
                } else {
                    k.as_str()
                }
            })
            .collect();
        let mut units = compress_ranges(&keys);
        if let Some(cap) = planned_cap {
            units = format!("(balanced cap {}) {units}", format_bytes(cap));
        }
        let reserved = plan
            .solve
            .as_ref()
            .and_then(|sv| sv.overhead.get(&d))
            .copied()
            .unwrap_or(0);
        if reserved > 0 {
            units = format!(
                "(+{} reserved: KV cache, streaming, --reserve) {units}",
                format_bytes(reserved)
            );
        }
        let _ = writeln!(
            s,
            "{:<6} {:>11} / {:>11}   {bar}  {units}",
            d.to_string(),
            format_bytes(used),
            budget_text
        );
    }
    let cpu = plan.bytes_on(Device::Cpu);
    let disk = plan.bytes_on(Device::Disk);
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "offloaded {} to cpu, {} to disk",
        format_bytes(cpu),
        format_bytes(disk)
    );
    s
}

/// One line of `devmap compare`.
pub struct CompareRow {
    label: String,
    ms: Option<f64>,
    per_device: String,
    offloaded: u64,
    changes: u32,
    millis: f64,
    note: String,
}

impl CompareRow {
    /// A row for a plan.
    pub fn from_plan(
        label: String,
        plan: &Plan,
        budgets: &MemoryBudgets,
        est: &Estimate,
    ) -> CompareRow {
        let per_device: Vec<String> = plan
            .usage
            .iter()
            .filter(|(d, b)| **b > 0 || budgets.contains(**d))
            .map(|(d, b)| format!("{d}:{:.1}", *b as f64 / (1u64 << 30) as f64))
            .collect();
        let offloaded = plan.bytes_on(Device::Cpu) + plan.bytes_on(Device::Disk);
        let mut note = String::new();
        if plan.bytes_on(Device::Disk) > 0 && !budgets.contains(Device::Disk) {
            note = "spills to disk (no disk budget)".into();
        }
        if let Some(sv) = &plan.solve {
            note = format!("gap {:.3}%", sv.gap * 100.0);
        }
        CompareRow {
            label,
            ms: Some(est.objective_seconds * 1e3),
            per_device: per_device.join(" "),
            offloaded,
            changes: est.device_changes,
            millis: plan.elapsed.as_secs_f64() * 1e3,
            note,
        }
    }

    /// A row for a strategy that failed.
    pub fn failed(label: String, error: &str) -> CompareRow {
        CompareRow {
            label,
            ms: None,
            per_device: String::new(),
            offloaded: 0,
            changes: 0,
            millis: 0.0,
            note: format!("failed: {error}"),
        }
    }
}

/// Render `devmap compare`.
pub fn compare_table(model: &Model, budgets: &MemoryBudgets, rows: &[CompareRow]) -> String {
    let mut s = String::new();
    let budget_text: Vec<String> = budgets
        .iter()
        .map(|b| format!("{}={}", b.device, format_bytes(b.bytes)))
        .collect();
    let _ = writeln!(
        s,
        "model   {}\nbudgets {}\n",
        model.name,
        budget_text.join(", ")
    );
    let _ = writeln!(
        s,
        "{:<30} {:>10} {:>10} {:>8} {:>9}  {:<40} note",
        "strategy", "ms/token", "offload", "changes", "plan ms", "GiB per device"
    );
    for r in rows {
        let ms = r.ms.map_or_else(|| "-".to_string(), |m| format!("{m:.3}"));
        let off = format!("{:.2} GiB", r.offloaded as f64 / (1u64 << 30) as f64);
        let _ = writeln!(
            s,
            "{:<30} {:>10} {:>10} {:>8} {:>9.2}  {:<40} {}",
            r.label, ms, off, r.changes, r.millis, r.per_device, r.note
        );
    }
    s
}

/// Join keys, collapsing runs of numbered siblings: `model.layers.0-15`.
pub fn compress_ranges(keys: &[&str]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(String, u64, u64)> = None;
    let flush = |run: &mut Option<(String, u64, u64)>, out: &mut Vec<String>| {
        if let Some((prefix, a, b)) = run.take() {
            out.push(if a == b {
                format!("{prefix}{a}")
            } else {
                format!("{prefix}{a}-{b}")
            });
        }
    };
    for key in keys {
        let split = key
            .rsplit_once('.')
            .and_then(|(p, last)| last.parse::<u64>().ok().map(|n| (format!("{p}."), n)));
        match (split, run.as_mut()) {
            (Some((prefix, n)), Some((rp, _, b))) if *rp == prefix && *b + 1 == n => *b = n,
            (Some((prefix, n)), _) => {
                flush(&mut run, &mut out);
                run = Some((prefix, n, n));
            }
            (None, _) => {
                flush(&mut run, &mut out);
                out.push((*key).to_string());
            }
        }
    }
    flush(&mut run, &mut out);
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(
            compress_ranges(&[
                "model.embed",
                "model.layers.0",
                "model.layers.1",
                "model.layers.2",
                "model.layers.4",
                "lm_head"
            ]),
            "model.embed, model.layers.0-2, model.layers.4, lm_head"
        );
    }
}
