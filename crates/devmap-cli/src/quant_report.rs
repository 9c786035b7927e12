//! The quantization part of `devmap plan`'s reports: per device the bytes held quantized and at
//! full precision (as the runtime allocates them), and each quantizer rule's verdict on the map.

use std::fmt::Write;

use devmap_core::quant_size::{runtime_bytes, RuntimeBytes};
use devmap_core::{format_bytes, Device, DeviceMap, Model, SizeRules};
use serde_json::{json, Value};

/// The devices `map` uses.
fn used_devices(map: &DeviceMap) -> Vec<Device> {
    let mut used: Vec<Device> = map.entries().iter().map(|(_, d)| *d).collect();
    used.sort();
    used.dedup();
    used
}

fn verdicts(q: &RuntimeBytes, map: &DeviceMap) -> Vec<(String, bool)> {
    q.verdicts(&used_devices(map))
}

/// The table section (empty for an unquantized model or when sizing fails).
pub fn table(model: &Model, map: &DeviceMap, rules: SizeRules) -> String {
    let Ok(Some(q)) = runtime_bytes(model, rules) else {
        return String::new();
    };
    let devices = devmap_core::validate::tensor_devices(model, map);
    let split = q.split_by_device(model, &devices);
    let full: u64 = model.tensor_sizes(rules).iter().sum();
    let mut s = String::new();
    let (quantized, kept): (u64, u64) = split.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let pre_quantized = model.quantization.as_ref().is_some_and(|q| q.pre_quantized);
    let unquantized = if pre_quantized {
        String::new()
    } else {
        format!(" ({} unquantized)", format_bytes(full))
    };
    let _ = writeln!(
        s,
        "\nquantization {}: {} quantized + {} full precision as loaded{unquantized}",
        q.label,
        format_bytes(quantized),
        format_bytes(kept),
    );
    let _ = writeln!(
        s,
        "{:<6} {:>11} {:>15}",
        "device", "quantized", "full precision"
    );
    for (d, (qb, fb)) in &split {
        let _ = writeln!(
            s,
            "{:<6} {:>11} {:>15}",
            d.to_string(),
            format_bytes(*qb),
            format_bytes(*fb)
        );
    }
    if q.workspace > 0 {
        let _ = writeln!(
            s,
            "dequantization workspace {} on each executing GPU (counted with the activations)",
            format_bytes(q.workspace)
        );
    }
    for (rule, holds) in verdicts(&q, map) {
        let _ = writeln!(
            s,
            "rule {rule}: {}",
            if holds { "holds" } else { "REJECTED" }
        );
    }
    s
}

/// The `quantization` object of plan-json (`null` for an unquantized model).
pub fn json(model: &Model, map: &DeviceMap, rules: SizeRules) -> Value {
    let Ok(Some(q)) = runtime_bytes(model, rules) else {
        return Value::Null;
    };
    let devices = devmap_core::validate::tensor_devices(model, map);
    let per_device: serde_json::Map<String, Value> = q
        .split_by_device(model, &devices)
        .into_iter()
        .map(|(d, (qb, fb))| {
            (
                d.to_string(),
                json!({"quantized": qb, "full_precision": fb}),
            )
        })
        .collect();
    let rules: Vec<Value> = verdicts(&q, map)
        .into_iter()
        .map(|(rule, holds)| json!({"rule": rule, "holds": holds}))
        .collect();
    json!({
        "method": q.label,
        "bytes": per_device,
        "workspace": q.workspace,
        "rules": rules,
    })
}
