#!/usr/bin/env python3
"""Re-predict every measured row of validate_gpu.py grids and fit the cost model's constants.

For each row with a measured ms/token, the row's own `device_map` is scored by
`devmap check --format json --map` (the current cost model, the topology the grid was planned
with, the row's workload), and the residual is printed. The estimate is linear in the constants
this script fits, so each row is decomposed once:

  t = rest + offloaded bytes / B_pageable + P x KV bytes / GPU bandwidth

(`rest`: resident reads, eager per module, hooks and copy latencies, as the topology has them;
the KV bytes are those devmap charges on GPU 0 at the row's workload, read `P` times per step:
`runtime.kv_passes_per_step`, 3 by default). Then

- `--write-fitted`: the single pageable rate that puts the most rows of the first grid within
  15 % (then the smallest worst error), written into a copy of its topology;
- the joint least-squares fit (relative errors) of one rate per grid and one P for all grids;
- a cross-check per grid: P fitted on the other grids, applied to this grid's own calibrated
  topology unchanged (what a new machine gets after `calibrate`);
- the free fits (bytes + modules, bytes only) kept for reference.

A grid is `FILE[:TOPOLOGY]`; without a topology the one embedded in the results file is used.
Rows that carry `offload_copy_probe` (validate_gpu.py since the costfit branch) are also scored
with their own load's measured copy rate.

Usage: python3 scripts/fit_cost_model.py --devmap target/debug/devmap \\
    --grid docs/validation-data/h200-grid-2026-12-01.json:docs/validation-data/h200-topology-2026-12-01.json \\
    --grid docs/validation-data/h200-grid-2026-12-01b.json:docs/validation-data/h200-topology-2026-12-01b.json
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = float(1 << 30)
DEFAULT_KV_PASSES = 3.0
DEFAULT_GRIDS = [
    "docs/validation-data/h200-grid-2026-12-01.json:docs/validation-data/h200-topology-2026-12-01.json",
    "docs/validation-data/h200-grid-2026-12-01b.json:docs/validation-data/h200-topology-2026-12-01b.json",
]


def check_map(devmap, manifest, topology, row, map_path):
    """devmap's `check --format json` of the row's map under `topology` (estimate and memory)."""
    Path(map_path).write_text(json.dumps(row["device_map"]))
    cap = row["cap_gib"]
    cmd = [devmap, "check", manifest, "--map", map_path,
           "--max-memory", f"0={cap}GiB,cpu=100GiB", "--topology", topology,
           "--workload", f"batch=1,prompt={row['prompt']},new={row['new_tokens']}",
           "--format", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode not in (0, 1):
        sys.exit(f"devmap check failed for {row['strategy']} {cap}/{row['prompt']}: {out.stderr}")
    return json.loads(out.stdout)


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
    """(bytes, modules, tensors) whose map entry is cpu/disk (longest matching prefix decides)."""
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
    return [b[i] / a[i][i] if a[i][i] else 0.0 for i in range(k)]


# ---------------------------------------------------------------- the rows


class Grid:
    """One results file, the topology it was planned with, and its measured rows decomposed."""

    def __init__(self, spec, tmp):
        path, _, topology = spec.partition(":")
        self.path, self.name = path, Path(path).name
        doc = json.loads(Path(path).read_text())
        if not topology:
            if not doc.get("topology"):
                sys.exit(f"{path}: no topology in the file; give one as {path}:TOPOLOGY")
            topology = f"{tmp}/{self.name}.topology.json"
            Path(topology).write_text(json.dumps(doc["topology"]))
        topo = json.loads(Path(topology).read_text())
        if "rows" in topo:  # another results file: the topology it embeds (a --resume call's)
            topology = f"{tmp}/{self.name}.topology.json"
            topo = topo["topology"]
            Path(topology).write_text(json.dumps(topo))
        self.topology, self.topo = topology, topo
        self.rows = [r for r in doc["rows"] if r.get("ms_per_token")]

    def rate(self):
        return self.topo["gpus"]["0"]["pageable_host_link"]["bandwidth"]

    def gpu_bandwidth(self):
        return self.topo["gpus"]["0"]["memory_bandwidth"]

    def kv_passes(self):
        return (self.topo.get("runtime") or {}).get("kv_passes_per_step", DEFAULT_KV_PASSES)


# The older calibrate_runtime.py kept one median per distinct Llama-3.1-8B layer shape, in this
# order (then the head): q/o, k/v, gate/up, down; how many tensors of a layer each one is.
LAYER_SHAPE_COUNTS = [2, 2, 2, 1]


def rederived(topo):
    """The topology today's calibrate_runtime.py would write from the raw timings an older run
    kept: latency = the driver's 8 KiB pageable copy (`devmap calibrate`), the rate = one
    Llama-3.1-8B layer's bytes over its copy time minus one latency per tensor, the hook = the
    tiny chain's per-module difference minus that latency. None without the raw timings."""
    raw = topo.get("runtime_calibration") or {}
    copies, hook = raw.get("pageable_copies") or {}, raw.get("hook") or {}
    measured = ((topo.get("calibration") or {}).get("measured") or {}).get("gpus") or []
    if "bytes" not in copies or "per_module_seconds" not in hook or not measured:
        return None
    latency = measured[0]["pageable"]["latency"]
    points = list(zip(copies["bytes"], copies["median_seconds"]))[: len(LAYER_SHAPE_COUNTS)]
    layer_bytes = sum(n * b for n, (b, _) in zip(LAYER_SHAPE_COUNTS, points))
    layer_seconds = sum(n * (t - latency) for n, (_, t) in zip(LAYER_SHAPE_COUNTS, points))
    out = json.loads(json.dumps(topo))
    link = {"bandwidth": layer_bytes / layer_seconds, "latency": latency}
    out["gpus"]["0"]["pageable_host_link"] = dict(link)
    out["default_pageable_host_link"] = dict(link)
    out["runtime"]["offload_hook_seconds"] = max(0.0, hook["per_module_seconds"] - latency)
    return out


