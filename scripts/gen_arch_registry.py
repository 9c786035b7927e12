#!/usr/bin/env python3
"""Generate devmap's architecture registry (`devmap-arch-registry/1`, JSON Lines).

Run by hand with transformers installed (not in CI):

    python scripts/gen_arch_registry.py --out crates/devmap-core/registry/arch-registry.jsonl

For every model class transformers' auto mappings name (base models and the heads devmap
plans for), the script builds the class at its config's defaults on the meta device (no memory,
no weights) and records what planning needs and a checkpoint does not say: the module tree in
registration order (repeated layers as templates), module classes, `_no_split_modules`, tie
aliases and the config field deciding them, `_keep_in_fp32_modules(_strict)`, tensors a
checkpoint never holds (with dtype and shape expressions over config fields), and the
checkpoint-key -> model-key conversions transformers applies on load. The checkpoint's key set
is what `save_pretrained` writes: the state dict, less `_keys_to_ignore_on_save`, with
transformers' own conversions reverted (run on meta tensors). The format is described in
docs/formats.md ("Architecture registry").
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict

FORMAT = "devmap-arch-registry/1"

# The auto mappings whose classes are recorded, in the order a class's heads are listed.
MAPPINGS = [
    "MODEL_MAPPING_NAMES",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
]

DTYPE_NAMES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "bool": "BOOL", "complex64": "C64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}

# Wall-clock seconds per class: on a shared 2-core machine (load ~16) the biggest classes took
# over 60 s although they need ~10 s of CPU, and a timeout drops the class from the file.
CLASS_TIMEOUT_S = 300


class ClassTimeout(Exception):
    """A class took longer than CLASS_TIMEOUT_S to build and record."""


# ---------------------------------------------------------------------------------------------
# Enumerating classes
# ---------------------------------------------------------------------------------------------


def list_classes(only: set[str] | None) -> list[tuple[str, str]]:
    """(model_type, line key) for every class of the recorded auto mappings.

    A class several model types map to (shieldgemma2 -> Gemma3ForConditionalGeneration) has its
    plain line for the type whose config class shares its name's prefix (gemma3: Gemma3Config) and
    a line "Class@model_type" for each other type: conversions follow the config's model_type.
    """
    from transformers.models.auto import configuration_auto, modeling_auto

    pairs: list[tuple[str, str]] = []
    for mapping_name in MAPPINGS:
        for model_type, names in getattr(modeling_auto, mapping_name, {}).items():
            for name in names if isinstance(names, (list, tuple)) else [names]:
                if (model_type, name) not in pairs:
                    pairs.append((model_type, name))
    config_names = configuration_auto.CONFIG_MAPPING_NAMES

    def affinity(model_type: str, name: str) -> int:
        config = config_names.get(model_type, "").lower()
        named_after = name.lower().startswith(re.sub(r"[-_]", "", model_type))
        return 100 * named_after + len(os.path.commonprefix([config, name.lower()]))

    owner: dict[str, str] = {}
    for model_type, name in pairs:
        if name not in owner or affinity(model_type, name) > affinity(owner[name], name):
            owner[name] = model_type
    out = []
    for model_type, name in pairs:
        key = name if owner[name] == model_type else f"{name}@{model_type}"
        if only and model_type not in only and name not in only and key not in only:
            continue
        out.append((model_type, key))
    return out


# ---------------------------------------------------------------------------------------------
# Config paths and expressions
# ---------------------------------------------------------------------------------------------


def sub_config_paths(config) -> dict[int, str]:
    """id(config object) -> dotted path from the top-level config ("" for the top)."""
    from transformers import PretrainedConfig

    paths: dict[int, str] = {}

    def walk(cfg, path: str) -> None:
        if id(cfg) in paths:
            return
        paths[id(cfg)] = path
        for key, value in vars(cfg).items():
            if isinstance(value, PretrainedConfig):
                walk(value, f"{path}.{key}" if path else key)

    walk(config, "")
    return paths


def sub_configs(config) -> dict:
    """Dotted path -> sub-config object ("" = the top level)."""
    from transformers import PretrainedConfig

    out = {"": config}

    def walk(cfg, path, depth):
        for key, value in vars(cfg).items():
            if isinstance(value, PretrainedConfig) and depth < 3:
                out[join(path, key)] = value
                walk(value, join(path, key), depth + 1)

    walk(config, "", 0)
    return out


def int_fields(config) -> dict:
    """Every integer (not bool) config field, by dotted path, sub-configs included, and the
    rotary fractions (floats) the shape expressions may also use."""
    from transformers import PretrainedConfig

    out: dict[str, int] = {}

    def walk(cfg, path: str, depth: int) -> None:
        for key, value in vars(cfg).items():
            if key.startswith("_"):
                continue
            full = f"{path}.{key}" if path else key
            if isinstance(value, PretrainedConfig) and depth < 3:
                walk(value, full, depth + 1)
            elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
                out[full] = value

    walk(config, "", 0)
    out.update(rotary_fractions(config))
    return out


def rotary_fractions(config) -> dict[str, float]:
    """Float fields that scale rotary dimensions (`partial_rotary_factor`, `rotary_pct`)."""
    from transformers import PretrainedConfig

    out: dict[str, float] = {}

    def walk(cfg, path: str, depth: int) -> None:
        for key, value in vars(cfg).items():
            full = f"{path}.{key}" if path else key
            if isinstance(value, PretrainedConfig) and depth < 3:
                walk(value, full, depth + 1)
            elif isinstance(value, float) and 0 < value < 1 and ("rotary" in key or "partial" in key):
                out[full] = value
            elif isinstance(value, dict) and key.startswith("rope"):
                for sub, inner in value.items():
                    if isinstance(inner, float) and 0 < inner < 1 and ("rotary" in sub or "partial" in sub):
                        out[f"{full}.{sub}"] = inner

    walk(config, "", 0)
    return out


def list_fields(config) -> dict[str, list]:
    """Every list-of-str config field, by dotted path (candidates for choosing layer variants)."""
    from transformers import PretrainedConfig

    out: dict[str, list] = {}

    def walk(cfg, path: str, depth: int) -> None:
        for key, value in vars(cfg).items():
            full = f"{path}.{key}" if path else key
            if isinstance(value, PretrainedConfig) and depth < 3:
                walk(value, full, depth + 1)
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
                out[full] = list(value)

    walk(config, "", 0)
    return out


# Fields preferred when several have the value a dimension needs (most specific first).
PREFERRED_FIELDS = [
    "head_dim", "hidden_size", "num_attention_heads", "max_position_embeddings",
    "num_key_value_heads", "intermediate_size", "vocab_size", "d_model", "d_kv", "n_positions",
    "num_hidden_layers", "num_experts", "image_size", "patch_size", "num_channels",
]


def field_rank(path: str, scope: str) -> tuple:
    """Sort key: fields in the tensor's own sub-config first, then preferred names, then short."""
    leaf = path.rsplit(".", 1)[-1]
    in_scope = 0 if (path.rsplit(".", 1)[0] if "." in path else "") == scope else 1
    pref = PREFERRED_FIELDS.index(leaf) if leaf in PREFERRED_FIELDS else len(PREFERRED_FIELDS)
    return (in_scope, pref, len(path), path)


