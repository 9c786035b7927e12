//! Data-driven parity with Hugging Face's quantized planning: every model × quantization config ×
//! scenario × strategy of fixtures/quant/reference (devmap-quant-reference/1, written by
//! scripts/hf_quant_reference.py with transformers 5.23 + bitsandbytes) must give exactly the map
//! transformers' planner computed, the budgets it planned against, and the quantizer's verdict
//! (its exact rejection text when it rejects the map).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use devmap_core::{load_model, DeviceMap, MemoryBudgets, Model, QuantConfig, Quantization};
use devmap_solver::{Compat, Error, HfGreedy, HfKind, Plan, PlanRequest, Strategy};

fn quant_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/quant")
}

fn kind(name: &str) -> HfKind {
    match name {
        "sequential" => HfKind::Sequential,
        "balanced" | "auto" => HfKind::Balanced,
        "balanced_low_0" => HfKind::BalancedLow0,
        other => panic!("unknown strategy {other}"),
    }
}

fn quantized(model: &Model, quant: &str) -> Model {
    let path = quant_fixtures()
        .join("configs")
        .join(format!("{quant}.json"));
    let mut model = model.clone();
    model.quantization = Some(Quantization {
        config: QuantConfig::read(&path).unwrap(),
        pre_quantized: false,
    });
    model
}

/// The map devmap computed and the quantizer's error text, as the reference records them.
fn outcome(
    result: Result<Plan, Error>,
) -> Result<(DeviceMap, Option<String>, Option<MemoryBudgets>), String> {
    match result {
        Ok(plan) => Ok((plan.map, None, Some(plan.budgets_used))),
        Err(Error::QuantizerRejects { message, map, .. }) => {
            Ok((*map, Some(format!("ValueError: {message}")), None))
        }
        Err(e) => Err(e.to_string()),
    }
}

fn map_diff(got: &DeviceMap, want: &DeviceMap) -> Option<String> {
    let (got, want) = (got.as_sorted(), want.as_sorted());
    if got == want {
        return None;
    }
    let diff: Vec<String> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: want {v} got {:?}", got.get(k)))
        .chain(
            got.iter()
                .filter(|(k, _)| !want.contains_key(*k))
                .map(|(k, v)| format!("{k}: extra {v}")),
        )
        .take(6)
        .collect();
    Some(diff.join("; "))
}

fn check_run(model: &Model, run: &serde_json::Value, origin: &Path) -> Option<String> {
    let budgets = MemoryBudgets::from_json_str(&run["max_memory"].to_string(), origin).unwrap();
    let strategy = HfGreedy {
        kind: kind(run["strategy"].as_str().unwrap()),
        compat: Compat::Transformers,
        spill_to_disk: true,
    };
    let result = strategy.plan(&PlanRequest::new(model, &budgets));
    if run["device_map"].is_null() {
        // Hugging Face's planner itself raised (no map to compare).
        return match result {
            Err(Error::HfRaises(_)) => None,
            other => Some(format!(
                "Hugging Face raised {}, devmap gave {other:?}",
                run["error"]
            )),
        };
    }
    let (map, error, budgets_used) = match outcome(result) {
        Ok(o) => o,
        Err(e) => return Some(format!("devmap failed: {e}")),
    };
    let want_error = run["error"].as_str().map(str::to_string);
    if error != want_error {
        return Some(format!(
            "verdict differs: want {want_error:?} got {error:?}"
        ));
    }
    let want = DeviceMap::from_json_str(&run["device_map"].to_string()).unwrap();
    if let Some(d) = map_diff(&map, &want) {
        return Some(format!("map differs: {d}"));
    }
    let used = budgets_used?;
    // Python holds the ×0.9 budgets as floats; devmap reports them rounded down.
    let inferred: BTreeMap<String, u64> = run["inferred_max_memory"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap().floor() as u64))
        .collect();
    let ours: BTreeMap<String, u64> = used
        .iter()
        .map(|b| (b.device.to_string(), b.bytes))
        .collect();
    (inferred != ours).then(|| format!("budgets differ: want {inferred:?} got {ours:?}"))
}

#[test]
fn quantized_maps_and_verdicts_equal_hugging_face_references() {
    let dir = quant_fixtures().join("reference");
    let mut refs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    refs.sort();
    assert!(
        refs.len() >= 6,
        "expected 6 reference files, found {}",
        refs.len()
    );
    let (mut checked, mut rejected) = (0, 0);
    let mut failures = Vec::new();
    for path in refs {
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        let base =
            load_model(&quant_fixtures().join("models").join(format!("{stem}.json"))).unwrap();
        let mut models: BTreeMap<String, Model> = BTreeMap::new();
        for run in reference["runs"].as_array().unwrap() {
            let quant = run["quant"].as_str().unwrap();
            let model = models
                .entry(quant.to_string())
                .or_insert_with(|| quantized(&base, quant));
            checked += 1;
            rejected += usize::from(!run["error"].is_null());
            if let Some(problem) = check_run(model, run, &path) {
                failures.push(format!(
                    "{stem} / {quant} / {} / {}: {problem}",
                    run["scenario"].as_str().unwrap(),
                    run["strategy"].as_str().unwrap()
                ));
            }
        }
    }
    assert!(checked >= 6 * 5 * 36, "only {checked} runs checked");
    assert!(
        rejected > 0,
        "no reference run exercises the quantizer's rejection"
    );
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
