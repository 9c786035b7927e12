//! `--quantization-config` through the binary: Hugging Face's quantized map (checked against the
//! map transformers computed), the bitsandbytes rejection text, and clear errors for an unknown
//! method and a malformed field; `auto` on a quantized model (real bytes, GPU only, how short).

use std::path::PathBuf;
use std::process::{Command, Output};

use devmap_core::DeviceMap;

fn quant() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/quant")
}

fn plan(quant_config: &str, extra: &[&str]) -> Output {
    let model = quant().join("models/llama-2-7b.json");
    Command::new(env!("CARGO_BIN_EXE_devmap"))
        .arg("plan")
        .arg(&model)
        .arg("--quantization-config")
        .arg(quant_config)
        .args(extra)
        .output()
        .expect("the devmap binary runs")
}

fn config(name: &str) -> String {
    quant().join("configs").join(name).display().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn reference_run(quant_name: &str, scenario: &str, strategy: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(quant().join("reference/llama-2-7b.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    doc["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["quant"] == quant_name && r["scenario"] == scenario && r["strategy"] == strategy
        })
        .expect("reference run present")
        .clone()
}

#[test]
fn quantized_map_equals_transformers() {
    let run = reference_run("bnb-4bit-nf4", "2x24G+cpu64", "balanced");
    let out = plan(
        &config("bnb-4bit-nf4.json"),
        &[
            "--max-memory",
            "0=24GiB,1=24GiB,cpu=64GiB",
            "--strategy",
            "balanced",
            "--compat",
            "transformers",
            "--format",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let got = DeviceMap::from_json_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let want = DeviceMap::from_json_str(&run["device_map"].to_string()).unwrap();
    assert_eq!(got.as_sorted(), want.as_sorted());
}

#[test]
fn rejection_carries_the_quantizers_text() {
    let run = reference_run("bnb-8bit", "1x4G+cpu64", "sequential");
    let want = run["error"]
        .as_str()
        .expect("the reference rejects this map");
    let out = plan(
        &config("bnb-8bit.json"),
        &[
            "--max-memory",
            "0=4GiB,cpu=64GiB",
            "--strategy",
            "sequential",
            "--compat",
            "transformers",
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains(want), "{}", stderr(&out));
}

#[test]
fn bad_configs_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (body, needle) in [
        (r#"{"quant_method": "hqq"}"#, "\"hqq\""),
        (
            r#"{"quant_method": "bitsandbytes", "load_in_4bit": 1}"#,
            "load_in_4bit",
        ),
    ] {
        let path = dir.path().join("q.json");
        std::fs::write(&path, body).unwrap();
        let out = plan(
            path.to_str().unwrap(),
            &[
                "--max-memory",
                "0=24GiB",
                "--strategy",
                "sequential",
                "--compat",
                "transformers",
            ],
        );
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains(needle) && err.contains("q.json") && !err.contains("panicked"),
            "{err}"
        );
    }
}

#[test]
fn auto_plans_quantized_bytes_gpu_only_or_says_how_short() {
    // 4-bit Llama-2-7B holds 3.88 GiB of weights (12.55 GiB unquantized): it fits 6 GiB, on GPU only.
    let out = plan(
        &config("bnb-4bit-nf4.json"),
        &["--max-memory", "0=6GiB,cpu=64GiB", "--format", "json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(map, serde_json::json!({"": 0}));
    // At 3 GiB it does not fit, and cpu is not an escape: bitsandbytes would reject the map.
    let out = plan(
        &config("bnb-4bit-nf4.json"),
        &["--max-memory", "0=3GiB,cpu=64GiB"],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("short by")
            && err.contains("on GPU 0")
            && err.contains("llm_int8_enable_fp32_cpu_offload"),
        "{err}"
    );
    // A pin to the cpu is a map bitsandbytes rejects: named as such.
    let out = plan(
        &config("bnb-4bit-nf4.json"),
        &["--max-memory", "0=24GiB,cpu=64GiB", "--pin", "lm_head=cpu"],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("\"lm_head\" to cpu cannot load") && err.contains("bitsandbytes forbids"),
        "{err}"
    );
    // With fp32 cpu offload the cpu takes layers at full precision; the table says so.
    let out = plan(
        &config("bnb-8bit-fp32-cpu-offload.json"),
        &["--max-memory", "0=4GiB,cpu=64GiB"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    let cpu_row = table
        .lines()
        .skip_while(|l| !l.starts_with("quantization bitsandbytes 8-bit"))
        .find(|l| l.starts_with("cpu "))
        .unwrap_or_else(|| panic!("{table}"));
    let cols: Vec<&str> = cpu_row.split_whitespace().collect();
    assert_eq!(&cols[1..3], ["0", "B"], "{table}");
    assert!(table.contains("map uses cpu: true: holds"), "{table}");
}
