//! Snapshot tests of README's commands on the example model (`examples/tiny-llama`, 483 KiB):
//! each command's stdout must equal its committed snapshot in `tests/snapshots/` (timings
//! masked), and each command (with `MODEL` for the example) must still be in README.md.
//!
//! After an intended change of output, rewrite the snapshots with
//! `DEVMAP_UPDATE_SNAPSHOTS=1 cargo test -p devmap-cli --test readme_snapshots`, then read the
//! diff: a snapshot is an expected value only once a person has checked it.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

use common::{path_str, repo, text};

const EXAMPLE: &str = "examples/tiny-llama";

/// (snapshot name, the command as README writes it with `MODEL`, whether README has it: the
/// issue's `compare` on the example's KiB budgets is not there).
const COMMANDS: &[(&str, &str, bool)] = &[
    (
        "run_it",
        "plan examples/tiny-llama --max-memory 0=200KiB,1=200KiB,cpu=1GiB --workload none",
        true,
    ),
    (
        "compare_kib",
        "compare examples/tiny-llama --max-memory 0=200KiB,1=200KiB,cpu=1GiB --workload none",
        false,
    ),
    ("plan_table", "plan MODEL --max-memory 0=22GiB,1=22GiB,cpu=64GiB", true),
    (
        "plan_json",
        "plan MODEL --max-memory 0=22GiB,1=22GiB,cpu=64GiB --format json",
        true,
    ),
    (
        "plan_plan_json",
        "plan MODEL --max-memory 0=22GiB,1=22GiB,cpu=64GiB --format plan-json",
        true,
    ),
    (
        "plan_workload",
        "plan MODEL --max-memory 0=24GiB,cpu=64GiB --workload batch=4,prompt=8192,new=512",
        true,
    ),
    (
        "plan_balanced_compat",
        "plan MODEL --max-memory 0=22GiB,1=22GiB,cpu=64GiB --strategy balanced --compat transformers",
        true,
    ),
    (
        "compare",
        "compare MODEL --max-memory 0=80GiB,1=24GiB,2=16GiB,3=16GiB,cpu=128GiB",
        true,
    ),
    (
        "check",
        "check MODEL --map device_map.json --max-memory 0=22GiB,cpu=64GiB",
        true,
    ),
];

/// The binary run from the repository root, as README's commands are.
fn devmap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_devmap"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("the devmap binary runs")
}

fn snapshot_path(name: &str) -> PathBuf {
    repo().join(format!("crates/devmap-cli/tests/snapshots/{name}.txt"))
}

/// Timings vary from run to run: `planned in 2.07 ms` and compare's `plan ms` column.
fn mask_timings(output: &str) -> String {
    let mut lines = Vec::new();
    let mut in_compare_rows = false;
    for line in output.lines() {
        let mut line = line.to_string();
        if let Some((head, tail)) = line.split_once("planned in ") {
            let rest = tail.split_once(" ms").map_or("", |(_, r)| r);
            line = format!("{head}planned in <ms> ms{rest}");
        }
        if in_compare_rows && line.len() > 72 {
            // Columns: label 30, ms 10, offload 11, changes 8 (+1 space each), then plan ms 9.
            line.replace_range(63..72, "     <ms>");
        }
        in_compare_rows |= line.starts_with("strategy ") && line.contains("plan ms");
        lines.push(line);
    }
    lines.join("\n") + "\n"
}

fn run_readme_command(command: &str, map_file: &str) -> String {
    let line = command
        .replace("MODEL", EXAMPLE)
        .replace("device_map.json", map_file);
    let args: Vec<&str> = line.split_whitespace().collect();
    let out = devmap(&args);
    assert!(
        out.status.success(),
        "devmap {line} failed: {}",
        text(&out.stderr)
    );
    format!("$ devmap {line}\n{}", mask_timings(&text(&out.stdout)))
}

#[test]
fn readme_commands_print_their_snapshots() {
    let readme = fs::read_to_string(repo().join("README.md")).expect("README.md");
    let dir = tempfile::tempdir().expect("a temp dir");
    let map = dir.path().join("device_map.json");
    let plan = devmap(&[
        "plan",
        EXAMPLE,
        "--max-memory",
        "0=22GiB,1=22GiB,cpu=64GiB",
        "--format",
        "json",
    ]);
    fs::write(&map, &plan.stdout).expect("writing the map");
    let update = std::env::var_os("DEVMAP_UPDATE_SNAPSHOTS").is_some();
    let mut stale = Vec::new();
    for (name, command, in_readme) in COMMANDS {
        if *in_readme {
            assert!(
                readme.contains(&format!("devmap {command}"))
                    || readme.contains(&format!("-p devmap-cli -- {command}")),
                "README.md no longer has `devmap {command}`: update COMMANDS"
            );
        }
        let got =
            run_readme_command(command, path_str(&map)).replace(path_str(&map), "device_map.json");
        let path = snapshot_path(name);
        if update {
            fs::write(&path, &got).expect("writing a snapshot");
            continue;
        }
        let want = fs::read_to_string(&path).unwrap_or_default();
        if got != want {
            stale.push(format!("--- {}\n{want}+++ now\n{got}", path.display()));
        }
    }
    assert!(
        stale.is_empty(),
        "{} snapshot(s) differ (DEVMAP_UPDATE_SNAPSHOTS=1 rewrites them):\n{}",
        stale.len(),
        stale.join("\n")
    );
}

#[test]
fn masking_keeps_everything_but_timings() {
    let table = "strategy auto, planned in 12.34 ms\n";
    assert_eq!(mask_timings(table), "strategy auto, planned in <ms> ms\n");
    let compare = "strategy                         ms/token     offload  changes   plan ms  memory per device  note\n\
                   auto                                4.003  216.75 KiB        2     91.40  0:88.94 KiB  gap 0.000%\n";
    let masked = mask_timings(compare);
    assert!(
        masked.contains("        2      <ms>  0:88.94 KiB"),
        "{masked}"
    );
    assert!(!masked.contains("91.40"));
}
