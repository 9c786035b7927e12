//! Plans for the Llama-3.1-8B-shaped bf16 checkpoint measured on a real H200 (transformers 5.17,
//! accelerate 1.15; `fixtures/measured/`), against what the GPU really needed.

use std::path::PathBuf;

use devmap_core::{load_model, Device, MemoryBudgets, Model, Workload};
use devmap_solver::{check_map, Auto, AutoOptions, PlanRequest, Strategy};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn model() -> Model {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/measured/llama-3.1-8b-shaped.json");
    load_model(&p).unwrap()
}

/// With the GPU hard-capped at 12 GiB and a 6064-token prompt, devmap's old plan (10.49 GiB
/// resident) ran out of memory in prefill. Measured with the whole model on the GPU, generate
/// needs 1.43 GiB above the weights at 6000 tokens (scaled here to 6064), and streaming a layer
/// 0.11 GiB more: the plan must leave that room.
#[test]
fn the_prefill_that_ran_out_of_memory_now_has_room() {
    let m = model();
    let budgets = MemoryBudgets::parse("0=12GiB,cpu=64GiB").unwrap();
    let opts = AutoOptions::default().workload(Some(Workload::parse("prompt=6064,new=0").unwrap()));
    let plan = Auto::new(opts.clone())
        .plan(&PlanRequest::new(&m, &budgets))
        .unwrap();
    let weights = plan.bytes_on(Device::Gpu(0));
    let measured_above_weights = 1.43 * 6064.0 / 6000.0 * GIB as f64 + 0.11 * GIB as f64;
    assert!(
        weights as f64 + measured_above_weights <= (12 * GIB) as f64,
        "{:.2} GiB of weights leave no room for the measured peak",
        weights as f64 / GIB as f64
    );
    let checked = check_map(&m, &plan.map, Some(&budgets), &opts, None).unwrap();
    assert!(checked.fits);
}

/// accelerate streams an offloaded layer one module at a time: the measured 10 GiB plan peaked
/// 0.11 GiB above its resident weights (the largest Linear, 14336 × 4096 bf16 = 112 MiB); devmap
/// used to reserve a whole decoder layer (416 MiB).
#[test]
fn the_streaming_reserve_is_the_largest_linear() {
    let m = model();
    let budgets = MemoryBudgets::parse("0=10GiB,cpu=64GiB").unwrap();
    let opts = AutoOptions::default();
    let plan = Auto::new(opts.clone())
        .plan(&PlanRequest::new(&m, &budgets))
        .unwrap();
    assert!(plan.bytes_on(Device::Cpu) > 0, "the plan offloads");
    let checked = check_map(&m, &plan.map, Some(&budgets), &opts, None).unwrap();
    assert_eq!(checked.memory[&Device::Gpu(0)].streaming, 14336 * 4096 * 2);
    assert_eq!(14336 * 4096 * 2, 112 * MIB);
}
