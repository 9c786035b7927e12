//! A hand-written device map: `DeviceMap::from_json_str`, then `validate` (what `devmap check`
//! runs) against a small fixed model with a tied head, no-split blocks, buffers and a module without
//! tensors, under budgets that some maps exceed. Invariants:
//! - `validate`'s per-tensor devices equal `DeviceMap::resolve` (two longest-match implementations);
//! - a valid map covers every tensor, keeps each no-split block on one device, stays in budget,
//!   resolves the same after `clean`, survives a JSON round trip, and has a finite estimate;
//! - every problem can be displayed.
#![no_main]

use std::sync::OnceLock;

use devmap_core::{
    validate, CostModel, DType, DeviceMap, MemoryBudgets, Model, ModelBuilder, Objective,
    SizeRules, Topology,
};
use libfuzzer_sys::fuzz_target;

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let mut b = ModelBuilder::new("fuzz")
            .root_class("ForCausalLM")
            .module("model", "Model")
            .module("model.embed", "Embedding")
            .param("model.embed.weight", DType::BF16, &[64, 16]);
        for i in 0..3 {
            let p = format!("model.layers.{i}");
            b = b
                .module(&p, "Block")
                .module(format!("{p}.attn"), "Attention")
                .module(format!("{p}.drop"), "Dropout")
                .param(format!("{p}.attn.q.weight"), DType::BF16, &[16, 16])
                .param(format!("{p}.attn.q.bias"), DType::BF16, &[16])
                .param(format!("{p}.mlp.weight"), DType::F32, &[16, 32])
                .buffer(format!("{p}.attn.mask"), DType::Bool, &[8, 8]);
        }
        b.module("model.norm", "Norm")
            .param("model.norm.weight", DType::F32, &[16])
            .buffer("model.rotary.inv_freq", DType::F32, &[8])
            .module("lm_head", "Linear")
            .param("lm_head.weight", DType::BF16, &[64, 16])
            .tied(vec!["model.embed.weight".into(), "lm_head.weight".into()])
            .no_split_classes(vec!["Block".into()])
            .hidden_size(Some(16))
            .build()
            .expect("the fixed model builds")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(map) = DeviceMap::from_json_str(text) else {
        return;
    };
    let model = model();
    let budgets = MemoryBudgets::parse("0=3KiB,1=2KiB,cpu=4KiB").expect("fixed budgets");
    let rules = SizeRules::default();
    let report = validate(model, &map, Some(&budgets), rules);
    for p in &report.problems {
        let _ = p.to_string();
    }
    for (t, tensor) in model.tensors().iter().enumerate() {
        assert_eq!(
            report.tensor_devices[t],
            map.resolve(&tensor.name),
            "{}",
            tensor.name
        );
    }
    if !report.is_valid() {
        return;
    }
    assert!(
        report.tensor_devices.iter().all(Option::is_some),
        "valid maps cover everything"
    );
    for (d, used) in &report.usage {
        if let Some(b) = budgets.get(*d) {
            assert!(used <= &b, "{d} over budget in a valid map");
        }
    }
    for (t, tensor) in model.tensors().iter().enumerate() {
        if let Some(ns) = model.no_split_ancestor(tensor.module) {
            for (u, other) in model.tensors().iter().enumerate() {
                if model.is_within(other.module, ns) {
                    assert_eq!(report.tensor_devices[t], report.tensor_devices[u]);
                }
            }
        }
    }
    let cleaned = map.clean();
    let again = validate(model, &cleaned, Some(&budgets), rules);
    assert_eq!(
        again.tensor_devices, report.tensor_devices,
        "clean changed a device"
    );
    assert!(
        again.is_valid(),
        "clean made a valid map invalid: {:?}",
        again.problems
    );
    let back = DeviceMap::from_json_str(&cleaned.to_json().to_string()).expect("round trip");
    assert_eq!(back, cleaned);
    let est = CostModel::new(
        model,
        &budgets.devices(),
        Topology::default(),
        Objective::Latency,
    )
    .evaluate(model, &map, rules);
    assert!(est.objective_seconds.is_finite() && est.objective_seconds >= 0.0);
});
