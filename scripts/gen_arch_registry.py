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

CLASS_TIMEOUT_S = 60


class ClassTimeout(Exception):
    """A class took longer than CLASS_TIMEOUT_S to build and record."""


# ---------------------------------------------------------------------------------------------
# Enumerating classes
# ---------------------------------------------------------------------------------------------


def list_classes(only: set[str] | None) -> list[tuple[str, str]]:
    """(model_type, class name) for every class of the recorded auto mappings, deduplicated."""
    from transformers.models.auto import modeling_auto

    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for mapping_name in MAPPINGS:
        mapping = getattr(modeling_auto, mapping_name, None)
        if mapping is None:
            continue
        for model_type, names in mapping.items():
            for name in names if isinstance(names, (list, tuple)) else [names]:
                if name in seen or (only and model_type not in only and name not in only):
                    continue
                seen.add(name)
                out.append((model_type, name))
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


def int_fields(config) -> dict[str, int]:
    """Every integer (not bool) config field, by dotted path, sub-configs included."""
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
    "head_dim", "max_position_embeddings", "hidden_size", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "vocab_size", "d_model", "d_kv", "n_positions",
    "num_hidden_layers", "num_experts", "image_size", "patch_size", "num_channels",
]


def field_rank(path: str, scope: str) -> tuple:
    """Sort key: fields in the tensor's own sub-config first, then preferred names, then short."""
    leaf = path.rsplit(".", 1)[-1]
    in_scope = 0 if (path.rsplit(".", 1)[0] if "." in path else "") == scope else 1
    pref = PREFERRED_FIELDS.index(leaf) if leaf in PREFERRED_FIELDS else len(PREFERRED_FIELDS)
    return (in_scope, pref, len(path), path)


def fit_dim(value: int, fields: dict[str, int], scope: str):
    """An expression over config fields equal to `value`, or the integer itself.

    Tried in order: small constants, one field, field/2, field/field, field/field/2, field*2.
    With one config the choice among equal values follows `field_rank`.
    """
    if value <= 2:
        return value
    ranked = sorted(fields, key=lambda p: field_rank(p, scope))
    for path in ranked:
        if fields[path] == value:
            return path
    for path in ranked:
        if fields[path] == 2 * value:
            return f"{path}/2"
    ranked_small = ranked[:60]
    for a in ranked_small:
        for b in ranked_small:
            if a != b and fields[b] > 1 and fields[a] == value * fields[b]:
                return f"{a}/{b}"
    for a in ranked_small:
        for b in ranked_small:
            if a != b and fields[b] > 1 and fields[a] == 2 * value * fields[b]:
                return f"{a}/{b}/2"
    for path in ranked:
        if 2 * fields[path] == value:
            return f"{path}*2"
    return value


def expr_paths(expr) -> list[str]:
    """Config paths an expression refers to."""
    if not isinstance(expr, str):
        return []
    return [tok for tok in re.split(r"[+\-*/() ]+", expr) if tok and not tok.isdigit()]


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
    for ckpt_key in sorted(ckpt_keys):
        target, pattern = rename_source_key(ckpt_key, renamings, converters, prefix, dict.fromkeys(model_keys, 1))
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

    def __init__(self, model, config):
        from transformers import PreTrainedModel

        self.model = model
        self.config = config
        self.config_paths = sub_config_paths(config)
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
                return self.config_paths.get(id(sub.config), "")
        return ""

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
        scope = self.scope_of(full.rsplit(".", 1)[0] if "." in full else "")
        shape = [fit_dim(int(d), self.fields, scope) for d in tensor.shape]
        for dim in shape:
            self.used_paths.update(expr_paths(dim))
        entry["shape"] = shape
        return entry

    def converted_entry(self, name: str, tensor, full: str, indices: list[int]):
        info = self.sources[full]
        conv = info["conv"]
        groups = [sorted(info["groups"][g], key=natural_key) for g in sorted(info["groups"])]
        ops = [] if conv is None else op_entries(conv)
        if ops is not None and conv is not None and len(conv.target_patterns) > 1:
            ops = [dict(o, part=info["part"]) if o["op"] == "chunk" else o for o in ops]
        keys = [sorted({template_key(k, indices) for k in g}) for g in groups]
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

    def container(self, module, name: str, path: str, indices: list[int]) -> dict:
        items = [(k, v) for k, v in module._modules.items() if v is not None]
        variants: list[dict] = []
        keys: list[str] = []
        seen: list[int] = []
        for key, child in items:
            node = self.node(child, "{i}", join(path, key), indices + [int(key)])
            text = json.dumps(node, sort_keys=True)
            if text not in keys:
                keys.append(text)
                variants.append(node)
            seen.append(keys.index(text))
        repeat = {"count": self.count_field(len(items), path), "variants": variants}
        repeat["select"] = self.select_rule(seen, len(variants))
        return {"n": name, "c": type(module).__name__, "repeat": repeat}

    def count_field(self, count: int, path: str):
        scope = self.scope_of(path)
        candidates = [p for p, v in self.fields.items() if v == count]
        if not candidates:
            return None

        def rank(p):
            leaf = p.rsplit(".", 1)[-1]
            layerish = 0 if "layers" in leaf else (1 if "layer" in leaf or "depth" in leaf or "blocks" in leaf else 2)
            return (layerish, field_rank(p, scope))

        best = sorted(candidates, key=rank)[0]
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


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def natural_key(key: str):
    return [int(t) if t.isdigit() else t for t in key.split(".")]


