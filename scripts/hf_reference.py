#!/usr/bin/env python3
"""Compute Hugging Face's device maps for one model: a devmap-reference/1 file.

    python scripts/hf_reference.py CONFIG_JSON_OR_HUB_ID --dtype bf16 -o fixtures/reference-extra/NAME.json
        [--manifest fixtures/models/NAME.json] [--name MODEL_NAME] [--scenarios fixtures/scenarios.json]
        [--repeat 5]

The model is built from its config on the meta device exactly as scripts/export_manifest.py builds it
(same auto classes, same default dtype, weights tied). For every scenario of fixtures/scenarios.json,
every strategy (auto, balanced, balanced_low_0, sequential) and both code paths:

- transformers: `transformers.integrations.accelerate._get_device_map(model, strategy, max_memory, None)`,
  what `from_pretrained(device_map=strategy, max_memory=...)` runs; the budgets it hands to the greedy
  pass (`inferred_max_memory`) are recomputed with the same transformers functions
  (`get_balanced_memory`, or `get_max_memory` for sequential);
- accelerate: `accelerate.utils.get_balanced_memory(model, max_memory, no_split_module_classes=...,
  low_zero=...)` (skipped for sequential, which uses `accelerate.utils.get_max_memory`) followed by
  `accelerate.infer_auto_device_map(model, max_memory=..., no_split_module_classes=...)`.

max_memory dicts are passed with int keys for GPUs, a fresh copy per call (both libraries convert the
size strings in place). A call that raises is recorded with `error` = "ExceptionType: message" and no
map (and when the budget step itself raises, the message also stands in `inferred_max_memory`, as in
fixtures/reference). Needs torch, transformers and accelerate (references were made with transformers 5.23.0 and
accelerate 1.15.0); no GPU is needed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import export_manifest  # noqa: E402

STRATEGIES = ["auto", "balanced", "balanced_low_0", "sequential"]
PATHS = ["transformers", "accelerate"]


def user_max_memory(spec: dict) -> dict:
    """Scenario dict (JSON string keys) -> what a user passes: int keys for GPUs."""
    return {(int(k) if k.isdigit() else k): v for k, v in spec.items()}


def jsonable(d):
    if d is None:
        return None
    return {str(k): v for k, v in d.items()}


def transformers_path(model, strategy: str, max_memory: dict):
    from transformers.integrations import accelerate as tfa

    def inferred():
        mm = copy.deepcopy(max_memory)
        if strategy == "sequential":
            return tfa.get_max_memory(mm)
        return tfa.get_balanced_memory(
            model,
            max_memory=mm,
            no_split_module_classes=model._no_split_modules,
            hf_quantizer=None,
            low_zero=(strategy == "balanced_low_0"),
        )

    def device_map():
        return tfa._get_device_map(model, strategy, copy.deepcopy(max_memory), None)

    return inferred, device_map


def accelerate_path(model, strategy: str, max_memory: dict):
    import accelerate
    from accelerate.utils import get_balanced_memory, get_max_memory

    no_split = list(model._no_split_modules)

    def inferred():
        mm = copy.deepcopy(max_memory)
        if strategy == "sequential":
            return get_max_memory(mm)
        return get_balanced_memory(
            model, mm, no_split_module_classes=no_split, low_zero=(strategy == "balanced_low_0")
        )

    def device_map():
        return accelerate.infer_auto_device_map(model, max_memory=inferred(), no_split_module_classes=no_split)

    return inferred, device_map


def run_one(model, scenario: dict, strategy: str, path: str, repeat: int) -> dict:
    max_memory = user_max_memory(scenario["max_memory"])
    make = transformers_path if path == "transformers" else accelerate_path
    inferred_fn, map_fn = make(model, strategy, max_memory)
    out = {
        "scenario": scenario["name"],
        "strategy": strategy,
        "path": path,
        "max_memory": scenario["max_memory"],
        "inferred_max_memory": None,
        "device_map": None,
        "error": None,
        "time_s_median": None,
    }
    # As in fixtures/reference: when computing the budgets raises, the message stands in
    # inferred_max_memory as well as in error.
    try:
        inferred = inferred_fn()
    except Exception as e:
        out["inferred_max_memory"] = out["error"] = f"{type(e).__name__}: {e}"
        return out
    out["inferred_max_memory"] = jsonable(inferred)
    try:
        device_map = map_fn()  # warm-up, and the result
    except Exception as e:  # recorded, as Hugging Face would raise it to the user
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        map_fn()
        times.append(time.perf_counter() - t0)
    out["device_map"] = dict(device_map)
    out["time_s_median"] = statistics.median(times) if times else None
    return out


def versions() -> dict:
    import accelerate
    import safetensors
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__,
    }


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="config.json path, a directory holding one, or a Hub id")
    ap.add_argument("--dtype", default="bf16", help="default dtype the model is built in (bf16, f16, f32)")
    ap.add_argument("--name", help="model name to record (default: the config's _name_or_path or the argument)")
    ap.add_argument("--manifest", default="", help="manifest path to record in the file")
    ap.add_argument("--scenarios", default=os.path.join(here, "..", "fixtures", "scenarios.json"))
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--repeat", type=int, default=5, help="timed repetitions after the warm-up (median kept)")
    ap.add_argument("-o", "--output", help="output path (default: stdout)")
    args = ap.parse_args(argv)

    import torch

    warnings.filterwarnings("ignore")
    for name in ("transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as tf_logging

    tf_logging.set_verbosity_error()

    torch_dtype = getattr(torch, export_manifest.DTYPE_ARGS[args.dtype.lower()])
    config = export_manifest.load_config(args.model)
    model = export_manifest.build_model(config, torch_dtype)
    export_manifest.tie(model)
    name = args.name or getattr(config, "_name_or_path", "") or args.model

    with open(args.scenarios) as f:
        scenarios = json.load(f)["scenarios"]
    runs = []
    for sc in scenarios:
        for strategy in args.strategies.split(","):
            for path in PATHS:
                r = run_one(model, sc, strategy, path, args.repeat)
                runs.append(r)
                status = r["error"][:60] if r["error"] else f"{len(r['device_map'])} entries"
                print(f"{sc['name']:28} {strategy:15} {path:13} {status}", file=sys.stderr)

    doc = {
        "format": "devmap-reference/1",
        "model": name,
        "manifest": args.manifest,
        "versions": versions(),
        "host": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "timing": f"time.perf_counter of the map computation; 1 warm-up excluded; median of {args.repeat}",
        "runs": runs,
    }
    text = json.dumps(doc, indent=1) + "\n"
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
