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

/// `devmap` on the Llama-3.1-8B-shaped manifest the H200 validation loads.
fn devmap_8b(args: &[&str]) -> Output {
    let model = quant().join("../measured/llama-3.1-8b-shaped.json");
    Command::new(env!("CARGO_BIN_EXE_devmap"))
        .arg(args[0])
        .arg(&model)
        .args(&args[1..])
        .output()
        .expect("the devmap binary runs")
}

/// FP8 quantize-on-load of the 8B shape, by hand: 32 layers of q/o [4096, 4096], k/v
/// [1024, 4096], gate/up/down 58,720,256 elements, each at 1 byte plus a float32 scale per
/// 128 x 128 block: 218,157,056 per layer, 6,981,025,792 in all; embed_tokens and lm_head
/// [128256, 4096] bf16 (1,050,673,152 each), 65 norms of 4096 bf16, two float32 [64] rotary
/// buffers: 2,101,879,296 at full precision. Loading converts one MLP matrix at a time through
/// 822,126,592 bytes of transients (quant_size's test derives it), so the load peaks at
/// 9,082,905,088 + 822,126,592 = 9,905,031,680 bytes (9.22 GiB): above 9 GiB by 241,355,264
/// (230.17 MiB), within 9.25 GiB, although weights, KV and activations fit 9 GiB at runtime.
const FP8_8B_WEIGHTS: u64 = 6_981_025_792 + 2_101_879_296;
const FP8_8B_LOAD_PEAK: u64 = FP8_8B_WEIGHTS + 822_126_592;

#[test]
fn fp8_quantize_on_load_fits_only_when_its_load_peak_does() {
    let fp8 = quant().join("configs-fp8/fp8-block128.json");
    let fp8 = fp8.to_str().unwrap();
    let workload = ["--workload", "batch=1,prompt=512,new=16"];
    let at = |cap: &str, extra: &[&str]| {
        let budget = format!("0={cap},cpu=100GiB");
        let mut args = vec![
            "plan",
            "--quantization-config",
            fp8,
            "--max-memory",
            &budget,
        ];
        args.extend(workload);
        args.extend(extra);
        devmap_8b(&args)
    };
    let out = at("9GiB", &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("short by 230.17 MiB on GPU 0") && err.contains("plus 784.04 MiB"),
        "{err}"
    );
    for cap in ["9.25GiB", "9.5GiB", "10GiB"] {
        let out = at(cap, &["--format", "plan-json"]);
        assert!(out.status.success(), "{cap}: {}", stderr(&out));
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let gpu0 = &plan["memory"]["0"];
        assert_eq!(plan["device_map"], serde_json::json!({"": 0}), "{cap}");
        assert_eq!(gpu0["weights"], FP8_8B_WEIGHTS, "{cap}");
        assert_eq!(gpu0["load_peak"], FP8_8B_LOAD_PEAK, "{cap}");
        assert_eq!(gpu0["fits_at_load"], true, "{cap}");
    }
    // The table names the peak beside the device.
    let out = at("9.5GiB", &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("load peak 9.22 GiB"));
}

#[test]
fn check_judges_the_load_peak_of_a_quantize_on_load_map() {
    let fp8 = quant().join("configs-fp8/fp8-block128.json");
    let map = std::env::temp_dir().join(format!("devmap-quant-cli-{}.json", std::process::id()));
    std::fs::write(&map, r#"{"": 0}"#).unwrap();
    let map = map.to_str().unwrap();
    let check = |cap: &str| {
        let budget = format!("0={cap}");
        devmap_8b(&[
            "check",
            "--quantization-config",
            fp8.to_str().unwrap(),
            "--map",
            map,
            "--max-memory",
            &budget,
            "--workload",
            "batch=1,prompt=512,new=16",
            "--format",
            "json",
        ])
    };
    let out = check("9GiB");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["fits"], false, "{doc}");
    assert_eq!(doc["memory"]["0"]["fits_at_load"], false);
    assert_eq!(doc["memory"]["0"]["load_peak"], FP8_8B_LOAD_PEAK);
    let problems = doc["problems"].to_string();
    assert!(
        problems.contains("peaks at 9.22 GiB") && problems.contains("over by 230.17 MiB"),
        "{problems}"
    );
    // Only the load rule fails: the runtime terms fit 9 GiB.
    assert!(!problems.contains("device 0 holds"), "{problems}");
    let out = check("9.25GiB");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["fits"], true, "{doc}");
    std::fs::remove_file(map).unwrap();
}

/// bnb 4-bit nf4 of the 8B shape: the largest converted weight (an MLP matrix) loads as a bf16
/// copy of 117,440,512 bytes beside the packed result; its runtime total (6.01 GiB with the
/// dequantization workspace) decides 6 GiB, not the load peak.
#[test]
fn bnb_4bit_load_peak_is_the_weights_plus_one_bf16_copy() {
    let cfg = quant().join("configs/bnb-4bit-nf4.json");
    let out = devmap_8b(&[
        "plan",
        "--quantization-config",
        cfg.to_str().unwrap(),
        "--max-memory",
        "0=6.5GiB,cpu=100GiB",
        "--workload",
        "batch=1,prompt=512,new=16",
        "--format",
        "plan-json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let gpu0 = &plan["memory"]["0"];
    let weights = gpu0["weights"].as_u64().unwrap();
    assert_eq!(
        gpu0["load_peak"].as_u64().unwrap() - weights,
        2 * 58_720_256
    );
}