def template_key(key: str, indices: list[int]) -> str:
    """A checkpoint key with the enclosing repeat indices as {i0}.. and any other number as {e}."""
    parts = key.split(".")
    pending = list(indices)
    level = 0
    out = []
    for part in parts:
        if part.isdigit():
            if pending and int(part) == pending[0]:
                out.append("{i%d}" % level)
                pending.pop(0)
                level += 1
            else:
                out.append("{e}")
        else:
            out.append(part)
    return ".".join(out)


# ---------------------------------------------------------------------------------------------
# One class
# ---------------------------------------------------------------------------------------------


def tied_entries(model, config_paths) -> list[dict]:
    """Every tie the model can make, with the config field deciding it."""
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
        cond = {"cfg": config_paths.get(id(cfg), ""), "field": "tie_word_embeddings"}
        for target, source in mapping.items():
            out.append({"t": join(prefix, target), "s": join(prefix, source), "if": cond})
    unique = {(e["t"], e["s"]): e for e in out}
    return list(unique.values())


def defaults_for(config, paths: set[str]) -> tuple[dict, dict]:
    """The config classes' defaults for `paths`, and expressions for computed ones."""
    defaults: dict = {}
    derived: dict = {}
    fields = int_fields(config)
    for path in sorted(paths):
        obj = config
        parts = path.split(".")
        for part in parts[:-1]:
            obj = getattr(obj, part, None)
        leaf = parts[-1]
        value = getattr(obj, leaf, None) if obj is not None else None
        declared = declared_default(type(obj), leaf) if obj is not None else value
        if declared is None and isinstance(value, int) and not isinstance(value, bool):
            defaults[path] = None
            scope = ".".join(parts[:-1])
            others = {p: v for p, v in fields.items() if p != path}
            expr = fit_dim(value, others, scope)
            derived[path] = expr
        else:
            defaults[path] = value if isinstance(value, (int, float, str, bool, list)) or value is None else str(value)
    return defaults, derived


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


def record_class(model_type: str, class_name: str) -> dict:
    """Build one class on the meta device and return its registry line (as a dict)."""
    import torch
    import transformers
    from transformers import AutoConfig

    cls = getattr(transformers, class_name)
    config = AutoConfig.for_model(model_type)
    with torch.device("meta"):
        model = cls(config)
    model.eval()
    rec = Recorder(model, config)
    tree = rec.node(model, "", "", [])
    tied = tied_entries(model, rec.config_paths)
    for entry in tied:
        cfg = entry["if"]["cfg"]
        rec.used_paths.add(join(cfg, "tie_word_embeddings"))
    defaults, derived = defaults_for(config, rec.used_paths)
    line = {
        "class": class_name,
        "model_type": model_type,
        "config_class": type(config).__name__,
        "base_model_prefix": getattr(model, "base_model_prefix", "") or "",
        "no_split": sorted(model._no_split_modules or []),
        "keep_in_fp32": sorted(model._keep_in_fp32_modules or []),
        "keep_in_fp32_strict": sorted(model._keep_in_fp32_modules_strict or []),
        "tied": tied,
        "defaults": defaults,
    }
    if derived:
        line["derived"] = derived
    line["tree"] = tree
    return {"line": line, "notes": rec.notes}


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


def compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def write_registry(path: str, results: list, elapsed: float) -> dict:
    import torch
    import transformers

    ok = [r for r in results if r[0] == "ok"]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="crates/devmap-core/registry/arch-registry.jsonl")
    parser.add_argument("--only", nargs="*", help="model types or class names to record (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args()

    start = time.time()
    items = list_classes(set(args.only) if args.only else None)
    print(f"{len(items)} classes to record", file=sys.stderr)
    results = []
    ctx = mp.get_context("fork")
    with ctx.Pool(args.jobs, maxtasksperchild=40) as pool:
        for n, result in enumerate(pool.imap_unordered(worker, items, chunksize=4), 1):
            results.append(result)
            if n % 50 == 0:
                print(f"  {n}/{len(items)} ({time.time() - start:.0f} s)", file=sys.stderr)
    header = write_registry(args.out, results, time.time() - start)
    size = os.path.getsize(args.out)
    print(f"built {header['classes']} of {len(items)} classes in {time.time() - start:.0f} s; "
          f"{args.out}: {size / 1e6:.2f} MB", file=sys.stderr)
    for reason, count in header["failed"].items():
        print(f"  failed {count:4d}  {reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
