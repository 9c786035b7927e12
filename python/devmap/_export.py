"""Reading a live ``torch.nn.Module`` into a ``devmap-manifest/1`` dict (no file, no weights).

The one implementation of the export: ``scripts/export_manifest.py`` imports it. Works on any
module (parameters may live on the meta device); transformers models add their no-split classes,
tie mapping (``all_tied_weights_keys``) and ``_keep_in_fp32_modules``. Importing this file does not
import torch.
"""

from __future__ import annotations

import re
import sys

from ._errors import ModelError

FORMAT = "devmap-manifest/1"

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
    """The safetensors spelling of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    name = str(torch_dtype).removeprefix("torch.")
    try:
        return SAFETENSORS_NAMES[name]
    except KeyError:
        raise ModelError(f"no safetensors spelling for dtype {torch_dtype}") from None


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
            print(f"devmap: warning: tied names {missing} are not parameters of the model; left out",
                  file=sys.stderr)
        kept = sorted(n for n in g if n in known)
        if len(kept) > 1:
            out.append(kept)
    return sorted(out)


def hidden_size(config):
    """The activation width from a transformers config (``hidden_size``, ``d_model``, ...)."""
    for c in (getattr(config, "text_config", None), config):
        if c is None:
            continue
        for attr in ("hidden_size", "d_model", "n_embd", "dim"):
            v = getattr(c, attr, None)
            if isinstance(v, int):
                return v
    return None


def model_dtype(model):
    """The model's dtype: ``model.dtype`` (transformers), else its first floating parameter's."""
    dtype = getattr(model, "dtype", None)
    if dtype is not None:
        return dtype
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return None


def manifest(model, name: str | None = None) -> dict:
    """The ``devmap-manifest/1`` dict of ``model``: every module (registration order), every
    parameter (duplicates of tied ones included) then every buffer, tie groups and targets,
    no-split classes and the hidden size."""
    modules = [module_entry(n, m) for n, m in model.named_modules() if n != ""]
    tensors = []
    for n, p in model.named_parameters(remove_duplicate=False):
        tensors.append({"name": n, "dtype": st_dtype(p.dtype), "shape": list(p.shape), "kind": "param"})
    params = [t["name"] for t in tensors]
    for n, b in model.named_buffers():
        tensors.append({"name": n, "dtype": st_dtype(b.dtype), "shape": list(b.shape), "kind": "buffer"})
    no_split = getattr(model, "_no_split_modules", None) or []
    config = getattr(model, "config", None)
    dtype = model_dtype(model)
    if name is None:
        name = getattr(config, "_name_or_path", "") or type(model).__name__
    return {
        "format": FORMAT,
        "name": name,
        "dtype": st_dtype(dtype) if dtype is not None else None,
        "root_class": type(model).__name__,
        "modules": modules,
        "tensors": tensors,
        "tied": tied_groups(model, params),
        # The names transformers treats as tie targets (it never counts their size, which drops a
        # shared storage entirely when a target is registered before its source).
        "tied_targets": sorted(k for k in (getattr(model, "all_tied_weights_keys", None) or {}) if k in set(params)),
        "no_split": sorted(no_split),
        "hidden_size": hidden_size(config) if config is not None else None,
        # For quantizers (docs/quantization.md): modules they keep in float32 / full precision.
        "keep_in_fp32_modules": sorted(getattr(model, "_keep_in_fp32_modules", None) or []),
        "output_embedding": output_embedding_name(model),
    }


def torch_kind(module) -> str | None:
    """What a quantizer needs to know of a module's class: exact ``nn.Linear``, a subclass, or
    ``Conv1D``. bitsandbytes converts only exact ``nn.Linear`` and transformers' ``Conv1D``; other
    quantizers accept subclasses. Other modules get no entry."""
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # a plain torch model without transformers installed
        Conv1D = ()
    if Conv1D and isinstance(module, Conv1D):
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
    """The module name of ``get_output_embeddings()`` (quantizers keep it in full precision)."""
    getter = getattr(model, "get_output_embeddings", None)
    out = getter() if getter is not None else None
    if out is None:
        return None
    return next((n for n, m in model.named_modules() if m is out), None)


def keep_in_fp32_patterns(model, target: str) -> list[str]:
    """Module names transformers keeps in float32 when loading in ``target`` (safetensors
    spelling): ``_keep_in_fp32_modules`` for F16, ``_keep_in_fp32_modules_strict`` for F16/BF16."""
    out = []
    if target == "F16":
        out += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if target in ("F16", "BF16"):
        out += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return sorted(set(out))


FLOAT_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def apply_dtype_keeping_fp32(manifest_dict: dict, target: str, patterns: list[str]) -> None:
    """Count floats at ``target`` (never upcast), except the tensors of the kept modules, which
    from_pretrained(dtype=...) loads in float32. Only for models with such modules: otherwise the
    target dtype goes to the planner, which applies the same rule."""
    kept = re.compile(r"(^|\.)(" + "|".join(re.escape(p) for p in patterns) + r")(\.|$)")
    for t in manifest_dict["tensors"]:
        own = FLOAT_SIZES.get(t["dtype"])
        if own is None:
            continue
        if kept.search(t["name"]):
            t["dtype"] = "F32"
        elif own > FLOAT_SIZES[target]:
            t["dtype"] = target
