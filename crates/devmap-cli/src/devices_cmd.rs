//! `devmap devices`: the GPUs the CUDA driver sees, their links, and the budgets `devmap plan`
//! uses when no `--max-memory` is given.
//!
//! Without an NVIDIA driver or GPU it prints one line to stderr (`no CUDA driver found: ...`) and
//! exits with status 2 (1 is kept for failures on a GPU that is there); `--json` then prints
//! `{"error": ..., "gpus": []}` on stdout as well.

use std::fmt::Write as _;
use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use devmap_core::{format_bytes, Device, MemoryBudgets, Topology};
use devmap_cuda::bench::{h2d_bandwidth, Bandwidth, HostMemory};
use devmap_cuda::budgets::{default_budgets, pcie_bandwidth, topology, Reserve};
use devmap_cuda::{discover, Inventory};

/// Exit status when there is no driver or no GPU.
const NO_GPU: u8 = 2;

/// Arguments of `devmap devices`.
#[derive(clap::Args, Debug)]
pub struct DevicesArgs {
    /// Print the inventory, default budgets and topology as JSON.
    #[arg(long)]
    json: bool,
    /// Also measure host-to-device copy bandwidth per GPU (pinned, pinned write-combined,
    /// pageable); the pinned figure then replaces the PCIe estimate in the topology.
    #[arg(long)]
    measure: bool,
}

