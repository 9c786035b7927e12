//! The readable `table` output of `devmap plan`.

use std::fmt::Write;

use devmap_core::cost::Estimate;
use devmap_core::{format_bytes, Device, MemoryBudgets, Model};
use devmap_solver::{Compat, DeviceMemory, MapCheck, Plan};
use serde_json::{json, Value};

use crate::WorkloadChoice;

const BAR: usize = 24;

/// Render a plan: per device the bytes used against the budget with a bar, its map keys, and the offload.
pub fn plan_table(
    model: &Model,
    plan: &Plan,
    budgets: &MemoryBudgets,
    compat: Option<Compat>,
    scored: &MapCheck,
    workload: &WorkloadChoice,
) -> String {
    let estimate = &scored.estimate;
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
    let _ = writeln!(s, "{}", workload_line(workload));
    if !scored.fits {
        for p in scored
            .problems()
            .iter()
            .filter(|p| p.starts_with("device "))
        {
            let _ = writeln!(s, "warning: under the memory model, {p}");
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
        if let Some(m) = scored.memory.get(&d) {
            let note = reserved_note(m);
            if !note.is_empty() {
                units = format!("({note}) {units}");
            }
        }
        let row = format!(
            "{:<6} {:>11} / {:>11}   {bar}  {units}",
            d.to_string(),
            format_bytes(used),
            budget_text
        );
        let _ = writeln!(s, "{}", row.trim_end());
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

/// The workload line of the reports.
fn workload_line(w: &WorkloadChoice) -> String {
    match &w.workload {
        Some(x) => format!("workload {x} ({})", w.origin),
        None => format!("workload none ({}): weights only", w.origin),
    }
}

/// `+4 GiB KV, +112 MiB streaming, ...`: what a device holds besides its weights.
fn reserved_note(m: &DeviceMemory) -> String {
    let parts: Vec<String> = [
        ("KV", m.kv),
        ("streaming", m.streaming),
        ("activations", m.activations),
        ("--reserve", m.reserve),
    ]
    .iter()
    .filter(|(_, b)| *b > 0)
    .map(|(what, b)| format!("+{} {what}", format_bytes(*b)))
    .chain(
        m.load_peak
            .map(|p| format!("load peak {} quantizing on load", format_bytes(p))),
    )
    .collect();
    parts.join(", ")
}

/// The `memory` object of plan-json and check json: per device, each term in bytes.
fn memory_json(scored: &MapCheck) -> Value {
    let mut obj = serde_json::Map::new();
    for (d, m) in &scored.memory {
        let mut terms = json!({
            "weights": m.weights,
            "streaming": m.streaming,
            "kv": m.kv,
            "activations": m.activations,
            "reserve": m.reserve,
            "total": m.total(),
            "budget": m.budget,
            "fits": m.fits,
        });
        // Only quantize-on-load plans have a load peak (other plans' JSON is unchanged).
        if let Some(peak) = m.load_peak {
            terms["load_peak"] = json!(peak);
            terms["fits_at_load"] = json!(m.fits_at_load);
        }
        obj.insert(d.to_string(), terms);
    }
    Value::Object(obj)
}

fn workload_json(w: &WorkloadChoice) -> Value {
    match &w.workload {
        Some(x) => json!({
            "batch": x.batch,
            "prompt": x.prompt,
            "new": x.new_tokens,
            "dtype": x.dtype.map(|d| d.safetensors_name()),
        }),
        None => Value::Null,
    }
}

/// The status of a plan: `auto`'s solve status (`optimal`, `feasible`), `heuristic` for the other
/// strategies.
fn plan_status(plan: &Plan) -> &'static str {
    plan.solve.as_ref().map_or("heuristic", |sv| sv.status())
}

/// `devmap plan --format plan-json`.
pub fn plan_json(plan: &Plan, scored: &MapCheck, workload: &WorkloadChoice) -> Value {
    json!({
        "device_map": plan.map.to_json(),
        "strategy": plan.strategy,
        "estimate_ms_per_token": scored.estimate.objective_seconds * 1e3,
        "lower_bound_ms_per_token": plan.solve.as_ref().map(|sv| sv.bound_seconds * 1e3),
        "status": plan_status(plan),
        "fits": scored.fits,
        "workload": workload_json(workload),
        "memory": memory_json(scored),
    })
}

/// `devmap check --format json`.
pub fn check_json(scored: &MapCheck, workload: &WorkloadChoice) -> Value {
    json!({
        "valid": scored.valid(),
        "fits": scored.fits,
        "estimate_ms_per_token": scored.estimate.objective_seconds * 1e3,
        "problems": scored.problems(),
        "workload": workload_json(workload),
        "memory": memory_json(scored),
    })
}

/// `devmap check`'s readable report: the workload, per device its terms against the budget, and
/// the warnings (errors go to stderr).
pub fn check_table(scored: &MapCheck, workload: &WorkloadChoice) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}", workload_line(workload));
    let _ = writeln!(
        s,
        "estimate {:.3} ms/token under devmap's cost model",
        scored.estimate.objective_seconds * 1e3
    );
    for (d, m) in &scored.memory {
        let budget = m.budget.map_or_else(|| "unbounded".into(), format_bytes);
        let note = reserved_note(m);
        let _ = writeln!(
            s,
            "{:>6}: {} of {budget}{}{}",
            d.to_string(),
            format_bytes(m.total()),
            if note.is_empty() {
                String::new()
            } else {
                format!(" (weights {}, {note})", format_bytes(m.weights))
            },
            if m.fits { "" } else { "  OVER BUDGET" }
        );
    }
    for p in scored
        .problems()
        .iter()
        .filter(|p| p.starts_with("warning: "))
    {
        let _ = writeln!(s, "{p}");
    }
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
            .map(|(d, b)| format!("{d}:{}", format_bytes(*b)))
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

/// Render `devmap compare`: one row per strategy, sizes in human units (`format_bytes`).
pub fn compare_table(model: &Model, budgets: &MemoryBudgets, rows: &[CompareRow]) -> String {
    const PER_DEVICE: &str = "memory per device";
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
    let width = rows
        .iter()
        .map(|r| r.per_device.len())
        .chain([PER_DEVICE.len()])
        .max()
        .unwrap_or_default();
    let mut line = |cells: [&str; 7]| {
        let [label, ms, off, changes, millis, per_device, note] = cells;
        let text = format!(
            "{label:<30} {ms:>10} {off:>11} {changes:>8} {millis:>9}  {per_device:<width$}  {note}"
        );
        let _ = writeln!(s, "{}", text.trim_end());
    };
    line([
        "strategy", "ms/token", "offload", "changes", "plan ms", PER_DEVICE, "note",
    ]);
    for r in rows {
        let ms = r.ms.map_or_else(|| "-".to_string(), |m| format!("{m:.3}"));
        line([
            &r.label,
            &ms,
            &format_bytes(r.offloaded),
            &r.changes.to_string(),
            &format!("{:.2}", r.millis),
            &r.per_device,
            &r.note,
        ]);
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
