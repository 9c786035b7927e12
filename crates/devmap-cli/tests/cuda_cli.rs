//! `devmap devices`, `devmap load`, and `devmap plan` without `--max-memory`, on whatever machine
//! runs the tests: without a driver they must fail with a clear line (never a panic); with a GPU
//! they must work.

use std::path::PathBuf;
use std::process::{Command, Output};

fn devmap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_devmap"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("devmap runs")
}

fn example() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/tiny-llama");
    p.to_string_lossy().into_owned()
}

fn has_gpu() -> bool {
    matches!(devmap_cuda::device_count(), Ok(n) if n > 0)
}

fn no_panic(out: &Output) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
}

#[test]
fn devices_lists_gpus_or_says_there_is_no_driver() {
    let out = devmap(&["devices"]);
    no_panic(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if has_gpu() {
        assert!(out.status.success(), "{stderr}");
        assert!(
            stdout.contains("UUID") && stdout.contains("default budgets"),
            "{stdout}"
        );
    } else {
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("no CUDA driver found") || stderr.contains("no CUDA device"),
            "{stderr}"
        );
        let json = devmap(&["devices", "--json"]);
        assert_eq!(json.status.code(), Some(2));
        let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(v["gpus"], serde_json::json!([]));
        assert!(v["error"].as_str().unwrap().starts_with("no CUDA"));
    }
}

#[test]
fn plan_without_max_memory_discovers_or_asks_for_budgets() {
    let out = devmap(&["plan", &example(), "--format", "json"]);
    no_panic(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if has_gpu() {
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("discovered budgets"), "{stderr}");
    } else {
        assert!(!out.status.success());
        assert!(
            stderr.contains("--max-memory is required here") && stderr.contains("no CUDA"),
            "{stderr}"
        );
    }
    // Offline planning with explicit budgets never touches the driver (weights only: 200 KiB GPUs
    // have no room for the default workload's activations).
    let out = devmap(&[
        "plan",
        &example(),
        "--max-memory",
        "0=200KiB,1=200KiB,cpu=1GiB",
        "--workload",
        "none",
        "--format",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn load_names_a_plan_key_the_checkpoint_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.json");
    std::fs::write(&plan, r#"{"model": 0, "lm_head": 0, "vision_tower": 0}"#).unwrap();
    let out = devmap(&["load", &example(), "--plan", plan.to_str().unwrap()]);
    no_panic(&out);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("\"vision_tower\""), "{stderr}");
}

#[test]
fn load_fails_clearly_without_a_gpu_and_loads_with_one() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.json");
    std::fs::write(&plan, r#"{"": 0}"#).unwrap();
    let out = devmap(&[
        "load",
        &example(),
        "--plan",
        plan.to_str().unwrap(),
        "--verify",
    ]);
    no_panic(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if has_gpu() {
        assert!(out.status.success(), "{stderr}");
        assert!(
            stdout.contains("GPU 0") && stdout.contains("verify: ok"),
            "{stdout}"
        );
    } else {
        assert!(!out.status.success());
        assert!(
            stderr.contains("no CUDA driver found") || stderr.contains("no CUDA device"),
            "{stderr}"
        );
    }
}
