#!/usr/bin/env python3
"""Export a devmap-manifest/1 JSON for a transformers model, built on the meta device (no weights).

    python scripts/export_manifest.py MODEL_ID_OR_CONFIG_JSON [--dtype bf16] [-o out.json]

MODEL_ID_OR_CONFIG_JSON is a path to a config.json, a directory holding one, or a Hugging Face Hub
id (the config is fetched from the Hub, or its cache; no weights are ever downloaded). The model is
instantiated with AutoModelForCausalLM.from_config (falling back to AutoModelForSeq2SeqLM,
AutoModelForImageTextToText, then AutoModel) under `torch.device("meta")`, with --dtype as the
default dtype, and its weights are tied before the tensor table is read.

Besides the manifest, `<out stem>.config.json` (the config's to_dict()) is written next to it: devmap
reads it for KV-cache sizing. Without -o the manifest goes to stdout and no config file is written.

Needs torch and transformers (tested with transformers 5.23); accelerate is not needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# The export itself lives in the Python package (python/devmap/_export.py), which needs no build
# to be imported from a checkout.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from devmap._export import FORMAT, SAFETENSORS_NAMES, manifest, st_dtype, tied_groups, hidden_size  # noqa: E402,F401

# argument spelling -> torch dtype attribute name
DTYPE_ARGS = {
    "f16": "float16", "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "f32": "float32", "fp32": "float32", "float32": "float32", "float": "float32",
    "f64": "float64", "fp64": "float64", "float64": "float64", "double": "float64",
}


def load_config(source: str):
    """A PretrainedConfig from a config.json path, a directory, or a Hub id."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if os.path.isfile(source):
        with open(source) as f:
            d = json.load(f)
        model_type = d.get("model_type")
        if not model_type:
            raise SystemExit(f"export_manifest: {source} has no model_type")
        return CONFIG_MAPPING[model_type].from_dict(d)
    return AutoConfig.from_pretrained(source)


def build_model(config, torch_dtype):
    """Instantiate the model on meta with the first auto class that accepts the config."""
    import torch
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForSeq2SeqLM,
    )

    errors = []
    for auto in (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForImageTextToText, AutoModel):
        previous = torch.get_default_dtype()
        try:
            torch.set_default_dtype(torch_dtype)
            with torch.device("meta"):
                model = auto.from_config(config, dtype=torch_dtype)
        except ValueError as e:  # "Unrecognized configuration class ..." for this auto class
            errors.append(f"{auto.__name__}: {e}")
            continue
        finally:
            torch.set_default_dtype(previous)
        return model
    raise SystemExit("export_manifest: no auto class builds this config:\n" + "\n".join(errors))


def tie(model) -> None:
    """Tie the weights the config asks to tie, so tied names share one tensor."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="path to a config.json (or a directory holding one) or a Hub id")
    ap.add_argument("--dtype", default="bf16", help="default dtype: bf16 (default), f16, f32, f64")
    ap.add_argument("--name", help="model name to record (default: the config's _name_or_path or the argument)")
    ap.add_argument("-o", "--output", help="manifest path (default: stdout)")
    args = ap.parse_args(argv)

    import torch

    try:
        torch_dtype = getattr(torch, DTYPE_ARGS[args.dtype.lower()])
    except KeyError:
        ap.error(f"unknown --dtype {args.dtype!r} (bf16, f16, f32, f64)")

    config = load_config(args.model)
    model = build_model(config, torch_dtype)
    tie(model)
    name = args.name or getattr(config, "_name_or_path", "") or args.model
    out = manifest(model, name)
    out["dtype"] = st_dtype(torch_dtype)
    text = json.dumps(out, indent=1) + "\n"
    if not args.output:
        sys.stdout.write(text)
        return 0
    with open(args.output, "w") as f:
        f.write(text)
    stem = args.output[: -len(".json")] if args.output.endswith(".json") else args.output
    with open(stem + ".config.json", "w") as f:
        json.dump(model.config.to_dict(), f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
