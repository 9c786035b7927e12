//! Named regressions from the issue "a lower bound that is really a bound": the bound with a pin
//! to cpu and with a KV cache, the main device when GPU 0 is too small or has no budget, and the
//! DP's way back to the main GPU.

use std::path::PathBuf;

use devmap_core::cost::{GpuProfile, Link, OffloadMemory, Runtime, Topology};
use devmap_core::{
    load_model, validate, CostModel, DType, Device, KvCacheSpec, MemoryBudgets, Model,
    ModelBuilder, SizeRules,
};
use devmap_solver::auto::{bound_holds, lower_bound, main_candidates};
use devmap_solver::{dp, Auto, AutoOptions, PlanRequest, SolveReport, Strategy};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn model(name: &str) -> Model {
    load_model(&fixtures().join(format!("models/{name}.json"))).unwrap()
}

fn plan(auto: &Auto, model: &Model, budgets: &str) -> SolveReport {
    let budgets = MemoryBudgets::parse(budgets).unwrap();
    let plan = auto.plan(&PlanRequest::new(model, &budgets)).unwrap();
    plan.solve.unwrap()
}

/// Issue figures (before the fix): bound 54.4 ms above the optimum 43.9 ms, because the pinned
/// embedding's streaming was counted in its own cost and again as bytes the GPU could not hold.
#[test]
fn a_unit_pinned_to_cpu_is_streamed_once_in_the_bound() {
    let m = model("llama-2-7b");
    // The issue measured under the rates of the time: pinned host link, no hook or eager terms.
    let then = Topology {
        runtime: Runtime {
            offload_memory: OffloadMemory::Pinned,
            offload_hook_seconds: 0.0,
            eager_module_seconds: 0.0,
            ..Runtime::default()
        },
        ..Topology::default()
    };
    // Whole blocks, as the issue planned (split layers reach 36.5 ms here).
    let auto = Auto::new(
        AutoOptions::default()
            .topology(then)
            .pin("model.embed_tokens", Device::Cpu)
            .split_blocks(false),
    );
    let solve = plan(&auto, &m, "0=13GB,cpu=64GiB");
    assert!(
        bound_holds(solve.bound_seconds, solve.objective_seconds),
        "bound {} above the plan's objective {}",
        solve.bound_seconds,
        solve.objective_seconds
    );
    // The optimum the issue measured, and a bound that still proves it (gap ≤ 0.05%).
    // The optimum was 43.931 ms under the memory rules of the time; today's rules (the
    // one-module streaming buffer, per-tensor copy latency) move it by 0.2%.
    assert!(
        (solve.objective_seconds * 1e3 - 43.931).abs() < 0.01 * 43.931,
        "{solve:?}"
    );
    assert_eq!(solve.status(), "optimal", "{}", solve.detail);
    let budgets = MemoryBudgets::parse("0=13GB,cpu=64GiB").unwrap();
    let inst = auto.instance(&PlanRequest::new(&m, &budgets)).unwrap();
    let lb = lower_bound(&inst);
    // Sound, and tight to 0.1%: with one streamed device the rate is the cheapest cover of the
    // bytes every placement streams (`cover_rate`), not the cheapest unit's (0.23% below here).
    assert!(
        lb <= solve.objective_seconds && lb > 0.999 * solve.objective_seconds,
        "{lb} vs {}",
        solve.objective_seconds
    );
}

/// A streamed layer's KV cache stays on the main GPU: the bound must not charge it as streamed
/// bytes, and the cuts on cpu must use the bytes the cpu holds.
#[test]
fn a_kv_cache_is_not_streamed_in_the_bound() {
    let m = model("llama-2-7b");
    for (budgets, seq) in [
        ("0=13GB,cpu=64GiB", 4096),
        ("0=8GiB,cpu=16GiB,disk=64GiB", 16384),
    ] {
        let kv = KvCacheSpec::parse(&format!("batch=1,seq={seq}")).unwrap();
        let auto = Auto::new(AutoOptions::default().kv_cache(Some(kv)));
        let solve = plan(&auto, &m, budgets);
        assert!(
            bound_holds(solve.bound_seconds, solve.objective_seconds),
            "{budgets}: bound {} above the plan's objective {}",
            solve.bound_seconds,
            solve.objective_seconds
        );
        let b = MemoryBudgets::parse(budgets).unwrap();
        // The bound of the world the plan lives in (a host-only plan wins when the KV cache
        // leaves the GPU no room): each world's bound holds for that world's plans.
        let inst = auto
            .instance_for_main(&PlanRequest::new(&m, &b), solve.main_gpu)
            .unwrap();
        assert!(
            lower_bound(&inst) <= solve.objective_seconds,
            "{budgets}: {} > {} ({solve:?})",
            lower_bound(&inst),
            solve.objective_seconds
        );
        assert!(
            solve.gap <= 1e-3,
            "{budgets}: gap {} ({})",
            solve.gap,
            solve.detail
        );
    }
}

