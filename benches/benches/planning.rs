//! Criterion benches of devmap's planning.
//!
//! - `plan/{model}/{scenario}/{strategy}` for the 7 fixture models with Hugging Face references × the 8
//!   scenarios: `sequential` and `balanced` (transformers path, spilling to disk like Hugging Face),
//!   `auto` (default options), and `job` (reading the manifest with `load_model`, then `auto`).
//! - `synthetic/{model}/{budgets}/{strategy}`: an 80-layer dense model, the 170k-tensor MoE
//!   (`balanced` and `auto`; `auto` must return a plan with its gap) and a T5-shaped encoder-decoder.
//!
//! Short measurement times (10 samples, 1 s, 200 ms warm-up) keep the whole run to a few minutes on two
//! cores. Filter as usual: `cargo bench -p devmap-benches -- plan/llama-2-7b`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use devmap_benches::{hf, load_fixture, model_path, reference_models, scenarios};
use devmap_core::{load_model, synthetic, DType, MemoryBudgets, Model};
use devmap_solver::{Auto, HfKind, PlanRequest, Strategy};

fn group_settings(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    g.sample_size(10)
        .measurement_time(Duration::from_secs(1))
        .warm_up_time(Duration::from_millis(200));
}

fn fixtures(c: &mut Criterion) {
    let scenarios = scenarios().expect("fixtures/scenarios.json is readable");
    let stems = reference_models().expect("fixtures/reference is readable");
    for stem in stems {
        let model = load_fixture(&stem).expect("fixture model loads");
        let path = model_path(&stem);
        for sc in &scenarios {
            let mut g = c.benchmark_group(format!("plan/{stem}/{}", sc.name));
            group_settings(&mut g);
            let req = PlanRequest::new(&model, &sc.budgets);
            g.bench_function("sequential", |b| {
                b.iter(|| hf(HfKind::Sequential).plan(black_box(&req)))
            });
            g.bench_function("balanced", |b| {
                b.iter(|| hf(HfKind::Balanced).plan(black_box(&req)))
            });
            g.bench_function("auto", |b| b.iter(|| Auto::default().plan(black_box(&req))));
            g.bench_function("job", |b| {
                b.iter(|| {
                    let m = load_model(black_box(&path)).expect("fixture model loads");
                    Auto::default()
                        .plan(&PlanRequest::new(&m, &sc.budgets))
                        .is_ok()
                })
            });
            g.finish();
        }
    }
}

fn synthetic_models(c: &mut Criterion) {
    let cases: Vec<(&str, Model, MemoryBudgets, bool)> = vec![
        (
            "dense-80",
            synthetic::dense_80(),
            synthetic::gpu_budgets(4, 80, None),
            true,
        ),
        (
            "moe-170k",
            synthetic::moe_170k(),
            synthetic::gpu_budgets(2, 80, Some(128)),
            false,
        ),
        (
            "encoder-decoder-24+24",
            synthetic::encoder_decoder(24, 24, 1024, 65_536, 32_128, DType::BF16),
            synthetic::gpu_budgets(2, 24, Some(64)),
            true,
        ),
    ];
    for (name, model, budgets, with_sequential) in &cases {
        let req = PlanRequest::new(model, budgets);
        // auto must plan these and report its gap; fail loudly rather than bench an error path.
        let plan = Auto::default()
            .plan(&req)
            .unwrap_or_else(|e| panic!("auto on {name}: {e}"));
        let solve = plan.solve.expect("auto reports how it solved");
        eprintln!(
            "synthetic/{name}: {} tensors, auto {:.3} ms/token, gap {:.3}%, {:?}",
            model.tensors().len(),
            solve.objective_seconds * 1e3,
            solve.gap * 100.0,
            plan.elapsed
        );
        let mut g = c.benchmark_group(format!("synthetic/{name}/{}", budgets_label(budgets)));
        group_settings(&mut g);
        if *with_sequential {
            g.bench_function("sequential", |b| {
                b.iter(|| hf(HfKind::Sequential).plan(black_box(&req)))
            });
        }
        g.bench_function("balanced", |b| {
            b.iter(|| hf(HfKind::Balanced).plan(black_box(&req)))
        });
        g.bench_function("auto", |b| b.iter(|| Auto::default().plan(black_box(&req))));
        g.finish();
    }
    let mut g = c.benchmark_group("synthetic/build");
    group_settings(&mut g);
    g.bench_function("moe-170k", |b| b.iter(synthetic::moe_170k));
    g.finish();
}

fn budgets_label(b: &MemoryBudgets) -> String {
    b.iter()
        .map(|x| format!("{}={}G", x.device, x.bytes >> 30))
        .collect::<Vec<_>>()
        .join(",")
}

criterion_group!(benches, fixtures, synthetic_models);
criterion_main!(benches);
