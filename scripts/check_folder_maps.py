#!/usr/bin/env python3
"""Check devmap's maps of the folder corpus with real transformers and accelerate (run by hand).

    python scripts/check_folder_maps.py [--devmap target/debug/devmap] [--folders fixtures/folders]
        [--refs fixtures/folder-reference] [--only NAME,...] [--markdown] [--references]

For every corpus folder and every scenario of its reference file (fixtures/folder-reference/NAME.json),
runs the devmap binary for the compat maps (`--compat transformers`, strategies sequential, balanced,
balanced_low_0) and for its own `--strategy auto` map. Each distinct map is then

1. checked with `accelerate.utils.check_device_map` on the model transformers builds
   (`Class.from_pretrained(folder, device_map=...)` stopped at its planner, so the model is exactly
   the one the map would be applied to); a warning about keys naming no submodule counts as a failure;
2. loaded on CPU: `Class.from_pretrained(folder, device_map=<the map, every device replaced by
   "cpu">, output_loading_info=True)` must succeed with no missing keys and no tensor left on the
   meta device, and `check_device_map` must accept the map on the loaded model too.

With --references, transformers' own maps from the reference files go through the same checks (a
control: they must all pass).

Prints one row per folder (maps checked, check_device_map passes, loads passing, devmap refusals) and
the failures; exit status 1 when anything fails. Needs torch, transformers and accelerate (CPU only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import gen_folder_corpus  # noqa: E402

COMPAT_STRATEGIES = ["sequential", "balanced", "balanced_low_0"]


def devmap_maps(devmap: str, folder: str, runs: list[dict]) -> tuple[list[tuple[str, dict]], list[str]]:
    """(label, map) for every compat and auto map devmap emits, and the refusals (label: message)."""
    maps, refusals, seen_specs = [], [], set()
    for run in runs:
        spec = ",".join(f"{k}={v}" for k, v in run["max_memory"].items())
        if spec in seen_specs:
            continue
        seen_specs.add(spec)
        jobs = [(s, ["--strategy", s, "--compat", "transformers"]) for s in COMPAT_STRATEGIES]
        jobs.append(("auto", ["--strategy", "auto"]))
        for label, extra in jobs:
            cmd = [devmap, "plan", folder, "--max-memory", spec, "--format", "json", *extra]
            p = subprocess.run(cmd, capture_output=True, text=True)
            name = f"{run['scenario']}/{label}"
            if p.returncode != 0:
                refusals.append(f"{name}: {p.stderr.strip().splitlines()[0] if p.stderr.strip() else p.returncode}")
                continue
            maps.append((name, json.loads(p.stdout)))
    return maps, refusals


def built_model(cls, folder: str):
    """The model `from_pretrained(folder, device_map=...)` builds, taken at its planner."""
    import transformers.modeling_utils as mu

    original, box = mu._get_device_map, {}

    def wrapped(model, device_map, max_memory, hf_quantizer):
        box["model"] = model
        raise gen_folder_corpus.Captured({})

    mu._get_device_map = wrapped
    try:
        cls.from_pretrained(folder, device_map="sequential")
    except gen_folder_corpus.Captured:
        pass
    finally:
        mu._get_device_map = original
    return box["model"]


def accelerate_accepts(model, device_map: dict) -> str | None:
    """None when check_device_map accepts the map and every key names a module or a tensor of the
    model, else why not. (accelerate warns about keys that name a tensor, not a module, such as
    BART's `final_logits_bias` buffer; transformers' own maps hold such keys, so they pass here.)"""
    from accelerate.utils import check_device_map

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            check_device_map(model, device_map)
        except Exception as e:
            return f"{type(e).__name__}: {str(e)[:200]}"
    names = {n for n, _ in model.named_modules()} | set(model.state_dict())
    names |= {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    unknown = [k for k in device_map if k and k not in names]
    return f"keys naming no module or tensor: {unknown[:3]}" if unknown else None


def loads_on_cpu(cls, folder: str, device_map: dict) -> str | None:
    """None when the map, every device made "cpu", loads and covers every key, else why not."""
    cpu_map = {k: "cpu" for k in device_map}
    try:
        model, info = cls.from_pretrained(folder, device_map=cpu_map, output_loading_info=True)
    except Exception as e:
        return f"load raised {type(e).__name__}: {str(e)[:200]}"
    if info.get("missing_keys"):
        return f"missing keys after load: {sorted(info['missing_keys'])[:3]}"
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        return f"left on meta: {on_meta[:3]}"
    return accelerate_accepts(model, device_map)


def check_folder(name: str, folder: str, ref: dict, devmap: str, with_references: bool) -> dict:
    import transformers

    cls = getattr(transformers, ref["class"])
    maps, refusals = devmap_maps(devmap, folder, ref["runs"])
    if with_references:  # the control: transformers' own maps must pass the same checks
        maps += [(f"reference {r['scenario']}/{r['strategy']}", r["device_map"])
                 for r in ref["runs"] if r["device_map"]]
    model = built_model(cls, folder)
    row = {"maps": 0, "accepted": 0, "loaded": 0, "refused": len(refusals), "failures": []}
    done_checks, done_loads = set(), set()
    for label, device_map in maps:
        key = json.dumps(device_map, sort_keys=True)
        if key in done_checks:
            continue
        done_checks.add(key)
        row["maps"] += 1
        why = accelerate_accepts(model, device_map)
        row["accepted"] += why is None
        if why:
            row["failures"].append(f"{name} {label}: check_device_map: {why}")
        cpu_key = json.dumps(sorted(device_map))
        if cpu_key in done_loads:  # the same keys all on "cpu" were loaded already
            row["loaded"] += why is None
            continue
        done_loads.add(cpu_key)
        why_load = loads_on_cpu(cls, folder, device_map)
        row["loaded"] += why_load is None
        if why_load:
            row["failures"].append(f"{name} {label}: CPU load: {why_load}")
    row["refusals"] = refusals
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devmap", default=os.path.join(ROOT, "target", "debug", "devmap"))
    ap.add_argument("--folders", default=os.path.join(ROOT, "fixtures", "folders"))
    ap.add_argument("--refs", default=os.path.join(ROOT, "fixtures", "folder-reference"))
    ap.add_argument("--only", help="folder names (comma-separated)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--references", action="store_true",
                    help="also check transformers' own maps of fixtures/folder-reference (a control)")
    args = ap.parse_args(argv)
    gen_folder_corpus.quiet()
    names = sorted(f[:-5] for f in os.listdir(args.refs) if f.endswith(".json"))
    if args.only:
        names = [n for n in names if n in set(args.only.split(","))]
    totals = {"maps": 0, "accepted": 0, "loaded": 0, "refused": 0}
    failures = []
    sep = " | " if args.markdown else "  "
    header = sep.join(["folder".ljust(36), "maps", "check_device_map", "CPU load", "devmap refused"])
    print(f"| {header} |\n|---|---|---|---|---|" if args.markdown else header)
    for name in names:
        with open(os.path.join(args.refs, f"{name}.json")) as f:
            ref = json.load(f)
        row = check_folder(name, os.path.join(args.folders, name), ref, args.devmap, args.references)
        cells = [name.ljust(36), str(row["maps"]), f"{row['accepted']}/{row['maps']}",
                 f"{row['loaded']}/{row['maps']}", str(row["refused"])]
        print(f"| {sep.join(cells)} |" if args.markdown else sep.join(cells), flush=True)
        for k in totals:
            totals[k] += row[k]
        failures += row["failures"]
    cells = [f"all {len(names)} folders".ljust(36), str(totals["maps"]),
             f"{totals['accepted']}/{totals['maps']}", f"{totals['loaded']}/{totals['maps']}",
             str(totals["refused"])]
    print(f"| {sep.join(cells)} |" if args.markdown else sep.join(cells))
    for f in failures:
        print(f"FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
