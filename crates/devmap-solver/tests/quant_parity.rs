//! Data-driven parity with Hugging Face's quantized planning: every model × quantization config ×
//! scenario × strategy of fixtures/quant/reference (devmap-quant-reference/1, written by
//! scripts/hf_quant_reference.py with transformers 5.23 + bitsandbytes) must give exactly the map
//! transformers' planner computed, the budgets it planned against, and the quantizer's verdict
//! (its exact rejection text when it rejects the map).

mod common;

use common::map_diff;
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

fn quantized_from(model: &Model, configs: &str, quant: &str, pre_quantized: bool) -> Model {
    let path = quant_fixtures().join(configs).join(format!("{quant}.json"));
    let mut model = model.clone();
    model.quantization = Some(Quantization {
        config: QuantConfig::read(&path).unwrap(),
        pre_quantized,
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

/// Every run of the references in `reference` (configs in `configs`; `pre_quantized` as the
/// reference file records it): (reference files, runs, rejected, failures).
fn check_references(reference: &str, configs: &str) -> (usize, usize, usize, Vec<String>) {
    let dir = quant_fixtures().join(reference);
    let mut refs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    refs.sort();
    let files = refs.len();
    let (mut checked, mut rejected) = (0, 0);
    let mut failures = Vec::new();
    for path in refs {
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        let base =
            load_model(&quant_fixtures().join("models").join(format!("{stem}.json"))).unwrap();
        let pre_quantized = reference["pre_quantized"].as_bool().unwrap_or(false);
        let mut models: BTreeMap<String, Model> = BTreeMap::new();
        for run in reference["runs"].as_array().unwrap() {
            let quant = run["quant"].as_str().unwrap();
            let model = models
                .entry(quant.to_string())
                .or_insert_with(|| quantized_from(&base, configs, quant, pre_quantized));
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
    (files, checked, rejected, failures)
}

/// All runs of `reference` equal (at least `files_at_least` models, `at_least` runs); when
/// `rejects` the quantizer must reject some maps (GPTQ's never does).
fn assert_all_equal(
    reference: &str,
    configs: &str,
    files_at_least: usize,
    at_least: usize,
    rejects: bool,
) {
    let (files, checked, rejected, failures) = check_references(reference, configs);
    assert!(
        files >= files_at_least,
        "expected {files_at_least} reference files in {reference}, found {files}"
    );
    assert!(checked >= at_least, "only {checked} runs checked");
    assert_eq!(
        rejected > 0,
        rejects,
        "{rejected} reference runs of {reference} record a quantizer rejection"
    );
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn quantized_maps_and_verdicts_equal_hugging_face_references() {
    assert_all_equal("reference", "configs", 6, 6 * 5 * 36, true);
}

/// FP8 fine-grained quantize-on-load (fixtures/quant/reference-fp8, the GPU check stubbed on
/// this CPU-only machine as hf_quant_reference.py records).
#[test]
fn fp8_maps_and_verdicts_equal_hugging_face_references() {
    assert_all_equal("reference-fp8", "configs-fp8", 6, 6 * 36, true);
}

/// GPTQ pre-quantized checkpoints (fixtures/quant/reference-gptq, optimum's `convert_model` with
/// gptqmodel's `QuantLinear` on the meta device): the planner counts the packed buffers at their
/// dtypes, fused experts at full precision, and the quantizer accepts every map. 5 models: llama,
/// gemma-2, gpt2 (Conv1D), and the MoE mixtral and qwen3-moe; 4-bit group 128 and 8-bit per
/// channel.
#[test]
fn gptq_pre_quantized_maps_equal_hugging_face_references() {
    assert_all_equal("reference-gptq", "configs-gptq", 5, 5 * 2 * 36, false);
}

/// One `auto` run on a quantized fixture: `Ok(true)` for a map transformers' quantizer accepts
/// (checked with devmap's reproduction of `validate_environment`, the one the parity test above
/// holds to transformers' verdicts) whose devices hold their bytes as the runtime allocates them,
/// `Ok(false)` for a "does not fit" answer, `Err` for anything else.
fn auto_run(model: &Model, budgets: &MemoryBudgets) -> Result<bool, String> {
    use devmap_core::quant_size::runtime_bytes;
    let auto = devmap_solver::Auto::new(
        devmap_solver::AutoOptions::default().time_limit(std::time::Duration::from_secs(2)),
    );
    let plan = match auto.plan(&PlanRequest::new(model, budgets)) {
        Ok(plan) => plan,
        // Infeasible: the totals fit but no packing does (a fused-experts layer streamed at full
        // precision needs its whole buffer on the GPU).
        Err(
            Error::QuantizedDoesNotFit { .. } | Error::DoesNotFit { .. } | Error::Infeasible(_),
        ) => return Ok(false),
        Err(e) => return Err(e.to_string()),
    };
    let quantizer = devmap_solver::hf::HfQuantizer::for_model(model, Compat::Transformers)
        .unwrap()
        .unwrap();
    if let Err(e) = quantizer.validate(&plan.map) {
        return Err(format!(
            "auto's map {:?} is rejected: {e}",
            plan.map.to_json()
        ));
    }
    let bytes = runtime_bytes(model, Default::default()).unwrap().unwrap();
    let tensor_devices = devmap_core::validate::tensor_devices(model, &plan.map);
    for (d, (q, f)) in bytes.split_by_device(model, &tensor_devices) {
        let budget = budgets.get(d).unwrap_or(u64::MAX);
        if q + f > budget {
            return Err(format!(
                "{d} holds {} of weights over its budget {budget}",
                q + f
            ));
        }
        // Quantize on load: the GPU also holds one tensor's conversion transient while loading.
        let on_d = (0..tensor_devices.len()).filter(|&t| tensor_devices[t] == Some(d));
        let transient = bytes.largest_load_transient(on_d).map_or(0, |x| x.1);
        let peak = devmap_core::memory::load_peak(q + f, transient);
        if d.is_gpu() && peak > budget {
            return Err(format!(
                "{d} peaks at {peak} while quantizing on load, over its budget {budget}"
            ));
        }
    }
    Ok(true)
}

#[test]
fn auto_never_emits_a_map_the_quantizer_rejects() {
    let scenarios: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(quant_fixtures().join("scenarios.json")).unwrap(),
    )
    .unwrap();
    let scenarios = scenarios["scenarios"].as_array().unwrap();
    let mut configs: Vec<(&str, String)> = Vec::new();
    for dir in ["configs", "configs-fp8"] {
        for e in std::fs::read_dir(quant_fixtures().join(dir)).unwrap() {
            let path = e.unwrap().path();
            configs.push((dir, path.file_stem().unwrap().to_str().unwrap().to_string()));
        }
    }
    configs.sort();
    let (mut planned, mut short, mut failures) = (0, 0, Vec::new());
    for stem in [
        "llama-2-7b",
        "gpt2-xl",
        "t5-11b",
        "mixtral-8x7b",
        "qwen3-30b-a3b",
        "gemma-2-9b",
    ] {
        let base =
            load_model(&quant_fixtures().join("models").join(format!("{stem}.json"))).unwrap();
        for (dir, quant) in &configs {
            let model = quantized_from(&base, dir, quant, false);
            for s in scenarios {
                let origin = Path::new("scenarios.json");
                let budgets =
                    MemoryBudgets::from_json_str(&s["max_memory"].to_string(), origin).unwrap();
                match auto_run(&model, &budgets) {
                    Ok(true) => planned += 1,
                    Ok(false) => short += 1,
                    Err(e) => failures.push(format!("{stem} / {quant} / {}: {e}", s["name"])),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(planned > 0 && short > 0, "planned {planned}, short {short}");
    eprintln!("auto on quantized fixtures: {planned} maps the quantizer accepts, {short} does-not-fit answers");
}

/// AWQ pre-quantized checkpoints (fixtures/quant/reference-awq, transformers'
/// `replace_with_awq_linear` with gptqmodel's AWQ linear on the meta device): every `nn.Linear`
/// but the default skips (lm_head) is replaced, fused experts stay, no map rule. 4 models (gpt2
/// has no nn.Linear to replace: transformers 5.23 raises UnboundLocalError there).
#[test]
fn awq_pre_quantized_maps_equal_hugging_face_references() {
    assert_all_equal("reference-awq", "configs-awq", 4, 4 * 36, false);
}
