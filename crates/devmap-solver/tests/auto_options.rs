//! `auto`'s options: pins, KV cache, reserves, the throughput objective, topology files.

use std::path::PathBuf;

use devmap_core::cost::{CostModel, KvCacheSpec, Objective};
use devmap_core::{load_model, validate, Device, MemoryBudgets, Model};
use devmap_solver::{Auto, AutoOptions, Error, PlanRequest, Strategy};

fn model(name: &str) -> Model {
    load_model(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../../fixtures/models/{name}.json")),
    )
    .unwrap()
}

#[test]
fn pins_are_honoured_and_the_rest_is_placed_around_them() {
    let m = model("llama-2-7b");
    let budgets = MemoryBudgets::parse("0=24GiB,1=24GiB").unwrap();
    let auto = Auto::new(
        AutoOptions::default()
            .pin("lm_head", Device::Gpu(1))
            .pin("model.embed_tokens", Device::Gpu(0)),
    );
    let plan = auto.plan(&PlanRequest::new(&m, &budgets)).unwrap();
    assert_eq!(plan.map.resolve("lm_head.weight"), Some(Device::Gpu(1)));
    assert_eq!(
        plan.map.resolve("model.embed_tokens.weight"),
        Some(Device::Gpu(0))
    );
    assert!(validate(&m, &plan.map, Some(&budgets), plan.size_rules).is_valid());
    // Without pins the whole model sits on one GPU (no device change); the pins force one.
    let free = Auto::default()
        .plan(&PlanRequest::new(&m, &budgets))
        .unwrap();
    assert_eq!(free.map.entries().len(), 1, "{:?}", free.map);
    assert!(plan.solve.unwrap().objective_seconds > free.solve.unwrap().objective_seconds);
}

#[test]
fn infeasible_pin_names_the_device_and_shortfall() {
    let m = model("llama-2-7b");
    let budgets = MemoryBudgets::parse("0=4GiB,1=24GiB").unwrap();
    let err = Auto::new(AutoOptions::default().pin("model.layers", Device::Gpu(0)))
        .plan(&PlanRequest::new(&m, &budgets))
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::BadPin(_)), "{text}");
    assert!(
        text.contains("device 0") && text.contains("short by"),
        "{text}"
    );
    let err = Auto::new(AutoOptions::default().pin("model.nothing", Device::Gpu(0)))
        .plan(&PlanRequest::new(&m, &budgets))
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"model.nothing\""), "{err}");
}

#[test]
fn kv_cache_is_charged_per_decoder_layer() {
    let m = model("llama-2-7b");
    assert!(
        m.config.is_some(),
        "the fixture's config.json is read beside the manifest"
    );
    let spec = KvCacheSpec::parse("batch=1,seq=4096").unwrap();
    // Llama-2-7B: 32 KV heads × 128 dims × 4096 tokens × K and V × 2 bytes.
    assert_eq!(spec.bytes_per_layer(&m).unwrap(), 2 * 4096 * 32 * 128 * 2);
    let budgets = MemoryBudgets::parse("0=14GiB,cpu=64GiB").unwrap();
    let req = PlanRequest::new(&m, &budgets);
    let without = Auto::default().plan(&req).unwrap();
    let with = Auto::new(AutoOptions::default().kv_cache(Some(spec)))
        .plan(&req)
        .unwrap();
    let kv_total = 32 * spec.bytes_per_layer(&m).unwrap();
    let overhead = with.solve.as_ref().unwrap().overhead[&Device::Gpu(0)];
    assert!(
        overhead >= kv_total,
        "KV {kv_total} not reserved on GPU 0 ({overhead})"
    );
    assert!(
        with.bytes_on(Device::Cpu) > without.bytes_on(Device::Cpu),
        "the cache must push weights out"
    );
    assert!(with.bytes_on(Device::Gpu(0)) + overhead <= 14 << 30);
}

#[test]
fn reserve_keeps_memory_free() {
    let m = model("llama-2-7b");
    let budgets = MemoryBudgets::parse("0=14GiB,cpu=64GiB").unwrap();
    let req = PlanRequest::new(&m, &budgets);
    let plan = Auto::new(AutoOptions::default().reserve(Device::Gpu(0), 4 << 30))
        .plan(&req)
        .unwrap();
    assert!(plan.bytes_on(Device::Gpu(0)) <= (14u64 - 4) << 30);
    let err = Auto::new(AutoOptions::default().reserve(Device::Gpu(3), 1 << 30))
        .plan(&req)
        .unwrap_err();
    assert!(err.to_string().contains("device 3"), "{err}");
}

#[test]
fn throughput_objective_balances_devices() {
    let m = model("llama-2-7b");
    let budgets = MemoryBudgets::parse("0=24GiB,1=24GiB").unwrap();
    let req = PlanRequest::new(&m, &budgets);
    let latency = Auto::default().plan(&req).unwrap();
    let throughput = Auto::new(AutoOptions::default().objective(Objective::Throughput))
        .plan(&req)
        .unwrap();
    let cm = CostModel::new(
        &m,
        &budgets.devices(),
        Default::default(),
        Objective::Throughput,
    );
    let busiest_latency_plan = cm
        .evaluate(&m, &latency.map, latency.size_rules)
        .busiest_seconds;
    let busiest_throughput_plan = cm
        .evaluate(&m, &throughput.map, throughput.size_rules)
        .busiest_seconds;
    assert!(
        busiest_throughput_plan < 0.6 * busiest_latency_plan,
        "{busiest_throughput_plan} vs {busiest_latency_plan}"
    );
    let g0 = throughput.bytes_on(Device::Gpu(0)) as f64;
    let g1 = throughput.bytes_on(Device::Gpu(1)) as f64;
    assert!((g0 - g1).abs() / (g0 + g1) < 0.1, "{g0} vs {g1}");
}

#[test]
fn faster_gpu_in_topology_gets_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("topo.json");
    std::fs::write(
        &path,
        r#"{"gpus": {"1": {"name": "H200", "memory_bandwidth": 4.8e12}}}"#,
    )
    .unwrap();
    let topology = devmap_core::Topology::read(&path).unwrap();
    let m = model("llama-2-7b");
    let budgets = MemoryBudgets::parse("0=24GiB,1=24GiB").unwrap();
    let plan = Auto::new(AutoOptions::default().topology(topology))
        .plan(&PlanRequest::new(&m, &budgets))
        .unwrap();
    assert!(plan.bytes_on(Device::Gpu(1)) > plan.bytes_on(Device::Gpu(0)));
}
