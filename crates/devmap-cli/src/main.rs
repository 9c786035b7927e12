//! `devmap`: plan where every weight of a model lives, and check hand-written maps.
//!
//! The command-line interface over devmap-core (models, budgets, maps) and devmap-solver
//! (strategies), as a library whose one entry is [`run`]: the `devmap` binary (src/bin/devmap.rs)
//! and the Python package's `devmap` command (crates/devmap-py) both call it, so this crate stays
//! the only composer of the command.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use devmap_core::cost::{CostModel, KvCacheSpec, Objective, OffloadMemory, Topology};
use devmap_core::{
    load_model_from, DType, Device, DeviceMap, MemoryBudgets, Model, Registry, RegistrySource,
    Workload, WorkloadMemory,
};
use devmap_solver::{
    check_map, strategy_by_name, Auto, AutoOptions, Compat, Plan, PlanRequest, Strategy,
};

mod calibrate_cmd;
mod devices_cmd;
mod load_cmd;
mod offload_cmd;
mod quant_report;
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
    #[command(about = PLAN_ABOUT)]
    Plan(PlanArgs),
    #[command(about = CHECK_ABOUT)]
    Check(CheckArgs),
    #[command(about = COMPARE_ABOUT)]
    Compare(CompareArgs),
    #[command(about = OFFLOAD_ABOUT)]
    Offload(offload_cmd::OffloadArgs),
    #[command(about = DEVICES_ABOUT)]
    Devices(devices_cmd::DevicesArgs),
    #[command(about = LOAD_ABOUT)]
    Load(load_cmd::LoadArgs),
    #[command(about = CALIBRATE_ABOUT)]
    Calibrate(calibrate_cmd::CalibrateArgs),
}

const PLAN_ABOUT: &str = "Compute a device map for a model";
const CHECK_ABOUT: &str = "Validate a hand-written device map against a model and budgets";
const COMPARE_ABOUT: &str =
    "Run every strategy on one model and budget set and print them side by side";
const OFFLOAD_ABOUT: &str =
    "Write the tensors a plan maps to disk as an accelerate offload folder, or verify one";
const DEVICES_ABOUT: &str =
    "List the GPUs the CUDA driver sees, their links, and the default budgets";
const LOAD_ABOUT: &str =
    "Load a checkpoint onto the devices a plan names (GPUs, pinned RAM) and report GB/s";
const CALIBRATE_ABOUT: &str =
    "Measure this machine's copy rates and write a topology file for `plan --topology`";

/// [`Cli`]'s parser with each subcommand's arguments built only when that subcommand is the one
/// invoked (`Command::defer`): clap's derive builds all seven subcommands' arguments, which was
/// most of what a `plan` process spent before reading its model (docs/performance.md,
/// "Start-up"). A unit test holds its help, every subcommand's included, equal to the derive's.
fn command_line() -> clap::Command {
    use clap::Args;
    type AddArgs = fn(clap::Command) -> clap::Command;
    // The arguments' own doc comments set `about` too: the subcommand's is applied after them,
    // as the derive applies it.
    macro_rules! subcommand {
        ($name:literal, $args:ty, $about:expr) => {
            (
                $name,
                $about,
                (|command: clap::Command| <$args>::augment_args(command).about($about)) as AddArgs,
            )
        };
    }
    let subcommands: [(&str, &str, AddArgs); 7] = [
        subcommand!("plan", PlanArgs, PLAN_ABOUT),
        subcommand!("check", CheckArgs, CHECK_ABOUT),
        subcommand!("compare", CompareArgs, COMPARE_ABOUT),
        subcommand!("offload", offload_cmd::OffloadArgs, OFFLOAD_ABOUT),
        subcommand!("devices", devices_cmd::DevicesArgs, DEVICES_ABOUT),
        subcommand!("load", load_cmd::LoadArgs, LOAD_ABOUT),
        subcommand!("calibrate", calibrate_cmd::CalibrateArgs, CALIBRATE_ABOUT),
    ];
    let mut command = clap::Command::new("devmap")
        .version(env!("CARGO_PKG_VERSION"))
        .about(env!("CARGO_PKG_DESCRIPTION"))
        .subcommand_required(true)
        .arg_required_else_help(true);
    for (name, about, add_args) in subcommands {
        command = command.subcommand(clap::Command::new(name).about(about).defer(add_args));
    }
    command
}

