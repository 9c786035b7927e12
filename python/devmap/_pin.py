"""Pinning the cpu-offloaded weights accelerate holds, so its per-forward copies to the GPU run
from page-locked memory (docs/python.md: measured 4.6x on an H200 with the map unchanged)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from . import _prefetch
from ._errors import PinError


@dataclass(frozen=True)
class PinReport:
    """What :func:`pin_offloaded` did."""

    #: Bytes newly pinned.
    bytes: int
    #: Tensors newly pinned.
    tensors: int
    #: Tensors that were pinned already (left as they were).
    already_pinned: int
    #: Wall time of the pinning, seconds.
    seconds: float
    #: Physical RAM of this machine, bytes (what ``max_ram_share`` is a share of).
    ram_bytes: int
    #: Offloading hooks that prefetch their successor (0 without ``prefetch=True``).
    prefetch_units: int = 0


def ram_bytes() -> int:
    """Physical RAM of this machine, bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _state_dicts(model) -> list[dict]:
    """The dicts of cpu tensors behind accelerate's offload hooks, each once.

    ``dispatch_model`` (what ``from_pretrained(device_map=...)`` calls) gives every offloaded
    module an ``AlignDevicesHook`` whose ``weights_map`` is a ``PrefixedDataset`` over one
    ``OffloadedWeightsLoader``; its ``state_dict`` holds the cpu-offloaded tensors (disk ones are in
    its ``index`` and are not touched)."""
    found: dict[int, dict] = {}
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            weights = getattr(h, "weights_map", None)
            dataset = getattr(weights, "dataset", weights)
            state = getattr(dataset, "state_dict", dataset)
            if isinstance(state, dict):
                found[id(state)] = state
    return list(found.values())


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def pin_offloaded(model, max_ram_share: float = 0.5, prefetch: bool = False) -> PinReport:
    """Replace the cpu-offloaded weights accelerate holds for ``model`` (after
    ``from_pretrained(device_map=...)`` or ``accelerate.dispatch_model``) by pinned copies.

    Refuses with :class:`PinError`, before pinning anything, when the model has no offloaded
    weights, when the bytes to pin exceed ``max_ram_share`` of this machine's RAM (pinned memory
    cannot be swapped or reclaimed: pinning too much starves the rest of the system), or when
    torch has no CUDA device to pin for. The map is unchanged; disk-offloaded weights are not
    touched. Returns the bytes and tensors pinned and the time it took.

    With ``prefetch=True`` each offloaded module's copy to the GPU is also issued one module ahead
    on a side CUDA stream, overlapping the running module's compute (``devmap._prefetch``; it holds
    at most one extra module on the GPU). Off by default: measure it with
    ``scripts/bench_pinned.py`` before relying on it.
    """
    if not (isinstance(max_ram_share, (int, float)) and 0 < max_ram_share <= 1):
        raise PinError(f"max_ram_share must be a fraction in (0, 1], not {max_ram_share!r}")
    state_dicts = _state_dicts(model)
    todo = [(sd, k) for sd in state_dicts for k, t in sd.items()
            if hasattr(t, "is_pinned") and t.device.type == "cpu" and not t.is_pinned()]
    already = sum(1 for sd in state_dicts for t in sd.values() if hasattr(t, "is_pinned") and t.is_pinned())
    if not state_dicts:
        raise PinError(
            f"{type(model).__name__} holds no cpu-offloaded weights: no accelerate offload hook was "
            "found (load it with a device_map that maps modules to 'cpu' on a machine with a GPU)"
        )
    need = sum(sd[k].numel() * sd[k].element_size() for sd, k in todo)
    ram = ram_bytes()
    if need > max_ram_share * ram:
        raise PinError(
            f"pinning {_fmt(need)} of offloaded weights ({len(todo)} tensors) would exceed "
            f"max_ram_share={max_ram_share} of this machine's {_fmt(ram)} RAM "
            f"({_fmt(max_ram_share * ram)}); raise max_ram_share or offload less"
        )
    import torch

    if (todo or prefetch) and not torch.cuda.is_available():
        what = "prefetching" if prefetch and not todo else "pinning"
        raise PinError(f"{what} needs a CUDA device: torch.cuda.is_available() is False here")
    start = time.perf_counter()
    for sd, k in todo:
        sd[k] = sd[k].pin_memory()
    units = _install_prefetch(model, _prefetch.CudaCopier()) if prefetch else 0
    return PinReport(bytes=need, tensors=len(todo), already_pinned=already,
                     seconds=time.perf_counter() - start, ram_bytes=ram, prefetch_units=units)


def _install_prefetch(model, copier) -> int:
    try:
        return len(_prefetch.install(model, copier).units)
    except ValueError as e:
        raise PinError(f"prefetch=True: {e}") from None
