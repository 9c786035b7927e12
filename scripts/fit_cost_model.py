#!/usr/bin/env python3
"""Re-predict every measured row of a validate_gpu.py grid and fit the cost model's constants.

For each row with a measured ms/token, the row's own `device_map` is scored by
`devmap check --format json --map` (the current cost model, the topology the grid was planned
with, the row's workload), and the residual is printed. Then the decode step is decomposed into
the model's physical terms, computed here from the checkpoint manifest for each map:

  t = t_gpu(resident reads + eager per module)
      + offloaded bytes / B_pageable            (the copy rate accelerate's `.to(device)` gets)
      + offloaded modules x (hook + per-copy latency)
      + KV bytes read per step / GPU bandwidth  (context x layers)

and B_pageable, the per-module overhead and a per-call (per process) rate are fitted by least
squares on the measured rows, reporting every row's error under the fitted constants.

Usage: python3 scripts/fit_cost_model.py --devmap target/debug/devmap \
    --grid docs/validation-data/h200-grid-2026-12-01.json \
    --topology docs/validation-data/h200-topology-2026-12-01.json \
    --manifest fixtures/measured/llama-3.1-8b-shaped.json
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = float(1 << 30)


def check_map(devmap, manifest, topology, row, map_path):
    """devmap's estimate (ms/token) of the row's map under `topology`."""
    Path(map_path).write_text(json.dumps(row["device_map"]))
    cap = row["cap_gib"]
    cmd = [devmap, "check", manifest, "--map", map_path,
           "--max-memory", f"0={cap}GiB,cpu=100GiB", "--topology", topology,
           "--workload", f"batch=1,prompt={row['prompt']},new={row['new_tokens']}",
           "--format", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode not in (0, 1):
        sys.exit(f"devmap check failed for {row['strategy']} {cap}/{row['prompt']}: {out.stderr}")
    return json.loads(out.stdout)["estimate_ms_per_token"]


def module_table(manifest):
    """{module name: (parameter bytes, parameter count)} of modules owning parameters."""
    sizes = {"BF16": 2, "F16": 2, "F32": 4}
    mods = {}
    for t in json.loads(Path(manifest).read_text())["tensors"]:
        if t.get("kind", "param") != "param":
            continue
        n = 1
        for s in t["shape"]:
            n *= s
        owner = t["name"].rsplit(".", 1)[0]
        b, c = mods.get(owner, (0, 0))
        mods[owner] = (b + n * sizes[t["dtype"]], c + 1)
    return mods


def offloaded(mods, device_map):
    """(bytes, modules) whose map entry is cpu/disk (longest matching prefix decides)."""
    keys = sorted(device_map, key=len, reverse=True)
    bytes_, count, tensors = 0, 0, 0
    for name, (b, c) in mods.items():
        key = next((k for k in keys if name == k or name.startswith(k + ".")), None)
        if key is not None and device_map[key] in ("cpu", "disk"):
            bytes_ += b
            count += 1
            tensors += c
    return bytes_, count, tensors


def lstsq(xs, ys):
    """Least squares without numpy: solve the normal equations."""
    k = len(xs[0])
    a = [[sum(x[i] * x[j] for x in xs) for j in range(k)] for i in range(k)]
    b = [sum(x[i] * y for x, y in zip(xs, ys)) for i in range(k)]
    for col in range(k):  # Gauss-Jordan with partial pivoting
        piv = max(range(col, k), key=lambda r: abs(a[r][col]))
        a[col], a[piv], b[col], b[piv] = a[piv], a[col], b[piv], b[col]
        for r in range(k):
            if r != col and a[col][col]:
                f = a[r][col] / a[col][col]
                a[r] = [u - f * v for u, v in zip(a[r], a[col])]
                b[r] -= f * b[col]
    return [b[i] / a[i][i] for i in range(k)]


def fit_pageable_rate(args, rows, mods):
    """The pageable rate (bytes/s) that puts the most rows within 15%, then the smallest worst
    error, with every other constant as calibrated. The estimate is linear in 1 / rate, so each
    row's prediction at another rate is its prediction now plus its offloaded bytes' change."""
    topo = json.loads(Path(args.topology).read_text())
    now_rate = topo["gpus"]["0"]["pageable_host_link"]["bandwidth"]
    parts = []
    for r in rows:
        copied, _, _ = offloaded(mods, r["device_map"])
        rest = r["predicted_ms_per_token"] * 1e-3 - copied / now_rate
        parts.append((rest, copied, r["ms_per_token"] * 1e-3))
    best = None
    for step in range(400, 1200):
        rate = step * 1e7
        errs = [(rest + c / rate) / y - 1 for rest, c, y in parts]
        key = (sum(abs(e) > 0.15 for e in errs), max(map(abs, errs)))
        if best is None or key < best[0]:
            best = (key, rate)
    return topo, best[1], best[0]


def write_fitted(args, rows, mods):
    topo, rate, (misses, worst) = fit_pageable_rate(args, rows, mods)
    for link in (topo["gpus"]["0"]["pageable_host_link"], topo["default_pageable_host_link"]):
        link["bandwidth"] = rate
    topo["runtime"]["source"] += (
        f"; pageable_host_link.bandwidth fitted to {Path(args.grid).name} by "
        f"scripts/fit_cost_model.py ({rate / 1e9:.2f} GB/s: {misses} rows beyond 15%, "
        f"worst {worst:.0%})")
    Path(args.write_fitted).write_text(json.dumps(topo, indent=2) + "\n")
    print(f"\nfitted pageable rate {rate / 1e9:.2f} GB/s: {misses} rows beyond 15%, worst {worst:.0%}"
          f" -> {args.write_fitted}")


def print_speedups(refits):
    """devmap's map against HF auto's at each cap and prompt where both were measured."""
    print("\n| cap | prompt | devmap / HF predicted (refit) | measured |\n|---|---|---|---|")
    for (strategy, cap, prompt), (pred, meas) in sorted(refits.items(), key=lambda kv: kv[0][1:]):
        hf = refits.get(("hf", cap, prompt))
        if strategy == "devmap" and hf:
            print(f"| {cap:g} | {prompt} | {hf[0] / pred:.2f}x | {hf[1] / meas:.2f}x |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devmap", default="target/debug/devmap")
    p.add_argument("--grid", default="docs/validation-data/h200-grid-2026-12-01.json")
    p.add_argument("--topology", default="docs/validation-data/h200-topology-2026-12-01.json")
    p.add_argument("--manifest", default="fixtures/measured/llama-3.1-8b-shaped.json")
    p.add_argument("--refit-topology", help="also score every row with this (fitted) topology")
    p.add_argument("--write-fitted", metavar="FILE",
                   help="write the topology with the pageable link rate fitted to the grid")
    args = p.parse_args()
    grid = json.loads(Path(args.grid).read_text())
    rows = [r for r in grid["rows"] if r.get("ms_per_token")]
    mods = module_table(args.manifest)
    tmp = tempfile.mkdtemp(prefix="fit_cost_")
    print("| strategy | cap | prompt | offloaded GiB | modules | measured | median | devmap now | error |"
          + (" refit | error |" if args.refit_topology else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.refit_topology else ""))
    feats, ys, refits = [], [], {}
    for r in rows:
        pred = check_map(args.devmap, args.manifest, args.topology, r, f"{tmp}/map.json")
        ob, om, _ = offloaded(mods, r["device_map"])
        meas = r["ms_per_token"]
        line = (f"| {r['strategy']} | {r['cap_gib']:g} | {r['prompt']} | {ob / GIB:.2f} | {om} | "
                f"{meas:.0f} | {r['ms_per_token_median']:.0f} | {pred:.0f} | {pred / meas - 1:+.0%} |")
        if args.refit_topology:
            refit = check_map(args.devmap, args.manifest, args.refit_topology, r, f"{tmp}/map.json")
            line += f" {refit:.0f} | {refit / meas - 1:+.0%} |"
            refits[(r["strategy"], r["cap_gib"], r["prompt"])] = (refit, meas)
        print(line)
        feats.append((1.0, ob / GIB, om))
        ys.append(meas)
    if refits:
        print_speedups(refits)
    base, per_gib, per_module = lstsq(feats, ys)
    print(f"\nfit t = {base:.1f} ms + {per_gib:.1f} ms/GiB offloaded + {per_module * 1e3:.0f} us/offloaded module")
    print(f"  = effective pageable rate {GIB / (per_gib * 1e-3) / 1e9:.2f} GB/s")
    worst = max(abs((base + per_gib * x[1] + per_module * x[2]) / y - 1) for x, y in zip(feats, ys))
    print(f"  worst row error {worst:.0%}")
    if args.write_fitted:
        write_fitted(args, rows, mods)
    base2, per_gib2 = lstsq([(1.0, x[1]) for x in feats], ys)
    worst2 = max(abs((base2 + per_gib2 * x[1]) / y - 1) for x, y in zip(feats, ys))
    print(f"bytes only: t = {base2:.1f} ms + {per_gib2:.1f} ms/GiB "
          f"({GIB / (per_gib2 * 1e-3) / 1e9:.2f} GB/s), worst {worst2:.0%}")


if __name__ == "__main__":
    main()