/// Parse `args` as [`Cli`] through [`command_line`].
fn parse_cli(args: Vec<std::ffi::OsString>) -> Result<Cli, clap::Error> {
    use clap::FromArgMatches;
    let matches = command_line().try_get_matches_from(args)?;
    Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut command_line()))
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
    /// Architecture registry (devmap-arch-registry/1 JSON Lines) to rebuild checkpoints with,
    /// e.g. one generated for another transformers version; the embedded one otherwise.
    #[arg(long = "arch-registry", value_name = "FILE")]
    arch_registry: Option<PathBuf>,
    /// A quantization_config JSON (as `BitsAndBytesConfig(...).to_dict()` writes it): quantize on
    /// load; overrides config.json's `quantization_config`.
    #[arg(long = "quantization-config", value_name = "FILE")]
    quantization_config: Option<PathBuf>,
}

/// Options of the cost model and of the memory model (shared by `plan`, `compare`, `check`).
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
    /// The workload to make room for: `batch=B,prompt=P,new=N[,dtype=D]` (default
    /// `batch=1,prompt=2048,new=256`), or `none` for weights only. Its KV cache is charged where
    /// each layer runs, its activations and the allocator allowance on every device that executes.
    #[arg(long, value_name = "SPEC")]
    workload: Option<String>,
    /// Alias of `--workload batch=B,prompt=S,new=0`: `batch=1,seq=4096[,dtype=bf16]`.
    #[arg(long = "kv-cache", value_name = "SPEC", conflicts_with = "workload")]
    kv_cache: Option<String>,
    /// The runtime that will execute the map: `accelerate` copies offloaded weights from pageable
    /// RAM on every step (the GPU's pageable host link); `pinned` from page-locked RAM (its pinned
    /// host link), as after `devmap.pin_offloaded`. Default: the topology's
    /// `runtime.offload_memory`, which is accelerate's unless the file says otherwise.
    #[arg(long, value_enum, value_name = "RUNTIME")]
    runtime: Option<RuntimeArg>,
}

/// `--runtime`: where the executing runtime copies offloaded weights from.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum RuntimeArg {
    /// accelerate as it ships: pageable memory.
    Accelerate,
    /// Offloaded weights pinned in page-locked memory.
    Pinned,
}

impl CostArgs {
    /// `topology` with `--runtime` applied (the one place the flag takes effect).
    fn with_runtime(&self, mut topology: Topology) -> Topology {
        match self.runtime {
            Some(RuntimeArg::Accelerate) => {
                topology.runtime.offload_memory = OffloadMemory::Pageable
            }
            Some(RuntimeArg::Pinned) => topology.runtime.offload_memory = OffloadMemory::Pinned,
            None => {}
        }
        topology
    }
}

/// Options of `auto`'s search.
#[derive(clap::Args, Debug, Clone)]
struct SolveArgs {
    /// Fix a module or tensor to a device and let `auto` place the rest: `--pin lm_head=1`; repeatable.
    #[arg(long, value_name = "KEY=DEVICE")]
    pin: Vec<String>,
    /// Time limit for `auto`'s whole solve, seconds (the best plan found and its proven gap are returned).
    #[arg(long = "time-limit", default_value_t = 10.0)]
    time_limit: f64,
    /// Let `auto` split a streamed no-split block at module granularity between the main GPU and
    /// cpu/disk (`true`/`false`, default `true`; `false`: every no-split block is one unit;
    /// docs/strategies.md, "Split blocks").
    #[arg(long = "split-blocks", value_name = "BOOL", action = clap::ArgAction::Set,
          default_value_t = AutoOptions::default().split_blocks)]
    split_blocks: bool,
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
    #[command(flatten)]
    solve: SolveArgs,
    /// Reproduce a Hugging Face implementation exactly, including spilling to disk without a disk budget.
    #[arg(long, value_enum)]
    compat: Option<CompatArg>,
    /// Output: a readable table; `json`, accelerate's device-map dict (for `from_pretrained`,
    /// nothing else on stdout); `plan-json`, the map with its estimate, bound, status and memory.
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
    #[command(flatten)]
    cost: CostArgs,
    /// Output: a readable report, or one JSON object (`valid`, `fits`, `estimate_ms_per_token`,
    /// `problems`, `memory`).
    #[arg(long, value_enum, default_value = "table")]
    format: CheckFormat,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum CheckFormat {
    Table,
    Json,
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
    #[command(flatten)]
    solve: SolveArgs,
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
    PlanJson,
}

fn parse_dtype(text: &str) -> Result<DType, String> {
    DType::parse(text).map_err(|e| e.to_string())
}

