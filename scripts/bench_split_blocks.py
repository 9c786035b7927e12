#!/usr/bin/env python3
"""`auto` with whole blocks against `--split-blocks true` on every fixture model × scenario: the
estimate (ms/token), the status and the wall time of one `devmap plan` process each (default
workload), printed as a Markdown table of the cases that differ (docs/performance.md,
"Split blocks").

    cargo build --release -p devmap-cli && python3 scripts/bench_split_blocks.py [DEVMAP_BINARY]
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time


def plan(binary: str, model: str, max_memory: str, split: str) -> tuple[float | None, float, str]:
    """(estimate ms/token or None, wall seconds, status) of one plan."""
    start = time.perf_counter()
    r = subprocess.run([binary, "plan", model, "--max-memory", max_memory, "--format", "plan-json",
                        "--split-blocks", split], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        return None, wall, "error"
    d = json.loads(r.stdout)
    return d["estimate_ms_per_token"], wall, d["status"]


def main() -> None:
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/devmap"
    scenarios = json.load(open("fixtures/scenarios.json"))["scenarios"]
    models = sorted(p for p in glob.glob("fixtures/models/*.json") if not p.endswith(".config.json"))
    print("| model | scenario | whole blocks ms/token | split ms/token | change | whole s | split s | split status |")
    print("|---|---|--:|--:|--:|--:|--:|---|")
    cases = 0
    for model in models:
        for s in scenarios:
            mm = ",".join(f"{k}={v}" for k, v in s["max_memory"].items())
            whole = plan(binary, model, mm, "false")
            split = plan(binary, model, mm, "true")
            cases += 1
            if whole[0] is None or split[0] is None or split[0] >= whole[0] * (1 - 1e-6):
                continue
            name = os.path.basename(model)[: -len(".json")]
            print(f"| {name} | {s['name']} | {whole[0]:.3f} | {split[0]:.3f} | "
                  f"{100 * (split[0] / whole[0] - 1):+.1f}% | {whole[1]:.3f} | {split[1]:.3f} | {split[2]} |")
    print(f"\n{cases} cases; the others plan the same map cost either way.")


if __name__ == "__main__":
    main()