def decompose(args, grid, mods, tmp):
    """Per row: {measured s, predicted s now, copied bytes, KV read time per pass, rest}."""
    out = []
    for r in grid.rows:
        check = check_map(args.devmap, args.manifest, grid.topology, r, f"{tmp}/map.json")
        copied, modules, tensors = offloaded(mods, r["device_map"])
        kv_pass = check["memory"]["0"]["kv"] / grid.gpu_bandwidth()
        pred = check["estimate_ms_per_token"] * 1e-3
        rest = pred - copied / grid.rate() - grid.kv_passes() * kv_pass
        out.append({"row": r, "grid": grid, "y": r["ms_per_token"] * 1e-3, "pred": pred, "copied": copied,
                    "modules": modules, "tensors": tensors, "kv_pass": kv_pass, "rest": rest})
    return out


def predict(p, rate, passes):
    return p["rest"] + p["copied"] / rate + passes * p["kv_pass"]


def score(parts, predictions):
    errs = [q / p["y"] - 1 for p, q in zip(parts, predictions)]
    return errs, sum(abs(e) > 0.15 for e in errs), max(map(abs, errs))


# ---------------------------------------------------------------- fits


def fit_pageable_rate(parts):
    """The pageable rate (bytes/s) that puts the most rows within 15%, then the smallest worst
    error, with every other constant as calibrated."""
    best = None
    for step in range(400, 1200):
        rate = step * 1e7
        _, misses, worst = score(parts, [predict(p, rate, p["grid"].kv_passes()) for p in parts])
        if best is None or (misses, worst) < best[0]:
            best = ((misses, worst), rate)
    return best[1], best[0]


def fit_rates_and_passes(parts):
    """Least squares on relative errors: one 1/rate per grid, one KV pass count for all.
    Returns ({grid name: rate}, passes); passes are kept >= 0."""
    names = sorted({p["grid"].name for p in parts})
    xs, ys = [], []
    for p in parts:
        # (rest + copied * u_g + P * kv_pass) / y = 1  ->  linear in (u_g..., P)
        xs.append([p["copied"] / p["y"] * (p["grid"].name == n) for n in names] + [p["kv_pass"] / p["y"]])
        ys.append(1 - p["rest"] / p["y"])
    sol = lstsq(xs, ys)
    passes = max(0.0, sol[-1])
    if sol[-1] < 0:  # refit the rates with P pinned at 0
        sol = lstsq([x[:-1] for x in xs], ys) + [0.0]
    return {n: 1.0 / u for n, u in zip(names, sol[:-1])}, passes


