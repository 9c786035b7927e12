"""pin_offloaded finds the weights accelerate's offload hooks hold and refuses clearly (CPU only:
pinning itself needs a GPU and is measured by scripts/bench_pinned.py)."""

from __future__ import annotations

import pytest
from conftest import model_bytes, real_model

import devmap

torch = pytest.importorskip("torch")
accelerate = pytest.importorskip("accelerate")


def offloaded(name="llama"):
    """A real model whose every weight accelerate keeps on the cpu behind offload hooks."""
    model = real_model(name, dtype=torch.float32)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    return model


def test_refuses_above_the_ram_share():
    model = offloaded()
    share = model_bytes(model) / devmap._pin.ram_bytes() / 2  # half of what pinning needs
    with pytest.raises(devmap.PinError, match=r"would exceed max_ram_share=.* RAM"):
        devmap.pin_offloaded(model, max_ram_share=share)


def test_finds_accelerates_offloaded_tensors():
    model = offloaded()
    state_dicts = devmap._pin._state_dicts(model)
    assert sum(len(sd) for sd in state_dicts) == len(model.state_dict())


def test_refuses_a_model_without_offload():
    with pytest.raises(devmap.PinError, match="holds no cpu-offloaded weights"):
        devmap.pin_offloaded(real_model("gpt2"))


@pytest.mark.parametrize("share", [0, 1.5, "half"])
def test_rejects_bad_share(share):
    with pytest.raises(devmap.PinError, match="max_ram_share must be a fraction"):
        devmap.pin_offloaded(offloaded(), max_ram_share=share)


def test_pins_with_cuda_or_says_it_needs_it():
    model = offloaded()
    if not torch.cuda.is_available():
        with pytest.raises(devmap.PinError, match="needs a CUDA device"):
            devmap.pin_offloaded(model, max_ram_share=1.0)
        return
    report = devmap.pin_offloaded(model, max_ram_share=1.0)
    assert report.bytes == model_bytes(model) and report.tensors == len(model.state_dict())
    assert all(t.is_pinned() for sd in devmap._pin._state_dicts(model) for t in sd.values())
    assert devmap.pin_offloaded(model, max_ram_share=1.0).already_pinned == report.tensors
