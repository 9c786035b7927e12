use devmap_core::{load_model, MemoryBudgets};
use devmap_solver::{Auto, PlanRequest, Strategy};
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let t = std::time::Instant::now();
    let model = load_model(args[1].as_ref()).unwrap();
    eprintln!("load {:?}", t.elapsed());
    let budgets = MemoryBudgets::parse(&args[2]).unwrap();
    let req = PlanRequest::new(&model, &budgets);
    let plan = Auto::default().plan(&req).unwrap();
    eprintln!(
        "total {:?} {:?}",
        t.elapsed(),
        plan.solve.map(|s| (s.gap, s.start))
    );
}