def print_rows(parts, columns):
    """One line per row: the measurement, then (label, predictions) columns with their errors."""
    head = "| grid | map | cap | prompt | offloaded GiB | KV GiB | measured | median |"
    print("\n" + head + "".join(f" {label} | error |" for label, _ in columns))
    print("|" + "---|" * (8 + 2 * len(columns)))
    for k, p in enumerate(parts):
        r = p["row"]
        line = (f"| {p['grid'].name.replace('h200-grid-', '')} | {r['strategy']} | {r['cap_gib']:g} | {r['prompt']} | "
                f"{p['copied'] / GIB:.2f} | {p['kv_pass'] * p['grid'].gpu_bandwidth() / GIB:.2f} | "
                f"{p['y'] * 1e3:.0f} | {r['ms_per_token_median']:.0f} |")
        for _, preds in columns:
            line += f" {preds[k] * 1e3:.0f} | {preds[k] / p['y'] - 1:+.0%} |"
        print(line)


def summary(label, parts, predictions):
    _, misses, worst = score(parts, predictions)
    print(f"{label}: {len(parts) - misses} of {len(parts)} rows within 15%, worst {worst:.0%}")


def cross_check(parts):
    """Per grid: P fitted on the other grids only, applied to this grid's calibrated topology."""
    names = sorted({p["grid"].name for p in parts})
    if len(names) < 2:
        return
    print("\nKV passes fitted on the other grids, this grid's own calibrated rates:")
    for n in names:
        own = [p for p in parts if p["grid"].name == n]
        _, passes = fit_rates_and_passes([p for p in parts if p["grid"].name != n])
        summary(f"  {n}: P = {passes:.1f}", own, [predict(p, p["grid"].rate(), passes) for p in own])
        summary(f"  {n}: P = {DEFAULT_KV_PASSES:g} (default)", own,
                [predict(p, p["grid"].rate(), DEFAULT_KV_PASSES) for p in own])


def load_rate(row):
    """The row's load's own copy rate, bytes/s: the mean of its probes before and after its
    prompts (offload_copy_probe[_after]), None where not recorded."""
    rates = [(row.get(k) or {}).get("gb_per_s") for k in ("offload_copy_probe", "offload_copy_probe_after")]
    rates = [r for r in rates if r]
    return 1e9 * sum(rates) / len(rates) if rates else None


def probe_rates(parts):
    """Rows scored with their own load's copy rate, where recorded: the calibrated passes, and
    passes fitted on those rows (what is left once the load-to-load rate is known)."""
    probed = [dict(p, probe=load_rate(p["row"])) for p in parts if load_rate(p["row"])]
    if not probed:
        return
    summary("each load's own copy rate", probed, [predict(p, p["probe"], p["grid"].kv_passes()) for p in probed])
    xs = [[p["kv_pass"] / p["y"]] for p in probed]
    ys = [1 - (p["rest"] + p["copied"] / p["probe"]) / p["y"] for p in probed]
    passes = max(0.0, lstsq(xs, ys)[0])
    summary(f"  and KV passes fitted on them ({passes:.1f})", probed, [predict(p, p["probe"], passes) for p in probed])


def rederived_scores(args, grids, mods, tmp):
    """Each grid whose topology kept its raw timings, re-scored by the topology today's
    calibration would derive from them (separate latency and hook)."""
    for g in grids:
        topo = rederived(g.topo)
        if topo is None:
            continue
        path = f"{tmp}/{g.name}.rederived.json"
        Path(path).write_text(json.dumps(topo))
        link, hook = topo["gpus"]["0"]["pageable_host_link"], topo["runtime"]["offload_hook_seconds"]
        parts = [check_map(args.devmap, args.manifest, path, r, f"{tmp}/map.json") for r in g.rows]
        preds = [c["estimate_ms_per_token"] * 1e-3 for c in parts]
        own = [{"y": r["ms_per_token"] * 1e-3} for r in g.rows]
        summary(f"{g.name} re-derived ({link['bandwidth'] / 1e9:.2f} GB/s + {link['latency'] * 1e6:.1f} us, "
                f"hook {hook * 1e6:.1f} us; was {g.rate() / 1e9:.2f} GB/s + "
                f"{g.topo['gpus']['0']['pageable_host_link']['latency'] * 1e6:.1f} us, hook "
                f"{g.topo['runtime']['offload_hook_seconds'] * 1e6:.1f} us)", own, preds)


