//! Transfers along the data-flow DAG on fixture models: an encoder-decoder's output crosses to
//! every cross-attention layer on each decode step, a vision tower feeds the language model only at
//! prefill. Expected values are computed here from the topology's links and the fixture's sizes.

use std::path::PathBuf;

use devmap_core::cost::{Exec, Topology};
use devmap_core::graph::{flows, units, FlowKind};
use devmap_core::memory::Workload;
use devmap_core::{load_model, CostModel, Device, DeviceMap, MemoryBudgets, Model, SizeRules};
use devmap_solver::{Auto, AutoOptions, PlanRequest, Strategy};

fn model(name: &str) -> Model {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models");
    load_model(&root.join(format!("{name}.json"))).unwrap()
}

/// A map putting every top-level name whose key starts with one of `on_1` on GPU 1, the rest on 0.
fn split_map(m: &Model, on_1: &[&str]) -> DeviceMap {
    let mut map = DeviceMap::new();
    for u in units(m) {
        let name = &m.module(u.module).name;
        let gpu = u32::from(on_1.iter().any(|p| name.starts_with(p)));
        map.insert(name.clone(), Device::Gpu(gpu));
    }
    map
}

fn cost_model(m: &Model, workload: Option<&Workload>) -> CostModel {
    CostModel::new(
        m,
        &[Device::Gpu(0), Device::Gpu(1)],
        Topology::default(),
        Default::default(),
    )
    .with_workload(m, workload)
    .unwrap()
}

/// T5-11B (bf16, d_model 1024, 24 decoder blocks with `EncDecAttention`), prompt 512: with the
/// encoder on GPU 0 and the decoder on GPU 1, every decoder block receives the 512-token encoder
/// output over the peer link on every step, and the decoder's embedding the one-token residual from
/// `shared`. The chain model of registration order charged one one-token change.
#[test]
fn t5_pays_the_encoder_output_to_every_cross_attention_block() {
    let m = model("t5-11b");
    let w = Workload {
        batch: 1,
        prompt: 512,
        new_tokens: 16,
        dtype: None,
    };
    let cm = cost_model(&m, Some(&w));
    let all_on_0 = split_map(&m, &[]);
    let split = split_map(&m, &["decoder", "lm_head"]);
    let rules = SizeRules::default();
    let base = cm.evaluate(&m, &all_on_0, rules);
    let e = cm.evaluate(&m, &split, rules);
    let link = Topology::default().peer_link(0, 1);
    let token = 1024.0 * 2.0;
    let expected = 24.0 * (512.0 * token / link.bandwidth + link.latency)
        + (token / link.bandwidth + link.latency);
    assert_eq!(e.device_changes, 25);
    // Same GPU profiles: the unit costs are equal, the difference is the transfers.
    let transfers = e.latency_seconds - base.latency_seconds;
    assert!(
        (transfers - expected).abs() < 1e-9 * expected,
        "{transfers} vs {expected}"
    );
    // The graph: 24 encoder-output edges from the encoder's last unit.
    let us = units(&m);
    let cross: Vec<_> = flows(&m, &us)
        .into_iter()
        .filter(|f| f.kind == FlowKind::EncoderOutput)
        .collect();
    assert_eq!(cross.len(), 24);
    assert!(cross
        .iter()
        .all(|f| m.module(us[f.from].module).name == "encoder.final_layer_norm"));
}

/// On two GPUs that hold 11 and 14 GiB of T5-11B (21.2 GiB, the decoder 12.1), `auto` keeps the whole decoder and the encoder's
/// last unit (its final norm, which emits the encoder output) on one GPU: splitting the encoder
/// costs nothing per decode step, cutting the decoder from the encoder output 512 tokens a block.
#[test]
fn t5_auto_keeps_the_encoder_output_with_the_decoder() {
    let m = model("t5-11b");
    let budgets = MemoryBudgets::parse("0=11GiB,1=14GiB").unwrap();
    let w = Workload {
        batch: 1,
        prompt: 512,
        new_tokens: 16,
        dtype: None,
    };
    let auto = Auto::new(AutoOptions::default().workload(Some(w)));
    let plan = auto.plan(&PlanRequest::new(&m, &budgets)).unwrap();
    let dev = |name: &str| {
        (plan.map.entries().iter())
            .filter(|(k, _)| name.starts_with(k.as_str()) || k.starts_with(name))
            .map(|(_, d)| *d)
            .collect::<Vec<_>>()
    };
    let decoder = dev("decoder.block");
    let norm = dev("encoder.final_layer_norm");
    assert!(
        !decoder.is_empty() && decoder.iter().all(|d| *d == decoder[0]),
        "{:?}",
        plan.map
    );
    assert_eq!(norm, vec![decoder[0]], "{:?}", plan.map);
    let solve = plan.solve.unwrap();
    assert!(!solve.chain, "an encoder-decoder is not a chain");
    assert_eq!(solve.status(), "optimal", "{}", solve.detail);
}

/// LLaVA-1.5-7B: the vision tower and projector on GPU 1, the language model on GPU 0. Per decode
/// step nothing crosses (the image features enter at prefill), where the chain model charged the
/// projector → embedding change; splitting the language model's layers costs one token.
#[test]
fn llava_vision_tower_costs_no_transfer_per_step() {
    let m = model("llava-1.5-7b");
    let cm = cost_model(&m, None);
    let rules = SizeRules::default();
    let base = cm.evaluate(&m, &split_map(&m, &[]), rules);
    let tower_apart = cm.evaluate(
        &m,
        &split_map(&m, &["model.vision_tower", "model.multi_modal_projector"]),
        rules,
    );
    assert_eq!(tower_apart.device_changes, 0);
    assert!((tower_apart.latency_seconds - base.latency_seconds).abs() < 1e-12);
    let lm_split = cm.evaluate(
        &m,
        &split_map(&m, &["model.language_model.layers.3"]),
        rules,
    );
    // layers.3, 30 and 31 on GPU 1 (32 layers): 0..2 | 3 | 4..29 | 30, 31 | norm: four changes.
    let link = Topology::default().peer_link(0, 1);
    let one = 4096.0 * 2.0 / link.bandwidth + link.latency;
    assert_eq!(lm_split.device_changes, 4);
    let transfers = lm_split.latency_seconds - base.latency_seconds;
    assert!((transfers - 4.0 * one).abs() < 1e-9, "{transfers}");
    assert_eq!(cm.transfer_seconds(Exec::Gpu(0), Exec::Gpu(1)), one);
}
