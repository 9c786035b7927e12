"""The prefetch schedule of pin_offloaded(prefetch=True), on the CPU: accelerate's real offload
hooks run with devmap's schedule and a copier within RAM (CUDA streams need a GPU: measured by
scripts/bench_pinned.py). The logits must be unchanged, and after one pass every unit must find
its tensors already copied."""

from __future__ import annotations

import pytest
from conftest import real_model

import devmap
from devmap import _prefetch

torch = pytest.importorskip("torch")
accelerate = pytest.importorskip("accelerate")

IDS = torch.arange(1, 17).reshape(1, 16)


def offloaded_with_reference(name="llama"):
    """A real model, its logits before offloading, then the model behind accelerate's cpu offload."""
    model = real_model(name, dtype=torch.float32)
    with torch.no_grad():
        reference = model(IDS).logits
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    return model, reference


def test_prefetched_forward_equals_the_plain_one():
    model, reference = offloaded_with_reference()
    prefetcher = _prefetch.install(model, _prefetch.CpuCopier())
    with torch.no_grad():
        first = model(IDS).logits
        after_first = (prefetcher.hits, prefetcher.misses)
        second = model(IDS).logits
    assert torch.equal(first, reference) and torch.equal(second, reference)
    n = len(prefetcher.units)
    # Every module with weights of its own is a unit (linear layers, norms, embedding, head).
    assert n == sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False)))
    # Llama registers a layer's norms after its attention and MLP but runs them before: the first
    # pass misses there (and where a miss is first); from the second pass on every unit hits.
    assert after_first[1] > 1
    assert (prefetcher.hits, prefetcher.misses) == (after_first[0] + n, after_first[1])


def test_served_tensors_are_the_copies_not_the_offloaded_ones():
    model, _ = offloaded_with_reference()
    prefetcher = _prefetch.install(model, _prefetch.CpuCopier())
    unit = prefetcher.units[1]
    offloaded = unit.tensors()
    prefetcher.enter(0)  # issues unit 1's copy
    ready = prefetcher.enter(1)
    assert sorted(ready) == sorted(unit.names)
    for name, tensor in ready.items():
        assert torch.equal(tensor, offloaded[name])
        assert tensor.data_ptr() != offloaded[name].data_ptr()


class Issued:
    """A copier that hands back which unit was copied (the schedule is what is tested here)."""

    def __init__(self):
        self.started = []

    def start(self, unit):
        self.started.append(unit)
        return {"unit": unit}

    def finish(self, handle):
        return handle


def test_learns_an_execution_order_unlike_module_order():
    copier = Issued()
    prefetcher = _prefetch.Prefetcher(units=["a", "b", "c", "d"], copier=copier)
    order = [2, 0, 3, 1]
    for i in order:  # first pass: module order (a->b->c->d) predicts nothing of this order
        prefetcher.enter(i)
    assert prefetcher.hits == 0 and prefetcher.dropped == 3
    served = [prefetcher.enter(i) for i in order * 2]
    assert served == [{"unit": "cadb"[k % 4]} for k in range(8)]
    assert prefetcher.successor == [3, 2, 0, 1]
    assert prefetcher.hits == 8


def test_at_most_one_copy_is_pending():
    copier = Issued()
    prefetcher = _prefetch.Prefetcher(units=["a", "b", "c"], copier=copier)
    for i in [0, 1, 2, 0]:
        prefetcher.enter(i)
    assert copier.started == ["b", "c", "a", "b"]
    assert prefetcher._pending == (1, {"unit": "b"})


def test_remove_restores_accelerates_hooks():
    model, reference = offloaded_with_reference()
    prefetcher = _prefetch.install(model, _prefetch.CpuCopier())
    hooks = [u.hook for u in prefetcher.units]
    _prefetch.remove(prefetcher)
    assert all("pre_forward" not in vars(h) for h in hooks)
    assert not any(isinstance(h.weights_map, _prefetch.PrefetchedWeights) for h in hooks)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference)
    assert prefetcher.hits + prefetcher.misses == 0


def test_installing_twice_is_refused():
    model, _ = offloaded_with_reference()
    _prefetch.install(model, _prefetch.CpuCopier())
    with pytest.raises(ValueError, match="already installed"):
        _prefetch.install(model, _prefetch.CpuCopier())


def test_pin_offloaded_prefetch_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU machine: scripts/bench_pinned.py measures prefetch there")
    model, _ = offloaded_with_reference()
    with pytest.raises(devmap.PinError, match="needs a CUDA device"):
        devmap.pin_offloaded(model, max_ram_share=1.0, prefetch=True)
