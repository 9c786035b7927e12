#!/usr/bin/env python3
"""Compare the model devmap rebuilds from checkpoint folders with the model transformers builds.

    python scripts/compare_folder_manifest.py FOLDER... [--registry FILE] [--devmap-example PATH]

For every FOLDER (a save_pretrained checkpoint with config.json), runs devmap-core's `dump_model`
example (`cargo build -p devmap-core --example dump_model` first), which prints devmap's model as a
devmap-manifest/1, and loads the folder with transformers (`from_pretrained` on CPU with the class
config.json names; tiny corpus models only), exporting its manifest with scripts/export_manifest.py.
Prints per folder: match, or the first difference in modules (names, classes, order), tensors
(names, kinds, shapes, order), tied groups, tie targets and no-split classes. Dtypes are not compared
(transformers loads in the checkpoint's dtype, devmap keeps stored dtypes). Run by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def hf_manifest(folder: str) -> dict:
    import torch
    import transformers
    from export_manifest import manifest

    with open(os.path.join(folder, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    cls = getattr(transformers, arch)
    model = cls.from_pretrained(folder)
    m = manifest(model, os.path.basename(folder))
    m["no_split"] = sorted(model._get_no_split_modules("auto")) if hasattr(model, "_get_no_split_modules") else m["no_split"]
    return m


def first_diff(a: list, b: list, what: str) -> str | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"{what}[{i}]: devmap {x} vs transformers {y}"
    if len(a) != len(b):
        extra = a[len(b):] if len(a) > len(b) else b[len(a):]
        side = "devmap" if len(a) > len(b) else "transformers"
        return f"{what}: {side} has {abs(len(a) - len(b))} more, first {extra[0]}"
    return None


def compare(dm: dict, hf: dict) -> list[str]:
    out = []
    mods = lambda m: [(x["name"], x["class"]) for x in m["modules"]]
    tens = lambda m: [(t["name"], t["kind"], t["shape"]) for t in m["tensors"]]
    for what, a, b in [
        ("modules", mods(dm), mods(hf)),
        ("tensors", tens(dm), tens(hf)),
        ("tied", sorted(sorted(g) for g in dm["tied"]), hf["tied"]),
        ("tied_targets", sorted(dm.get("tied_targets", [])), hf.get("tied_targets", [])),
        # Only classes the model has matter to a planner.
        ("no_split", sorted(dm["no_split"]), sorted(c for c in hf["no_split"] if c in {x["class"] for x in hf["modules"]})),
    ]:
        d = first_diff(a, b, what)
        if d:
            out.append(d)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--registry")
    ap.add_argument("--devmap-example", default="target/debug/examples/dump_model")
    args = ap.parse_args()
    ok = 0
    for folder in args.folders:
        cmd = [args.devmap_example, folder] + ([args.registry] if args.registry else [])
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            print(f"{folder}: devmap failed: {run.stderr.strip()}")
            continue
        notes = [l for l in run.stderr.splitlines() if l.startswith("note:")]
        try:
            hf = hf_manifest(folder)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{folder}: transformers failed: {type(e).__name__}: {e}"[:300])
            continue
        diffs = compare(json.loads(run.stdout), hf)
        if diffs:
            print(f"{folder}: DIFF " + " | ".join(diffs) + (f" | {notes[0]}" if notes else ""))
        else:
            ok += 1
            print(f"{folder}: match" + (f" ({len(notes)} notes)" if notes else ""))
    print(f"{ok}/{len(args.folders)} folders match")
    return 0 if ok == len(args.folders) else 1


if __name__ == "__main__":
    sys.exit(main())
