//! The three operations (plan, check, compare) over a [`Request`], returning plain JSON values.
//! Pure Rust, no Python: lib.rs only moves strings across.

use std::collections::BTreeMap;

use devmap_core::cost::CostModel;
use devmap_core::{validate, DType, Device, Estimate, MemoryBudgets, Model, SizeRules};
use devmap_solver::{
    strategy_by_name, Auto, AutoOptions, Compat, Plan, PlanRequest, SolveReport, Strategy,
};
use serde_json::{json, Value};

use crate::error::Result;
use crate::request::Request;

/// `(device, bytes)` pairs as a JSON list, so GPU indices stay integers on the Python side.
fn device_bytes<'a>(pairs: impl IntoIterator<Item = (&'a Device, &'a u64)>) -> Value {
    Value::Array(
        pairs
            .into_iter()
            .map(|(d, b)| json!([d.to_json(), b]))
            .collect(),
    )
}

fn budgets_json(budgets: &MemoryBudgets) -> Value {
    let pairs: BTreeMap<Device, u64> = budgets.iter().map(|b| (b.device, b.bytes)).collect();
    device_bytes(&pairs)
}

fn estimate_json(e: &Estimate) -> Value {
    json!({
        "objective_seconds": e.objective_seconds,
        "ms_per_token": e.objective_seconds * 1e3,
        "latency_seconds": e.latency_seconds,
        "busiest_seconds": e.busiest_seconds,
        "device_changes": e.device_changes,
        "streamed_bytes": e.streamed_bytes,
    })
}

fn solve_json(s: &SolveReport) -> Value {
    json!({
        "objective_seconds": s.objective_seconds,
        "bound_seconds": s.bound_seconds,
        "gap": s.gap,
        "status": s.status(),
        "detail": s.detail,
        "start": s.start,
        "units": s.units,
        "overhead": device_bytes(&s.overhead),
    })
}

fn plan_json(plan: &Plan, budgets: &MemoryBudgets, estimate: &Estimate) -> Value {
    json!({
        "strategy": plan.strategy,
        "device_map": plan.map.to_json(),
        "usage": device_bytes(&plan.usage),
        "budgets": budgets_json(budgets),
        "budgets_used": budgets_json(&plan.budgets_used),
        "offloaded_bytes": plan.bytes_on(Device::Cpu) + plan.bytes_on(Device::Disk),
        "estimate": estimate_json(estimate),
        "solve": plan.solve.as_ref().map(solve_json),
        "elapsed_s": plan.elapsed.as_secs_f64(),
    })
}

/// What plan and compare both start from: the model, target dtype, budgets, `auto`'s options and
/// the cost model that scores every map under them.
struct Setup {
    model: Model,
    dtype: Option<DType>,
    budgets: MemoryBudgets,
    options: AutoOptions,
    cost_model: CostModel,
}

impl Setup {
    fn of(req: &Request) -> Result<Setup> {
        let model = req.model()?;
        let dtype = req.dtype()?;
        let (budgets, discovered) = req.budgets()?;
        let options = req.auto_options(&model, discovered)?;
        let cost_model = CostModel::new(
            &model,
            &budgets.devices(),
            options.topology.clone(),
            options.objective,
        )
        .with_workload(&model, options.workload.as_ref())
        .map_err(devmap_solver::Error::from)?;
        Ok(Setup {
            model,
            dtype,
            budgets,
            options,
            cost_model,
        })
    }
}

/// `devmap plan`: the plan with its estimate, per-device usage and (for `auto`) bound and gap.
pub fn plan(req: &Request) -> Result<Value> {
    let Setup {
        model,
        dtype,
        budgets,
        options,
        cost_model,
    } = Setup::of(req)?;
    let strategy = req.strategy(options)?;
    let plan = strategy.plan(&PlanRequest::new(&model, &budgets).with_dtype(dtype))?;
    let estimate = cost_model.evaluate(&model, &plan.map, plan.size_rules);
    Ok(plan_json(&plan, &budgets, &estimate))
}

/// `devmap check`: usage per device, errors and warnings; a map with errors is data, not an error.
pub fn check(req: &Request) -> Result<Value> {
    let model = req.model()?;
    let rules = SizeRules {
        target_dtype: req.dtype()?,
        bool_as_bits: false,
    };
    let map = req.device_map()?;
    let budgets = req.given_budgets()?;
    let report = validate(&model, &map, budgets.as_ref(), rules);
    let messages = |errors: bool| -> Vec<String> {
        report
            .problems
            .iter()
            .filter(|p| p.is_error() == errors)
            .map(ToString::to_string)
            .collect()
    };
    Ok(json!({
        "valid": report.is_valid(),
        "usage": device_bytes(&report.usage),
        "budgets": budgets.as_ref().map(budgets_json),
        "errors": messages(true),
        "warnings": messages(false),
        "tensors": model.tensors().len(),
    }))
}

/// The strategies `devmap compare` runs, labelled as in its table.
fn compare_strategies(auto: Auto) -> Result<Vec<(String, Box<dyn Strategy>)>> {
    let mut out: Vec<(String, Box<dyn Strategy>)> = Vec::new();
    for (compat, path) in [
        (Compat::Transformers, "transformers"),
        (Compat::Accelerate, "accelerate"),
    ] {
        for name in ["sequential", "balanced", "balanced_low_0"] {
            out.push((
                format!("{name} ({path})"),
                strategy_by_name(name, Some(compat))?,
            ));
        }
    }
    out.push(("auto".to_string(), Box::new(auto)));
    Ok(out)
}

/// `devmap compare`: every strategy on one model and budget set; a strategy that fails is a row
/// with its error.
pub fn compare(req: &Request) -> Result<Value> {
    let Setup {
        model,
        dtype,
        budgets,
        options,
        cost_model,
    } = Setup::of(req)?;
    let request = PlanRequest::new(&model, &budgets).with_dtype(dtype);
    let rows = compare_strategies(Auto::new(options))?
        .into_iter()
        .map(|(label, strategy)| match strategy.plan(&request) {
            Ok(plan) => {
                let estimate = cost_model.evaluate(&model, &plan.map, plan.size_rules);
                let mut row = plan_json(&plan, &budgets, &estimate);
                row["label"] = json!(label);
                row["error"] = Value::Null;
                row
            }
            Err(e) => json!({"label": label, "error": e.to_string()}),
        })
        .collect();
    Ok(Value::Array(rows))
}
