//! A cost that decides which map wins once the cost model knows what a decode step reads: an
//! encoder-decoder's encoder runs only at prefill.

use devmap_core::config::ModelConfig;
use devmap_core::{DType, Device, MemoryBudgets, Model, ModelBuilder};
use devmap_solver::{Auto, PlanRequest, Strategy};

/// Two encoder blocks and two decoder blocks of 4000 f32 elements (16 000 bytes) each.
fn encoder_decoder() -> Model {
    let mut b = ModelBuilder::new("t5ish").no_split_classes(vec!["Block".into()]);
    for part in ["encoder", "decoder"] {
        for i in 0..2 {
            let block = format!("{part}.block.{i}");
            b = b
                .module(block.clone(), "Block")
                .module(format!("{block}.ff"), "Linear")
                .param(format!("{block}.ff.weight"), DType::F32, &[4000]);
        }
    }
    b.config(Some(ModelConfig {
        raw: serde_json::json!({"is_encoder_decoder": true}),
    }))
    .hidden_size(Some(8))
    .build()
    .unwrap()
}

#[test]
fn auto_offloads_the_encoder_first_since_a_decode_step_never_runs_it() {
    let m = encoder_decoder();
    // Room on GPU 0 for two of the four blocks and the one-module streaming buffer (16 000 B:
    // accelerate still copies the encoder once, at prefill).
    let budgets = MemoryBudgets::parse("0=50000,cpu=1MiB").unwrap();
    let plan = Auto::default()
        .plan(&PlanRequest::new(&m, &budgets))
        .unwrap();
    for i in 0..2 {
        let enc = format!("encoder.block.{i}.ff.weight");
        let dec = format!("decoder.block.{i}.ff.weight");
        assert_eq!(plan.map.resolve(&enc), Some(Device::Cpu), "{:?}", plan.map);
        assert_eq!(
            plan.map.resolve(&dec),
            Some(Device::Gpu(0)),
            "{:?}",
            plan.map
        );
    }
}
