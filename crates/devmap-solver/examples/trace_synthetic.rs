//! Time `auto` on a synthetic model: `cargo run --release --example trace_synthetic -- dense80|moe170k|encdec SPEC`
//! (set DEVMAP_TRACE=1 for the phases).
use devmap_core::{synthetic, MemoryBudgets};
use devmap_solver::{Auto, PlanRequest, Strategy};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(which), Some(spec)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: trace_synthetic dense80|moe170k|encdec MAX_MEMORY");
        std::process::exit(2);
    };
    let model = match which.as_str() {
        "dense80" => synthetic::dense_80(),
        "moe170k" => synthetic::moe_170k(),
        _ => synthetic::encoder_decoder(24, 24, 1024, 65536, 32128, devmap_core::DType::BF16),
    };
    let budgets = MemoryBudgets::parse(spec).expect("budgets");
    let t = std::time::Instant::now();
    let plan = Auto::default()
        .plan(&PlanRequest::new(&model, &budgets))
        .expect("plan");
    let solve = plan.solve.expect("auto reports its solve");
    println!(
        "{:.1} ms, objective {:.4} ms, bound {:.4} ms, gap {:.2e}, {}",
        t.elapsed().as_secs_f64() * 1e3,
        solve.objective_seconds * 1e3,
        solve.bound_seconds * 1e3,
        solve.gap,
        solve.status
    );
}
