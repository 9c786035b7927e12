//! `devmap`: plan where every weight of a model lives, and check hand-written maps.
//!
//! A thin binary over devmap-core (models, budgets, maps) and devmap-solver (strategies).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use devmap_core::cost::{CostModel, KvCacheSpec, Objective, Topology};
use devmap_core::{
    format_bytes, load_model, validate, DType, Device, DeviceMap, MemoryBudgets, Model, SizeRules,
};
use devmap_solver::{strategy_by_name, Auto, AutoOptions, Compat, Plan, PlanRequest, Strategy};

mod devices_cmd;
mod load_cmd;
mod offload_cmd;
mod report;

/// Plan where every weight of a neural network lives: GPUs, CPU RAM or disk.
#[derive(Parser, Debug)]
#[command(name = "devmap", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Compute a device map for a model.
    Plan(PlanArgs),
    /// Validate a hand-written device map against a model and budgets.
    Check(CheckArgs),
    /// Run every strategy on one model and budget set and print them side by side.
    Compare(CompareArgs),
    /// Write the tensors a plan maps to disk as an accelerate offload folder, or verify one.
    Offload(offload_cmd::OffloadArgs),
    /// List the GPUs the CUDA driver sees, their links, and the default budgets.
    Devices(devices_cmd::DevicesArgs),
    /// Load a checkpoint onto the devices a plan names (GPUs, pinned RAM) and report GB/s.
    Load(load_cmd::LoadArgs),
}

#[derive(clap::Args, Debug)]
struct ModelArgs {
    /// A .safetensors file, a checkpoint folder, a model.safetensors.index.json, or a devmap-manifest/1 JSON.
    model: PathBuf,
    /// Target dtype: floating tensors are counted at this size, never upcast (Hugging Face's rule).
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<DType>,
    /// Module class or name pattern (`model.layers.*`) that must stay on one device; repeatable.
    /// Replaces the model's own no-split classes (or, for safetensors, the inferred numbered blocks).
    #[arg(long = "no-split", value_name = "CLASS_OR_PATTERN")]
    no_split: Vec<String>,
    /// A quantization_config JSON (as `BitsAndBytesConfig(...).to_dict()` writes it): quantize on
    /// load; overrides config.json's `quantization_config`.
    #[arg(long = "quantization-config", value_name = "FILE")]
    quantization_config: Option<PathBuf>,
}

