#!/usr/bin/env python3
"""Record the maps transformers computes for a folder-corpus model under other hash seeds.

    python scripts/folder_reference_seeds.py NAME... [--seeds 0 1 2 3 4 5 6 7]

transformers 5.23's `infer_auto_device_map` builds its tied groups from a `set` of parameter
names, so with two or more tie groups their order, and hence which tied module it splits first,
follows Python's string hash seed (`PYTHONHASHSEED`): the same `from_pretrained` call gives
different maps in different processes (T5Gemma 2: its embedding and `eoi_embedding` groups). For
every run of `fixtures/folder-reference/NAME.json` this re-runs the call once per seed (each in a
fresh process) and stores every map that differs from the recorded one as
`runs[i].device_map_other_seeds: [{"seed": S, "device_map": {...}}]`; folder_parity.rs accepts
those too. Runs whose map no seed changes get no such field. Run by hand (as the reference itself).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def maps_under_seed(name: str, seed: int) -> list:
    """The reference's runs re-captured in a process with PYTHONHASHSEED=seed."""
    code = (
        "import json, sys, warnings; warnings.simplefilter('ignore');"
        f"sys.path.insert(0, {os.path.join(ROOT, 'scripts')!r});"
        "import gen_folder_corpus as g, transformers;"
        f"d = json.load(open({reference_path(name)!r}));"
        "cls = getattr(transformers, d['class']);"
        "out = [g.capture(cls, d['folder'], r['strategy'], r['max_memory'], {}).get('device_map') for r in d['runs']];"
        "print('MAPS ' + json.dumps(out))"
    )
    env = dict(os.environ, PYTHONHASHSEED=str(seed))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("MAPS ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{name} seed {seed}: {done.stderr[-2000:]}")
    return json.loads(lines[-1][5:])


def reference_path(name: str) -> str:
    return os.path.join(ROOT, "fixtures", "folder-reference", f"{name}.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    args = ap.parse_args()
    for name in args.names:
        path = reference_path(name)
        with open(path) as f:
            doc = json.load(f)
        for run in doc["runs"]:
            run.pop("device_map_other_seeds", None)
        changed = 0
        for seed in args.seeds:
            for run, got in zip(doc["runs"], maps_under_seed(name, seed)):
                others = run.setdefault("device_map_other_seeds", [])
                if got is not None and got != run["device_map"] and all(got != o["device_map"] for o in others):
                    others.append({"seed": seed, "device_map": got})
                    changed += 1
        for run in doc["runs"]:
            if not run["device_map_other_seeds"]:
                del run["device_map_other_seeds"]
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"{name}: {changed} maps that only other hash seeds give, over seeds {args.seeds}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
