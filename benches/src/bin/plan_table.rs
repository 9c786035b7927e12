//! Prints markdown tables of devmap's planning times and `auto`'s plan quality, for the docs
//! (docs/performance.md, docs/strategies.md). Not a criterion bench: medians of a few runs each.
//!
//! ```text
//! cargo run --release -p devmap-benches --bin plan_table -- [--runs N] [--auto-runs N] [--model STEM]... [--no-fixtures] [--no-synthetic]
//! ```
//!
//! For every fixture model with a Hugging Face reference × every scenario: devmap's `sequential` and
//! `balanced` (transformers path, spilling to disk like Hugging Face) and `auto` (default options)
//! planning times, the whole job (manifest read + plan), Hugging Face's `time_s_median` for the same
//! case and the ratio; then, for `auto`, the estimated ms/token, the gap, and the best of Hugging Face's
//! three maps under the same cost model, with the bytes each leaves on cpu + disk. Then the synthetic
//! models (an 80-layer dense, the 170k-tensor MoE, an encoder-decoder).

use std::time::Duration;

use anyhow::{bail, Result};
use devmap_benches::{
    hf, load_fixture, model_path, reference_models, reference_runs, reference_time, scenarios,
    time_median,
};
use devmap_core::cost::CostModel;
use devmap_core::{load_model, synthetic, DType, Device, MemoryBudgets, Model};
use devmap_solver::{Auto, Error as SolverError, HfKind, Plan, PlanRequest, Strategy};

type AutoResult = std::result::Result<Plan, SolverError>;

const GIB: f64 = (1u64 << 30) as f64;