def free_fits(parts):
    feats = [(1.0, p["copied"] / GIB, p["modules"]) for p in parts]
    ys = [p["y"] * 1e3 for p in parts]
    base, per_gib, per_module = lstsq(feats, ys)
    worst = max(abs((base + per_gib * x[1] + per_module * x[2]) / y - 1) for x, y in zip(feats, ys))
    print(f"\nfree fit t = {base:.1f} ms + {per_gib:.1f} ms/GiB offloaded + {per_module * 1e3:.0f} us/offloaded module "
          f"({GIB / (per_gib * 1e-3) / 1e9:.2f} GB/s effective), worst {worst:.0%}")
    base2, per_gib2 = lstsq([(1.0, x[1]) for x in feats], ys)
    worst2 = max(abs((base2 + per_gib2 * x[1]) / y - 1) for x, y in zip(feats, ys))
    print(f"bytes only: t = {base2:.1f} ms + {per_gib2:.1f} ms/GiB ({GIB / (per_gib2 * 1e-3) / 1e9:.2f} GB/s), worst {worst2:.0%}")


def print_speedups(parts, preds):
    """devmap's map against HF auto's at each grid, cap and prompt where both were measured."""
    cells = {(p["grid"].name, p["row"]["strategy"], p["row"]["cap_gib"], p["row"]["prompt"]): (q, p["y"])
             for p, q in zip(parts, preds)}
    print("\n| grid | cap | prompt | devmap / HF predicted (joint fit) | measured |\n|---|---|---|---|---|")
    for (g, s, cap, prompt), (pred, meas) in sorted(cells.items()):
        hf = cells.get((g, "hf", cap, prompt))
        if s == "devmap" and hf:
            print(f"| {g.replace('h200-grid-', '')} | {cap:g} | {prompt} | {hf[0] / pred:.2f}x | {hf[1] / meas:.2f}x |")


def write_fitted(path, grid, rate, misses, worst):
    topo = json.loads(json.dumps(grid.topo))
    for link in (topo["gpus"]["0"]["pageable_host_link"], topo["default_pageable_host_link"]):
        link["bandwidth"] = rate
    topo["runtime"]["source"] += (
        f"; pageable_host_link.bandwidth fitted to {grid.name} by scripts/fit_cost_model.py "
        f"({rate / 1e9:.2f} GB/s: {misses} rows beyond 15%, worst {worst:.0%})")
    Path(path).write_text(json.dumps(topo, indent=2) + "\n")
    print(f"\nfitted pageable rate {rate / 1e9:.2f} GB/s: {misses} rows beyond 15%, worst {worst:.0%} -> {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devmap", default="target/debug/devmap")
    p.add_argument("--grid", action="append", help="FILE[:TOPOLOGY], repeatable (default: the two 2026-12-01 grids)")
    p.add_argument("--manifest", default="fixtures/measured/llama-3.1-8b-shaped.json")
    p.add_argument("--write-fitted", metavar="FILE", help="write the first grid's topology with its pageable rate fitted")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="fit_cost_")
    grids = [Grid(spec, tmp) for spec in (args.grid or DEFAULT_GRIDS)]
    mods = module_table(args.manifest)
    parts = [q for g in grids for q in decompose(args, g, mods, tmp)]
    rates, passes = fit_rates_and_passes(parts)
    calibrated = [p["pred"] for p in parts]
    joint = [predict(q, rates[q["grid"].name], passes) for q in parts]
    rate_only = [predict(q, rates[q["grid"].name], DEFAULT_KV_PASSES) for q in parts]
    print_rows(parts, [("calibrated", calibrated), ("joint fit", joint)])
    print()
    summary("as calibrated", parts, calibrated)
    print("joint fit: " + ", ".join(f"{n} {r / 1e9:.2f} GB/s" for n, r in sorted(rates.items())) + f"; KV passes {passes:.1f}")
    summary("  with those rates and the fitted passes", parts, joint)
    summary(f"  with those rates and {DEFAULT_KV_PASSES:g} passes", parts, rate_only)
    cross_check(parts)
    probe_rates(parts)
    print()
    rederived_scores(args, grids, mods, tmp)
    print_speedups(parts, joint)
    free_fits(parts)
    if args.write_fitted:
        first = [q for q in parts if q["grid"] is grids[0]]
        rate, (misses, worst) = fit_pageable_rate(first)
        write_fitted(args.write_fitted, grids[0], rate, misses, worst)


if __name__ == "__main__":
    main()
