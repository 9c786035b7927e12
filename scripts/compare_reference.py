#!/usr/bin/env python3
"""Compare devmap's maps with Hugging Face reference files (devmap-reference/1).

    python scripts/compare_reference.py fixtures/reference-extra/*.json [--devmap target/debug/devmap]
        [--models fixtures/models]

For every run of every file, runs
    devmap plan MODELS/<stem>.json --max-memory <spec> --strategy <s> --compat <path> --format json
("auto" is planned as balanced, which is what Hugging Face does) and compares the map with the
reference's as unordered dicts. A run where Hugging Face raised (no map) counts as matched when
devmap also refuses (non-zero exit). Prints, per file, matched/total and every mismatch with the keys
that differ. Exit status 1 when anything differs. Plain Python 3, no third-party packages.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))


def spec(max_memory: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in max_memory.items())


def norm(device_map: dict) -> dict:
    return {str(k): str(v) for k, v in device_map.items()}


def key_diff(want: dict, got: dict, limit: int = 20) -> list[str]:
    lines = []
    for k in sorted(set(want) | set(got)):
        w, g = want.get(k), got.get(k)
        if w == g:
            continue
        if g is None:
            lines.append(f"    - {k!r}: hf={w} devmap=<absent>")
        elif w is None:
            lines.append(f"    + {k!r}: hf=<absent> devmap={g}")
        else:
            lines.append(f"    ~ {k!r}: hf={w} devmap={g}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"    ... {len(lines) - limit} more"]
    return lines


def compare_file(path: str, devmap: str, models: str) -> tuple[int, int, list[str]]:
    with open(path) as f:
        ref = json.load(f)
    stem = os.path.splitext(os.path.basename(path))[0]
    manifest = os.path.join(models, f"{stem}.json")
    matched, total, report = 0, 0, []
    for run in ref["runs"]:
        total += 1
        strategy = "balanced" if run["strategy"] == "auto" else run["strategy"]
        label = f"{run['scenario']} / {run['strategy']} / {run['path']}"
        cmd = [
            devmap, "plan", manifest,
            "--max-memory", spec(run["max_memory"]),
            "--strategy", strategy,
            "--compat", run["path"],
            "--format", "json",
        ]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if run["device_map"] is None:
            if p.returncode != 0:
                matched += 1
            else:
                report.append(f"  {label}: Hugging Face raised {run['error']!r}; devmap planned")
            continue
        if p.returncode != 0:
            report.append(f"  {label}: devmap failed (exit {p.returncode}): {p.stderr.strip()[:300]}")
            continue
        want, got = norm(run["device_map"]), norm(json.loads(p.stdout))
        if want == got:
            matched += 1
        else:
            report.append(f"  {label}: maps differ ({len(want)} hf entries, {len(got)} devmap entries)")
            report.extend(key_diff(want, got))
    return matched, total, report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("references", nargs="+", help="devmap-reference/1 files")
    ap.add_argument("--devmap", default=os.path.join(ROOT, "target", "debug", "devmap"))
    ap.add_argument("--models", default=os.path.join(ROOT, "fixtures", "models"),
                    help="folder holding <stem>.json manifests")
    args = ap.parse_args(argv)
    if not os.path.exists(args.devmap):
        ap.error(f"{args.devmap} not found: cargo build -p devmap-cli")
    all_ok, grand_m, grand_t = True, 0, 0
    for path in args.references:
        m, t, report = compare_file(path, args.devmap, args.models)
        grand_m, grand_t = grand_m + m, grand_t + t
        print(f"{os.path.splitext(os.path.basename(path))[0]}: {m}/{t}")
        for line in report:
            print(line)
        all_ok &= m == t
    if len(args.references) > 1:
        print(f"total: {grand_m}/{grand_t}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