/// Options of the cost model and of `auto`.
#[derive(clap::Args, Debug, Clone)]
struct CostArgs {
    /// Device profiles and links (JSON, see docs/cost-model.md); defaults otherwise.
    #[arg(long, value_name = "FILE")]
    topology: Option<PathBuf>,
    /// What `auto` minimises: one decode step's latency, or the busiest device's time (pipelined serving).
    #[arg(long, value_enum, default_value = "latency")]
    objective: ObjectiveArg,
    /// Memory to keep free per device, `0=2GiB,cpu=8GiB` (accelerate's size syntax).
    #[arg(long, value_name = "SPEC")]
    reserve: Option<String>,
    /// KV cache to make room for, charged per decoder layer where it executes: `batch=1,seq=4096[,dtype=bf16]`.
    #[arg(long = "kv-cache", value_name = "SPEC")]
    kv_cache: Option<String>,
    /// Fix a module or tensor to a device and let `auto` place the rest: `--pin lm_head=1`; repeatable.
    #[arg(long, value_name = "KEY=DEVICE")]
    pin: Vec<String>,
    /// Time limit for `auto`'s whole solve, seconds (the best plan found and its proven gap are returned).
    #[arg(long = "time-limit", default_value_t = 10.0)]
    time_limit: f64,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum ObjectiveArg {
    Latency,
    Throughput,
}

#[derive(clap::Args, Debug)]
struct PlanArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Memory budgets in accelerate's syntax, `0=22GiB,1=22GiB,cpu=64GiB,disk=1TB`, or a JSON file of the same dict.
    #[arg(long = "max-memory", value_name = "SPEC")]
    max_memory: Option<String>,
    /// auto (optimal), sequential, balanced, balanced_low_0, single:N, cpu.
    #[arg(long, default_value = "auto")]
    strategy: String,
    #[command(flatten)]
    cost: CostArgs,
    /// Reproduce a Hugging Face implementation exactly, including spilling to disk without a disk budget.
    #[arg(long, value_enum)]
    compat: Option<CompatArg>,
    /// Output: a readable table, or accelerate's device-map dict as JSON (nothing else on stdout).
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The device map to check (JSON, as accelerate's dict).
    #[arg(long)]
    map: PathBuf,
    /// Budgets to check the map against.
    #[arg(long = "max-memory", value_name = "SPEC")]
    max_memory: Option<String>,
}

#[derive(clap::Args, Debug)]
struct CompareArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Memory budgets (as for `plan`).
    #[arg(long = "max-memory", value_name = "SPEC")]
    max_memory: Option<String>,
    #[command(flatten)]
    cost: CostArgs,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum CompatArg {
    Transformers,
    Accelerate,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

fn parse_dtype(text: &str) -> Result<DType, String> {
    DType::parse(text).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(args) => plan(args),
        Command::Check(args) => check(args),
        Command::Compare(args) => compare(args),
        Command::Offload(args) => offload_cmd::run(args),
        Command::Devices(args) => devices_cmd::run(args),
        Command::Load(args) => load_cmd::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read_model(args: &ModelArgs) -> Result<Model> {
    let mut model = load_model(&args.model)
        .with_context(|| format!("reading model {}", args.model.display()))?;
    if !args.no_split.is_empty() {
        model.set_no_split(&args.no_split)?;
    }
    if let Some(path) = &args.quantization_config {
        model.quantization = Some(devmap_core::Quantization {
            config: devmap_core::QuantConfig::read(path)?,
            pre_quantized: false,
        });
    }
    Ok(model)
}

/// Budgets from `--max-memory`, or discovered from the GPUs here (with their topology).
fn read_budgets(spec: Option<&str>) -> Result<(MemoryBudgets, Option<Topology>)> {
    match spec {
        Some(s) => Ok((MemoryBudgets::parse(s)?, None)),
        None => devices_cmd::discovered_budgets().map(|(b, t)| (b, Some(t))),
    }
}

fn plan(args: PlanArgs) -> Result<ExitCode> {
    let model = read_model(&args.model)?;
    let (budgets, discovered) = read_budgets(args.max_memory.as_deref())?;
    let compat = args.compat.map(|c| match c {
        CompatArg::Transformers => Compat::Transformers,
        CompatArg::Accelerate => Compat::Accelerate,
    });
    let mut auto_options = auto_options(&args.cost, &model)?;
    if let (Some(t), None) = (discovered, &args.cost.topology) {
        auto_options.topology = t;
    }
    if let (Some(q), "auto", None) = (&model.quantization, args.strategy.as_str(), compat) {
        // auto sizes every tensor at its dtype: a quantized model would get a wrong plan.
        anyhow::bail!(
            "--strategy auto does not plan quantized models yet (quant_method {:?}); use \
             --strategy balanced, balanced_low_0 or sequential with --compat transformers for \
             Hugging Face's quantized plan",
            q.config.method()
        );
    }
    let strategy: Box<dyn Strategy> = match (args.strategy.as_str(), compat) {
        ("auto", None) => Box::new(Auto::new(auto_options.clone())),
        // --compat reproduces Hugging Face, whose device_map="auto" is "balanced".
        ("auto", Some(_)) => strategy_by_name("balanced", compat)?,
        (name, _) => strategy_by_name(name, compat)?,
    };
    let request = PlanRequest::new(&model, &budgets).with_dtype(args.model.dtype);
    let plan: Plan = strategy.plan(&request)?;
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => {
            serde_json::to_writer(&mut out, &plan.map.to_json())?;
            writeln!(out)?;
        }
        Format::Table => {
            let cost_model = CostModel::new(
                &model,
                &budgets.devices(),
                auto_options.topology.clone(),
                auto_options.objective,
            );
            let estimate = cost_model.evaluate(&model, &plan.map, plan.size_rules);
            let text = report::plan_table(&model, &plan, &budgets, compat, &estimate);
            out.write_all(text.as_bytes())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn auto_options(args: &CostArgs, model: &Model) -> Result<AutoOptions> {
    let mut o = AutoOptions::default();
    if let Some(path) = &args.topology {
        o.topology = Topology::read(path)?;
    }
    o.objective = match args.objective {
        ObjectiveArg::Latency => Objective::Latency,
        ObjectiveArg::Throughput => Objective::Throughput,
    };
    if let Some(spec) = &args.reserve {
        for b in MemoryBudgets::parse(spec)?.iter() {
            o.reserve.push((b.device, b.bytes));
        }
    }
    if let Some(spec) = &args.kv_cache {
        let kv = KvCacheSpec::parse(spec)?;
        kv.bytes_per_layer(model)?; // fail early if config.json is missing
        o.kv_cache = Some(kv);
    }
    for pin in &args.pin {
        let Some((key, device)) = pin.rsplit_once('=') else {
            bail!("--pin {pin:?} is not KEY=DEVICE (for example lm_head=1)");
        };
        o.pins.push((key.to_string(), Device::parse(device)?));
    }
    if !(args.time_limit.is_finite() && args.time_limit > 0.0) {
        bail!(
            "--time-limit {} must be a positive number of seconds",
            args.time_limit
        );
    }
    o.time_limit = Duration::from_secs_f64(args.time_limit);
    Ok(o)
}

fn compare(args: CompareArgs) -> Result<ExitCode> {
    let model = read_model(&args.model)?;
    let (budgets, discovered) = read_budgets(args.max_memory.as_deref())?;
    let mut options = auto_options(&args.cost, &model)?;
    if let (Some(t), None) = (discovered, &args.cost.topology) {
        options.topology = t;
    }
    let request = PlanRequest::new(&model, &budgets).with_dtype(args.model.dtype);
    let cost_model = CostModel::new(
        &model,
        &budgets.devices(),
        options.topology.clone(),
        options.objective,
    );
    let mut rows = Vec::new();
    let mut strategies: Vec<(String, Box<dyn Strategy>)> = Vec::new();
    for compat in [Compat::Transformers, Compat::Accelerate] {
        for name in ["sequential", "balanced", "balanced_low_0"] {
            let label = format!(
                "{name} ({})",
                if compat == Compat::Transformers {
                    "transformers"
                } else {
                    "accelerate"
                }
            );
            strategies.push((label, strategy_by_name(name, Some(compat))?));
        }
    }
    strategies.push(("auto".to_string(), Box::new(Auto::new(options))));
    for (label, strategy) in strategies {
        let row = match strategy.plan(&request) {
            Ok(plan) => {
                let est = cost_model.evaluate(&model, &plan.map, plan.size_rules);
                report::CompareRow::from_plan(label, &plan, &budgets, &est)
            }
            Err(e) => report::CompareRow::failed(label, &e.to_string()),
        };
        rows.push(row);
    }
    print!("{}", report::compare_table(&model, &budgets, &rows));
    Ok(ExitCode::SUCCESS)
}

fn check(args: CheckArgs) -> Result<ExitCode> {
    let model = read_model(&args.model)?;
    let map = DeviceMap::read(&args.map)
        .with_context(|| format!("reading map {}", args.map.display()))?;
    let budgets = match args.max_memory.as_deref() {
        Some(s) => Some(MemoryBudgets::parse(s)?),
        None => None,
    };
    let rules = SizeRules {
        target_dtype: args.model.dtype,
        bool_as_bits: false,
    };
    let report = validate(&model, &map, budgets.as_ref(), rules);
    let mut out = std::io::stdout().lock();
    for (device, bytes) in &report.usage {
        let budget = budgets.as_ref().and_then(|b| b.get(*device));
        match budget {
            Some(b) => writeln!(
                out,
                "{device:>6}: {} of {}",
                format_bytes(*bytes),
                format_bytes(b)
            )?,
            None => writeln!(out, "{device:>6}: {}", format_bytes(*bytes))?,
        }
    }
    for p in report.problems.iter().filter(|p| !p.is_error()) {
        writeln!(out, "warning: {p}")?;
    }
    if report.is_valid() {
        writeln!(
            out,
            "ok: {} covers all {} tensors",
            args.map.display(),
            model.tensors().len()
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    drop(out);
    let errors: Vec<String> = report.errors().map(|p| p.to_string()).collect();
    for e in &errors {
        eprintln!("error: {e}");
    }
    eprintln!(
        "{} is not a valid map for {} ({} problem(s))",
        args.map.display(),
        model.name,
        errors.len()
    );
    Ok(ExitCode::FAILURE)
}
