//! Data-driven parity with Hugging Face: every fixture model × scenario × strategy × compat path
//! must give exactly the map (and the balanced budgets) transformers 5.23 / accelerate 1.15 computed.
//! The references are under fixtures/reference (format devmap-reference/1, see docs/formats.md).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use devmap_core::{load_model, DeviceMap, MemoryBudgets};
use devmap_solver::{Compat, HfGreedy, HfKind, PlanRequest, Strategy};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn kind(name: &str) -> HfKind {
    match name {
        "sequential" => HfKind::Sequential,
        "balanced" | "auto" => HfKind::Balanced,
        "balanced_low_0" => HfKind::BalancedLow0,
        other => panic!("unknown strategy {other}"),
    }
}

#[test]
fn maps_equal_hugging_face_references() {
    let mut checked = 0;
    let mut failures = Vec::new();
    // fixtures/reference: computed by the project's first set-up; fixtures/reference-extra: by
    // scripts/hf_reference.py for architectures outside it (same format).
    let mut refs: Vec<PathBuf> = ["reference", "reference-extra"]
        .iter()
        .flat_map(|d| std::fs::read_dir(fixtures().join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    refs.sort();
    assert!(
        refs.len() >= 21,
        "expected the 7 + 14 reference files, found {}",
        refs.len()
    );
    for path in refs {
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        let model = load_model(&fixtures().join("models").join(format!("{stem}.json"))).unwrap();
        for run in reference["runs"].as_array().unwrap() {
            let label = format!(
                "{stem} / {} / {} / {}",
                run["scenario"].as_str().unwrap(),
                run["strategy"].as_str().unwrap(),
                run["path"].as_str().unwrap()
            );
            let budgets =
                MemoryBudgets::from_json_str(&run["max_memory"].to_string(), path.as_ref())
                    .unwrap();
            let compat = match run["path"].as_str().unwrap() {
                "transformers" => Compat::Transformers,
                _ => Compat::Accelerate,
            };
            let strategy = HfGreedy {
                kind: kind(run["strategy"].as_str().unwrap()),
                compat,
                spill_to_disk: true,
            };
            let result = strategy.plan(&PlanRequest::new(&model, &budgets));
            checked += 1;
            if run["device_map"].is_null() {
                if result.is_ok() {
                    failures.push(format!(
                        "{label}: Hugging Face raised {:?}, devmap planned",
                        run["error"]
                    ));
                }
                continue;
            }
            let plan = match result {
                Ok(p) => p,
                Err(e) => {
                    failures.push(format!("{label}: devmap failed: {e}"));
                    continue;
                }
            };
            let expected = DeviceMap::from_json_str(&run["device_map"].to_string()).unwrap();
            if let Some(diff) = common::map_diff(&plan.map, &expected) {
                failures.push(format!("{label}: map differs: {diff}"));
            }
            let inferred: BTreeMap<String, u64> = run["inferred_max_memory"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_f64().unwrap() as u64))
                .collect();
            let ours: BTreeMap<String, u64> = plan
                .budgets_used
                .iter()
                .map(|b| (b.device.to_string(), b.bytes))
                .collect();
            if inferred != ours {
                failures.push(format!(
                    "{label}: budgets differ: want {inferred:?} got {ours:?}"
                ));
            }
        }
    }
    assert!(checked >= 21 * 64, "only {checked} runs checked");
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
