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

/// With split blocks (the default) `auto` fills the main GPU's idle room with modules of the streamed
/// layers (the whole-block plans left 0.11 / 0.05 / 0.40 GiB idle at 6 / 10 / 14 GiB on the H200
/// grid's workload): each plan is at least as fast, strictly faster where a block is split, proven
/// optimal over the finer units, and `devmap check` accepts and scores it the same. A layer gets
/// module-level keys only when it is split.
#[test]
fn split_blocks_use_the_idle_gpu_room() {
    let m = model();
    let workload = Some(Workload::parse("batch=1,prompt=8,new=12").unwrap());
    let mut split_somewhere = false;
    for cap in ["6GiB", "10GiB", "14GiB"] {
        let budgets = MemoryBudgets::parse(&format!("0={cap},cpu=100GiB")).unwrap();
        let req = PlanRequest::new(&m, &budgets);
        let whole_opts = AutoOptions::default()
            .workload(workload)
            .split_blocks(false);
        let split_opts = whole_opts.clone().split_blocks(true);
        let whole = Auto::new(whole_opts).plan(&req).unwrap();
        let split = Auto::new(split_opts.clone()).plan(&req).unwrap();
        let (w, s) = (whole.solve.unwrap(), split.solve.clone().unwrap());
        assert_eq!(s.status(), "optimal", "{cap}: {}", s.detail);
        assert!(
            s.bound_seconds <= s.objective_seconds * (1.0 + 1e-9),
            "{cap}"
        );
        // The whole-block plan is one plan of the finer space (within the solver's gap).
        assert!(
            s.objective_seconds <= w.objective_seconds * (1.0 + 5e-4),
            "{cap}"
        );
        let checked = check_map(&m, &split.map, Some(&budgets), &split_opts, None).unwrap();
        assert!(
            checked.valid() && checked.fits,
            "{cap}: {:?}",
            checked.problems()
        );
        let est = checked.estimate.objective_seconds;
        assert!((est - s.objective_seconds).abs() <= 1e-9 * est, "{cap}");
        let split_layers = split_layer_keys(&split.map);
        split_somewhere |= !split_layers.is_empty();
        if !split_layers.is_empty() {
            assert!(s.objective_seconds < w.objective_seconds, "{cap}");
        }
    }
    assert!(split_somewhere, "no plan split a layer");
}

/// The layers whose map keys name their modules; each of them spans more than one device (an
/// unsplit layer keeps one key).
fn split_layer_keys(map: &devmap_core::DeviceMap) -> Vec<String> {
    let mut layers: Vec<(String, Vec<Device>)> = Vec::new();
    for (key, device) in map.entries() {
        let parts: Vec<&str> = key.split('.').collect();
        if parts.len() > 3 && parts[1] == "layers" {
            let layer = parts[..3].join(".");
            match layers.iter_mut().find(|(l, _)| *l == layer) {
                Some((_, ds)) if !ds.contains(device) => ds.push(*device),
                Some(_) => {}
                None => layers.push((layer, vec![*device])),
            }
        }
    }
    for (layer, devices) in &layers {
        assert!(devices.len() > 1, "{layer} has module keys on one device");
        assert!(
            devices.iter().all(|d| !d.is_gpu() || *d == Device::Gpu(0)),
            "{layer} split off the main GPU: {devices:?}"
        );
    }
    layers.into_iter().map(|(l, _)| l).collect()
}
