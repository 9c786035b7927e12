//! Property tests on random chains: the MIP restricted to contiguous runs equals the exact DP,
//! the unrestricted MIP is never worse than the DP, and every plan respects the memory rules.

use devmap_core::{DType, MemoryBudgets, ModelBuilder};
use devmap_solver::mip::{self, MipOptions};
use devmap_solver::{dp, Auto, PlanRequest, Strategy};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

fn chain(sizes_mib: &[u64]) -> devmap_core::Model {
    let mut b = ModelBuilder::new("chain").hidden_size(Some(1024));
    for (i, s) in sizes_mib.iter().enumerate() {
        // F16 elements: bytes / 2.
        b = b.module(format!("layers.{i}"), "Block").param(
            format!("layers.{i}.weight"),
            DType::F16,
            &[*s * MIB / 2],
        );
    }
    b.no_split_classes(vec!["Block".into()]).build().unwrap()
}

fn budgets(gpus_mib: &[u64], cpu_mib: Option<u64>) -> MemoryBudgets {
    // Capacities end in half a MiB so no subset of whole-MiB units sits within the MIP's safety margin.
    let mut pairs: Vec<(devmap_core::Device, u64)> = gpus_mib
        .iter()
        .enumerate()
        .map(|(i, c)| (devmap_core::Device::Gpu(i as u32), c * MIB + MIB / 2))
        .collect();
    if let Some(c) = cpu_mib {
        pairs.push((devmap_core::Device::Cpu, c * MIB + MIB / 2));
    }
    MemoryBudgets::new(pairs).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn contiguous_mip_equals_dp(
        sizes in prop::collection::vec(1u64..64, 2..12),
        gpus in prop::collection::vec(16u64..160, 1..4),
        cpu in prop::option::of(64u64..1024),
    ) {
        let model = chain(&sizes);
        let budgets = budgets(&gpus, cpu);
        let req = PlanRequest::new(&model, &budgets);
        let inst = Auto::default().instance(&req).unwrap();
        let exact = MipOptions { mip_rel_gap: 1e-9, contiguous: true, ..MipOptions::default() };
        let dp = dp::solve_contiguous(&inst);
        let mip_c = mip::solve(&inst, None, exact).unwrap();
        match (&dp, &mip_c.assignment) {
            (None, None) => {}
            (Some((a, cost)), Some(b)) => {
                prop_assert!(inst.feasible(a));
                prop_assert!(inst.feasible(b));
                prop_assert!(a.windows(2).all(|w| w[0] <= w[1]), "DP result not contiguous: {a:?}");
                let rel = (mip_c.objective_seconds - cost).abs() / cost.max(1e-12);
                prop_assert!(rel < 1e-7, "contiguous MIP {} vs DP {} ({b:?} vs {a:?})", mip_c.objective_seconds, cost);
            }
            (d, m) => prop_assert!(false, "DP {:?} vs MIP {:?}", d, m),
        }
        let general = mip::solve(&inst, None, MipOptions { mip_rel_gap: 1e-9, ..MipOptions::default() }).unwrap();
        if let Some((_, cost)) = &dp {
            let g = general.assignment.as_ref().expect("a contiguous solution exists, so a general one does");
            prop_assert!(inst.feasible(g));
            prop_assert!(general.objective_seconds <= cost * (1.0 + 1e-9));
        }
    }

    #[test]
    fn auto_plans_respect_budgets(
        sizes in prop::collection::vec(1u64..64, 2..16),
        gpus in prop::collection::vec(8u64..200, 1..4),
        cpu in prop::option::of(64u64..2048),
    ) {
        let model = chain(&sizes);
        let budgets = budgets(&gpus, cpu);
        let req = PlanRequest::new(&model, &budgets);
        match Auto::default().plan(&req) {
            Ok(plan) => {
                let report = devmap_core::validate(&model, &plan.map, Some(&budgets), plan.size_rules);
                prop_assert!(report.is_valid(), "{:?}", report.problems);
                let solve = plan.solve.unwrap();
                prop_assert!(solve.gap <= 1e-3, "gap {}", solve.gap);
                prop_assert!(solve.bound_seconds <= solve.objective_seconds * (1.0 + 1e-12));
            }
            Err(e) => {
                // Only when the units cannot fit: then even the DP and the MIP find nothing.
                let inst = Auto::default().instance(&req).unwrap();
                prop_assert!(dp::solve_contiguous(&inst).is_none(), "auto failed ({e}) but the DP fits");
            }
        }
    }
}
