//! The `devmap` binary on bad input: a non-zero exit, nothing on stdout, and a message on stderr
//! that starts with `error:`, names the culprit and is never a panic. Plus the positive contract
//! the error cases are measured against: `--format json` prints exactly one JSON object that
//! `devmap check` accepts, the table lists every device, and a model that does not fit fails
//! unless `--compat` asks for Hugging Face's spill to disk.

use std::path::PathBuf;
use std::process::Output;

use devmap_core::{load_model, validate, DeviceMap, MemoryBudgets, SizeRules};

mod common;
use common::{devmap, path_str, repo, text};

/// Budgets the tiny example fits with cpu offload: embeddings on GPU 0, two layers on GPU 1.
const FITS: &str = "0=200KiB,1=200KiB,cpu=1GiB";
/// Budgets large enough that a `check` reports only the problem under test.
const ROOMY: &str = "0=1GiB,1=1GiB,cpu=1GiB";

fn manifest() -> PathBuf {
    repo().join("examples/tiny-llama.manifest.json")
}

/// The failure contract, except stdout (see [`assert_fails`] and [`assert_check_fails`]).
#[track_caller]
fn assert_error_on_stderr(out: &Output, culprits: &[&str]) -> String {
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got {:?}\nstdout: {}\nstderr: {stderr}",
        out.status,
        text(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1), "exit status; stderr: {stderr}");
    assert!(stderr.starts_with("error:"), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    for c in culprits {
        assert!(stderr.contains(c), "stderr does not name {c}: {stderr}");
    }
    stderr
}

/// Non-zero exit, empty stdout, `error:` first on stderr naming every culprit, no panic.
#[track_caller]
fn assert_fails(out: &Output, culprits: &[&str]) -> String {
    let stderr = assert_error_on_stderr(out, culprits);
    assert!(
        out.stdout.is_empty(),
        "stdout must be empty on error: {}",
        text(&out.stdout)
    );
    stderr
}

/// `devmap check` on a map it can read but rejects: as [`assert_fails`], except that stdout holds
/// the per-device usage summary (`DEVICE: USED [of BUDGET]`), never a verdict; and exactly one
/// problem is reported, so the message is about the culprit under test.
#[track_caller]
fn assert_check_fails(out: &Output, culprits: &[&str]) -> String {
    let stderr = assert_error_on_stderr(out, culprits);
    let stdout = text(&out.stdout);
    // The report's header: the workload and the estimate.
    let usage_lines = stdout
        .lines()
        .filter(|l| !l.starts_with("workload ") && !l.starts_with("estimate "));
    for line in usage_lines {
        let (device, usage) = line
            .trim_start()
            .split_once(": ")
            .unwrap_or_else(|| panic!("not a usage line on stdout: {line:?}"));
        assert!(
            device.parse::<u32>().is_ok() || device == "cpu" || device == "disk",
            "not a usage line on stdout: {line:?}"
        );
        assert!(
            !usage.contains("error") && !usage.contains("ok"),
            "{line:?}"
        );
    }
    assert_eq!(
        stderr.matches("error:").count(),
        1,
        "exactly one problem expected: {stderr}"
    );
    assert!(stderr.contains("(1 problem(s))"), "stderr: {stderr}");
    stderr
}

fn plan(budgets: &str, extra: &[&str]) -> Output {
    let m = manifest();
    let mut args = vec!["plan", path_str(&m), "--max-memory", budgets];
    args.extend_from_slice(extra);
    devmap(&args)
}

/// Run `devmap check` on the tiny example with `map` written to a file.
fn check(map: &str, budgets: &str) -> (Output, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let p = dir.path().join("map.json");
    std::fs::write(&p, map).expect("write the map");
    let m = manifest();
    let out = devmap(&[
        "check",
        path_str(&m),
        "--map",
        path_str(&p),
        "--max-memory",
        budgets,
    ]);
    (out, dir, p)
}

// ---------------------------------------------------------------- bad models

#[test]
fn bad_safetensors_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.safetensors");
    let header = br#"{"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    std::fs::write(&p, bytes).unwrap();
    let out = devmap(&["plan", path_str(&p), "--max-memory", FITS]);
    assert_fails(&out, &[path_str(&p), "invalid JSON"]);
}

