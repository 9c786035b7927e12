"""devmap: where every weight of a neural network lives (GPU, CPU RAM, disk).

Three lines to a map that ``from_pretrained(device_map=...)`` accepts as is::

    import devmap
    device_map = devmap.plan("path/to/checkpoint", max_memory={0: "22GiB", 1: "22GiB", "cpu": "64GiB"})
    model = AutoModelForCausalLM.from_pretrained("path/to/checkpoint", device_map=device_map)

``model`` may be a path (checkpoint folder, ``.safetensors`` file, ``model.safetensors.index.json``
or ``devmap-manifest/1`` JSON) or a live ``torch.nn.Module``, typically built on the meta device
(``accelerate.init_empty_weights()`` or ``with torch.device("meta"):``), which is read in Python
without writing a file. torch is imported only when a module is passed. See docs/python.md.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping, Sequence, Union

from . import _export
from ._errors import (
    BY_KIND,
    ArgumentError,
    BudgetError,
    DevmapError,
    DoesNotFitError,
    MapError,
    ModelError,
    PinError,
    PlanError,
)
from ._pin import PinReport, pin_offloaded

__all__ = [
    "plan", "plan_report", "check", "compare", "manifest", "pin_offloaded", "PinReport",
    "DevmapError", "ArgumentError", "BudgetError", "ModelError", "MapError", "PlanError",
    "DoesNotFitError", "PinError", "__version__",
]

__version__ = "0.1.0"

Device = Union[int, str]
MaxMemory = Mapping[Any, Union[int, str]]
PathLike = Union[str, "os.PathLike[str]"]

WORKLOAD_KEYS = ("batch", "prompt", "new", "seq", "kv_dtype", "objective", "reserve")


def _native():
    # Imported on first use, so that `devmap._export` (and scripts using it) work from a source
    # tree where the extension is not built.
    from . import _devmap

    return _devmap


def _is_module(model) -> bool:
    torch = sys.modules.get("torch")  # a module can only exist if torch was imported
    return torch is not None and isinstance(model, torch.nn.Module)


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        return dtype
    if type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype":
        return str(dtype).removeprefix("torch.")
    raise ArgumentError(f"dtype must be a string such as 'bf16' or a torch.dtype, not {dtype!r}")


def _model_source(model, dtype: str | None, keep_fp32: bool) -> tuple[dict, str | None]:
    """The request's model entry, and the dtype left for the planner to apply."""
    if isinstance(model, (str, os.PathLike)):
        return {"path": os.fspath(model)}, dtype
    if not _is_module(model):
        raise ArgumentError(
            "model must be a path (checkpoint folder, .safetensors, index or manifest) or a "
            f"torch.nn.Module, not {type(model).__name__}"
        )
    doc = _export.manifest(model)
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else None
    if dtype is not None and keep_fp32:
        target = _canonical_float(dtype)
        patterns = _export.keep_in_fp32_patterns(model, target) if target else []
        if patterns:
            _export.apply_dtype_keeping_fp32(doc, target, patterns)
            dtype = None
    source = {"module": {"manifest": doc, "config": json.loads(json.dumps(config_dict, default=str))}}
    return source, dtype


def _canonical_float(dtype: str) -> str | None:
    spelled = {"bf16": "BF16", "bfloat16": "BF16", "f16": "F16", "fp16": "F16", "float16": "F16",
               "half": "F16", "f32": "F32", "fp32": "F32", "float32": "F32", "float": "F32"}
    return spelled.get(dtype.strip().lower())


def _device_key(key) -> str:
    if isinstance(key, bool) or not isinstance(key, (int, str)) and type(key).__name__ != "device":
        raise BudgetError(f"max_memory key {key!r} is not a device (0, 'cuda:0', 'cpu', 'disk')")
    return str(key)


