#!/usr/bin/env python3
"""Whole `devmap plan` processes against Hugging Face's in-process map computation, case by case
(docs/performance.md, "Start-up"): every run of fixtures/reference*/ on transformers' path that
has a time, planned by a fresh `devmap plan MODEL --max-memory ... --format json` process
(posix_spawn + wait, stdout to /dev/null, median of RUNS): Hugging Face's sequential, balanced
and balanced_low_0 against the same strategy with `--compat transformers` (the same map, spilling
to disk as Hugging Face does), its `auto` (balanced) against devmap's `auto` (with `disk=1TB`
added where the scenario has no disk, as Hugging Face always allows disk).

    cargo build --release -p devmap-cli
    python3 scripts/bench_process.py [--binary target/release/devmap]... [--runs 11] [--verbose]

Prints the load average, `/bin/true` and `devmap --version` timed the same way, and per strategy
the number of cases, the median and the least of Hugging Face's time over devmap's, by wall time
and by the process's CPU time (user + system, from wait4: on a loaded machine a process waits for
a core, and the wall time measures the load), and with --verbose the cases devmap loses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def spawn(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + system) time of one process from spawn to exit, in ms; a failing
    process is an error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, devnull, 1)]
        start = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
        _, status, usage = os.wait4(pid, 0)
        wall = (time.perf_counter() - start) * 1e3
    finally:
        os.close(devnull)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench_process: {' '.join(argv)} exited with {os.waitstatus_to_exitcode(status)}")
    return wall, (usage.ru_utime + usage.ru_stime) * 1e3


def median_ms(argv: list[str], runs: int) -> tuple[float, float]:
    """Median wall and median CPU time of `runs` processes, after one warm-up (page cache)."""
    spawn(argv)
    times = [spawn(argv) for _ in range(runs)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def budget_spec(max_memory: dict) -> str:
    return ",".join(f"{device}={size}" for device, size in max_memory.items())


def cases():
    """(model manifest, max_memory spec, HF strategy, HF seconds) of every timed transformers run."""
    for path in sorted(REPO.glob("fixtures/reference*/*.json")):
        reference = json.loads(path.read_text())
        model = REPO / "fixtures/models" / Path(reference["manifest"]).name
        for run in reference["runs"]:
            if run["path"] != "transformers" or run.get("time_s_median") is None or run["error"]:
                continue
            yield model, budget_spec(run["max_memory"]), run["strategy"], run["time_s_median"]


def plan_argv(binary: str, model: Path, spec: str, strategy: str) -> list[str]:
    """The `devmap plan` command set against Hugging Face's `strategy` on these budgets."""
    if strategy == "auto":
        # Hugging Face's auto spills to disk when nothing else fits; devmap's may too.
        extra = "" if "disk=" in spec else ",disk=1TB"
        return [binary, "plan", str(model), "--max-memory", spec + extra, "--format", "json"]
    # The same planner, spilling to disk as Hugging Face's does.
    return [binary, "plan", str(model), "--max-memory", spec, "--strategy", strategy,
            "--compat", "transformers", "--format", "json"]


def summary(ratios: dict[str, list[tuple[float, float, str]]], verbose: bool) -> None:
    """Per strategy, then over all: median and least HF/devmap ratio by wall and CPU time."""
    everything = [r for rs in ratios.values() for r in rs]
    for name, rs in list(ratios.items()) + [("all", everything)]:
        print(f"{name}: {len(rs)} cases")
        for what, i in (("wall", 0), ("CPU", 1)):
            values = [r[i] for r in rs]
            print(f"  HF / devmap {what}: median {statistics.median(values):.2f}x, "
                  f"least {min(values):.2f}x, devmap slower on {sum(v < 1 for v in values)}")
        for r in rs if verbose and name != "all" else []:
            if r[1] < 1:
                print(f"    slower (CPU): {r[2]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", action="append",
                        help="devmap binary (repeatable: binaries alternate case by case)")
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--verbose", action="store_true", help="list the cases devmap loses")
    args = parser.parse_args()
    binaries = [str(Path(b).resolve()) for b in args.binary or [REPO / "target/release/devmap"]]
    print(f"load average: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    for argv in [["/bin/true"]] + [[b, "--version"] for b in binaries]:
        wall, cpu = median_ms(argv, 101)
        print(f"{' '.join(argv)}: wall {wall:.2f} ms, CPU {cpu:.2f} ms (medians of 101)")
    ratios: dict[str, dict[str, list[tuple[float, float, str]]]] = {b: {} for b in binaries}
    for model, spec, strategy, hf_s in cases():
        hf = hf_s * 1e3
        for binary in binaries:
            wall, cpu = median_ms(plan_argv(binary, model, spec, strategy), args.runs)
            label = f"{model.stem} {spec} {strategy}: devmap wall {wall:.2f} / CPU {cpu:.2f} ms, HF {hf:.2f} ms"
            name = f"HF {strategy} vs devmap {strategy}"
            ratios[binary].setdefault(name, []).append((hf / wall, hf / cpu, label))
    print(f"load average: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    for binary in binaries:
        print(f"== {binary}")
        summary(ratios[binary], args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
