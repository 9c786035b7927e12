//! The `devmap` binary as built for users: HiGHS' C++ static initialisers are deferred from
//! start-up to the first solve (crates/devmap-cli/build.rs, `devmap_solver::highs_init`), and a
//! process that really runs HiGHS still exits 0 with the map the library computes in this (normally
//! initialised) test process; `--version` prints what clap prints.

use std::process::Command;

use devmap_core::{load_model, MemoryBudgets, Workload};
use devmap_solver::{Auto, AutoOptions, PlanRequest, Strategy};

mod common;
use common::{devmap, path_str, repo, text};

/// qwen3-30b-a3b with a 16 GiB GPU, 16 GiB of cpu and disk, the CLI's default workload: its
/// layers are split, so `auto` solves the class model with HiGHS (the trace says so; checked
/// below). t5-11b on the same budgets was such a case until `auto` learnt its cheapest-streamed
/// start.
const MODEL: &str = "fixtures/models/qwen3-30b-a3b.json";
const BUDGETS: &str = "0=16GiB,cpu=16GiB,disk=1TB";
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