#[test]
fn missing_model_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("no-such-model");
    let out = devmap(&["plan", path_str(&p), "--max-memory", FITS]);
    assert_fails(&out, &[path_str(&p)]);
}

// ---------------------------------------------------------------- bad budgets

#[test]
fn budget_with_an_unknown_unit() {
    assert_fails(&plan("0=20G", &[]), &["\"20G\"", "unit"]);
}

#[test]
fn negative_budget() {
    assert_fails(&plan("0=-1GiB", &[]), &["\"-1GiB\"", "negative"]);
}

#[test]
fn budget_for_an_unknown_device() {
    assert_fails(&plan("gpu0=1GiB", &[]), &["\"gpu0\""]);
}

#[test]
fn budget_that_is_not_a_number() {
    assert_fails(
        &plan("0=abcGB", &[]),
        &["\"abcGB\"", "\"abc\" is not a number"],
    );
}

#[test]
fn budget_json_file_with_a_negative_number() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("budgets.json");
    std::fs::write(&p, r#"{"0": -5, "cpu": "1GiB"}"#).unwrap();
    assert_fails(&plan(path_str(&p), &[]), &["\"-5\"", "non-negative"]);
}

#[test]
fn budget_json_file_that_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("budgets.json");
    std::fs::write(&p, r#"{"0": "1GiB""#).unwrap();
    assert_fails(&plan(path_str(&p), &[]), &[path_str(&p)]);
}

// ---------------------------------------------------------------- bad options

#[test]
fn unknown_strategy() {
    assert_fails(
        &plan(FITS, &["--strategy", "fastest"]),
        &["\"fastest\"", "sequential"],
    );
}

#[test]
fn no_split_class_that_matches_nothing() {
    assert_fails(
        &plan(FITS, &["--no-split", "Nonexistent"]),
        &["\"Nonexistent\""],
    );
}

// ---------------------------------------------------------------- devmap check

#[test]
fn check_unknown_map_key() {
    let (out, _dir, _) = check(
        r#"{"model": 0, "lm_head": "cpu", "decoder.layers.0": 1}"#,
        ROOMY,
    );
    assert_check_fails(&out, &["\"decoder.layers.0\"", "names no module"]);
}

#[test]
fn check_overlapping_keys() {
    let (out, _dir, _) = check(
        r#"{"model": 0, "model.layers.0": 1, "lm_head": "cpu"}"#,
        ROOMY,
    );
    assert_check_fails(&out, &["\"model\"", "\"model.layers.0\"", "overlap"]);
}

#[test]
fn check_uncovered_tensors() {
    let (out, _dir, _) = check(r#"{"model": 0}"#, ROOMY);
    assert_check_fails(&out, &["lm_head.weight", "no device"]);
}

#[test]
fn check_no_split_module_across_devices() {
    let map = r#"{
        "model.embed_tokens": 0,
        "model.layers.0.self_attn": 0,
        "model.layers.0.mlp": 1,
        "model.layers.0.input_layernorm": 0,
        "model.layers.0.post_attention_layernorm": 0,
        "model.layers.1": 1, "model.layers.2": 1, "model.layers.3": "cpu",
        "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"
    }"#;
    let (out, _dir, _) = check(map, ROOMY);
    assert_check_fails(&out, &["\"model.layers.0\"", "no-split", "0, 1"]);
}

