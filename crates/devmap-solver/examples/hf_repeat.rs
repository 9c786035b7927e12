//! Run a Hugging Face strategy many times on one model, for profiling (callgrind, perf):
//! `cargo run --release --example hf_repeat -- MODEL SPEC sequential|balanced N`.
use devmap_core::{load_model, MemoryBudgets};
use devmap_solver::{strategy_by_name, Compat, PlanRequest};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: hf_repeat MODEL MAX_MEMORY STRATEGY N");
        std::process::exit(2);
    }
    let model = load_model(args[1].as_ref()).expect("model");
    let budgets = MemoryBudgets::parse(&args[2]).expect("budgets");
    let strategy = strategy_by_name(&args[3], Some(Compat::Transformers)).expect("strategy");
    let n: usize = args[4].parse().expect("N");
    let t = std::time::Instant::now();
    let mut keys = 0;
    for _ in 0..n {
        keys += strategy
            .plan(&PlanRequest::new(&model, &budgets))
            .expect("plan")
            .map
            .len();
    }
    println!(
        "{:.1} µs per plan ({keys} keys)",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
}
