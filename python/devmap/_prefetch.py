"""Prefetching the next offloaded module on a side CUDA stream, so that its copy to the GPU overlaps
the current module's compute (``pin_offloaded(model, prefetch=True)``; docs/python.md).

accelerate's ``AlignDevicesHook.pre_forward`` copies each offloaded module's weights to the
execution device when the module runs (on the compute stream: the GPU computes, then copies, then
computes). Here every offloading hook becomes a *unit*; when unit ``i`` starts, the copy of its
successor is issued on a side stream and unit ``i`` takes the copy issued for it one step earlier
(the compute stream waits on its event, not the host). The successor is learned: it starts as the
next unit in module order and becomes whatever unit really ran after ``i`` last time, so models
whose execution order differs from their registration order are prefetched from the second pass
on. At most one copy is pending, so the GPU holds at most one extra module.

Not prefetched (accelerate's own path loads them as before): tied weights (accelerate deduplicates
them by their cpu pointer), int8 weights and their statistics, and disk-offloaded tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class Unit:
    """One offloading hook: the tensors it loads that are prefetched."""

    #: The ``AlignDevicesHook``.
    hook: object
    #: Its ``weights_map`` (the tensors are read from it when the copy starts).
    weights: object
    #: Names (as the hook asks ``weights_map`` for them) of the prefetched tensors.
    names: list
    #: Where the hook runs the module.
    device: object

    def tensors(self) -> dict:
        """The cpu tensors to copy, read now (so that pinning after installation is seen)."""
        return {name: self.weights[name] for name in self.names}


@dataclass
class Prefetcher:
    """The schedule: which unit's copy to issue when a unit starts, and the one pending copy."""

    units: list
    copier: object
    #: unit index -> the unit expected to run next.
    successor: list = field(default_factory=list)
    hits: int = 0
    misses: int = 0
    #: Copies issued for a unit that did not run next (freed unused).
    dropped: int = 0
    _previous: "int | None" = None
    _pending: "tuple | None" = None

    def __post_init__(self):
        if not self.successor:
            n = len(self.units)
            self.successor = [(i + 1) % n for i in range(n)]

    def enter(self, i: int) -> dict:
        """Unit ``i`` starts: learn the transition, return its prefetched tensors (empty on a
        miss) and issue the copy of its successor."""
        if self._previous is not None and self._previous != i:
            self.successor[self._previous] = i
        self._previous = i
        ready: dict = {}
        if self._pending is not None and self._pending[0] == i:
            ready = self.copier.finish(self._pending[1])
            self.hits += 1
        else:
            self.misses += 1
            self.dropped += self._pending is not None
        self._pending = None
        following = self.successor[i]
        if following != i:
            self._pending = (following, self.copier.start(self.units[following]))
        return ready


class PrefetchedWeights(Mapping):
    """A hook's ``weights_map`` that serves the tensors prefetched for the running unit and
    delegates everything else to accelerate's map."""

    def __init__(self, original):
        self.original = original
        self.ready: dict = {}

    def __getitem__(self, name):
        tensor = self.ready.pop(name, None)
        return self.original[name] if tensor is None else tensor

    def __contains__(self, name):
        return name in self.original

    def __iter__(self):
        return iter(self.original)

    def __len__(self):
        return len(self.original)

    def __getattr__(self, attr):  # `dataset`, `prefix`: what _pin._state_dicts reads
        return getattr(self.original, attr)


class CudaCopier:
    """Copies on one side stream per device; the compute stream waits on an event."""

    def __init__(self):
        self.streams: dict = {}

    def start(self, unit: Unit):
        import torch

        device = torch.device("cuda", unit.device) if isinstance(unit.device, int) else torch.device(unit.device)
        stream = self.streams.get(device)
        if stream is None:
            stream = self.streams[device] = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            copies = {name: t.to(device, non_blocking=True) for name, t in unit.tensors().items()}
            event = torch.cuda.Event()
            event.record(stream)
        return device, copies, event

    def finish(self, handle) -> dict:
        import torch

        device, copies, event = handle
        compute = torch.cuda.current_stream(device)
        compute.wait_event(event)
        for tensor in copies.values():
            tensor.record_stream(compute)  # the allocator must not reuse it before compute is done
        return copies


class CpuCopier:
    """Synchronous copies within RAM: the same schedule on a machine without CUDA (tests,
    ``scripts/bench_pinned.py --dry-run``)."""

    def start(self, unit: Unit):
        return {name: t.clone() for name, t in unit.tensors().items()}

    def finish(self, handle) -> dict:
        return handle


def _ram_resident(weights, name: str) -> bool:
    """Whether ``weights[name]`` is a tensor held in RAM (not read from an offload folder)."""
    dataset = getattr(weights, "dataset", weights)
    key = getattr(weights, "prefix", "") + name
    state = getattr(dataset, "state_dict", dataset)
    return isinstance(state, dict) and key in state


def _units(model) -> list:
    from accelerate.hooks import AlignDevicesHook
    from accelerate.utils import named_module_tensors

    units = []
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            if not (isinstance(h, AlignDevicesHook) and h.offload and h.weights_map is not None):
                continue
            if isinstance(h.weights_map, PrefetchedWeights):
                raise ValueError("prefetch is already installed on this model")
            tied = set(getattr(h, "tied_params_names", None) or ())
            names = [name for name, t in named_module_tensors(
                module, include_buffers=h.offload_buffers, recurse=h.place_submodules,
                remove_non_persistent=True)
                if name not in tied and _ram_resident(h.weights_map, name)
                and h.weights_map[name].dtype.is_floating_point]
            if names:
                units.append(Unit(hook=h, weights=h.weights_map, names=names, device=h.execution_device))
    return units


def install(model, copier) -> Prefetcher:
    """Make every offloading hook of ``model`` prefetch its successor through ``copier``; returns
    the schedule (``hits``, ``misses``, ``dropped``; ``len(units)``). :func:`remove` undoes it."""
    units = _units(model)
    prefetcher = Prefetcher(units, copier)
    for i, unit in enumerate(units):
        wrapped = PrefetchedWeights(unit.weights)
        original = unit.hook.pre_forward

        def pre_forward(module, *args, _i=i, _weights=wrapped, _original=original, **kwargs):
            _weights.ready = prefetcher.enter(_i)
            try:
                return _original(module, *args, **kwargs)
            finally:
                _weights.ready = {}

        unit.hook.weights_map = wrapped
        unit.hook.pre_forward = pre_forward
    return prefetcher


def remove(prefetcher: Prefetcher) -> None:
    """Restore the hooks :func:`install` changed (pending copies are dropped)."""
    for unit in prefetcher.units:
        unit.hook.weights_map = unit.weights
        del unit.hook.pre_forward  # the instance attribute; the class's method is back
    prefetcher._pending = None
