#!/usr/bin/env python3
"""Two devmap binaries' `auto` plans on every fixture case: every fixtures/models/*.json × every
scenario of fixtures/scenarios.json, with `--workload none` and with the CLI's default workload.
Prints the cases whose estimate (ms/token) differs by more than a relative 1e-9 or whose status
differs, then a count of those where the new binary is better, worse or equal.

    python3 scripts/compare_plans.py BASE_BINARY NEW_BINARY
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

WORKLOADS = {"none": ["--workload", "none"], "default": []}


def plan(binary: str, model: str, max_memory: str, workload: list[str]) -> tuple[float | None, str]:
    """(estimate ms/token or None, status or the error's last line) of one `devmap plan`."""
    r = subprocess.run([binary, "plan", model, "--max-memory", max_memory, "--format", "plan-json",
                        *workload], capture_output=True, text=True)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines()
        return None, "error: " + (lines[-1] if lines else "?")
    d = json.loads(r.stdout)
    return d["estimate_ms_per_token"], d["status"]


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    base, new = sys.argv[1], sys.argv[2]
    scenarios = json.load(open("fixtures/scenarios.json"))["scenarios"]
    models = sorted(p for p in glob.glob("fixtures/models/*.json") if not p.endswith(".config.json"))
    print("| model | scenario | workload | base ms/token | new ms/token | relative | base status | new status |")
    print("|---|---|---|--:|--:|--:|---|---|")
    tally = {"better": 0, "worse": 0, "equal": 0, "status": 0}
    cases = 0
    for model in models:
        name = os.path.basename(model)[: -len(".json")]
        for s in scenarios:
            mm = ",".join(f"{k}={v}" for k, v in s["max_memory"].items())
            for wl, flags in WORKLOADS.items():
                cases += 1
                (be, bs), (ne, ns) = plan(base, model, mm, flags), plan(new, model, mm, flags)
                rel = None if be is None or ne is None else (ne - be) / max(abs(be), 1e-300)
                same = (be is None and ne is None) or (rel is not None and abs(rel) <= 1e-9)
                if bs != ns:
                    tally["status"] += 1
                tally["equal" if same else "better" if rel is not None and rel < 0 else "worse"] += 1
                if not same or bs != ns:
                    rel_s = "" if rel is None else f"{rel:+.2e}"
                    print(f"| {name} | {s['name']} | {wl} | {be} | {ne} | {rel_s} | {bs} | {ns} |")
    print(f"\n{cases} plans: {tally['equal']} equal estimates (relative ≤ 1e-9), {tally['better']} "
          f"lower, {tally['worse']} higher; {tally['status']} with another status.")


if __name__ == "__main__":
    main()
