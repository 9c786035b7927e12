//! `devmap load MODEL --plan PLAN.json [--verify]`: put a checkpoint on the devices a plan names,
//! with a progress bar, then GB/s per device and overall.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::ValueEnum;
use devmap_core::{format_bytes, load_model, Device, DeviceMap};
use devmap_cuda::{load, LoadOptions, LoadStats, ReadMode, VerifyReport};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Arguments of `devmap load`.
#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// The checkpoint: a .safetensors file, a checkpoint folder or its index.
    model: PathBuf,
    /// The plan: accelerate's device-map dict, as `devmap plan --format json` prints it.
    #[arg(long, value_name = "PLAN.json")]
    plan: PathBuf,
    /// Copy every tensor back and compare its checksum (xxh3-64) with the file's bytes.
    #[arg(long)]
    verify: bool,
    /// Size of each pinned staging buffer, MiB (default: 2).
    #[arg(long = "staging-mib")]
    staging_mib: Option<usize>,
    /// Staging buffers per GPU, a ring (2 = double buffering; default: that GPU's copy threads + 8).
    #[arg(long = "staging-buffers")]
    staging_buffers: Option<usize>,
    /// Host threads filling the staging buffers, split between the GPUs by their bytes (default:
    /// one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// How to read the files: copy out of a memory map, or pread.
    #[arg(long, value_enum, default_value = "mmap")]
    read: ReadArg,
    /// Staging memory: cached (the GPU reads what the CPU just wrote from its cache) or
    /// write-combined (uncached; writes stream to DRAM).
    #[arg(long = "staging-memory", value_enum)]
    staging_memory: Option<StagingMemory>,
    /// Print the figures as JSON on stdout (no progress bar).
    #[arg(long)]
    json: bool,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum ReadArg {
    Mmap,
    Pread,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum StagingMemory {
    Cached,
    WriteCombined,
}

/// Run `devmap load`.
pub fn run(args: LoadArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let model = load_model(&args.model)
        .with_context(|| format!("reading model {}", args.model.display()))?;
    let plan = DeviceMap::read(&args.plan)
        .with_context(|| format!("reading plan {}", args.plan.display()))?;
    let total: u64 = model.tensors().iter().map(|t| t.stored_bytes()).sum();
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    };
    let progress = bar.clone();
    let mut options = LoadOptions {
        read: match args.read {
            ReadArg::Mmap => ReadMode::Mmap,
            ReadArg::Pread => ReadMode::Pread,
        },
        progress: Some(Arc::new(move |bytes| progress.inc(bytes))),
        ..LoadOptions::default()
    };
    if let Some(mib) = args.staging_mib {
        options.staging_bytes = mib << 20;
    }
    if let Some(m) = args.staging_memory {
        options.write_combined = m == StagingMemory::WriteCombined;
    }
    if let Some(t) = args.threads {
        options.copy_threads = t;
    }
    if let Some(b) = args.staging_buffers {
        options.staging_buffers = Some(b);
    }
    let loaded = load(&model, &plan, &options).with_context(|| {
        format!(
            "loading {} per {}",
            args.model.display(),
            args.plan.display()
        )
    })?;
    bar.finish_and_clear();
    let command_seconds = started.elapsed().as_secs_f64();
    let report = if args.verify {
        Some(loaded.verify()?)
    } else {
        None
    };
    let stats = loaded.stats();
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = serde_json::json!({
            "model": args.model,
            "plan": args.plan,
            "options": {
                "staging_bytes": options.staging_bytes,
                "staging_buffers": options.staging_buffers,
                "copy_threads": options.copy_threads,
                "read": options.read,
                "write_combined": options.write_combined,
            },
            "stats": stats,
            "copy_gib_per_s": stats.copy_gib_per_s(),
            "total_gib_per_s": stats.total_gib_per_s(),
            "command_seconds": command_seconds,
            "tensors": loaded.tensors().len(),
            "left_to_offload": loaded.left_to_offload().len(),
            "verify": report,
        });
        writeln!(out, "{}", serde_json::to_string(&v)?)?;
    } else {
        write_report(
            &mut out,
            stats,
            loaded.tensors().len(),
            loaded.left_to_offload().len(),
            command_seconds,
        )?;
        if let Some(r) = &report {
            write_verify(&mut out, r)?;
        }
    }
    match report {
        Some(r) if !r.mismatches.is_empty() => {
            drop(out);
            for m in &r.mismatches {
                eprintln!(
                    "error: {} on {}: loaded bytes hash to {:016x}, the file's to {:016x}",
                    m.tensor, m.device, m.found, m.expected
                );
            }
            Ok(ExitCode::FAILURE)
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

fn gb(bytes: u64, seconds: f64) -> String {
    if seconds <= 0.0 {
        return "-".into();
    }
    format!(
        "{:.2} GB/s ({:.2} GiB/s)",
        bytes as f64 / seconds / 1e9,
        bytes as f64 / seconds / (1u64 << 30) as f64
    )
}

fn write_report(
    out: &mut impl Write,
    stats: &LoadStats,
    tensors: usize,
    offloaded: usize,
    command_seconds: f64,
) -> Result<()> {
    writeln!(
        out,
        "loaded {tensors} tensors, {} in {:.3} s (setup {:.3} s: contexts and allocations; copies {:.3} s)",
        format_bytes(stats.bytes),
        stats.total_seconds,
        stats.setup_seconds,
        stats.copy_seconds
    )?;
    for d in &stats.devices {
        let name = match d.device {
            Device::Gpu(i) => format!("GPU {i}"),
            other => format!("{other} (pinned)"),
        };
        writeln!(
            out,
            "  {name:<14} {:>6} tensors  {:>11}  {:.3} s  {}",
            d.tensors,
            format_bytes(d.bytes),
            d.seconds,
            gb(d.bytes, d.seconds)
        )?;
    }
    writeln!(
        out,
        "  {:<14} {:>6} tensors  {:>11}  {:.3} s  {}",
        "overall",
        stats.devices.iter().map(|d| d.tensors).sum::<usize>(),
        format_bytes(stats.bytes),
        stats.copy_seconds,
        gb(stats.bytes, stats.copy_seconds)
    )?;
    writeln!(
        out,
        "  whole call {:.3} s: {}; command (headers read too) {:.3} s",
        stats.total_seconds,
        gb(stats.bytes, stats.total_seconds),
        command_seconds
    )?;
    if offloaded > 0 {
        writeln!(
            out,
            "left to the offload reader: {offloaded} tensors, {} (devmap offload writes their folder)",
            format_bytes(stats.offloaded_bytes)
        )?;
    }
    Ok(())
}

fn write_verify(out: &mut impl Write, r: &VerifyReport) -> Result<()> {
    if r.mismatches.is_empty() {
        writeln!(
            out,
            "verify: ok, {} tensors ({}) read back match the files (xxh3-64), {:.2} s",
            r.tensors,
            format_bytes(r.bytes),
            r.seconds
        )?;
    } else {
        writeln!(
            out,
            "verify: {} of {} tensors differ from the files",
            r.mismatches.len(),
            r.tensors
        )?;
    }
    Ok(())
}