def candidate_exprs(value: int, fields: dict, scope: str):
    """Expressions over config fields equal to `value` on `fields`, simplest first.

    Forms: one field, field/2, field/field, field/field/2, field*2, field*fraction/2,
    field/field*fraction/2 (partial rotary), field/field*field/field(+1) (patch grids). Among
    equal forms, fields of the tensor's own sub-config and PREFERRED_FIELDS come first.
    """
    ints = {p: v for p, v in fields.items() if isinstance(v, int)}
    fracs = [p for p, v in fields.items() if isinstance(v, float)]
    ranked = sorted(ints, key=lambda p: field_rank(p, scope))
    few = ranked[:60]
    pairs = [(a, b) for a in few for b in few if a != b and ints[b] > 1]
    yield from (p for p in ranked if ints[p] == value)
    yield from (f"{p}/2" for p in ranked if ints[p] == 2 * value)
    for f in fracs:
        yield from (f"{p}*{f}/2" for p in few if int(ints[p] * fields[f]) // 2 == value)
    # Pairs from one sub-config first (vision sizes divide by vision head counts), and head counts
    # before other divisors: they divide sizes far more often than anything else does.
    def group_of(ab):
        own = ab[0].rpartition(".")[0] == scope
        same = ab[0].rpartition(".")[0] == ab[1].rpartition(".")[0]
        return (not (own and same), not same, "heads" not in ab[1].rpartition(".")[2])

    for key in sorted({group_of(ab) for ab in pairs}):
        group = [ab for ab in pairs if group_of(ab) == key]
        yield from (f"{a}/{b}" for a, b in group if ints[a] == value * ints[b])
        yield from (f"{a}/{b}/2" for a, b in group if ints[a] == 2 * value * ints[b])
        for f in fracs:
            yield from (f"{a}/{b}*{f}/2" for a, b in group if int(ints[a] // ints[b] * fields[f]) // 2 == value)
        yield from (f"{a}/{b}/4" for a, b in group if ints[a] == 4 * value * ints[b])
    yield from (f"{p}*2" for p in ranked if 2 * ints[p] == value)
    for a in few:
        for b in few:
            if a != b and ints[b] > 1 and ints[a] % ints[b] == 0:
                grid = (ints[a] // ints[b]) ** 2
                if grid == value:
                    yield f"({a}/{b})*({a}/{b})"
                elif grid + 1 == value:
                    yield f"({a}/{b})*({a}/{b})+1"
    yield from composite_exprs(value, fields, ints, fracs, few)


# Offsets that sinusoidal position tables add to their size (M2M-100/NLLB/Seamless/XGLM: padding
# index + 1 + 1; wav2vec2-conformer/seamless relative tables: 2 * max - 1).
POSITION_OFFSETS = (1, 2, 3, 4)


def composite_exprs(value: int, fields: dict, ints: dict, fracs: list, few: list):
    """Rarer forms, tried after every simpler one (only a second build makes them safe):
    field+k / field*2-1 (sinusoidal position tables), field*fraction (rotary tables that repeat
    each frequency twice), a*b (attention widths heads*head_dim where the config sets head_dim),
    and tile grids divided by a scale factor, (a/b/c)^2 and (a/b/(c/2))^2 (pixel-shuffle
    connectors)."""
    for p in few:
        for k in POSITION_OFFSETS:
            if ints[p] + k == value:
                yield f"{p}+{k}"
        if 2 * ints[p] - 1 == value:
            yield f"{p}*2-1"
    for f in fracs:
        yield from (f"{p}*{f}" for p in few if int(ints[p] * fields[f]) == value)
    same = [(a, b) for a in few for b in few if a < b and a.rpartition(".")[0] == b.rpartition(".")[0]]
    yield from (f"{a}*{b}" for a, b in same if ints[a] * ints[b] == value)
    # Image sides first: a width over a head count can equal a tile side at both builds.
    sides = sorted(few, key=lambda p: not p.endswith("image_size"))
    for a in sides:
        for b in sorted(few, key=lambda p: not p.endswith("patch_size")):
            if a == b or ints[b] < 2 or ints[a] % ints[b] == 0 or a.rpartition(".")[0] != b.rpartition(".")[0]:
                continue
            # A side that does not divide: the grid floors it (SigLIP at 384 px, 14 px patches).
            grid = (ints[a] // ints[b]) ** 2
            if grid == value:
                yield f"({a}//{b})*({a}//{b})"
            elif grid + 1 == value:
                yield f"({a}//{b})*({a}//{b})+1"
    for a in sides:
        for b in sorted(few, key=lambda p: not p.endswith("patch_size")):
            if a == b or ints[b] < 2 or ints[a] % ints[b] or a.rpartition(".")[0] != b.rpartition(".")[0]:
                continue
            side = ints[a] // ints[b]
            for c in few:
                if c in (a, b) or not 1 < ints[c] <= 16 or c.rpartition(".")[0] != a.rpartition(".")[0]:
                    continue
                if side % ints[c] == 0 and (side // ints[c]) ** 2 == value:
                    yield f"({a}/{b}/{c})*({a}/{b}/{c})"
                if ints[c] % 2 == 0 and side % (ints[c] // 2) == 0 and (side // (ints[c] // 2)) ** 2 == value:
                    yield f"({a}/{b}/({c}/2))*({a}/{b}/({c}/2))"


def eval_expr(expr: str, fields: dict):
    """Value of an expression (`+ - * /`, usual precedence, in floats, truncated at the end), or
    None if a path is absent. The Rust reader evaluates the same way (docs/formats.md)."""
    tokens = re.findall(r"[A-Za-z_][A-Za-z0-9_.]*|\d+|[-+*/()]", expr)
    values = []
    for tok in tokens:
        if tok[0].isalpha() or tok[0] == "_":
            if tok not in fields:
                return None
            values.append(str(float(fields[tok])))
        else:
            values.append(tok)
    try:
        return int(eval("".join(values), {"__builtins__": {}}))  # noqa: S307 - tokens are numbers/operators
    except ZeroDivisionError:
        return None


_fit_cache: dict = {}


def fit_dim(value: int, fields: dict, scope: str, value_b=None, fields_b=None):
    """Memoized `fit_dim_uncached` (the same rotary buffer recurs in every layer)."""
    key = (value, id(fields), scope, value_b, id(fields_b))
    if key not in _fit_cache:
        _fit_cache[key] = fit_dim_uncached(value, fields, scope, value_b, fields_b)
    return _fit_cache[key]


def fit_dim_uncached(value: int, fields: dict, scope: str, value_b=None, fields_b=None):
    """An expression over config fields for one dimension of a tensor the checkpoint lacks.

    With a second build (`value_b` on `fields_b`, sizes scaled), an expression must give both
    values; a dimension that did not change and matches no field is a constant; otherwise "?".
    With one build only, small values are constants and the first candidate is taken.
    """
    if fields_b is None:
        return value if value <= 2 else next(candidate_exprs(value, fields, scope), value)
    if value <= 2 and value == value_b:
        return value
    for expr in candidate_exprs(value, fields, scope):
        if eval_expr(expr, fields_b) == value_b:
            return expr
    return value if value == value_b else "?"


SCALED_SUFFIXES = ("hidden_size", "intermediate_size", "_dim", "max_position_embeddings", "_positions",
                   "d_model", "d_ff", "d_kv", "n_embd", "n_inner", "image_size", "_head_dim")


def scale_factor(key: str) -> int:
    """Different factors for unrelated sizes, so that e.g. max_position_embeddings/num_heads cannot
    pass for head_dim/2: widths (hidden, head, embed dims) x2, feed-forward sizes x3, positions x5."""
    if "intermediate" in key or "ffn" in key or key in ("d_ff", "n_inner"):
        return 3
    if "position" in key:
        return 5
    return 2


def scaled_config(config, shrink_layers: bool = False):
    """A copy of `config` with its size fields (hidden, intermediate, head and position sizes)
    scaled (`scale_factor`): ratios such as hidden_size/num_attention_heads stay valid, so the model
    still builds, and an expression that fits both builds follows the config, not a coincidence."""
    import copy

    from transformers import PretrainedConfig

    scaled = copy.deepcopy(config)

    def walk(cfg, depth):
        for key, value in list(vars(cfg).items()):
            if isinstance(value, PretrainedConfig) and depth < 3:
                walk(value, depth + 1)
            elif (shrink_layers and isinstance(value, int) and not isinstance(value, bool) and value > 2
                  and any(word in key for word in LAYER_COUNT_WORDS) and "num" in key or key == "n_layer"):
                setattr(cfg, key, 2)
            elif (isinstance(value, int) and not isinstance(value, bool) and value > 1
                  and key.endswith(SCALED_SUFFIXES) and "patch" not in key):
                setattr(cfg, key, scale_factor(key) * value)

    walk(scaled, 0)
    return scaled


def expr_paths(expr) -> list[str]:
    """Config paths an expression refers to."""
    if not isinstance(expr, str):
        return []
    return [tok for tok in re.split(r"[+\-*/() ]+", expr) if tok and not tok.isdigit() and tok != "?"]


# ---------------------------------------------------------------------------------------------
# Checkpoint keys and conversions
# ---------------------------------------------------------------------------------------------


def checkpoint_tensors(model) -> dict[str, tuple]:
    """What save_pretrained writes: key -> (shape, dtype), tied aliases kept (see `tied`)."""
    from transformers.core_model_loading import revert_weight_conversion

    state = model.state_dict()
    for key in list(getattr(model, "_keys_to_ignore_on_save", None) or []):
        state.pop(key, None)
    state = revert_weight_conversion(model, state)
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items() if hasattr(v, "shape")}


def conversion_lists(model):
    """transformers' load-time conversions for this model: (renamings, converters)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    conversions = get_model_conversion_mapping(model, add_legacy=False)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    return renamings, converters


def op_entries(converter) -> list[dict] | None:
    """The converter's operations in the registry's shape vocabulary (None: not expressible)."""
    out = []
    for op in converter.operations:
        name = type(op).__name__
        if name == "MergeModulelist":
            out.append({"op": "stack", "dim": op.dim})
        elif name == "Concatenate":
            out.append({"op": "concat", "dim": op.dim})
        elif name in ("Chunk", "Split"):
            out.append({"op": "chunk", "dim": op.dim, "n": len(converter.target_patterns)})
        elif name == "Transpose":
            out.append({"op": "transpose", "dim0": op.dim0, "dim1": op.dim1})
        elif name in ("PermuteForRope", "Interleave"):
            out.append({"op": "same"})
        else:
            return None
    return out


def map_checkpoint_to_model(ckpt_keys, model_keys: set[str], model):
    """model key -> (source checkpoint keys grouped by converter pattern, ops, converter index).

    Keys whose model key equals the checkpoint key are left out (they need no conversion).
    """
    from transformers.core_model_loading import rename_source_key

    renamings, converters = conversion_lists(model)
    if not renamings and not converters:
        return {}
    prefix = getattr(model, "base_model_prefix", None) or None
    sources: dict[str, dict] = {}
    meta_state = dict.fromkeys(model_keys, 1)
    for ckpt_key in sorted(ckpt_keys):
        target, pattern = rename_source_key(ckpt_key, renamings, converters, prefix, meta_state)
        if target == ckpt_key and pattern is None:
            continue
        conv = next((c for c in converters if pattern is not None and pattern in c.source_patterns), None)
        targets = [target]
        if conv is not None and len(conv.target_patterns) > 1:
            first = conv.target_patterns[0]
            targets = [target.replace(first, t) for t in conv.target_patterns] if first in target else targets
        for part, tgt in enumerate(targets):
            entry = sources.setdefault(tgt, {"groups": defaultdict(list), "conv": conv, "part": part})
            group = conv.source_patterns.index(pattern) if conv is not None else 0
            entry["groups"][group].append(ckpt_key)
    return sources


def apply_ops(groups: list[list[tuple]], ops: list[dict]):
    """Shape of the model tensor from the source shapes, under the registry's op semantics."""
    shapes = [[list(s) for s in g] for g in groups]
    stacked = False
    for op in ops:
        kind = op["op"]
        if kind == "stack":
            shapes = [[s[0][: op["dim"]] + [len(s)] + s[0][op["dim"]:]] for s in shapes]
            stacked = True
        elif kind == "concat":
            first = [g[0] for g in shapes]
            out = list(first[0])
            out[op["dim"]] = sum(s[op["dim"]] for s in first)
            shapes = [[out]]
        elif kind == "chunk":
            s = list(shapes[0][0])
            s[op["dim"]] //= op["n"]
            shapes = [[s]]
        elif kind == "transpose":
            s = list(shapes[0][0])
            s[op["dim0"]], s[op["dim1"]] = s[op["dim1"]], s[op["dim0"]]
            shapes = [[s]]
    del stacked
    if len(shapes) != 1 or len(shapes[0]) != 1:
        return None
    return tuple(shapes[0][0])


# ---------------------------------------------------------------------------------------------
# The module tree
# ---------------------------------------------------------------------------------------------


class Recorder:
    """Walks one built model and produces the registry's nodes (see docs/formats.md)."""

    def __init__(self, model, config, shapes_b=None, config_b=None, dtypes_b=None):
        from transformers import PreTrainedModel

        self.model = model
        self.config = config
        self.shapes_b = shapes_b
        self.dtypes_b = dtypes_b or {}
        self.fields_b = int_fields(config_b) if config_b is not None else None
        self.config_paths = sub_config_paths(config)
        self.config_objects = {path: obj for path, obj in sub_configs(config).items()}
        self.fields = int_fields(config)
        self.lists = list_fields(config)
        self.ckpt = checkpoint_tensors(model)
        model_keys = {k for k, _ in model.named_parameters(remove_duplicate=False)}
        model_keys |= {k for k, _ in model.named_buffers(remove_duplicate=False)}
        self.sources = map_checkpoint_to_model(self.ckpt.keys(), model_keys, model)
        self.seen_modules: dict[int, str] = {}
        self.used_paths: set[str] = set()
        self.notes: list[str] = []
        self.pretrained_type = PreTrainedModel

    # -- tensors --------------------------------------------------------------------------

    def scope_of(self, module_path: str) -> str:
        """Config path of the nearest PreTrainedModel at or above `module_path`."""
        parts = module_path.split(".") if module_path else []
        for depth in range(len(parts), -1, -1):
            sub = self.model.get_submodule(".".join(parts[:depth]))
            if isinstance(sub, self.pretrained_type):
                return self.config_path_of(sub.config)
        return ""

    def config_path_of(self, cfg) -> str:
        """Path of a sub-model's config; by identity, else the one sub-config of the same class
        (some models copy their sub-config)."""
        if id(cfg) in self.config_paths:
            return self.config_paths[id(cfg)]
        same = [p for p, c in self.config_objects.items() if type(c) is type(cfg)]
        return same[0] if len(same) == 1 else ""

    def tensor_entry(self, name: str, tensor, full: str, indices: list[int], is_buffer: bool, persistent: bool):
        if full in self.ckpt and full not in self.sources:
            if not is_buffer or persistent:
                return name
        if full in self.sources:
            return self.converted_entry(name, tensor, full, indices)
        entry = {"n": name, "ckpt": False}
        if is_buffer and not persistent:
            entry["persistent"] = False
        entry["dtype"] = DTYPE_NAMES.get(str(tensor.dtype).replace("torch.", ""), str(tensor.dtype))
        if follows_load_dtype(tensor.dtype, self.dtypes_b.get(digits_to_template(full))):
            entry["load_dtype"] = True
        scope = self.scope_of(full.rsplit(".", 1)[0] if "." in full else "")
        shape_b = self.shapes_b.get(digits_to_template(full)) if self.shapes_b is not None else None
        if shape_b is None or len(shape_b) != len(tensor.shape):
            shape = [fit_dim(int(d), self.fields, scope) for d in tensor.shape]
        else:
            shape = [fit_dim(int(d), self.fields, scope, int(b), self.fields_b) for d, b in zip(tensor.shape, shape_b)]
        if "?" in shape:
            entry["shape_default"] = [int(d) for d in tensor.shape]
        for dim in shape:
            self.used_paths.update(expr_paths(dim))
        entry["shape"] = shape
        listed = self.listed_condition(name)
        if listed:
            entry["if_listed"] = listed
            self.used_paths.add(listed["field"])
        return entry

    def listed_condition(self, name: str):
        """Per-layer-type buffers (`sliding_attention_inv_freq`) exist only for the layer types
        the config lists: the field and value, or None."""
        for path, values in self.lists.items():
            for value in sorted(set(values), key=len, reverse=True):
                if name.startswith(value + "_"):
                    return {"field": path, "value": value}
        return None

    def converted_entry(self, name: str, tensor, full: str, indices: list[int]):
        info = self.sources[full]
        conv = info["conv"]
        groups = [sorted(info["groups"][g], key=natural_key) for g in sorted(info["groups"])]
        ops = [] if conv is None else op_entries(conv)
        if ops is not None and conv is not None and len(conv.target_patterns) > 1:
            ops = [dict(o, part=info["part"]) if o["op"] == "chunk" else o for o in ops]
        keys = [sorted({template_key(k, indices, varying_positions(g)) for k in g}) for g in groups]
        entry = {"n": name, "src": {"keys": keys, "ops": ops if ops is not None else []}}
        src_shapes = [[self.ckpt[k][0] for k in g] for g in groups]
        expected = tuple(tensor.shape)
        got = apply_ops(src_shapes, ops) if ops is not None else None
        if ops is None or got != expected:
            entry["src"]["shape_unverified"] = True
            self.notes.append(f"{full}: conversion shape not reproduced ({got} vs {expected})")
        return entry

    # -- nodes ----------------------------------------------------------------------------

    def node(self, module, name: str, path: str, indices: list[int]) -> dict:
        if id(module) in self.seen_modules:
            return {"n": name, "alias": self.seen_modules[id(module)]}
        self.seen_modules[id(module)] = path
        children = [(k, v) for k, v in module._modules.items() if v is not None]
        numbered = bool(children) and [k for k, _ in children] == [str(i) for i in range(len(children))]
        if numbered and not module._parameters and not module._buffers:
            return self.container(module, name, path, indices)
        names = numbered_names([k for k, _ in children])
        if names and not module._parameters and not module._buffers:
            return self.container(module, name, path, indices, names)
        out: dict = {"n": name, "c": type(module).__name__}
        params = [
            self.tensor_entry(k, v, join(path, k), indices, False, True)
            for k, v in module._parameters.items() if v is not None
        ]
        nodes = [self.node(v, k, join(path, k), indices) for k, v in children]
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        buffers = [
            self.tensor_entry(k, v, join(path, k), indices, True, k not in non_persistent)
            for k, v in module._buffers.items() if v is not None
        ]
        if params:
            out["p"] = params
        if nodes:
            out["m"] = nodes
        if buffers:
            out["b"] = buffers
        return out

    def container(self, module, name: str, path: str, indices: list[int], names: str = "{i}") -> dict:
        items = [(k, v) for k, v in module._modules.items() if v is not None]
        seen_before = dict(self.seen_modules)
        variants: list[dict] = []
        keys: list[str] = []
        seen: list[int] = []
        every: list[dict] = []
        for number, (key, child) in enumerate(items):
            node = self.node(child, "{i}", join(path, key), indices + [number])
            every.append(node)
            text = json.dumps(node, sort_keys=True)
            if text not in keys:
                keys.append(text)
                variants.append(node)
            seen.append(keys.index(text))
        if len(variants) == len(items) > 1 or (len(variants) > 1 and type(module).__name__ == "Sequential"):
            # A pipeline of different modules (Sequential(Linear, GELU, Linear)) is no repeat.
            self.seen_modules = seen_before
            return self.pipeline(module, name, path, indices, items)
        repeat = {"count": self.count_field(len(items), path), "variants": variants}
        if names != "{i}":
            repeat["names"] = names
        repeat["select"] = self.select_rule(seen, len(variants))
        return {"n": name, "c": type(module).__name__, "repeat": repeat}

    def pipeline(self, module, name: str, path: str, indices: list[int], items: list) -> dict:
        """A numbered container of different modules (Sequential(Linear, GELU, Linear)) as plain
        children "0".."N-1", one per item (a repeated item at each of its indices), walked again
        without the index (the caller restores `seen_modules`): "mlp.0" is a name here, not a
        repeat index to template in `src` keys."""
        nodes = [self.node(child, key, join(path, key), indices + [ChildName(key)]) for key, child in items]
        return {"n": name, "c": type(module).__name__, "m": nodes}

    def count_field(self, count: int, path: str):
        scope = self.scope_of(path)
        candidates = [p for p, v in self.fields.items() if v == count]
        if not candidates:
            return None

        words = {w for seg in path.split(".") for w in seg.split("_") if len(w) > 2}

        def rank(p):
            leaf = p.rsplit(".", 1)[-1]
            layerish = 0 if "layers" in leaf else (1 if "layer" in leaf or "depth" in leaf or "blocks" in leaf else 2)
            # `decoder.block` counts `num_decoder_layers`, `encoder.layers` `encoder_layers`...
            shared = -len(words & set(leaf.split("_")))
            return (layerish, shared, field_rank(p, scope))

        best = sorted(candidates, key=rank)[0]
        layerish, shared, _ = rank(best)
        if layerish == 2 and shared == 0 and not words & {"experts", "heads"}:
            # A field that merely has the same value (num_channels = 3 mergers) is no count:
            # the consumer counts the checkpoint's indices instead.
            return None
        self.used_paths.add(best)
        return best

    def select_rule(self, seen: list[int], n_variants: int) -> dict:
        if n_variants == 1:
            return {"by": "all", "variant": 0}
        for path, values in self.lists.items():
            if len(values) != len(seen):
                continue
            mapping: dict[str, int] = {}
            if all(mapping.setdefault(v, s) == s for v, s in zip(values, seen)):
                by_variant = defaultdict(set)
                for v, s in mapping.items():
                    by_variant[s].add(v)
                self.used_paths.add(path)
                return {"by": "list", "field": path, "values": mapping, "seen": seen}
        return {"by": "checkpoint", "seen": seen}


def numbered_names(keys: list[str]):
    """"expert_{i}" when the children are named expert_0, expert_1, ... (Switch Transformers'
    experts): a repeat whose child names carry a prefix. None otherwise (also for plain 0..N-1)."""
    if len(keys) < 2:
        return None
    match = re.fullmatch(r"([A-Za-z_]*[A-Za-z_])0", keys[0])
    if not match:
        return None
    prefix = match.group(1)
    return prefix + "{i}" if keys == [f"{prefix}{i}" for i in range(len(keys))] else None


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def natural_key(key: str):
    return [int(t) if t.isdigit() else t for t in key.split(".")]


class ChildName(int):
    """A pipeline child's number ("mlp.2") among `indices`: kept as it is in key templates."""


def varying_positions(keys: list[str]) -> set[int]:
    """The dot-separated positions at which the keys of one source group differ: the expert
    number of fused experts (`experts.{e}.w1`). A rename's fixed number (`mlp1.1.weight` ->
    `multi_modal_projector.linear_1.weight`) varies nowhere and must stay literal."""
    split = [k.split(".") for k in keys]
    return {i for i in range(max(map(len, split), default=0)) if len({p[i] if i < len(p) else None for p in split}) > 1}


def template_key(key: str, indices: list[int], varying: set[int] | None = None) -> str:
    """A checkpoint key with the enclosing repeat indices as {i0}.. and any other number as {e}
    where it varies within its group (`varying`; None: everywhere); a number that does not vary
    and a pipeline child's number (`ChildName`) stay literal."""
    parts = key.split(".")
    pending = list(indices)
    level = 0
    out = []
    for position, part in enumerate(parts):
        if part.isdigit():
            if pending and isinstance(pending[0], ChildName) and int(part) == pending[0]:
                out.append(part)
                pending.pop(0)
            elif pending and int(part) == pending[0]:
                out.append("{i%d}" % level)
                pending.pop(0)
                level += 1
            elif varying is None or position in varying:
                out.append("{e}")
            else:
                out.append(part)
        else:
            out.append(part)
    return ".".join(out)


# ---------------------------------------------------------------------------------------------
# One class
# ---------------------------------------------------------------------------------------------


def tied_entries(model, config_paths) -> list[dict]:
    """Every tie the model can make, with the condition on config.json deciding it."""
    from transformers import PreTrainedModel

    out = []
    for prefix, sub in model.named_modules():
        if not isinstance(sub, PreTrainedModel) or not sub._tied_weights_keys:
            continue
        cfg = sub.config
        had = "tie_word_embeddings" in vars(cfg)
        old = getattr(cfg, "tie_word_embeddings", None)
        try:
            cfg.tie_word_embeddings = True
            mapping = sub.get_expanded_tied_weights_keys(all_submodels=False)
        finally:
            if had:
                cfg.tie_word_embeddings = old
            else:
                delattr(cfg, "tie_word_embeddings")
        cond = tie_condition(type(model.config), config_paths.get(id(cfg), ""), model.config)
        for target, source in mapping.items():
            out.append({"t": join(prefix, target), "s": join(prefix, source), "if": cond})
    unique = {(e["t"], e["s"]): e for e in out}
    return list(unique.values())


TIE = "tie_word_embeddings"
_tie_cache: dict = {}


def tie_condition(config_cls, scope: str, config):
    """How transformers decides `tie_word_embeddings` for the sub-config at `scope`.

    Probes the config class: builds it from config.json-like dicts with the flag absent, true or
    false at the top level, in `text_config` and at `scope`, and reads the flag where
    `get_expanded_tied_weights_keys` does (`getattr(config, "tie_word_embeddings", False)`).
    The result is the smallest condition that reproduces every probe (see docs/formats.md).
    """
    key = (config_cls, scope)
    if key not in _tie_cache:
        fields = [TIE]
        for sub in [scope, "text_config"]:
            if sub and hasattr(config, sub.split(".")[0]) and join(sub, TIE) not in fields:
                fields.append(join(sub, TIE))
        rows = probe_tie(config_cls, scope, fields)
        _tie_cache[key] = simplest_condition(fields, rows)
    return _tie_cache[key]


def probe_tie(config_cls, scope: str, fields: list[str]) -> list[list]:
    import itertools

    rows = []
    for values in itertools.product([None, True, False], repeat=len(fields)):
        data: dict = {}
        for path, value in zip(fields, values):
            if value is None:
                continue
            obj = data
            parts = path.split(".")
            for part in parts[:-1]:
                obj = obj.setdefault(part, {})
            obj[parts[-1]] = value
        try:
            built = config_cls.from_dict(data)
            target = built
            for part in [p for p in scope.split(".") if p]:
                target = getattr(target, part)
            rows.append(list(values) + [bool(getattr(target, TIE, False))])
        except Exception:  # noqa: BLE001 - a combination the class rejects is no evidence
            continue
    return rows


def simplest_condition(fields: list[str], rows: list[list]):
    """true/false, one field with a default, or the probe table itself."""
    results = {r[-1] for r in rows}
    if len(results) == 1:
        return results.pop()
    for n, path in enumerate(fields):
        absent = [r[-1] for r in rows if r[n] is None]
        if len(set(absent)) != 1:
            continue
        default = absent[0]
        if all(r[-1] == (default if r[n] is None else r[n]) for r in rows):
            return {"field": path, "default": default}
    import itertools

    def value(row, n, default):
        return default if row[n] is None else row[n]

    for a, b in itertools.combinations(range(len(fields)), 2):
        for da, db in itertools.product([False, True], repeat=2):
            for kind, join_op in (("any", any), ("all", all)):
                if all(r[-1] == join_op([value(r, a, da), value(r, b, db)]) for r in rows):
                    return {kind: [{"field": fields[a], "default": da}, {"field": fields[b], "default": db}]}
    return {"table": {"fields": fields, "rows": rows}}


def defaults_for(config, paths: set[str], config_b=None) -> tuple[dict, dict]:
    """The config classes' defaults for `paths`, and expressions for computed ones."""
    defaults: dict = {}
    derived: dict = {}
    fields = int_fields(config)
    fields_b = int_fields(config_b) if config_b is not None else None
    for path in sorted(paths):
        obj = config
        parts = path.split(".")
        for part in parts[:-1]:
            obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
        leaf = parts[-1]
        if isinstance(obj, dict):
            defaults[path] = obj.get(leaf)
            continue
        value = config_attr(obj, leaf)
        declared = declared_default(type(obj), leaf) if obj is not None else value
        if declared is None and isinstance(value, int) and not isinstance(value, bool):
            defaults[path] = None
            scope = ".".join(parts[:-1])
            others = {p: v for p, v in fields.items() if p != path}
            if fields_b is not None and path in fields_b:
                expr = fit_dim(value, others, scope, fields_b[path], fields_b)
            else:
                expr = fit_dim(value, others, scope)
            derived[path] = expr
        else:
            defaults[path] = value if isinstance(value, (int, float, str, bool, list)) or value is None else str(value)
    return defaults, derived


def config_attr(obj, leaf: str):
    """`getattr(obj, leaf, None)`, also None where the config refuses a global value (Gemma 4's
    per-layer `head_dim` raises; its shapes then come from the layers' own fields)."""
    if obj is None:
        return None
    try:
        return getattr(obj, leaf, None)
    except Exception:  # noqa: BLE001 - AmbiguousGlobalPerLayerAttributeError and kin
        return None


def declared_default(config_cls, field: str):
    """The default `field` has in the config class's __init__ (None also when not declared)."""
    import inspect

    try:
        param = inspect.signature(config_cls.__init__).parameters.get(field)
    except (TypeError, ValueError):
        param = None
    if param is not None and param.default is not inspect.Parameter.empty:
        return param.default
    value = getattr(config_cls, field, None)
    return value if not callable(value) and not isinstance(value, property) else None


def fill_unset_sizes(config) -> list[str]:
    """Give None sizes the values transformers usually derives (head_dim = hidden/heads, KV heads
    = heads, vocab 32000); returns the paths set, recorded on the line as `config_filled`."""
    from transformers import PretrainedConfig

    filled = []

    def walk(cfg, path):
        rules = {
            "head_dim": lambda c: c.hidden_size // c.num_attention_heads,
            "num_key_value_heads": lambda c: c.num_attention_heads,
            "vocab_size": lambda c: 32000,
        }
        for key, rule in rules.items():
            if key in vars(cfg) and getattr(cfg, key) is None:
                try:
                    setattr(cfg, key, rule(cfg))
                    filled.append(join(path, key))
                except (AttributeError, TypeError, ZeroDivisionError):
                    pass
        for key, value in list(vars(cfg).items()):
            if isinstance(value, PretrainedConfig):
                walk(value, join(path, key))

    walk(config, "")
    return filled


# Config defaults of transformers 5.23 that their model class cannot be built with, and the
# value real checkpoints' config.json carries: model_type -> {dotted path: value}.
CONFIG_REPAIRS = {
    # DbrxAttentionConfig has no rope_theta attribute, DbrxAttention reads it (DBRX: 500000).
    "dbrx": {"attn_config.rope_theta": 500000.0},
    # The default SigLIP tower (width 1152) with 14 heads does not divide; aya-vision's has 16.
    "aya_vision": {"vision_config.num_attention_heads": 16},
    # No image vocabulary by default; the model reads tokens from it (any dict builds).
    "chameleon": {"vocabulary_map": {}},
    "emu3": {"vocabulary_map": {}},
    # Expert counts default to None (dots.llm1: 128 experts, 6 per token, 2 shared).
    "dots1": {"n_routed_experts": 128, "num_experts_per_tok": 6, "n_shared_experts": 2},
    # Per-layer kinds default to None; a list holding every kind records every layer variant.
    "lfm2_moe": {"layer_types": lambda c: ["full_attention" if i % 4 == 3 else "conv" for i in range(c.num_hidden_layers)]},
    "deepseek_ocr2": {"text_config.mlp_layer_types": lambda c: ["dense"] + ["sparse"] * (c.num_hidden_layers - 1)},
}


def repair_config(model_type: str, config) -> list[str]:
    """Apply CONFIG_REPAIRS[model_type] to `config`; returns the paths set (`config_filled`)."""
    done = []
    for path, value in CONFIG_REPAIRS.get(model_type, {}).items():
        *parents, leaf = path.split(".")
        obj = config
        for part in parents:
            obj = getattr(obj, part)
        setattr(obj, leaf, value(obj) if callable(value) else value)
        done.append(path)
    return done


def record_class(model_type: str, class_name: str) -> dict:
    """Build one class on the meta device and return its registry line (as a dict)."""
    import torch
    import transformers
    from transformers import AutoConfig

    second_type = "@" in class_name
    cls = getattr(transformers, class_name.split("@")[0])
    _fit_cache.clear()  # keyed by id() of per-class dicts
    config = AutoConfig.for_model(model_type)
    own = getattr(cls, "config_class", None)
    if own is not None and not isinstance(config, own) and not second_type:
        # e.g. Llama4ForCausalLM takes the text sub-config, not the composite Llama4Config
        config = own()
    filled: list[str] = []
    try:
        with torch.device("meta"):
            model = cls(config)
    except (TypeError, AttributeError, ValueError):
        # Some config classes default a size to None and expect config.json to set it; a few
        # have defaults their own model cannot build with (CONFIG_REPAIRS).
        filled = fill_unset_sizes(config) + repair_config(model_type, config)
        if not filled:
            raise
        with torch.device("meta"):
            model = cls(config)
    model.eval()
    shapes_b, config_b, dtypes_b = second_build(cls, config)
    rec = Recorder(model, config, shapes_b, config_b, dtypes_b)
    tree = rec.node(model, "", "", [])
    tied = tied_entries(model, rec.config_paths)
    defaults, derived = defaults_for(config, rec.used_paths, config_b)
    extra = {p for expr in derived.values() for p in expr_paths(expr)} - set(defaults)
    if extra:
        more, _ = defaults_for(config, extra, config_b)
        defaults = dict(sorted({**defaults, **more}.items()))
    line = {
        "class": class_name,
        "model_type": model_type,
        "config_class": type(config).__name__,
        "config_model_type": getattr(config, "model_type", model_type) or model_type,
        "base_model_prefix": getattr(model, "base_model_prefix", "") or "",
        "no_split": sorted(model._no_split_modules or []),
        "keep_in_fp32": sorted(model._keep_in_fp32_modules or []),
        "keep_in_fp32_strict": sorted(model._keep_in_fp32_modules_strict or []),
        "tied": tied,
        "defaults": defaults,
    }
    if derived:
        line["derived"] = derived
    if filled:
        line["config_filled"] = filled
    line["tree"] = tree
    return {"line": line, "notes": rec.notes}


LAYER_COUNT_WORDS = ("layers", "layer", "depth", "n_layer")


def second_build(cls, config):
    """Shapes and dtypes of the class built at `scaled_config`, by key template (digits -> `{i}`),
    or (None, None, None) when it cannot be built.

    Layer counts are cut to 2 first (the shapes of one layer are those of all), then, if the config
    refuses that (e.g. `layer_types` must match), kept. The build runs under a bfloat16 default
    dtype, as `from_pretrained` builds a bf16 checkpoint, so `follows_load_dtype` can tell tensors
    made in the default dtype from those made float32 on purpose (rotary frequencies)."""
    import torch

    previous = torch.get_default_dtype()
    for shrink in (True, False):
        try:
            config_b = scaled_config(config, shrink_layers=shrink)
            torch.set_default_dtype(torch.bfloat16)
            with torch.device("meta"):
                model_b = cls(config_b)
            break
        except Exception:  # noqa: BLE001 - then try unshrunk, and finally fit on one build only
            continue
        finally:
            torch.set_default_dtype(previous)
    else:
        return None, None, None
    shapes: dict = {}
    dtypes: dict = {}
    for key, tensor in [*model_b.named_parameters(remove_duplicate=False), *model_b.named_buffers(remove_duplicate=False)]:
        shapes.setdefault(digits_to_template(key), tuple(tensor.shape))
        dtypes.setdefault(digits_to_template(key), tensor.dtype)
    return shapes, config_b, dtypes


def follows_load_dtype(dtype, dtype_in_bf16_build) -> bool:
    """A tensor built float32 at the default dtype and bfloat16 under a bf16 default takes the
    dtype transformers loads the model in (registry key `load_dtype`)."""
    import torch

    return dtype == torch.float32 and dtype_in_bf16_build == torch.bfloat16


def digits_to_template(key: str) -> str:
    return ".".join("{i}" if part.isdigit() else part for part in key.split("."))


def on_timeout(signum, frame):
    raise ClassTimeout(f"took over {CLASS_TIMEOUT_S} s")


def worker(item):
    """Pool worker: one class -> ("ok", line, notes, seconds) or ("fail", reason, detail, seconds)."""
    model_type, class_name = item
    start = time.time()
    signal.signal(signal.SIGALRM, on_timeout)
    signal.alarm(CLASS_TIMEOUT_S)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = record_class(model_type, class_name)
        return ("ok", model_type, class_name, result["line"], result["notes"], time.time() - start)
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded with its reason
        reason = failure_reason(exc)
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()[:400]
        return ("fail", model_type, class_name, reason, detail, time.time() - start)
    finally:
        signal.alarm(0)


def failure_reason(exc: BaseException) -> str:
    """A short bucket for the summary: exception type plus the first words of its message."""
    text = str(exc).split("\n")[0]
    if "requires the" in text or "pip install" in text or isinstance(exc, ImportError):
        return "missing optional dependency"
    if isinstance(exc, ClassTimeout):
        return "timeout"
    if "meta" in text.lower():
        return f"{type(exc).__name__}: meta device"
    return type(exc).__name__


# ---------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------


def prefixed(node: dict, prefix: str) -> dict:
    """A copy of `node` whose full-key strings (src templates, alias paths) start with `prefix`."""
    out = {}
    for key, value in node.items():
        if key == "alias":
            out[key] = join(prefix, value)
        elif key == "src":
            out[key] = dict(value, keys=[[join(prefix, k) for k in group] for group in value["keys"]])
        elif isinstance(value, dict):
            out[key] = prefixed(value, prefix)
        elif isinstance(value, list):
            out[key] = [prefixed(v, prefix) if isinstance(v, dict) else v for v in value]
        else:
            out[key] = value
    return out


def share_subtrees(lines: list[dict]) -> int:
    """Replace subtrees equal to another class's whole tree by `ref` (keeps the file small).

    Only classes that are never `ref`ed themselves are rewritten, so a ref is one level deep.
    Returns the number of subtrees replaced.
    """
    by_root: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        by_root[line["tree"]["c"]].append(line)
    replaced = 0
    referenced: set[str] = set()

    def visit(node: dict, path: str, owner: dict) -> dict:
        nonlocal replaced
        for target in by_root.get(node.get("c", ""), []):
            if target is owner or target["class"] in rewritten or not path:
                continue
            candidate = prefixed(dict(target["tree"], n=node["n"]), path)
            if compact(candidate) == compact(node):
                replaced += 1
                referenced.add(target["class"])
                return {"n": node["n"], "ref": target["class"]}
        if "m" in node:
            node = dict(node, m=[visit(child, join(path, child["n"]), owner) for child in node["m"]])
        return node

    rewritten: set[str] = set()
    # Largest trees first: a referenced tree is a proper subtree of its referrer, hence smaller,
    # so it is visited later and then skipped (it stays whole).
    for line in sorted(lines, key=lambda l: -len(compact(l["tree"]))):
        if line["class"] in referenced:
            continue
        new_tree = visit(line["tree"], "", line)
        if new_tree is not line["tree"]:
            line["tree"] = new_tree
            rewritten.add(line["class"])
    return replaced


def compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def write_registry(path: str, results: list, elapsed: float) -> dict:
    import torch
    import transformers

    ok = [r for r in results if r[0] == "ok"]
    shared = share_subtrees([r[3] for r in ok])
    print(f"{shared} subtrees shared by ref", file=sys.stderr)
    failed = [r for r in results if r[0] == "fail"]
    by_type: dict[str, list[str]] = defaultdict(list)
    for _, model_type, class_name, *_ in ok:
        by_type[model_type].append(class_name)
    header = {
        "format": FORMAT,
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "classes": len(ok),
        "failed": dict(Counter(r[3] for r in failed).most_common()),
        "by_model_type": dict(sorted(by_type.items())),
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        out.write(compact(header) + "\n")
        for r in sorted(ok, key=lambda r: r[2]):
            out.write(compact(r[3]) + "\n")
    failures = {
        "transformers": transformers.__version__,
        "failed": [{"class": r[2], "model_type": r[1], "reason": r[3], "detail": r[4]} for r in failed],
        "notes": {r[2]: r[4] for r in ok if r[4]},
        "seconds": round(elapsed, 1),
    }
    with open(os.path.join(os.path.dirname(path) or ".", "failures.json"), "w", encoding="utf-8") as out:
        json.dump(failures, out, indent=1, sort_keys=True)
        out.write("\n")
    return header


def check_registry(path: str) -> list[str]:
    """Problems in a registry file (empty when it keeps the format's promises)."""
    problems: list[str] = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    header = json.loads(lines[0])
    if header.get("format") != FORMAT:
        problems.append(f"{path}:1: format is {header.get('format')!r}")
    classes = {}
    for number, text in enumerate(lines[1:], 2):
        line = json.loads(text)
        prefix = '{"class":%s,"model_type":%s,' % (json.dumps(line["class"]), json.dumps(line["model_type"]))
        if not text.startswith(prefix):
            problems.append(f"{path}:{number}: does not start with {prefix}")
        if line["class"] in classes:
            problems.append(f"{path}:{number}: class {line['class']} repeated")
        classes[line["class"]] = line
    for model_type, names in header["by_model_type"].items():
        problems += [f"{path}: by_model_type {model_type} names absent class {n}" for n in names if n not in classes]
    for name, line in classes.items():
        for ref in re.findall(r'"ref":"([^"]+)"', compact(line["tree"])):
            if ref not in classes or '"ref"' in compact(classes[ref]["tree"]):
                problems.append(f"{path}: {name} refs {ref}, absent or itself holding refs")
    if header["classes"] != len(classes):
        problems.append(f"{path}: header says {header['classes']} classes, file has {len(classes)}")
    return problems


def splice_registry(part_path: str, into_path: str) -> int:
    """Replace (or add) in `into_path` the class lines of `part_path`, a file written with
    `--only`: regenerating a few model types without the hour a full run takes. The header's
    `by_model_type` and `classes` follow; failures.json is left as it is. Returns the lines replaced."""
    with open(part_path, encoding="utf-8") as f:
        part = f.read().split("\n")
    with open(into_path, encoding="utf-8") as f:
        full = f.read().split("\n")
    part = [t for t in part[1:] if t]
    header, body = json.loads(full[0]), [t for t in full[1:] if t]
    lines = {json.loads(t)["class"]: t for t in body}
    replaced = 0
    for text in part:
        line = json.loads(text)
        replaced += line["class"] in lines
        lines[line["class"]] = text
        names = header["by_model_type"].setdefault(line["model_type"], [])
        if line["class"] not in names:
            names.append(line["class"])
    header["classes"] = len(lines)
    header["by_model_type"] = dict(sorted(header["by_model_type"].items()))
    with open(into_path, "w", encoding="utf-8") as out:
        out.write(compact(header) + "\n")
        for name in sorted(lines):
            out.write(lines[name] + "\n")
    return replaced


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="crates/devmap-core/registry/arch-registry.jsonl",
                        help="file to write (default: the committed registry; with --only give "
                             "another path, e.g. /tmp/part.jsonl, and --splice-into)")
    parser.add_argument("--only", nargs="*", help="model types or class names to record (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--check", metavar="FILE", help="only check an existing registry file")
    parser.add_argument("--splice-into", metavar="FILE",
                        help="after writing --out, replace (or add) its class lines in FILE, the "
                             "full registry, and update FILE's header (use with --only; "
                             "failures.json is left as it is)")
    args = parser.parse_args()
    if args.check:
        problems = check_registry(args.check)
        print("\n".join(problems) or f"{args.check}: ok", file=sys.stderr)
        return 1 if problems else 0

    start = time.time()
    items = list_classes(set(args.only) if args.only else None)
    print(f"{len(items)} classes to record", file=sys.stderr)
    results = []
    ctx = mp.get_context("fork")
    with ctx.Pool(args.jobs, maxtasksperchild=40) as pool:
        for n, result in enumerate(pool.imap_unordered(worker, items, chunksize=1), 1):
            results.append(result)
            if n % 50 == 0:
                print(f"  {n}/{len(items)} ({time.time() - start:.0f} s)", file=sys.stderr)
    order = {name: n for n, (_, name) in enumerate(items)}
    results.sort(key=lambda r: order[r[2]])
    header = write_registry(args.out, results, time.time() - start)
    size = os.path.getsize(args.out)
    print(f"built {header['classes']} of {len(items)} classes in {time.time() - start:.0f} s; "
          f"{args.out}: {size / 1e6:.2f} MB", file=sys.stderr)
    for reason, count in header["failed"].items():
        print(f"  failed {count:4d}  {reason}", file=sys.stderr)
    problems = check_registry(args.out)
    if args.splice_into and not problems:
        replaced = splice_registry(args.out, args.splice_into)
        print(f"{args.splice_into}: {replaced} class lines replaced", file=sys.stderr)
        problems = check_registry(args.splice_into)
    print("\n".join(problems) or "check: ok", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
