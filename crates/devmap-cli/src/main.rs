//! `devmap`: plan where every weight of a model lives, and check hand-written maps.
//!
//! A thin binary over devmap-core (models, budgets, maps) and devmap-solver (strategies).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use devmap_core::{
    format_bytes, load_model, validate, DType, Device, DeviceMap, MemoryBudgets, Model, SizeRules,
};
use devmap_solver::{strategy_by_name, Compat, Plan, PlanRequest};

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
}

#[derive(clap::Args, Debug)]
struct PlanArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Memory budgets in accelerate's syntax, `0=22GiB,1=22GiB,cpu=64GiB,disk=1TB`, or a JSON file of the same dict.
    #[arg(long = "max-memory", value_name = "SPEC")]
    max_memory: Option<String>,
    /// sequential, balanced, balanced_low_0, single:N, cpu.
    #[arg(long, default_value = "balanced")]
    strategy: String,
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
    Ok(model)
}

fn read_budgets(spec: Option<&str>) -> Result<MemoryBudgets> {
    match spec {
        Some(s) => Ok(MemoryBudgets::parse(s)?),
        None => bail!(
            "--max-memory is required: give budgets such as --max-memory 0=22GiB,1=22GiB,cpu=64GiB \
             (reading free GPU memory comes with devmap-cuda)"
        ),
    }
}

fn plan(args: PlanArgs) -> Result<ExitCode> {
    let model = read_model(&args.model)?;
    let budgets = read_budgets(args.max_memory.as_deref())?;
    let compat = args.compat.map(|c| match c {
        CompatArg::Transformers => Compat::Transformers,
        CompatArg::Accelerate => Compat::Accelerate,
    });
    let strategy = strategy_by_name(&args.strategy, compat)?;
    let request = PlanRequest::new(&model, &budgets).with_dtype(args.model.dtype);
    let plan: Plan = strategy.plan(&request)?;
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => {
            serde_json::to_writer(&mut out, &plan.map.to_json())?;
            writeln!(out)?;
        }
        Format::Table => {
            let text = report::plan_table(&model, &plan, &budgets, compat);
            out.write_all(text.as_bytes())?;
        }
    }
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
    let _ = Device::Cpu;
    Ok(ExitCode::FAILURE)
}
