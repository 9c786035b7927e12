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

FORMAT = "devmap-manifest/1"

# argument spelling -> torch dtype attribute name
DTYPE_ARGS = {
    "f16": "float16", "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "f32": "float32", "fp32": "float32", "float32": "float32", "float": "float32",
    "f64": "float64", "fp64": "float64", "float64": "float64", "double": "float64",
}

# torch dtype attribute name -> safetensors spelling
SAFETENSORS_NAMES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    # less common, spelled as in safetensors where it has a name
    "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "complex64": "C64", "float8_e8m0fnu": "F8_E8M0",
}


def st_dtype(torch_dtype) -> str:
    name = str(torch_dtype).removeprefix("torch.")
    try:
        return SAFETENSORS_NAMES[name]
    except KeyError:
        raise SystemExit(f"export_manifest: no safetensors spelling for dtype {torch_dtype}")


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


def tied_groups(model, param_names: list[str]) -> list[list[str]]:
    """Groups of tensor names sharing one storage, each sorted, sorted by first member."""
    groups: dict[str, set[str]] = {}
    keys = getattr(model, "all_tied_weights_keys", None)
    if keys:
        # {tied name: source name}; one group per source.
        for target, source in keys.items():
            groups.setdefault(source, {source}).add(target)
    # Identity-based grouping catches ties the mapping does not name (older models, custom code).
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    for names in by_id.values():
        if len(names) < 2:
            continue
        merged = set(names)
        for key in [k for k, g in groups.items() if g & merged]:
            merged |= groups.pop(key)
        groups[min(merged)] = merged
    known = set(param_names)
    out = []
    for g in groups.values():
        missing = sorted(n for n in g if n not in known)
        if missing:
            print(f"export_manifest: warning: tied names {missing} are not parameters of the model; left out",
                  file=sys.stderr)
        kept = sorted(n for n in g if n in known)
        if len(kept) > 1:
            out.append(kept)
    return sorted(out)


def hidden_size(config):
    for c in (getattr(config, "text_config", None), config):
        if c is None:
            continue
        for attr in ("hidden_size", "d_model", "n_embd", "dim"):
            v = getattr(c, attr, None)
            if isinstance(v, int):
                return v
    return None


def torch_kind(module) -> str | None:
    """What a quantizer needs to know of a module's class: exact `nn.Linear`, a subclass, or `Conv1D`.

    bitsandbytes converts only exact `nn.Linear` and transformers' `Conv1D`; other quantizers accept
    subclasses. Other modules get no entry."""
    import torch

    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return "conv1d"
    if type(module) is torch.nn.Linear:
        return "linear"
    if isinstance(module, torch.nn.Linear):
        return "linear_subclass"
    return None


def module_entry(name: str, module) -> dict:
    entry = {"name": name, "class": type(module).__name__}
    kind = torch_kind(module)
    if kind is not None:
        entry["torch_kind"] = kind
    return entry


def output_embedding_name(model) -> str | None:
    """The module name of `get_output_embeddings()` (quantizers keep it in full precision)."""
    getter = getattr(model, "get_output_embeddings", None)
    out = getter() if getter is not None else None
    if out is None:
        return None
    return next((n for n, m in model.named_modules() if m is out), None)


def manifest(model, name: str, torch_dtype) -> dict:
    modules = [module_entry(n, m) for n, m in model.named_modules() if n != ""]
    tensors = []
    for n, p in model.named_parameters(remove_duplicate=False):
        tensors.append({"name": n, "dtype": st_dtype(p.dtype), "shape": list(p.shape), "kind": "param"})
    params = [t["name"] for t in tensors]
    for n, b in model.named_buffers():
        tensors.append({"name": n, "dtype": st_dtype(b.dtype), "shape": list(b.shape), "kind": "buffer"})
    no_split = getattr(model, "_no_split_modules", None) or []
    return {
        "format": FORMAT,
        "name": name,
        "dtype": st_dtype(torch_dtype),
        "root_class": type(model).__name__,
        "modules": modules,
        "tensors": tensors,
        "tied": tied_groups(model, params),
        # The names transformers treats as tie targets (it never counts their size, which drops a
        # shared storage entirely when a target is registered before its source).
        "tied_targets": sorted(k for k in (getattr(model, "all_tied_weights_keys", None) or {}) if k in set(params)),
        "no_split": sorted(no_split),
        "hidden_size": hidden_size(model.config),
        # For quantizers (docs/quantization.md): modules they keep in float32 / full precision.
        "keep_in_fp32_modules": sorted(getattr(model, "_keep_in_fp32_modules", None) or []),
        "output_embedding": output_embedding_name(model),
    }


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
    out = manifest(model, name, torch_dtype)
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