def _budgets(max_memory, what: str = "max_memory"):
    """accelerate's dict (int or str keys, int bytes or '20GiB' values) -> JSON-ready."""
    if max_memory is None:
        return None
    if isinstance(max_memory, str):
        return max_memory  # the CLI's spec, "0=22GiB,cpu=64GiB"
    if not isinstance(max_memory, Mapping):
        raise BudgetError(f"{what} must be a dict such as {{0: '22GiB', 'cpu': '64GiB'}}, not {max_memory!r}")
    out = {}
    for key, value in max_memory.items():
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise BudgetError(f"{what}[{key!r}] = {value!r}: a budget is bytes (int) or a size such as '20GiB'")
        out[_device_key(key)] = value
    return out


def _no_split(no_split) -> list[str]:
    if no_split is None:
        return []
    if isinstance(no_split, str):
        return [no_split]
    if isinstance(no_split, Sequence) and all(isinstance(c, str) for c in no_split):
        return list(no_split)
    raise ArgumentError(f"no_split must be a class name, a pattern or a list of them, not {no_split!r}")


def _workload(workload) -> dict:
    """The workload as the native layer takes it: `--workload`'s spec, `--kv-cache`'s, or nothing
    (the CLI's default workload, ``batch=1,prompt=2048,new=256``)."""
    if workload is None:
        return {}
    if isinstance(workload, str):
        # "batch=..,seq=.." is a KV-cache spec (the older form); "none" and "batch=..,prompt=..,new=.."
        # are `devmap plan --workload`'s.
        return {"kv_cache": workload} if "seq=" in workload else {"workload": workload}
    if not isinstance(workload, Mapping):
        raise ArgumentError(
            "workload must be a dict, 'none', or a string such as 'batch=1,prompt=2048,new=256', "
            f"not {workload!r}")
    unknown = sorted(set(workload) - set(WORKLOAD_KEYS))
    if unknown:
        raise ArgumentError(f"workload has unknown keys {unknown} (expected {', '.join(WORKLOAD_KEYS)})")
    if "seq" in workload and ("prompt" in workload or "new" in workload):
        raise ArgumentError("workload takes 'seq' (a KV cache) or 'prompt'/'new' (a generation), not both")
    out = {}
    dtype = [f"dtype={_dtype_name(workload['kv_dtype'])}"] if workload.get("kv_dtype") is not None else []
    if "prompt" in workload or "new" in workload:
        parts = [f"batch={workload.get('batch', 1)}", f"prompt={workload.get('prompt', 2048)}",
                 f"new={workload.get('new', 256)}"]
        out["workload"] = ",".join(parts + dtype)
    elif "seq" in workload or "batch" in workload:
        parts = [f"batch={workload.get('batch', 1)}", f"seq={workload.get('seq', 0)}"]
        out["kv_cache"] = ",".join(parts + dtype)
    if "objective" in workload:
        out["objective"] = workload["objective"]
    if "reserve" in workload:
        out["reserve"] = _budgets(workload["reserve"], "workload['reserve']")
    return out


def _pins(pins) -> list[list[str]]:
    if pins is None:
        return []
    if not isinstance(pins, Mapping):
        raise ArgumentError(f"pins must be a dict of module or tensor name -> device, not {pins!r}")
    return [[str(k), str(v)] for k, v in pins.items()]


def _topology(topology) -> str | None:
    if topology is None or isinstance(topology, (str, os.PathLike)):
        return None if topology is None else os.fspath(topology)
    raise ArgumentError(f"topology must be the path of a topology JSON file, not {topology!r}")


