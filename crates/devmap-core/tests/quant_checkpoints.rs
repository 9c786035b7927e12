//! Pre-quantized checkpoints (fixtures/quant/checkpoints, scripts/gen_quant_checkpoints.py): the
//! bytes `auto` sizes them with are the header's stored bytes (hand-computed below), and a
//! quantization_config whose fields contradict the packed tensors' shapes is an error naming the
//! field and the tensor.

use std::path::{Path, PathBuf};

use devmap_core::quant_size::runtime_bytes;
use devmap_core::{load_model, SizeRules};

fn checkpoint(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/quant/checkpoints")
        .join(name)
}

/// (bytes held quantized, bytes at full precision) of a checkpoint.
fn split(path: &Path) -> (u64, u64) {
    let model = load_model(path).unwrap();
    assert!(model.quantization.as_ref().unwrap().pre_quantized);
    let bytes = runtime_bytes(&model, SizeRules::default())
        .unwrap()
        .unwrap();
    let mut out = (0, 0);
    for (t, b) in bytes.on_gpu.iter().enumerate() {
        if bytes.quantized[t] {
            out.0 += b;
        } else {
            out.1 += b;
        }
    }
    out
}

// The tiny Llama: hidden 128, intermediate 256, 2 layers, 1 KV head of 64. Per layer the seven
// linears hold 16384 + 8192 + 8192 + 16384 + 32768 + 32768 + 32768 = 147456 weights (in x out).
// Full precision: embed and lm_head 256 x 128 bf16 (65536 B each) + 5 norms of 128 bf16.
const LLAMA_FULL: u64 = 2 * 65_536 + 5 * 256;

#[test]
fn stored_bytes_are_what_auto_counts() {
    for (name, quantized, full) in [
        // fp8 weight (1 B) + float32 weight_scale_inv per 128x128 block: 10 blocks per layer.
        ("fp8", 2 * (147_456 + 10 * 4), LLAMA_FULL),
        // qweight n/2 + qzeros 576 + fp16 scales 2304 + int32 g_idx 4096 per layer.
        ("gptq", 2 * (73_728 + 576 + 2_304 + 4_096), LLAMA_FULL),
        // qweight n/2 + qzeros 576 + scales 2304 per layer.
        ("awq", 2 * (73_728 + 576 + 2_304), LLAMA_FULL),
        // uint8 packed n/2 + float32 absmax n/64 + 14 x (16 float32 quant_map + 120 B quant_state).
        (
            "bnb-4bit",
            147_456 + 294_912 / 64 * 4 + 14 * (64 + 120),
            LLAMA_FULL,
        ),
    ] {
        assert_eq!(split(&checkpoint(name)), (quantized, full), "{name}");
    }
    // gpt-oss, 4 experts, hidden 128, intermediate 128: gate_up blocks 4x256x4x16 + scales
    // 4x256x4, down blocks 4x128x4x16 + scales 4x128x4, per layer.
    let (q, _) = split(&checkpoint("mxfp4"));
    assert_eq!(q, 2 * (65_536 + 4_096 + 32_768 + 2_048));
}

/// A copy of checkpoint `name` whose quantization_config has `field` set to `value`.
fn with_field(name: &str, field: &str, value: serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = checkpoint(name);
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["quantization_config"][field] = value;
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn fields_that_contradict_packed_shapes_are_named() {
    use serde_json::json;
    for (name, field, value, tensor) in [
        (
            "fp8",
            "weight_block_size",
            json!([64, 64]),
            "weight_scale_inv",
        ),
        ("fp8", "weight_block_size", json!(null), "weight_scale_inv"),
        ("gptq", "group_size", json!(64), "scales"),
        ("gptq", "bits", json!(8), "g_idx"),
        ("awq", "group_size", json!(32), "scales"),
        (
            "bnb-4bit",
            "bnb_4bit_use_double_quant",
            json!(true),
            "absmax",
        ),
    ] {
        let dir = with_field(name, field, value.clone());
        let e = load_model(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{field:?}")) && e.contains(tensor) && e.contains("config.json"),
            "{name} {field}={value}: {e}"
        );
    }
}

#[test]
fn unknown_and_malformed_configs_in_a_checkpoint_are_named() {
    let dir = with_field("fp8", "quant_method", serde_json::json!("hqq"));
    let e = load_model(dir.path()).unwrap_err().to_string();
    assert!(e.contains("\"hqq\"") && e.contains("gptq"), "{e}");
    let dir = with_field("gptq", "group_size", serde_json::json!("128"));
    let e = load_model(dir.path()).unwrap_err().to_string();
    assert!(e.contains("group_size") && e.contains("integer"), "{e}");
}