struct Args {
    runs: usize,
    auto_runs: usize,
    models: Vec<String>,
    fixtures: bool,
    synthetic: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        runs: 11,
        auto_runs: 5,
        models: Vec::new(),
        fixtures: true,
        synthetic: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))
        };
        match arg.as_str() {
            "--runs" => a.runs = value("--runs")?.parse()?,
            "--auto-runs" => a.auto_runs = value("--auto-runs")?.parse()?,
            "--model" => a.models.push(value("--model")?),
            "--no-fixtures" => a.fixtures = false,
            "--no-synthetic" => a.synthetic = false,
            "-h" | "--help" => {
                println!(
                    "plan_table [--runs N] [--auto-runs N] [--model STEM]... [--no-fixtures] [--no-synthetic]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(a)
}

/// Milliseconds with a precision that suits the magnitude.
fn ms(d: Duration) -> String {
    ms_f(d.as_secs_f64() * 1e3)
}

fn ms_f(v: f64) -> String {
    if v < 0.1 {
        format!("{v:.3}")
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

fn ratio(hf_s: Option<f64>, ours: Duration) -> String {
    match hf_s {
        Some(h) if ours > Duration::ZERO => format!("{:.0}×", h / ours.as_secs_f64()),
        _ => "–".into(),
    }
}

fn offloaded(plan: &Plan) -> u64 {
    plan.bytes_on(Device::Cpu) + plan.bytes_on(Device::Disk)
}

fn gib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / GIB)
}

/// Hugging Face's best map (transformers path) under devmap's cost model: (strategy, seconds, offloaded
/// bytes). Maps that spill to a disk the budgets do not offer do not count.
fn hf_best(model: &Model, budgets: &MemoryBudgets) -> Option<(String, f64, u64)> {
    let cm = CostModel::new(
        model,
        &budgets.devices(),
        Default::default(),
        Default::default(),
    );
    let req = PlanRequest::new(model, budgets);
    let mut best: Option<(String, f64, u64)> = None;
    for kind in [HfKind::Sequential, HfKind::Balanced, HfKind::BalancedLow0] {
        let s = hf(kind);
        let Ok(plan) = s.plan(&req) else { continue };
        if plan.bytes_on(Device::Disk) > 0 && !budgets.contains(Device::Disk) {
            continue;
        }
        let est = cm
            .evaluate(model, &plan.map, plan.size_rules)
            .objective_seconds;
        if best.as_ref().is_none_or(|b| est < b.1) {
            best = Some((s.name(), est, offloaded(&plan)));
        }
    }
    best
}

/// `auto`'s result columns: ms/token, gap, offloaded GiB (or why it failed).
struct AutoCols {
    time: String,
    ms_token: String,
    gap: String,
    offload: String,
}

fn auto_cols(result: &AutoResult, time: Duration) -> AutoCols {
    match result {
        Ok(plan) => {
            let solve = plan.solve.as_ref();
            AutoCols {
                time: ms(time),
                ms_token: solve.map_or("–".into(), |s| {
                    format!("{:.3}", s.objective_seconds * 1e3)
                }),
                gap: solve.map_or("–".into(), |s| format!("{:.3}%", s.gap * 100.0)),
                offload: gib(offloaded(plan)),
            }
        }
        Err(e) => {
            let short = match e {
                SolverError::DoesNotFit { .. } => "does not fit".to_string(),
                SolverError::Infeasible(_) => "infeasible".to_string(),
                other => format!("failed: {other}"),
            };
            AutoCols {
                time: ms(time),
                ms_token: short,
                gap: "–".into(),
                offload: "–".into(),
            }
        }
    }
}

fn hf_cols(best: &Option<(String, f64, u64)>) -> (String, String) {
    match best {
        Some((name, s, off)) => (format!("{:.3} ({name})", s * 1e3), gib(*off)),
        None => ("spills to disk".into(), "–".into()),
    }
}

fn speedup(auto: &AutoResult, best: &Option<(String, f64, u64)>) -> String {
    match (auto, best) {
        (Ok(plan), Some((_, h, _))) => match &plan.solve {
            Some(s) if s.objective_seconds > 0.0 => format!("{:.2}×", h / s.objective_seconds),
            _ => "–".into(),
        },
        _ => "–".into(),
    }
}

fn geomean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    (values.iter().map(|v| v.ln()).sum::<f64>() / values.len() as f64).exp()
}

fn fixtures(args: &Args) -> Result<()> {
    let scenarios = scenarios()?;
    let mut stems = reference_models()?;
    if !args.models.is_empty() {
        stems.retain(|s| args.models.contains(s));
    }
    let mut time_rows = Vec::new();
    let mut auto_rows = Vec::new();
    let (mut seq_ratios, mut bal_ratios, mut speedups) = (Vec::new(), Vec::new(), Vec::new());
    let (mut auto_times, mut auto_better, mut auto_cases) = (Vec::new(), 0usize, 0usize);
    for stem in &stems {
        let model = load_fixture(stem)?;
        let path = model_path(stem);
        let runs = reference_runs(stem)?;
        let (read, _) = time_median(args.runs, || load_model(&path));
        eprintln!(
            "{stem}: {} tensors, read {}",
            model.tensors().len(),
            ms(read)
        );
        for sc in &scenarios {
            let req = PlanRequest::new(&model, &sc.budgets);
            let (seq, _) = time_median(args.runs, || hf(HfKind::Sequential).plan(&req));
            let (bal, _) = time_median(args.runs, || hf(HfKind::Balanced).plan(&req));
            let (auto_t, auto) = time_median(args.auto_runs, || Auto::default().plan(&req));
            let (job_bal, _) = time_median(args.runs, || {
                load_model(&path).map(|m| {
                    hf(HfKind::Balanced)
                        .plan(&PlanRequest::new(&m, &sc.budgets))
                        .is_ok()
                })
            });
            let (job_auto, _) = time_median(args.auto_runs, || {
                load_model(&path).map(|m| {
                    Auto::default()
                        .plan(&PlanRequest::new(&m, &sc.budgets))
                        .is_ok()
                })
            });
            let hf_seq = reference_time(&runs, &sc.name, "sequential", "transformers");
            let hf_bal = reference_time(&runs, &sc.name, "balanced", "transformers");
            if let Some(h) = hf_seq {
                seq_ratios.push(h / seq.as_secs_f64());
            }
            if let Some(h) = hf_bal {
                bal_ratios.push(h / bal.as_secs_f64());
            }
            time_rows.push(format!(
                "| {stem} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                sc.name,
                ms(seq),
                hf_seq.map_or("–".into(), |h| ms_f(h * 1e3)),
                ratio(hf_seq, seq),
                ms(bal),
                hf_bal.map_or("–".into(), |h| ms_f(h * 1e3)),
                ratio(hf_bal, bal),
                ms(auto_t),
                ms(job_bal),
                ms(job_auto),
            ));
            let best = hf_best(&model, &sc.budgets);
            let cols = auto_cols(&auto, auto_t);
            let (hf_tok, hf_off) = hf_cols(&best);
            if let (Ok(plan), Some((_, h, _))) = (&auto, &best) {
                if let Some(s) = &plan.solve {
                    auto_cases += 1;
                    auto_times.push(auto_t.as_secs_f64());
                    if s.objective_seconds > 0.0 {
                        speedups.push(h / s.objective_seconds);
                    }
                    if s.objective_seconds < h * (1.0 - 1e-9) {
                        auto_better += 1;
                    }
                }
            }
            auto_rows.push(format!(
                "| {stem} | {} | {} | {} | {} | {hf_tok} | {} | {} | {hf_off} |",
                sc.name,
                cols.time,
                cols.ms_token,
                cols.gap,
                speedup(&auto, &best),
                cols.offload,
            ));
            eprintln!("  {}: done", sc.name);
        }
    }
    println!("### Planning time (ms; devmap: median of {} runs, release build; Hugging Face: `time_s_median`, transformers path)\n", args.runs);
    println!("| model | scenario | sequential | HF sequential | × | balanced | HF balanced | × | auto | read + balanced | read + auto |");
    println!("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in &time_rows {
        println!("{r}");
    }
    println!();
    println!(
        "Geometric mean of HF time / devmap time: sequential {:.0}×, balanced {:.0}× ({} and {} cases).\n",
        geomean(&seq_ratios),
        geomean(&bal_ratios),
        seq_ratios.len(),
        bal_ratios.len()
    );
    println!("### `auto` vs Hugging Face's best map under devmap's cost model (auto: median of {} runs)\n", args.auto_runs);
    println!("| model | scenario | auto ms | auto ms/token | gap | HF best ms/token | speed-up | offload auto GiB | offload HF GiB |");
    println!("|---|---|--:|--:|--:|--:|--:|--:|--:|");
    for r in &auto_rows {
        println!("{r}");
    }
    println!();
    auto_times.sort_by(f64::total_cmp);
    println!(
        "`auto` planned {auto_cases} cases where Hugging Face also fits; strictly faster than Hugging Face's best in {auto_better}; \
         geometric-mean speed-up {:.3}×; planning time median {} ms, max {} ms.\n",
        geomean(&speedups),
        auto_times
            .get(auto_times.len() / 2)
            .map_or("–".into(), |t| ms_f(t * 1e3)),
        auto_times.last().map_or("–".into(), |t| ms_f(t * 1e3)),
    );
    Ok(())
}

fn synthetic_rows(args: &Args) {
    type Gen = fn() -> Model;
    type Budgets = Vec<(&'static str, MemoryBudgets)>;
    let cases: Vec<(&str, Gen, Budgets)> = vec![
        (
            "dense 80 layers (8192/28672, BF16)",
            synthetic::dense_80,
            vec![
                ("4x80G", synthetic::gpu_budgets(4, 80, None)),
                ("2x80G+cpu128", synthetic::gpu_budgets(2, 80, Some(128))),
                (
                    "hetero80+24+16+16+cpu128",
                    synthetic::hetero(&[80, 24, 16, 16], Some(128), None),
                ),
            ],
        ),
        (
            "MoE 48 × 1180 experts",
            synthetic::moe_170k,
            vec![
                ("4x80G", synthetic::gpu_budgets(4, 80, None)),
                ("2x80G+cpu128", synthetic::gpu_budgets(2, 80, Some(128))),
                ("8x24G+cpu64", synthetic::gpu_budgets(8, 24, Some(64))),
            ],
        ),
        (
            "encoder-decoder 24+24 (1024/65536, BF16)",
            || synthetic::encoder_decoder(24, 24, 1024, 65_536, 32_128, DType::BF16),
            vec![
                ("1x24G+cpu64", synthetic::gpu_budgets(1, 24, Some(64))),
                ("1x8G+cpu64", synthetic::gpu_budgets(1, 8, Some(64))),
                ("2x8G+cpu64", synthetic::gpu_budgets(2, 8, Some(64))),
            ],
        ),
    ];
    let runs = args.runs.min(5);
    let auto_runs = args.auto_runs.min(3);
    println!(
        "### Synthetic models (ms; median of {runs} runs, auto {auto_runs}, build {})\n",
        runs.min(3)
    );
    println!("| model | tensors | GiB | budgets | build | sequential | balanced | auto | auto ms/token | gap | HF best ms/token | offload auto GiB | offload HF GiB |");
    println!("|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for (label, make, budgets) in cases {
        // Median of a few builds: the first allocation after freeing a large model is slow.
        let (build, model) = time_median(runs.min(3), make);
        let total = model.total_bytes(Default::default());
        eprintln!(
            "{label}: {} tensors, built in {}",
            model.tensors().len(),
            ms(build)
        );
        for (bname, b) in budgets {
            let req = PlanRequest::new(&model, &b);
            let (seq, _) = time_median(runs, || hf(HfKind::Sequential).plan(&req));
            let (bal, _) = time_median(runs, || hf(HfKind::Balanced).plan(&req));
            let (auto_t, auto) = time_median(auto_runs, || Auto::default().plan(&req));
            if let Err(e) = &auto {
                eprintln!("  {bname}: auto failed: {e}");
            }
            let cols = auto_cols(&auto, auto_t);
            let best = hf_best(&model, &b);
            let (hf_tok, hf_off) = hf_cols(&best);
            println!(
                "| {label} | {} | {} | {bname} | {} | {} | {} | {} | {} | {} | {hf_tok} | {} | {hf_off} |",
                model.tensors().len(),
                gib(total),
                ms(build),
                ms(seq),
                ms(bal),
                cols.time,
                cols.ms_token,
                cols.gap,
                cols.offload,
            );
        }
    }
    println!();
}

fn main() -> Result<()> {
    let args = args()?;
    if args.fixtures {
        fixtures(&args)?;
    }
    if args.synthetic {
        synthetic_rows(&args);
    }
    Ok(())
}