/// Run `devmap devices`.
pub fn run(args: DevicesArgs) -> Result<ExitCode> {
    let inv = match discover() {
        Ok(inv) => inv,
        Err(e) if e.is_no_gpu() => {
            if args.json {
                let v = serde_json::json!({"error": e.to_string(), "gpus": []});
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            eprintln!("{e}");
            return Ok(ExitCode::from(NO_GPU));
        }
        Err(e) => return Err(e.into()),
    };
    let measured = if args.measure {
        measure(&inv)?
    } else {
        Vec::new()
    };
    let host: Vec<(u32, f64)> = measured
        .iter()
        .filter(|b| b.memory == HostMemory::Pinned)
        .map(|b| (b.gpu, b.median))
        .collect();
    let budgets = default_budgets(&inv, &Reserve::default());
    let topo = topology(&inv, &host);
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = serde_json::json!({
            "inventory": inv,
            "default_budgets": budgets.to_json(),
            "topology": topo,
            "h2d_bandwidth": measured,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        out.write_all(table(&inv, &budgets, &topo, &measured).as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn measure(inv: &Inventory) -> Result<Vec<Bandwidth>> {
    let mut out = Vec::new();
    for g in &inv.gpus {
        // 1 GiB pinned copies (large enough that per-copy overhead vanishes), fewer pageable ones.
        out.push(h2d_bandwidth(g.index, HostMemory::Pinned, 1 << 30, 5)?);
        out.push(h2d_bandwidth(
            g.index,
            HostMemory::PinnedWriteCombined,
            1 << 30,
            5,
        )?);
        out.push(h2d_bandwidth(g.index, HostMemory::Pageable, 256 << 20, 3)?);
    }
    Ok(out)
}

fn table(
    inv: &Inventory,
    budgets: &MemoryBudgets,
    topo: &Topology,
    measured: &[Bandwidth],
) -> String {
    let mut s = String::new();
    let n = inv.gpus.len();
    let _ = writeln!(
        s,
        "CUDA driver API {} · NVIDIA driver {} · NVML {} · {n} GPU{}",
        inv.cuda_driver_version,
        inv.nvidia_driver_version.as_deref().unwrap_or("?"),
        if inv.nvml { "yes" } else { "no" },
        if n == 1 { "" } else { "s" }
    );
    if let Some(v) = &inv.cuda_visible_devices {
        let _ = writeln!(s, "CUDA_VISIBLE_DEVICES={v}");
    }
    let name_w = inv
        .gpus
        .iter()
        .map(|g| g.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        s,
        "{:>3}  {:<name_w$}  {:>10}  {:>10}  {:>3}  {:>4}  {:>10}  {:<12}  {:<20}  {:<7}  UUID",
        "GPU",
        "name",
        "total",
        "free",
        "cc",
        "SMs",
        "memory BW",
        "PCI bus id",
        "PCIe now / max",
        "NVLink"
    );
    for g in &inv.gpus {
        let pcie = g.pcie.map_or("-".to_string(), |p| {
            format!(
                "Gen{} x{} / Gen{} x{}",
                p.current_gen, p.current_width, p.max_gen, p.max_width
            )
        });
        let nvlink = g.nvlink.map_or("-".to_string(), |l| {
            format!("{}/{}", l.active_links, l.links)
        });
        let bw = g
            .memory_bandwidth
            .map_or("-".to_string(), |b| format!("{:.2} TB/s", b / 1e12));
        let _ = writeln!(
            s,
            "{:>3}  {:<name_w$}  {:>10}  {:>10}  {:>3}  {:>4}  {:>10}  {:<12}  {:<20}  {:<7}  {}",
            g.index,
            g.name,
            format_bytes(g.total_memory),
            format_bytes(g.free_memory),
            format!("{}.{}", g.compute_capability.0, g.compute_capability.1),
            g.multiprocessors,
            bw,
            g.pci_bus_id,
            pcie,
            nvlink,
            g.uuid
        );
    }
    if n > 1 {
        let _ = writeln!(
            s,
            "\npeer access (P2P performance rank, 0 = best; \"-\" = no direct access; NV = NVLink):"
        );
        let _ = write!(s, "     ");
        for b in &inv.gpus {
            let _ = write!(s, "{:>6}", b.index);
        }
        let _ = writeln!(s);
        for a in &inv.gpus {
            let _ = write!(s, "{:>5}", a.index);
            for b in &inv.gpus {
                let cell = if a.index == b.index {
                    "·".to_string()
                } else {
                    match inv.peer(a.index, b.index) {
                        Some(p) if p.access => format!(
                            "{}{}",
                            if p.nvlink == Some(true) { "NV" } else { "" },
                            p.performance_rank.unwrap_or(0)
                        ),
                        _ => "-".to_string(),
                    }
                };
                let _ = write!(s, "{cell:>6}");
            }
            let _ = writeln!(s);
        }
    }
    if !measured.is_empty() {
        let _ = writeln!(s, "\nhost-to-device copies (median):");
        for b in measured {
            let _ = writeln!(
                s,
                "  GPU {}  {:<22} {:>9} copies  {:>6.1} GiB/s  (best {:.1})",
                b.gpu,
                match b.memory {
                    HostMemory::Pinned => "pinned",
                    HostMemory::PinnedWriteCombined => "pinned write-combined",
                    HostMemory::Pageable => "pageable",
                },
                format_bytes(b.bytes),
                b.median_gib_per_s(),
                b.best / (1u64 << 30) as f64
            );
        }
    }
    let _ = writeln!(
        s,
        "\nlinks for the cost model (devmap plan without --topology):"
    );
    for g in &inv.gpus {
        let link = topo.host_link(g.index);
        let source = if measured.iter().any(|b| b.gpu == g.index) {
            "measured pinned copies"
        } else if g.pcie.as_ref().and_then(pcie_bandwidth).is_some() {
            "80% of the PCIe link's maximum rate"
        } else {
            "default"
        };
        let _ = writeln!(
            s,
            "  GPU {} host link {:.1} GB/s ({source}), memory {:.2} TB/s",
            g.index,
            link.bandwidth / 1e9,
            topo.gpu_bandwidth(g.index) / 1e12
        );
    }
    for (pair, link) in &topo.peer_links {
        let _ = writeln!(s, "  GPUs {pair}: {:.1} GB/s", link.bandwidth / 1e9);
    }
    let _ = writeln!(
        s,
        "\ndefault budgets (devmap plan without --max-memory): free − (1 GiB + 2% of total) per GPU, \
         MemAvailable − (2 GiB + 10% of MemTotal) for cpu"
    );
    let parts: Vec<String> = budgets
        .iter()
        .map(|b| format!("{}={}", b.device, format_bytes(b.bytes)))
        .collect();
    let _ = writeln!(s, "  {}", parts.join(", "));
    if budgets.get(Device::Cpu).is_none() {
        let _ = writeln!(s, "  (no cpu budget: /proc/meminfo could not be read)");
    }
    for note in &inv.notes {
        let _ = writeln!(s, "note: {note}");
    }
    s
}

/// Budgets and topology for `devmap plan`/`compare` when `--max-memory` is missing: discovered,
/// or an error that says how to plan offline.
pub fn discovered_budgets() -> Result<(MemoryBudgets, Topology)> {
    match discover() {
        Ok(inv) => {
            let budgets = default_budgets(&inv, &Reserve::default());
            let parts: Vec<String> = budgets
                .iter()
                .map(|b| format!("{}={}", b.device, format_bytes(b.bytes)))
                .collect();
            eprintln!(
                "no --max-memory: using discovered budgets {} (free memory minus the reserve, see devmap devices)",
                parts.join(",")
            );
            Ok((budgets, topology(&inv, &[])))
        }
        Err(e) if e.is_no_gpu() => anyhow::bail!(
            "--max-memory is required here: {e}, so budgets cannot be discovered; give budgets \
             such as --max-memory 0=22GiB,1=22GiB,cpu=64GiB to plan for GPUs that are elsewhere"
        ),
        Err(e) => Err(anyhow::Error::new(e).context("discovering GPUs for default budgets")),
    }
}