/// With GPU 0 at 5% of the model, GPU 1 at 50% and the cpu at 200%, `auto` refused in 16 of 16
/// cases ("no placement fits"); accelerate's main device is the lowest GPU the map uses, so the
/// map may leave GPU 0 empty and run on GPU 1. On every fixture model it must plan, and the
/// estimate must be the one of the map accelerate runs.
#[test]
fn a_gpu_0_too_small_to_be_the_main_device_is_left_out() {
    let dir = fixtures().join("models");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".json") && !n.ends_with(".config.json"))
        .map(|n| n.trim_end_matches(".json").to_string())
        .collect();
    names.sort();
    assert!(names.len() >= 16, "fixtures missing");
    let mut failures = Vec::new();
    let mut gpu0_empty = 0;
    // 5% as in the issue; 2% leaves less than a layer's streaming buffer on some models.
    let auto = Auto::new(AutoOptions::default().time_limit(std::time::Duration::from_secs(2)));
    for (name, percent) in names.iter().flat_map(|n| [(n, 5), (n, 2)]) {
        let m = model(name);
        let s = m.total_bytes(SizeRules::default());
        let budgets = MemoryBudgets::new([
            (Device::Gpu(0), s * percent / 100),
            (Device::Gpu(1), s / 2),
            (Device::Cpu, 2 * s),
        ])
        .unwrap();
        let req = PlanRequest::new(&m, &budgets);
        let plan = match auto.plan(&req) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{name} ({percent}%): {e}"));
                continue;
            }
        };
        let solve = plan.solve.clone().unwrap();
        let used = devmap_core::cost::main_gpu_of(plan.map.entries().iter().map(|(_, d)| *d));
        if used != solve.main_gpu {
            failures.push(format!(
                "{name}: map's main {used:?} != {:?}",
                solve.main_gpu
            ));
        }
        gpu0_empty += usize::from(used == Some(1));
        let report = validate(&m, &plan.map, Some(&budgets), plan.size_rules);
        if !report.is_valid() {
            failures.push(format!("{name}: invalid map {:?}", report.problems));
        }
        let cm = CostModel::new(
            &m,
            &budgets.devices(),
            Topology::default(),
            Default::default(),
        );
        let est = cm
            .evaluate(&m, &plan.map, plan.size_rules)
            .objective_seconds;
        if (est - solve.objective_seconds).abs() > 1e-9 * est {
            failures.push(format!(
                "{name}: estimate {est} != {}",
                solve.objective_seconds
            ));
        }
        let optimal = solve.gap <= AutoOptions::default().mip_rel_gap * (1.0 + 1e-6);
        if !bound_holds(solve.bound_seconds, solve.objective_seconds)
            || optimal != (solve.status() == "optimal")
        {
            failures.push(format!(
                "{name}: bound {} gap {} status {}",
                solve.bound_seconds,
                solve.gap,
                solve.status()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Measured (this test, 2 s limit): GPU 0 left empty in 19 of 42 cases.
    eprintln!(
        "GPU 0 left empty in {gpu0_empty} of {} cases",
        2 * names.len()
    );
    assert!(
        gpu0_empty > 0,
        "no case left GPU 0 empty: the test no longer covers it"
    );
}

/// A 0-byte GPU holds nothing, so it is never the main device: not in the cost model (which
/// took the first GPU of the budgets), not in the plan.
#[test]
fn a_zero_byte_gpu_is_never_the_main_device() {
    let m = model("llama-2-7b");
    let budgets = MemoryBudgets::parse("0=0,1=8GiB,cpu=64GiB").unwrap();
    assert_eq!(main_candidates(&budgets), vec![Some(1), None]);
    let plan = Auto::default()
        .plan(&PlanRequest::new(&m, &budgets))
        .unwrap();
    let solve = plan.solve.clone().unwrap();
    assert_eq!(solve.main_gpu, Some(1));
    assert!(plan.bytes_on(Device::Gpu(0)) == 0 && plan.bytes_on(Device::Cpu) > 0);
    // The core estimate of the map, from a cost model built on every budgeted device (GPU 0
    // included), runs the streamed units on GPU 1 as accelerate does.
    let cm = CostModel::new(
        &m,
        &budgets.devices(),
        Topology::default(),
        Default::default(),
    );
    let est = cm.evaluate(&m, &plan.map, plan.size_rules);
    assert!(
        (est.objective_seconds - solve.objective_seconds).abs() <= 1e-9 * est.objective_seconds
    );
    assert_eq!(
        est.device_changes, 0,
        "cpu units execute on GPU 1, next to GPU 1's units"
    );
}

/// The DP's GPU part may end on either GPU at the same cost; the way back to the main GPU (for
/// the streamed suffix) decides which. It was chosen before that cost was added.
#[test]
fn the_dp_adds_the_way_back_to_the_main_gpu_before_choosing() {
    let mib = 1u64 << 20;
    // Four 10 MiB blocks, a 30 MiB head: GPU 0 (main) 21 MiB, GPU 1 21 MiB, cpu for the rest.
    let mut b = ModelBuilder::new("chain").hidden_size(Some(4096));
    for (i, s) in [10u64, 10, 10, 10, 30].iter().enumerate() {
        b = b.module(format!("layers.{i}"), "Block").param(
            format!("layers.{i}.w"),
            DType::F16,
            &[s * mib / 2],
        );
    }
    let m = b.no_split_classes(vec!["Block".into()]).build().unwrap();
    let budgets = MemoryBudgets::parse("0=51MiB,1=21MiB,cpu=1GiB").unwrap();
    // GPU 1 is far from GPU 0 (a slow peer link), GPU 0's host link is fast.
    let mut topo = Topology::default();
    topo.peer_links.insert(
        "0-1".into(),
        Link {
            bandwidth: 1e9,
            latency: 1e-3,
        },
    );
    topo.gpus.insert(
        0,
        GpuProfile {
            name: "main".into(),
            memory_bandwidth: 2e12,
            host_link: Some(Link {
                bandwidth: 50e9,
                latency: 1e-6,
            }),
            // accelerate streams offloaded weights over the pageable link: make it the fast one.
            pageable_host_link: Some(Link {
                bandwidth: 50e9,
                latency: 1e-6,
            }),
        },
    );
    let auto = Auto::new(AutoOptions::default().topology(topo));
    let req = PlanRequest::new(&m, &budgets);
    let inst = auto.instance(&req).unwrap();
    let (a, cost) = dp::solve_contiguous(&inst).expect("a contiguous plan fits");
    // Enumerate every contiguous assignment: the DP must meet the best.
    let k = inst.devices.len();
    let mut best = f64::INFINITY;
    for code in 0..k.pow(inst.n() as u32) {
        let x: Vec<usize> = (0..inst.n()).map(|i| code / k.pow(i as u32) % k).collect();
        if x.windows(2).all(|w| w[0] <= w[1]) && inst.feasible(&x) {
            best = best.min(inst.evaluate(&x));
        }
    }
    assert!(
        (cost - best).abs() <= 1e-12 * best,
        "DP {cost} ({a:?}) vs best {best}"
    );
}

/// Without a GPU the host executes every unit: a disk unit's KV cache is on the cpu, not on the
/// disk row (memory.md, "Noticed, not fixed"). Llama-2-7B's cache is 2 × 32 heads × 128 × 2 bytes
/// = 16 KiB per token and layer: 16 MiB per layer at 1024 tokens, 512 MiB for the 32 layers.
#[test]
fn without_a_gpu_the_cpu_holds_the_kv_cache_of_disk_units() {
    let m = model("llama-2-7b");
    let kv = KvCacheSpec::parse("batch=1,seq=1024").unwrap();
    let auto = Auto::new(AutoOptions::default().kv_cache(Some(kv)));
    let budgets = MemoryBudgets::parse("cpu=4GiB,disk=64GiB").unwrap();
    let req = PlanRequest::new(&m, &budgets);
    let plan = auto.plan(&req).unwrap();
    let inst = auto.instance_for_main(&req, None).unwrap();
    let a = inst.from_map(&m, &plan.map).unwrap();
    let (cpu, disk) = (inst.cpu.unwrap(), inst.disk.unwrap());
    assert!(a.contains(&disk), "{:?}", plan.map);
    let usage = inst.usage(&a);
    assert_eq!(usage.kv[cpu], 32 << 24, "{usage:?}");
    assert_eq!(usage.kv[disk], 0);
    assert!(usage.total(cpu) <= inst.caps[cpu]);
    let layer = (0..inst.n()).find(|&i| inst.kv[i] > 0).unwrap();
    assert_eq!(inst.kv[layer], 1 << 24);
    assert_eq!(inst.unit_bytes_on(layer, disk), inst.mem[layer]);
    assert_eq!(inst.unit_bytes_on(layer, cpu), inst.mem[layer] + (1 << 24));
}
