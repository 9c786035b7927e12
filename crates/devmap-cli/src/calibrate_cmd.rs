//! `devmap calibrate`: measure this machine's copy rates and write the topology `devmap plan
//! --topology FILE` reads.
//!
//! The file is the discovered topology (`devmap devices`) with every measured rate written in,
//! plus a `calibration` object holding the raw measurements (ignored by `Topology::read`).
//! `scripts/calibrate_runtime.py` adds the constants only Python can measure (`runtime`).
//! Without an NVIDIA driver or GPU it prints one line to stderr and exits with status 2.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use devmap_cuda::budgets::topology;
use devmap_cuda::calibrate::{calibrate, CalibrateOptions, Calibration};
use devmap_cuda::discover;

/// Exit status when there is no driver or no GPU (as `devmap devices`).
const NO_GPU: u8 = 2;

/// Arguments of `devmap calibrate`.
#[derive(clap::Args, Debug)]
pub struct CalibrateArgs {
    /// Write the topology JSON here (stdout otherwise); the summary goes to stderr.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// MiB per large copy from pinned memory, between GPUs and within a GPU.
    #[arg(long = "bulk-mib", default_value_t = 512)]
    bulk_mib: usize,
    /// MiB per large copy from pageable memory and of the page-cache file.
    #[arg(long = "pageable-mib", default_value_t = 256)]
    pageable_mib: usize,
    /// Folder for the page-cache measurement's temporary file.
    #[arg(long = "page-cache-dir", value_name = "DIR")]
    page_cache_dir: Option<PathBuf>,
}

/// Run `devmap calibrate`.
pub fn run(args: CalibrateArgs) -> Result<ExitCode> {
    let inv = match discover() {
        Ok(inv) => inv,
        Err(e) if e.is_no_gpu() => {
            eprintln!("{e}");
            return Ok(ExitCode::from(NO_GPU));
        }
        Err(e) => return Err(e.into()),
    };
    let opts = options(&args)?;
    let cal = calibrate(&inv, &opts)?;
    let mut topo = topology(&inv, &[]);
    cal.apply(&mut topo);
    let mut value = serde_json::to_value(&topo)?;
    value["calibration"] = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "measured": cal,
    });
    let text = serde_json::to_string_pretty(&value)? + "\n";
    match &args.out {
        Some(path) => std::fs::write(path, text)
            .with_context(|| format!("writing the topology to {}", path.display()))?,
        None => print!("{text}"),
    }
    eprint!("{}", summary(&cal));
    Ok(ExitCode::SUCCESS)
}

fn options(args: &CalibrateArgs) -> Result<CalibrateOptions> {
    for (flag, mib) in [
        ("--bulk-mib", args.bulk_mib),
        ("--pageable-mib", args.pageable_mib),
    ] {
        if mib == 0 || mib > 64 << 10 {
            anyhow::bail!("{flag} {mib} must be between 1 and 65536");
        }
    }
    let mut opts = CalibrateOptions {
        bulk_bytes: args.bulk_mib << 20,
        pageable_bytes: args.pageable_mib << 20,
        ..CalibrateOptions::default()
    };
    if let Some(dir) = &args.page_cache_dir {
        opts.page_cache_dir = Some(dir.clone());
    }
    Ok(opts)
}

fn summary(cal: &Calibration) -> String {
    let gb = |b: f64| b / 1e9;
    let us = |s: f64| s * 1e6;
    let mut s = String::new();
    for g in &cal.gpus {
        let _ = writeln!(
            s,
            "GPU {} {}: pinned {:.1} GB/s + {:.1} µs, pageable {:.1} GB/s + {:.1} µs, memory {:.0} GB/s (device copy)",
            g.gpu,
            g.name,
            gb(g.pinned.bandwidth),
            us(g.pinned.latency),
            gb(g.pageable.bandwidth),
            us(g.pageable.latency),
            gb(g.memory_bandwidth)
        );
    }
    for p in &cal.peers {
        let _ = writeln!(
            s,
            "GPU {} -> {}: {:.1} GB/s + {:.1} µs",
            p.from,
            p.to,
            gb(p.rate.bandwidth),
            us(p.rate.latency)
        );
    }
    if let Some(r) = cal.page_cache_read {
        let _ = writeln!(s, "page cache read: {:.1} GB/s", gb(r));
    }
    s
}