/// Run the `devmap` command on `args` (the program name first, as `std::env::args_os` gives
/// them) and return its exit status. Help, `--version` and usage errors are printed as clap
/// prints them; stdout is flushed before returning (a host process such as Python does not flush
/// Rust's stdout at exit).
pub fn run<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    if is_version_request(&args) {
        print!("{}", version_line());
        let _ = std::io::stdout().flush();
        return 0;
    }
    let code = match parse_cli(args) {
        Ok(cli) => dispatch(cli.command),
        Err(e) => {
            let _ = e.print();
            return u8::try_from(e.exit_code()).unwrap_or(2);
        }
    };
    let _ = std::io::stdout().flush();
    status_number(code)
}

/// `devmap --version` or `devmap -V` and nothing else: answered without building clap's parser,
/// whose construction of every subcommand's arguments was most of what `--version` spent after
/// HiGHS' initialisers (docs/performance.md, "Start-up"). Any other form goes through clap.
fn is_version_request(args: &[std::ffi::OsString]) -> bool {
    matches!(args, [_, flag] if flag == "--version" || flag == "-V")
}

/// What clap prints for `--version` (`name version`; a unit test holds the two equal).
fn version_line() -> String {
    format!("devmap {}\n", env!("CARGO_PKG_VERSION"))
}

/// The number of an `ExitCode` (std has no accessor; the commands return 0, 1 or their own codes).
fn status_number(code: ExitCode) -> u8 {
    (0..=u8::MAX)
        .find(|n| ExitCode::from(*n) == code)
        .unwrap_or(1)
}

