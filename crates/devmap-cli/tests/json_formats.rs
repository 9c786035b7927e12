//! The machine-readable outputs: `plan --format plan-json`, `check --format json`, and that
//! `--format json` stays the bare dict `from_pretrained` takes.

use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;

mod common;
use common::devmap;

fn llama() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models/llama-2-7b.json")
        .to_str()
        .unwrap()
        .to_string()
}

const BUDGETS: &str = "0=10GiB,cpu=64GiB";

fn json_of(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim_end().lines().count(), 1, "one line: {stdout}");
    serde_json::from_str(&stdout).expect("stdout is one JSON value")
}

fn plan(extra: &[&str]) -> Output {
    let m = llama();
    let mut args = vec!["plan", m.as_str(), "--max-memory", BUDGETS];
    args.extend_from_slice(extra);
    devmap(&args)
}

#[test]
fn plan_json_has_map_estimate_bound_status_and_memory() {
    let out = plan(&["--format", "plan-json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_of(&out);
    assert!(v["device_map"].is_object());
    let est = v["estimate_ms_per_token"].as_f64().unwrap();
    let bound = v["lower_bound_ms_per_token"].as_f64().unwrap();
    assert!(
        est > 0.0 && bound > 0.0 && bound <= est * (1.0 + 1e-9),
        "{est} {bound}"
    );
    assert!(["optimal", "feasible"].contains(&v["status"].as_str().unwrap()));
    assert_eq!(v["fits"], Value::Bool(true));
    // The default workload, printed.
    assert_eq!(v["workload"]["batch"], 1);
    assert_eq!(v["workload"]["prompt"], 2048);
    assert_eq!(v["workload"]["new"], 256);
    let gpu = &v["memory"]["0"];
    for key in ["weights", "streaming", "kv", "activations", "budget"] {
        assert!(gpu[key].is_u64(), "memory.0.{key}: {gpu}");
    }
    assert_eq!(gpu["budget"], 10u64 << 30);
    // Llama-2-7B at batch 1, 2048 + 256 tokens: 2 × 2304 × 32 × 128 × 2 bytes per layer, all 32
    // layers' caches on the main GPU wherever their weights are.
    assert_eq!(gpu["kv"], 2 * 2304 * 32 * 128 * 2 * 32u64);
    let total: u64 = ["weights", "streaming", "kv", "activations"]
        .iter()
        .map(|k| gpu[k].as_u64().unwrap())
        .sum();
    assert!(total <= 10 << 30);
    // The bare map is unchanged and equals plan-json's.
    let bare = json_of(&plan(&["--format", "json"]));
    assert_eq!(bare, v["device_map"]);
}

#[test]
fn dtype_applies_to_kv_and_activations() {
    // Llama-2-7B is f16; at --dtype f32 its cache is 4 bytes an element: 2 × 2304 × 32 × 128 × 4
    // bytes per layer, 32 layers.
    let v = json_of(&plan(&["--dtype", "f32", "--format", "plan-json"]));
    assert_eq!(v["memory"]["0"]["kv"], 2 * 2304 * 32 * 128 * 4 * 32u64);
    // A dtype in the workload wins over --dtype.
    let v = json_of(&plan(&[
        "--dtype",
        "f32",
        "--workload",
        "batch=1,prompt=2048,new=256,dtype=f16",
        "--format",
        "plan-json",
    ]));
    assert_eq!(v["memory"]["0"]["kv"], 2 * 2304 * 32 * 128 * 2 * 32u64);
}

#[test]
fn heuristic_strategies_report_no_bound() {
    let v = json_of(&plan(&[
        "--strategy",
        "sequential",
        "--format",
        "plan-json",
    ]));
    assert_eq!(v["status"], "heuristic");
    assert!(v["lower_bound_ms_per_token"].is_null());
    assert!(v["estimate_ms_per_token"].as_f64().unwrap() > 0.0);
}

#[test]
fn check_json_scores_any_map() {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("map.json");
    let out = plan(&["--format", "json"]);
    std::fs::write(&map, &out.stdout).unwrap();
    let m = llama();
    let check = |extra: &[&str]| {
        let mut args = vec![
            "check",
            m.as_str(),
            "--map",
            map.to_str().unwrap(),
            "--max-memory",
            BUDGETS,
            "--format",
            "json",
        ];
        args.extend_from_slice(extra);
        devmap(&args)
    };
    let ok = check(&[]);
    assert!(ok.status.success());
    let v = json_of(&ok);
    assert_eq!(v["valid"], true);
    assert_eq!(v["fits"], true);
    assert!(v["estimate_ms_per_token"].as_f64().unwrap() > 0.0);
    assert_eq!(v["problems"], serde_json::json!([]));
    // The same map with 8 × 8192 tokens does not fit: a problem names the device and the KV cache.
    let heavy = check(&["--workload", "batch=8,prompt=8192,new=0"]);
    assert!(!heavy.status.success());
    let v = json_of(&heavy);
    assert_eq!(v["valid"], true);
    assert_eq!(v["fits"], false);
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    let p = problems[0].as_str().unwrap();
    assert!(p.contains("device 0") && p.contains("KV"), "{p}");
    // `--kv-cache` is the alias of a workload without generation: the same verdict.
    let alias = json_of(&check(&["--kv-cache", "batch=8,seq=8192"]));
    assert_eq!(alias["memory"], v["memory"]);
    // A map naming a module that does not exist is invalid, in JSON too.
    std::fs::write(&map, r#"{"": 0, "nonsense": "cpu"}"#).unwrap();
    let v = json_of(&check(&[]));
    assert_eq!(v["valid"], false);
    assert!(v["problems"][0].as_str().unwrap().contains("\"nonsense\""));
}

#[test]
fn workload_flags_are_checked() {
    let out = plan(&["--workload", "batch=1,prompt=x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"x\""));
    let out = plan(&["--workload", "prompt=10", "--kv-cache", "seq=10"]);
    assert!(!out.status.success(), "the two flags conflict");
}

#[test]
fn runtime_pinned_streams_offloaded_layers_over_the_pinned_link() {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("map.json");
    let mut entries = serde_json::Map::new();
    entries.insert("model.embed_tokens".into(), 0.into());
    for l in 0..32 {
        let device: Value = if l >= 30 { "cpu".into() } else { 0.into() };
        entries.insert(format!("model.layers.{l}"), device);
    }
    for name in ["model.norm", "model.rotary_emb", "lm_head"] {
        entries.insert(name.into(), 0.into());
    }
    std::fs::write(&map, Value::Object(entries).to_string()).unwrap();
    let m = llama();
    let estimate = |runtime: &[&str]| {
        let mut args = vec![
            "check",
            m.as_str(),
            "--map",
            map.to_str().unwrap(),
            "--max-memory",
            "0=20GiB,cpu=64GiB",
            "--workload",
            "none",
            "--format",
            "json",
        ];
        args.extend_from_slice(runtime);
        let out = devmap(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        json_of(&out)["estimate_ms_per_token"].as_f64().unwrap()
    };
    // Two fp16 Llama-2-7B layers on cpu: q, k, v, o (4096 x 4096), gate, up, down (4096 x 11008)
    // and two 4096-wide norms, 9 tensors each. The default links (docs/cost-model.md): pageable
    // 7.5 GB/s + 7 µs per copy, pinned 25 GB/s + 10 µs.
    let layer_bytes = 2.0 * (4.0 * 4096.0 * 4096.0 + 3.0 * 4096.0 * 11008.0 + 2.0 * 4096.0);
    let copies = 18.0;
    let saved_ms = 1e3 * (2.0 * layer_bytes * (1.0 / 7.5e9 - 1.0 / 25e9) + copies * (7e-6 - 10e-6));
    let (accelerate, pinned) = (
        estimate(&["--runtime", "accelerate"]),
        estimate(&["--runtime", "pinned"]),
    );
    assert!(
        ((accelerate - pinned) - saved_ms).abs() < 1e-6,
        "accelerate {accelerate} ms, pinned {pinned} ms, expected a {saved_ms} ms difference"
    );
    // Without the flag the topology's runtime (accelerate's pageable copies by default) applies.
    assert_eq!(estimate(&[]), accelerate);
}

/// `--split-blocks true`: the plan names a layer's modules when it splits the layer between the
/// main GPU and cpu (faster than the whole-block plan), and `devmap check` accepts and scores that
/// map at the plan's estimate.
#[test]
fn split_block_maps_plan_and_check() {
    let plan_with =
        |split: &str| json_of(&plan(&["--split-blocks", split, "--format", "plan-json"]));
    let (whole, split) = (plan_with("false"), plan_with("true"));
    let est = |v: &Value| v["estimate_ms_per_token"].as_f64().unwrap();
    assert!(
        est(&split) < est(&whole),
        "{} !< {}",
        est(&split),
        est(&whole)
    );
    let map = split["device_map"].as_object().unwrap();
    let module_keys: Vec<&String> = (map.keys())
        .filter(|k| k.split('.').count() > 3 && k.starts_with("model.layers."))
        .collect();
    assert!(!module_keys.is_empty(), "no layer is split: {map:?}");
    assert!(whole["device_map"]
        .as_object()
        .unwrap()
        .keys()
        .all(|k| k.split('.').count() <= 3));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("map.json");
    std::fs::write(&path, split["device_map"].to_string()).unwrap();
    let m = llama();
    let checked = devmap(&[
        "check",
        m.as_str(),
        "--map",
        path.to_str().unwrap(),
        "--max-memory",
        BUDGETS,
        "--format",
        "json",
    ]);
    let v = json_of(&checked);
    assert_eq!(
        (v["valid"].clone(), v["fits"].clone()),
        (Value::Bool(true), Value::Bool(true)),
        "{v}"
    );
    let scored = v["estimate_ms_per_token"].as_f64().unwrap();
    assert!(
        (scored - est(&split)).abs() <= 1e-9 * scored,
        "{scored} vs {}",
        est(&split)
    );
}
