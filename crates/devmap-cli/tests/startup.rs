//! The `devmap` binary as built for users: HiGHS' C++ static initialisers are deferred from
//! start-up to the first solve (crates/devmap-cli/build.rs, `devmap_solver::highs_init`), and a
//! process that really runs HiGHS still exits 0 with the map the library computes in this (normally
//! initialised) test process; `--version` prints what clap prints.

use std::process::Command;

use devmap_core::{load_model, MemoryBudgets, Workload};
use devmap_solver::{Auto, AutoOptions, PlanRequest, Strategy};

mod common;
use common::{devmap, path_str, repo, text};

/// t5-11b on two 24 GiB GPUs and 64 GiB of cpu, the CLI's default workload: `auto` runs the unit
/// MIP with HiGHS (the trace says so; checked below). qwen3-30b-a3b with a 16 GiB GPU, 16 GiB of
/// cpu and disk was such a case (HiGHS solved its class model) until the class model was solved
/// by its buffer levels; t5-11b on those budgets until `auto` learnt its cheapest-streamed start.
const MODEL: &str = "fixtures/models/t5-11b.json";
const BUDGETS: &str = "0=24GiB,1=24GiB,cpu=64GiB";
const WORKLOAD: &str = "batch=1,prompt=2048,new=256";

/// Whether build.rs linked the binary with `highs-init.ld` (its probe passed on this toolchain).
const DEFERRED: bool = matches!(env!("DEVMAP_HIGHS_INIT_DEFERRED").as_bytes(), b"1");

/// The number the solver's trace gives after `deferred to the first solve:`, per solve.
fn deferred_counts(stderr: &str) -> Vec<usize> {
    stderr
        .lines()
        .filter_map(|l| {
            l.split("highs static initialisers deferred to the first solve: ")
                .nth(1)
        })
        .map(|n| n.trim().parse().expect("a count"))
        .collect()
}

#[test]
fn a_solve_in_the_binary_runs_the_deferred_initialisers_and_matches_the_library() {
    let model_path = repo().join(MODEL);
    let out = Command::new(env!("CARGO_BIN_EXE_devmap"))
        .args(["plan", path_str(&model_path), "--max-memory", BUDGETS])
        .args(["--workload", WORKLOAD, "--format", "json"])
        .env("DEVMAP_TRACE", "1")
        .output()
        .expect("the devmap binary runs");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{:?}\nstderr: {stderr}", out.status);
    let counts = deferred_counts(&stderr);
    assert!(!counts.is_empty(), "HiGHS did not run: {stderr}");
    assert!(stderr.contains("trace:   highs Optimal"), "{stderr}");
    if DEFERRED {
        // highs-sys' objects hold ~170 initialisers; all of them must have been moved.
        assert!(counts.iter().all(|&n| n > 100), "{counts:?}");
    } else {
        assert!(counts.iter().all(|&n| n == 0), "{counts:?}");
    }

    let model = load_model(&model_path).expect("the fixture loads");
    let budgets = MemoryBudgets::parse(BUDGETS).expect("budgets");
    let options = AutoOptions {
        workload: Some(Workload::parse(WORKLOAD).expect("workload")),
        ..AutoOptions::default()
    };
    let library = Auto::new(options)
        .plan(&PlanRequest::new(&model, &budgets))
        .expect("the library plans");
    let binary: serde_json::Value =
        serde_json::from_str(&text(&out.stdout)).expect("stdout is one JSON value");
    assert_eq!(binary, library.map.to_json());
}

#[test]
fn version_is_the_package_version() {
    let out = devmap(&["--version"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("devmap {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

/// Whether build.rs linked the binary with a static unwinder and with lazy binding.
const STATIC_UNWINDER: bool = matches!(env!("DEVMAP_STATIC_UNWINDER").as_bytes(), b"1");
const LAZY_BINDING: bool = matches!(env!("DEVMAP_LAZY_BINDING").as_bytes(), b"1");

/// What the loader reads from an ELF64 little-endian executable's dynamic section: the libraries
/// it loads (`DT_NEEDED`) and whether every import is bound at start (`DF_BIND_NOW`, `DF_1_NOW`
/// or `DT_BIND_NOW`).
struct DynamicSection {
    needed: Vec<String>,
    bind_now: bool,
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn u16_at(bytes: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes(
        bytes[at..at + 2].try_into().expect("2 bytes"),
    ))
}

fn dynamic_section(elf: &[u8]) -> DynamicSection {
    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    assert_eq!(&elf[..6], b"\x7fELF\x02\x01", "an ELF64 little-endian file");
    let (phoff, phentsize, phnum) = (
        u64_at(elf, 0x20) as usize,
        u16_at(elf, 0x36),
        u16_at(elf, 0x38),
    );
    // (type, file offset, virtual address, file size) of each program header.
    let headers: Vec<(u32, usize, u64, u64)> = (0..phnum)
        .map(|i| {
            let h = phoff + i * phentsize;
            let kind = u32::from_le_bytes(elf[h..h + 4].try_into().expect("4 bytes"));
            (
                kind,
                u64_at(elf, h + 8) as usize,
                u64_at(elf, h + 16),
                u64_at(elf, h + 32),
            )
        })
        .collect();
    let &(_, dynamic, _, _) = headers
        .iter()
        .find(|h| h.0 == PT_DYNAMIC)
        .expect("a dynamically linked executable");
    let entries: Vec<(u64, u64)> = (0..)
        .map(|i| {
            (
                u64_at(elf, dynamic + 16 * i),
                u64_at(elf, dynamic + 16 * i + 8),
            )
        })
        .take_while(|&(tag, _)| tag != 0)
        .collect();
    let value = |tag: u64| entries.iter().find(|e| e.0 == tag).map(|e| e.1);
    let strtab_address = value(5).expect("DT_STRTAB");
    let &(_, offset, address, _) = headers
        .iter()
        .find(|&&(kind, _, start, size)| {
            kind == PT_LOAD && (start..start + size).contains(&strtab_address)
        })
        .expect("the string table is in a loaded segment");
    let strtab = offset + (strtab_address - address) as usize;
    let name = |at: u64| {
        let start = strtab + at as usize;
        let end = start + elf[start..].iter().position(|&b| b == 0).expect("NUL");
        String::from_utf8_lossy(&elf[start..end]).into_owned()
    };
    DynamicSection {
        needed: entries
            .iter()
            .filter(|e| e.0 == 1)
            .map(|e| name(e.1))
            .collect(),
        bind_now: value(24).is_some()
            || value(30).is_some_and(|f| f & 0x8 != 0)
            || value(0x6fff_fffb).is_some_and(|f| f & 0x1 != 0),
    }
}

#[test]
fn the_binary_loads_and_binds_what_build_rs_says() {
    let elf = std::fs::read(env!("CARGO_BIN_EXE_devmap")).expect("the devmap binary is readable");
    let dynamic = dynamic_section(&elf);
    assert!(
        dynamic.needed.iter().any(|n| n.starts_with("libc.so")),
        "{:?}",
        dynamic.needed
    );
    let loads_libgcc_s = dynamic.needed.iter().any(|n| n.starts_with("libgcc_s"));
    assert_eq!(loads_libgcc_s, !STATIC_UNWINDER, "{:?}", dynamic.needed);
    assert_eq!(dynamic.bind_now, !LAZY_BINDING);
    if STATIC_UNWINDER {
        // The static libstdc++ is what the static unwinder comes with.
        assert!(
            !dynamic.needed.iter().any(|n| n.starts_with("libstdc++")),
            "{:?}",
            dynamic.needed
        );
    }
}
