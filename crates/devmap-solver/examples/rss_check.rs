//! Peak memory of planning a 200,000-tensor model on 16 devices (docs/testing.md, "Limits").
//!
//! ```sh
//! cargo run --release -p devmap-solver --example rss_check -- moe auto
//! cargo run --release -p devmap-solver --example rss_check -- moe balanced
//! cargo run --release -p devmap-solver --example rss_check -- dense auto
//! ```
//!
//! Shapes (both 200k tensors, bf16, 15 GPUs + cpu = 16 devices, the GPUs holding 85% of the model):
//! - `moe`: 48 layers × 1,387 experts per layer (`synthetic::moe`): 200,068 tensors, 48 no-split
//!   decoder layers, ~213 GB (198 GiB);
//! - `dense`: 22,222 small decoder layers (`synthetic::dense`, hidden 64): 200,002 tensors and
//!   22,222 placement units, the most units a 200k-tensor model can have in a realistic layout.
//!
//! One strategy per process, so the figure printed is that strategy's peak (VmHWM of
//! /proc/self/status: the model, the plan and everything freed in between). `auto` runs with its
//! default 10 s time limit unless `--time-limit-ms N` is given. Exits non-zero when the peak
//! exceeds 2 GiB.

use std::time::{Duration, Instant};

use devmap_core::synthetic::{dense, moe};
use devmap_core::{format_bytes, DType, Device, MemoryBudgets, Model, SizeRules};
use devmap_solver::{strategy_by_name, Auto, AutoOptions, PlanRequest, Strategy};

const LIMIT: u64 = 2 << 30;

/// (VmRSS, VmHWM) in bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// 15 GPUs that hold 85% of the model together, plus a cpu that holds it all: 15% must be
/// offloaded, so `auto` cannot stop at a start that meets its lower bound without solving.
fn budgets(model: &Model) -> MemoryBudgets {
    let total = model.total_bytes(SizeRules::default());
    let per_gpu = total / 100 * 85 / 15;
    let mut pairs: Vec<(Device, u64)> = (0..15).map(|i| (Device::Gpu(i), per_gpu)).collect();
    pairs.push((Device::Cpu, total));
    MemoryBudgets::new(pairs).expect("distinct devices")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let shape = args.get(1).map_or("moe", String::as_str);
    let strategy = args.get(2).map_or("auto", String::as_str);
    let time_limit = args
        .iter()
        .position(|a| a == "--time-limit-ms")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);

    let t = Instant::now();
    let model = match shape {
        "moe" => moe(48, 1387, 2048, 256, 151_936, DType::BF16),
        "dense" => dense(22_222, 64, 128, 32_000, DType::BF16, false),
        other => {
            eprintln!("usage: rss_check moe|dense STRATEGY [--time-limit-ms N] (got {other:?})");
            std::process::exit(2);
        }
    };
    let built = t.elapsed();
    let b = budgets(&model);
    let (rss_model, _) = rss();
    println!(
        "{shape}: {} tensors, {} modules, {}; budgets {}",
        model.tensors().len(),
        model.modules().len(),
        format_bytes(model.total_bytes(SizeRules::default())),
        b.to_json()
    );
    println!(
        "built in {:.2} s, RSS after build {}",
        built.as_secs_f64(),
        format_bytes(rss_model)
    );

    let req = PlanRequest::new(&model, &b);
    let t = Instant::now();
    let result = if strategy == "auto" {
        let mut opts = AutoOptions::default();
        if let Some(limit) = time_limit {
            opts = opts.time_limit(limit);
        }
        Auto::new(opts).plan(&req)
    } else {
        match strategy_by_name(strategy, None) {
            Ok(s) => s.plan(&req),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(2);
            }
        }
    };
    let took = t.elapsed();
    match &result {
        Ok(plan) => {
            let status = plan.solve.as_ref().map_or(String::new(), |s| {
                format!(", {} units, gap {:.2e}, {}", s.units, s.gap, s.status)
            });
            println!(
                "{strategy}: {} keys in {:.2} s{status}",
                plan.map.len(),
                took.as_secs_f64()
            );
        }
        Err(e) => println!("{strategy}: error after {:.2} s: {e}", took.as_secs_f64()),
    }
    let (rss_now, peak) = rss();
    println!(
        "peak RSS (VmHWM) {} ({} bytes), RSS now {}, limit {}",
        format_bytes(peak),
        peak,
        format_bytes(rss_now),
        format_bytes(LIMIT)
    );
    drop(result);
    if peak > LIMIT {
        eprintln!("peak RSS above the 2 GiB limit");
        std::process::exit(1);
    }
}