#[test]
fn check_over_budget_device() {
    let (out, _dir, _) = check(r#"{"": 0}"#, FITS);
    assert_check_fails(
        &out,
        &["device 0", "483.16 KiB", "200.00 KiB", "over by 283.16 KiB"],
    );
}

#[test]
fn check_map_that_is_invalid_json() {
    let (out, _dir, p) = check(r#"{"model": 0, "lm_head": "#, ROOMY);
    assert_fails(&out, &[path_str(&p), "not a JSON object"]);
}

#[test]
fn check_map_with_an_invalid_device() {
    let (out, _dir, p) = check(r#"{"model": 0, "lm_head": "gpu"}"#, ROOMY);
    assert_fails(&out, &[path_str(&p), "\"lm_head\"", "\"gpu\""]);
}

#[test]
fn check_map_with_a_duplicate_key() {
    let (out, _dir, p) = check(r#"{"model": 0, "lm_head": 1, "lm_head": "cpu"}"#, ROOMY);
    assert_fails(&out, &[path_str(&p), "\"lm_head\"", "twice"]);
}

// ---------------------------------------------------------------- what must work

#[test]
fn json_plan_is_one_object_covering_the_model_that_check_accepts() {
    let out = plan(FITS, &["--format", "json"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(out.stderr.is_empty(), "stderr: {}", text(&out.stderr));
    // serde_json rejects anything after the value but whitespace: exactly one object.
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is one JSON value");
    assert!(value.is_object(), "{stdout}");
    assert_eq!(stdout.trim_end().lines().count(), 1, "{stdout}");

    let model = load_model(&manifest()).unwrap();
    let map = DeviceMap::from_json_str(&stdout).unwrap();
    let budgets = MemoryBudgets::parse(FITS).unwrap();
    let report = validate(&model, &map, Some(&budgets), SizeRules::default());
    assert!(report.is_valid(), "{:?}", report.problems);
    assert!(report.tensor_devices.iter().all(Option::is_some));

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("plan.json");
    std::fs::write(&p, &stdout).unwrap();
    let m = manifest();
    let out = devmap(&[
        "check",
        path_str(&m),
        "--map",
        path_str(&p),
        "--max-memory",
        FITS,
    ]);
    assert!(
        out.status.success(),
        "check rejected the plan: {}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("ok:"), "{}", text(&out.stdout));
}

#[test]
fn checkpoint_and_manifest_plan_alike() {
    let folder = repo().join("examples/tiny-llama");
    // A deterministic strategy gives the same map from both forms of the model.
    let from_st = devmap(&[
        "plan",
        path_str(&folder),
        "--max-memory",
        FITS,
        "--strategy",
        "sequential",
        "--format",
        "json",
    ]);
    assert!(from_st.status.success(), "{}", text(&from_st.stderr));
    let from_manifest = plan(FITS, &["--strategy", "sequential", "--format", "json"]);
    let mut a: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&from_st.stdout).unwrap();
    let mut b: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&from_manifest.stdout).unwrap();
    // The checkpoint stores no rotary buffer; everything else must agree.
    assert!(b.remove("model.rotary_emb").is_some());
    a.remove("model.rotary_emb");
    assert_eq!(a, b);
    // `auto` may pick either of two equally good plans; their estimates must agree.
    let estimate = |out: &std::process::Output| -> f64 {
        let stdout = text(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.starts_with("estimate "))
            .unwrap_or_else(|| panic!("no estimate line:\n{stdout}"))
            .to_string();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    // Weights only: the checkpoint has a config.json (so a default workload), the manifest not.
    let auto_st = devmap(&[
        "plan",
        path_str(&folder),
        "--max-memory",
        FITS,
        "--workload",
        "none",
    ]);
    let auto_manifest = plan(FITS, &["--workload", "none"]);
    assert!(auto_st.status.success() && auto_manifest.status.success());
    let (x, y) = (estimate(&auto_st), estimate(&auto_manifest));
    assert!((x - y).abs() <= 0.001 * x.max(y), "{x} vs {y}");
}

#[test]
fn table_mentions_every_device() {
    let out = plan(FITS, &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for device in ["0", "1", "cpu"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.split_whitespace().next() == Some(device)),
            "no row for device {device}:\n{stdout}"
        );
    }
    assert!(stdout.contains("tiny-llama"), "{stdout}");
}

#[test]
fn model_that_does_not_fit_without_a_disk_budget() {
    let out = plan("0=200KiB,1=200KiB", &[]);
    // 483.16 KiB of weights, 400 KiB of budgets.
    assert_fails(&out, &["does not fit", "83.16 KiB", "disk"]);
    // With a disk budget the same spill is a valid plan.
    let out = plan("0=200KiB,1=200KiB,disk=1GiB", &["--format", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn compat_transformers_spills_to_disk_like_hugging_face() {
    let out = plan(
        "0=200KiB,1=200KiB",
        &["--compat", "transformers", "--format", "json"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        map.values().any(|v| v == "disk"),
        "nothing went to disk: {map:?}"
    );
    assert_eq!(map["lm_head"], "disk");
}
