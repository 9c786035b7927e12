//! `devmap offload`: write the disk part of a plan as an accelerate offload folder, or verify one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use devmap_core::{format_bytes, load_model, DeviceMap};
use devmap_offload::{disk_tensors, offload_tensors, Form, OffloadFolder, OffloadOptions};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `devmap offload`.
#[derive(clap::Args, Debug)]
pub struct OffloadArgs {
    /// The model the plan was made for: a .safetensors file, a checkpoint folder or its index.
    #[arg(required_unless_present = "verify", conflicts_with = "verify")]
    model: Option<PathBuf>,
    /// The plan: accelerate's device-map dict, as `devmap plan --format json` prints it.
    #[arg(
        long,
        value_name = "PLAN.json",
        required_unless_present = "verify",
        conflicts_with = "verify"
    )]
    plan: Option<PathBuf>,
    /// The offload folder (created if needed; an existing index.json is merged into).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "verify",
        conflicts_with = "verify"
    )]
    folder: Option<PathBuf>,
    /// Copy each disk tensor into DIR/{name}.dat instead of pointing into the safetensors files.
    #[arg(long, conflicts_with = "verify")]
    copy: bool,
    /// Do not fsync the files (faster; a power loss may lose what was written last).
    #[arg(long = "no-fsync", conflicts_with = "verify")]
    no_fsync: bool,
    /// Re-check every tensor of the offload folder DIR against its checksum instead of writing.
    #[arg(long, value_name = "DIR")]
    verify: Option<PathBuf>,
}

/// Run `devmap offload`.
pub fn run(args: OffloadArgs) -> Result<ExitCode> {
    match (&args.verify, &args.model, &args.plan, &args.folder) {
        (Some(dir), _, _, _) => verify(dir),
        (None, Some(model), Some(plan), Some(folder)) => write(&args, model, plan, folder),
        // clap enforces the combinations above.
        _ => anyhow::bail!("give MODEL --plan PLAN.json --folder DIR, or --verify DIR"),
    }
}

fn bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

fn gb_per_s(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    format!("{:.2} GB/s", bytes as f64 / 1e9 / secs)
}

fn write(args: &OffloadArgs, model_path: &Path, plan: &Path, folder: &Path) -> Result<ExitCode> {
    let model = load_model(model_path)
        .with_context(|| format!("reading model {}", model_path.display()))?;
    let map = DeviceMap::read(plan).with_context(|| format!("reading plan {}", plan.display()))?;
    let ids = disk_tensors(&model, &map).with_context(|| format!("plan {}", plan.display()))?;
    let options = OffloadOptions {
        form: if args.copy {
            Form::Copy
        } else {
            Form::Reference
        },
        fsync: !args.no_fsync,
        ..OffloadOptions::default()
    };
    let total: u64 = ids.iter().map(|&t| model.tensor(t).stored_bytes()).sum();
    let progress = bar(total);
    let start = Instant::now();
    let result = offload_tensors(&model, &ids, folder, &options, &|n| progress.inc(n));
    let elapsed = start.elapsed();
    progress.finish_and_clear();
    let report = result.with_context(|| format!("offloading into {}", folder.display()))?;

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: {} disk tensor(s), {}",
        folder.display(),
        report.tensors,
        format_bytes(report.bytes)
    )?;
    if args.copy {
        writeln!(
            out,
            "wrote {} .dat file(s), {} in {:.2} s: {}; {} already complete and verified",
            report.written,
            format_bytes(report.bytes_written),
            elapsed.as_secs_f64(),
            gb_per_s(report.bytes_written, elapsed),
            report.skipped
        )?;
    } else {
        writeln!(
            out,
            "referenced {} tensor(s) in their safetensors files (nothing copied); hashed {} in {:.2} s: {}",
            report.referenced,
            format_bytes(report.bytes),
            elapsed.as_secs_f64(),
            gb_per_s(report.bytes, elapsed)
        )?;
    }
    if report.stale_temp_files > 0 {
        writeln!(
            out,
            "removed {} temporary file(s) of an interrupted run",
            report.stale_temp_files
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(dir: &Path) -> Result<ExitCode> {
    let folder = OffloadFolder::open(dir)?;
    let total: u64 = folder
        .entries()
        .iter()
        .filter(|e| folder.checksums().get(&e.name).is_some())
        .map(|e| e.bytes())
        .sum();
    let progress = bar(total);
    let start = Instant::now();
    let result = folder.verify_with_progress(&|n| progress.inc(n));
    let elapsed = start.elapsed();
    progress.finish_and_clear();
    let report = result?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: {} of {} tensor(s) match their checksums ({} in {:.2} s: {})",
        dir.display(),
        report.verified,
        folder.len(),
        format_bytes(report.bytes),
        elapsed.as_secs_f64(),
        gb_per_s(report.bytes, elapsed)
    )?;
    if !report.unchecked.is_empty() {
        let shown: Vec<&str> = report
            .unchecked
            .iter()
            .take(10)
            .map(String::as_str)
            .collect();
        writeln!(
            out,
            "{} tensor(s) have no checksum (not written by devmap): {}{}",
            report.unchecked.len(),
            shown.join(", "),
            if report.unchecked.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        )?;
    }
    if report.is_ok() {
        return Ok(ExitCode::SUCCESS);
    }
    drop(out);
    for m in &report.mismatched {
        eprintln!(
            "error: tensor {:?}: {} bytes hash to {:016x}, the checksum recorded is {:016x} over {} bytes",
            m.tensor, m.actual.bytes, m.actual.xxh3, m.expected.xxh3, m.expected.bytes
        );
    }
    eprintln!(
        "{}: {} tensor(s) changed since they were offloaded",
        dir.display(),
        report.mismatched.len()
    );
    Ok(ExitCode::FAILURE)
}