fn dispatch(command: Command) -> ExitCode {
    let result = match command {
        Command::Plan(args) => plan(args),
        Command::Check(args) => check(args),
        Command::Compare(args) => compare(args),
        Command::Offload(args) => offload_cmd::run(args),
        Command::Devices(args) => devices_cmd::run(args),
        Command::Load(args) => load_cmd::run(args),
        Command::Calibrate(args) => calibrate_cmd::run(args),
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
    let file_registry;
    let registry = match &args.arch_registry {
        Some(path) => {
            file_registry = Registry::read(path)
                .with_context(|| format!("reading --arch-registry {}", path.display()))?;
            RegistrySource::Opened(&file_registry)
        }
        None => RegistrySource::Embedded,
    };
    let loaded = load_model_from(&args.model, registry)
        .with_context(|| format!("reading model {}", args.model.display()))?;
    for note in &loaded.notes {
        eprintln!("note: {note}");
    }
    let mut model = loaded.model;
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
    let (mut auto_options, workload) =
        auto_options(&args.cost, Some(&args.solve), &model, args.model.dtype)?;
    if let (Some(t), None) = (discovered, &args.cost.topology) {
        auto_options.topology = args.cost.with_runtime(t);
    }
    let strategy: Box<dyn Strategy> = match (args.strategy.as_str(), compat) {
        ("auto", None) => Box::new(Auto::new(auto_options.clone())),
        // --compat reproduces Hugging Face, whose device_map="auto" is "balanced".
        ("auto", Some(_)) => strategy_by_name("balanced", compat)?,
        (name, _) => strategy_by_name(name, compat)?,
    };
    let request = PlanRequest::new(&model, &budgets).with_dtype(args.model.dtype);
    let plan: Plan = strategy.plan(&request)?;
    warn_uncovered(&model, &plan.map, compat.is_some());
    let mut out = std::io::stdout().lock();
    if args.format == Format::Json {
        serde_json::to_writer(&mut out, &plan.map.to_json())?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let scored = check_map(
        &model,
        &plan.map,
        Some(&budgets),
        &auto_options,
        args.model.dtype,
    )?;
    match args.format {
        Format::PlanJson => {
            let mut json = report::plan_json(&plan, &scored, &workload);
            json["quantization"] = quant_report::json(&model, &plan.map, plan.size_rules);
            serde_json::to_writer(&mut out, &json)?;
            writeln!(out)?;
        }
        _ => {
            let text = report::plan_table(&model, &plan, &budgets, compat, &scored, &workload);
            out.write_all(text.as_bytes())?;
            out.write_all(quant_report::table(&model, &plan.map, plan.size_rules).as_bytes())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Says on stderr which keys `map` gives no device that `from_pretrained` checks, and the fix.
/// Only a `--compat` map can: transformers' planner drops a split module's direct buffers
/// (mra's persistent `embeddings.position_ids` under `balanced_low_0`), and the compat map is
/// transformers' map, bug for bug, which transformers then refuses to load.
fn warn_uncovered(model: &Model, map: &DeviceMap, compat: bool) {
    let devices = devmap_core::validate::tensor_devices(model, map);
    let uncovered = devmap_core::validate::uncovered_tensors(model, &devices);
    if uncovered.is_empty() {
        return;
    }
    let additions: Vec<String> = uncovered
        .iter()
        .map(|&id| {
            let device = devmap_core::validate::neighbour_device(model, &devices, id)
                .map_or("\"cpu\"".to_string(), |d| d.to_json().to_string());
            format!("{:?}: {device}", model.tensor(id).name)
        })
        .collect();
    let why = if compat {
        "as transformers' own map for these budgets does: its planner drops a split module's \
         direct buffers, and --compat reproduces its map"
    } else {
        "a devmap bug: please report it"
    };
    eprintln!(
        "warning: this map gives no device to {} key(s) from_pretrained checks: {} ({why}), so \
         from_pretrained will refuse it (\"does not give any device for the following \
         parameters\"); add {} to the map, or plan with --strategy auto",
        uncovered.len(),
        uncovered
            .iter()
            .map(|&id| model.tensor(id).name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        additions.join(", ")
    );
}

/// The workload a command charges, and how it was chosen (for the reports).
pub struct WorkloadChoice {
    /// The workload (`None`: weights only).
    pub workload: Option<Workload>,
    /// Where it came from: `--workload`, `--kv-cache`, the default, or why there is none.
    pub origin: String,
}

/// The workload of `--workload` / `--kv-cache`, or the default one. `--dtype` is the dtype of KV
/// and activations unless the spec names one. An explicit workload needs config.json; the
/// default one is left out (and the reports say so) when the model has none.
fn choose_workload(args: &CostArgs, model: &Model, dtype: Option<DType>) -> Result<WorkloadChoice> {
    resolve_workload(
        args.workload.as_deref(),
        args.kv_cache.as_deref(),
        model,
        dtype,
    )
}

/// The workload a `--workload` spec (`batch=B,prompt=P,new=N[,dtype=D]` or `none`) or a
/// `--kv-cache` spec (`batch=B,seq=S[,dtype=D]`) stands for, or the default one when neither is
/// given: the one rule the CLI and the Python package (`devmap.plan(..., workload=...)`) share.
pub fn resolve_workload(
    workload: Option<&str>,
    kv_cache: Option<&str>,
    model: &Model,
    dtype: Option<DType>,
) -> Result<WorkloadChoice> {
    let (workload, origin) = match (workload, kv_cache) {
        (Some(w), _) if w.trim() == "none" => (None, "--workload none".to_string()),
        (Some(w), _) => (Some(Workload::parse(w)?), "--workload".to_string()),
        (None, Some(kv)) => (
            Some(Workload::from_kv_cache(&KvCacheSpec::parse(kv)?)),
            "--kv-cache".to_string(),
        ),
        (None, None) => {
            let w = Workload::default().or_dtype(dtype);
            return Ok(match WorkloadMemory::new(model, &w) {
                Ok(_) => WorkloadChoice {
                    workload: Some(w),
                    origin: "default; --workload to change".into(),
                },
                Err(e) => WorkloadChoice {
                    workload: None,
                    origin: format!("none: the default workload needs config.json ({e})"),
                },
            });
        }
    };
    let workload = workload.map(|w| w.or_dtype(dtype));
    if let Some(w) = &workload {
        WorkloadMemory::new(model, w)?; // fail early: config.json missing, sizes overflowing
    }
    Ok(WorkloadChoice { workload, origin })
}

fn auto_options(
    args: &CostArgs,
    solve: Option<&SolveArgs>,
    model: &Model,
    dtype: Option<DType>,
) -> Result<(AutoOptions, WorkloadChoice)> {
    let mut o = AutoOptions::default();
    if let Some(path) = &args.topology {
        o.topology = Topology::read(path)?;
    }
    o.topology = args.with_runtime(o.topology);
    o.objective = match args.objective {
        ObjectiveArg::Latency => Objective::Latency,
        ObjectiveArg::Throughput => Objective::Throughput,
    };
    if let Some(spec) = &args.reserve {
        for b in MemoryBudgets::parse(spec)?.iter() {
            o.reserve.push((b.device, b.bytes));
        }
    }
    let workload = choose_workload(args, model, dtype)?;
    o.workload = workload.workload;
    let Some(solve) = solve else {
        return Ok((o, workload));
    };
    for pin in &solve.pin {
        let Some((key, device)) = pin.rsplit_once('=') else {
            bail!("--pin {pin:?} is not KEY=DEVICE (for example lm_head=1)");
        };
        o.pins.push((key.to_string(), Device::parse(device)?));
    }
    if !(solve.time_limit.is_finite() && solve.time_limit > 0.0) {
        bail!(
            "--time-limit {} must be a positive number of seconds",
            solve.time_limit
        );
    }
    o.time_limit = Duration::from_secs_f64(solve.time_limit);
    o.split_blocks = solve.split_blocks;
    Ok((o, workload))
}

fn compare(args: CompareArgs) -> Result<ExitCode> {
    let model = read_model(&args.model)?;
    let (budgets, discovered) = read_budgets(args.max_memory.as_deref())?;
    let (mut options, _) = auto_options(&args.cost, Some(&args.solve), &model, args.model.dtype)?;
    if let (Some(t), None) = (discovered, &args.cost.topology) {
        options.topology = args.cost.with_runtime(t);
    }
    let request = PlanRequest::new(&model, &budgets).with_dtype(args.model.dtype);
    let cost_model = CostModel::new(
        &model,
        &budgets.devices(),
        options.topology.clone(),
        options.objective,
    )
    .with_workload(&model, options.workload.as_ref())?;
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
    let (options, workload) = auto_options(&args.cost, None, &model, args.model.dtype)?;
    let scored = check_map(&model, &map, budgets.as_ref(), &options, args.model.dtype)?;
    let passed = scored.valid() && scored.fits;
    let code = if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    if args.format == CheckFormat::Json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &report::check_json(&scored, &workload))?;
        writeln!(out)?;
        return Ok(code);
    }
    print!("{}", report::check_table(&scored, &workload));
    if passed {
        println!(
            "ok: {} covers all {} tensors and fits",
            args.map.display(),
            model.tensors().len()
        );
        return Ok(code);
    }
    let errors: Vec<String> = scored
        .problems()
        .into_iter()
        .filter(|p| !p.starts_with("warning: "))
        .collect();
    for e in &errors {
        eprintln!("error: {e}");
    }
    eprintln!(
        "{} is not a valid map for {} ({} problem(s))",
        args.map.display(),
        model.name,
        errors.len()
    );
    Ok(code)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every help text the derive's parser prints, top level and each subcommand, short and long.
    fn help_texts(mut command: clap::Command) -> Vec<String> {
        command.build();
        let mut texts = vec![
            command.render_help().to_string(),
            command.render_long_help().to_string(),
            command.render_usage().to_string(),
        ];
        for sub in command.get_subcommands_mut() {
            let name = sub.get_name().to_string();
            texts.push(format!("{name}: {}", sub.render_long_help()));
            texts.push(format!("{name}: {}", sub.render_help()));
            texts.push(format!("{name}: {}", sub.render_usage()));
        }
        texts
    }

    #[test]
    fn the_deferred_parser_prints_the_derives_help() {
        let derived = help_texts(Cli::command());
        let deferred = help_texts(command_line());
        assert_eq!(derived.len(), deferred.len());
        for (d, e) in derived.iter().zip(&deferred) {
            assert_eq!(d, e);
        }
        // Both parse the same command line to the same arguments.
        let args: Vec<std::ffi::OsString> = ["devmap", "plan", "m.json", "--max-memory", "0=1GiB"]
            .iter()
            .map(Into::into)
            .collect();
        let via_derive = format!("{:?}", Cli::try_parse_from(args.clone()).unwrap());
        assert_eq!(via_derive, format!("{:?}", parse_cli(args).unwrap()));
    }

    #[test]
    fn the_version_shortcut_prints_what_clap_prints() {
        assert_eq!(version_line(), Cli::command().render_version());
        let args = |a: &[&str]| {
            a.iter()
                .map(Into::into)
                .collect::<Vec<std::ffi::OsString>>()
        };
        assert!(is_version_request(&args(&["devmap", "--version"])));
        assert!(is_version_request(&args(&["/usr/bin/devmap", "-V"])));
        // Anything else is clap's: a subcommand's `--version`, an extra argument, a typo.
        assert!(!is_version_request(&args(&["devmap", "plan", "--version"])));
        assert!(!is_version_request(&args(&["devmap", "--version", "x"])));
        assert!(!is_version_request(&args(&["devmap", "--versio"])));
        assert!(!is_version_request(&args(&["devmap"])));
    }
}