def _request(model, max_memory=None, strategy="auto", no_split=None, dtype=None, workload=None,
             pins=None, topology=None, compat=None, time_limit=None, runtime=None, split_blocks=None,
             **extra) -> dict:
    if not isinstance(strategy, str):
        raise ArgumentError(f"strategy must be a string, not {strategy!r}")
    if compat is not None and not isinstance(compat, str):
        raise ArgumentError(f"compat must be 'transformers', 'accelerate' or None, not {compat!r}")
    dtype = _dtype_name(dtype)
    # devmap's own strategy counts real memory (kept-fp32 modules stay fp32); Hugging Face's
    # strategies count as Hugging Face's planner does.
    source, dtype = _model_source(model, dtype, keep_fp32=(strategy == "auto" and compat is None))
    req = {"model": source, "max_memory": _budgets(max_memory), "strategy": strategy,
           "no_split": _no_split(no_split), "dtype": dtype, "pins": _pins(pins),
           "topology": _topology(topology), "compat": compat, **_workload(workload), **extra}
    if time_limit is not None:
        req["time_limit"] = float(time_limit)
    if split_blocks is not None:
        if not isinstance(split_blocks, bool):
            raise ArgumentError(f"split_blocks must be True, False or None, not {split_blocks!r}")
        req["split_blocks"] = split_blocks
    if runtime is not None:
        if not isinstance(runtime, str):
            raise ArgumentError(f"runtime must be 'accelerate', 'pinned' or None, not {runtime!r}")
        req["runtime"] = runtime
    return req


def _call(op: str, request: dict):
    native = _native()
    try:
        text = getattr(native, op)(json.dumps(request))
    except native.NativeError as e:
        kind, message = e.args
        raise BY_KIND.get(kind, DevmapError)(message) from None
    return json.loads(text)


def _device(value) -> Device:
    return value if isinstance(value, int) else str(value)


def _by_device(pairs) -> dict:
    return {_device(d): b for d, b in pairs}


def _report(raw: dict) -> dict:
    """Native answer -> Python data: device-keyed lists become dicts with int GPU keys."""
    out = dict(raw)
    for key in ("usage", "budgets", "budgets_used"):
        if out.get(key) is not None:
            out[key] = _by_device(out[key])
    if out.get("solve"):
        out["solve"] = dict(out["solve"], overhead=_by_device(out["solve"]["overhead"]))
    return out


def plan(model, max_memory: MaxMemory | str | None = None, strategy: str = "auto",
         no_split: str | Sequence[str] | None = None, dtype=None, workload=None,
         pins: Mapping[str, Device] | None = None, topology: PathLike | None = None,
         compat: str | None = None, *, time_limit: float | None = None,
         runtime: str | None = None, split_blocks: bool | None = None) -> dict:
    """The device map for ``model``: a dict ``{module or tensor name: 0 | "cpu" | "disk"}`` that
    ``from_pretrained(device_map=...)`` and ``accelerate.dispatch_model`` take as is.

    Args:
        model: a path (checkpoint folder, ``.safetensors``, index or manifest) or a live
            ``torch.nn.Module`` (meta device is fine).
        max_memory: accelerate's dict, e.g. ``{0: "22GiB", 1: "22GiB", "cpu": "64GiB"}`` (int bytes
            also work; ``"disk"`` allows disk offload). None: the GPUs of this machine (free memory
            minus a reserve); raises BudgetError where there is none.
        strategy: ``"auto"`` (devmap's optimal placement), ``"sequential"``, ``"balanced"``,
            ``"balanced_low_0"`` (Hugging Face's, bit for bit), ``"single:N"``, ``"cpu"``.
        no_split: module classes or name patterns (``"model.layers.*"``) that must stay on one
            device; replaces the model's own.
        dtype: target dtype (``"bf16"`` or a ``torch.dtype``): floats are counted at it, never upcast.
        workload: what to make room for, as ``devmap plan --workload``: ``None`` (the CLI's default,
            ``batch=1,prompt=2048,new=256``: KV cache and activations), ``"none"`` (weights only),
            ``"batch=1,prompt=6000,new=64"``, a KV-cache spec ``"batch=4,seq=8192"``, or a dict with
            ``batch``, ``prompt``, ``new`` (or ``seq``), ``kv_dtype``, ``objective``
            (``"latency"``/``"throughput"``), ``reserve`` (a max_memory-style dict of memory to keep free).
        pins: ``{"lm_head": 1}``: fix modules or tensors to devices (``auto``).
        topology: path of a topology JSON file (docs/cost-model.md).
        compat: ``"transformers"`` or ``"accelerate"``: reproduce that implementation exactly,
            including spilling to disk without a disk budget.
        time_limit: ``auto``'s time limit in seconds (default 10).
        runtime: the runtime that will execute the map, whose rates the cost model uses:
            ``"accelerate"`` (offloaded weights copied from pageable RAM every step, as accelerate
            ships) or ``"pinned"`` (page-locked RAM, as after :func:`pin_offloaded`). None: the
            topology's own setting (accelerate's unless the file says otherwise).
        split_blocks: whether ``auto`` may split a streamed decoder layer by module between the
            main GPU and cpu/disk (``devmap plan --split-blocks``). None: the default, True;
            False keeps every no-split block on one device.

    Raises:
        ArgumentError, BudgetError, ModelError, DoesNotFitError, PlanError (all DevmapError).
    """
    return plan_report(model, max_memory, strategy, no_split, dtype, workload, pins, topology,
                       compat, time_limit=time_limit, runtime=runtime,
                       split_blocks=split_blocks)["device_map"]


