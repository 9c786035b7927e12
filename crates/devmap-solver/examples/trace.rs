//! Time `auto` on one model and budget set:
//! `cargo run --release --example trace -- MODEL SPEC`, where MODEL is a path or one of the
//! synthetic models `synthetic:dense80`, `synthetic:moe170k`, `synthetic:encdec`
//! (set DEVMAP_TRACE=1 for the phases). The time includes reading the model.
use devmap_core::{load_model, synthetic, DType, MemoryBudgets};
use devmap_solver::{Auto, PlanRequest, Strategy};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(model), Some(spec)) = (args.get(1), args.get(2)) else {
        eprintln!(
            "usage: trace MODEL|synthetic:dense80|synthetic:moe170k|synthetic:encdec MAX_MEMORY"
        );
        std::process::exit(2);
    };
    let t = std::time::Instant::now();
    let model = match model.as_str() {
        "synthetic:dense80" => synthetic::dense_80(),
        "synthetic:moe170k" => synthetic::moe_170k(),
        "synthetic:encdec" => synthetic::encoder_decoder(24, 24, 1024, 65536, 32128, DType::BF16),
        path => load_model(path.as_ref()).expect("model"),
    };
    let budgets = MemoryBudgets::parse(spec).expect("budgets");
    let plan = match Auto::default().plan(&PlanRequest::new(&model, &budgets)) {
        Ok(p) => p,
        Err(e) => {
            println!("{:.1} ms: {e}", t.elapsed().as_secs_f64() * 1e3);
            std::process::exit(1);
        }
    };
    let solve = plan.solve.expect("auto reports its solve");
    println!(
        "{:.1} ms total, objective {:.4} ms, bound {:.4} ms, gap {:.2e}, {}",
        t.elapsed().as_secs_f64() * 1e3,
        solve.objective_seconds * 1e3,
        solve.bound_seconds * 1e3,
        solve.gap,
        solve.status
    );
}
