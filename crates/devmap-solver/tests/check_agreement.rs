//! `devmap check` and `auto` give one verdict: on every fixture model × scenario × workload, the
//! map `auto` returns is valid and fits under `check_map`, with the same estimate; and for
//! Hugging Face's maps and perturbed `auto` maps, `check_map` fits exactly when `auto`'s instance
//! calls the placement feasible.

use std::path::PathBuf;
use std::time::Duration;

use devmap_core::{load_model, Device, DeviceMap, MemoryBudgets, Model, Workload};
use devmap_solver::{
    check::instance_for_map, check_map, strategy_by_name, Auto, AutoOptions, Compat, PlanRequest,
    Strategy,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn scenarios() -> Vec<(String, MemoryBudgets)> {
    let text = std::fs::read_to_string(fixtures().join("scenarios.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let budgets = MemoryBudgets::from_json_str(
                &s["max_memory"].to_string(),
                "scenarios.json".as_ref(),
            )
            .unwrap();
            (s["name"].as_str().unwrap().to_string(), budgets)
        })
        .collect()
}

fn model(name: &str) -> Model {
    load_model(&fixtures().join("models").join(format!("{name}.json"))).unwrap()
}

/// Dense, GQA, sliding, MLA, MoE, encoder-decoder and multimodal fixtures.
const MODELS: [&str; 7] = [
    "llama-2-7b",
    "mistral-7b",
    "gemma-2-9b",
    "deepseek-v2-lite",
    "mixtral-8x7b",
    "t5-11b",
    "llava-1.5-7b",
];

fn options(workload: Option<&str>) -> AutoOptions {
    AutoOptions::default()
        .time_limit(Duration::from_secs(2))
        .workload(workload.map(|w| Workload::parse(w).unwrap()))
}

/// Whether `check_map` and `auto`'s instance agree on `map`; `None` when the map is not a unit
/// placement of the instance (then only `check_map` can judge it).
fn agree(
    model: &Model,
    budgets: &MemoryBudgets,
    opts: &AutoOptions,
    map: &DeviceMap,
) -> Option<bool> {
    let checked = check_map(model, map, Some(budgets), opts, None).unwrap();
    let req = PlanRequest::new(model, budgets);
    let inst = instance_for_map(&Auto::new(opts.clone()), &req, map).unwrap();
    let a = inst.from_map(model, map)?;
    Some((checked.valid() && checked.fits) == inst.feasible(&a))
}

/// The map with its largest cpu unit moved to the lowest GPU (often no longer fitting).
fn perturbed(
    model: &Model,
    map: &DeviceMap,
    inst: &devmap_solver::instance::Instance,
) -> Option<DeviceMap> {
    let mut a = inst.from_map(model, map)?;
    let cpu = inst.cpu?;
    let gpu = inst.main?;
    let i = (0..a.len())
        .filter(|&i| a[i] == cpu)
        .max_by_key(|&i| inst.mem[i])?;
    a[i] = gpu;
    Some(inst.to_map(model, &a))
}

#[test]
fn check_and_auto_give_one_verdict() {
    let mut compared = 0;
    let mut rejected = 0;
    let mut failures = Vec::new();
    for name in MODELS {
        let m = model(name);
        for (scenario, budgets) in scenarios() {
            for workload in [
                None,
                Some("batch=1,prompt=2048,new=256"),
                Some("batch=8,prompt=8192,new=512"),
            ] {
                let label = format!("{name} / {scenario} / {workload:?}");
                let opts = options(workload);
                let req = PlanRequest::new(&m, &budgets);
                let Ok(plan) = Auto::new(opts.clone()).plan(&req) else {
                    continue;
                };
                let checked = check_map(&m, &plan.map, Some(&budgets), &opts, None).unwrap();
                if !(checked.valid() && checked.fits) {
                    failures.push(format!(
                        "{label}: check rejects auto's map: {:?}",
                        checked.problems()
                    ));
                }
                let objective = plan.solve.as_ref().unwrap().objective_seconds;
                let est = checked.estimate.objective_seconds;
                if (est - objective).abs() > 1e-9 * objective.max(1e-12) {
                    failures.push(format!("{label}: check estimates {est}, auto {objective}"));
                }
                let inst = instance_for_map(&Auto::new(opts.clone()), &req, &plan.map).unwrap();
                let mut maps: Vec<DeviceMap> =
                    perturbed(&m, &plan.map, &inst).into_iter().collect();
                for s in ["sequential", "balanced"] {
                    let hf = strategy_by_name(s, Some(Compat::Transformers)).unwrap();
                    if let Ok(p) = hf.plan(&req) {
                        maps.push(p.map);
                    }
                }
                for map in &maps {
                    match agree(&m, &budgets, &opts, map) {
                        Some(true) => compared += 1,
                        Some(false) => {
                            failures.push(format!("{label}: verdicts differ on {map:?}"))
                        }
                        None => {}
                    }
                    let c = check_map(&m, map, Some(&budgets), &opts, None).unwrap();
                    rejected += usize::from(!c.fits);
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The comparison must have exercised both verdicts.
    assert!(compared >= 50, "only {compared} maps compared");
    assert!(
        rejected >= 10,
        "only {rejected} maps rejected: the perturbations tested nothing"
    );
}

#[test]
fn a_workload_that_does_not_fit_is_rejected_by_both() {
    // Llama-2-7B's weights-only plan on one 14 GiB GPU fills it; 8 sequences of 8192 tokens need
    // 8 × 8448 × 2 × 32 × 128 × 2 bytes × 32 layers = 33 GiB of KV cache on top.
    let m = model("llama-2-7b");
    let budgets = MemoryBudgets::parse("0=14GiB,cpu=64GiB").unwrap();
    let req = PlanRequest::new(&m, &budgets);
    let weights_only = Auto::new(options(None)).plan(&req).unwrap();
    let heavy = options(Some("batch=8,prompt=8192,new=256"));
    let checked = check_map(&m, &weights_only.map, Some(&budgets), &heavy, None).unwrap();
    assert!(checked.valid() && !checked.fits);
    let gpu = checked.memory[&Device::Gpu(0)];
    assert_eq!(gpu.kv, 8 * 8448 * 2 * 32 * 128 * 2 * 32);
    let problems = checked.problems().join("\n");
    assert!(
        problems.contains("device 0") && problems.contains("KV"),
        "{problems}"
    );
    assert_eq!(agree(&m, &budgets, &heavy, &weights_only.map), Some(true));
}