def plan_report(model, max_memory: MaxMemory | str | None = None, strategy: str = "auto",
                no_split: str | Sequence[str] | None = None, dtype=None, workload=None,
                pins: Mapping[str, Device] | None = None, topology: PathLike | None = None,
                compat: str | None = None, *, time_limit: float | None = None,
                runtime: str | None = None, split_blocks: bool | None = None) -> dict:
    """Like :func:`plan`, with what the CLI's table shows: ``device_map``, ``strategy``, ``usage``
    (bytes per device), ``budgets`` (given), ``budgets_used`` (after balancing), ``offloaded_bytes``,
    ``estimate`` (``ms_per_token``, ``objective_seconds``, ``latency_seconds``, ``busiest_seconds``,
    ``device_changes``, ``streamed_bytes``), ``solve`` (``auto`` only: ``bound_seconds``, ``gap``,
    ``status``, ``start``, ``units``, ``overhead`` per device; else None) and ``elapsed_s``."""
    req = _request(model, max_memory, strategy, no_split, dtype, workload, pins, topology, compat,
                   time_limit, runtime, split_blocks)
    return _report(_call("plan", req))


def check(model, device_map: Mapping[str, Device], max_memory: MaxMemory | str | None = None,
          dtype=None, no_split: str | Sequence[str] | None = None) -> dict:
    """Validate ``device_map`` for ``model`` (what ``devmap check`` reports): ``valid`` (bool),
    ``errors`` and ``warnings`` (the CLI's messages), ``usage`` (bytes per device), ``budgets``
    (None without max_memory) and ``tensors`` (how many the model has). An invalid map is a
    result, not an exception; a map that does not parse raises MapError."""
    if not isinstance(device_map, Mapping):
        raise MapError(f"device_map must be a dict of name -> device, not {device_map!r}")
    req = _request(model, no_split=no_split, dtype=dtype,
                   device_map={str(k): v for k, v in device_map.items()})
    req["max_memory"] = _budgets(max_memory)
    return _report(_call("check", req))


def compare(model, max_memory: MaxMemory | str | None = None,
            no_split: str | Sequence[str] | None = None, dtype=None, workload=None,
            pins: Mapping[str, Device] | None = None, topology: PathLike | None = None, *,
            time_limit: float | None = None, runtime: str | None = None,
            split_blocks: bool | None = None) -> list[dict]:
    """Every strategy on one model and budget set (``devmap compare``): one dict per strategy with
    ``label`` (``"balanced (transformers)"``, ..., ``"auto"``), ``error`` (None, or why it has no
    plan) and, when it has a plan, the fields of :func:`plan_report`."""
    req = _request(model, max_memory, "auto", no_split, dtype, workload, pins, topology, None,
                   time_limit, runtime, split_blocks)
    return [_report(row) if row.get("error") is None else row for row in _call("compare", req)]


def manifest(model, name: str | None = None) -> dict:
    """The ``devmap-manifest/1`` dict of a live ``torch.nn.Module`` (what ``plan`` reads from it);
    ``json.dump`` it to plan the same model with the CLI."""
    if not _is_module(model):
        raise ArgumentError(f"manifest needs a torch.nn.Module, not {type(model).__name__}")
    return _export.manifest(model, name)
