"""The dict devmap.plan returns goes straight into from_pretrained(device_map=...): a CPU-only
machine loads a saved model under a cpu + disk map, accelerate dispatches it as mapped, and its
logits equal those of the model loaded whole."""

from __future__ import annotations

import pytest
from conftest import model_bytes, real_model, resolve

import devmap

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("strategy", ["auto", "sequential"])
def test_map_loads_and_runs(tmp_path, strategy):
    model = real_model("llama", dtype=torch.float32)
    model.save_pretrained(tmp_path / "ckpt")
    total = model_bytes(model)
    max_memory = {"cpu": int(total * 0.5), "disk": 10 * total}
    # Budgets sized to the tiny model's weights: weights only (the default workload's prompt would not fit).
    device_map = devmap.plan(str(tmp_path / "ckpt"), max_memory, strategy=strategy, workload="none")
    assert set(device_map.values()) == {"cpu", "disk"}, device_map

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", device_map=device_map, offload_folder=tmp_path / "offload", dtype=torch.float32)
    for name, _ in loaded.named_parameters():
        assert resolve(loaded.hf_device_map, name) == resolve(device_map, name), name

    whole = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 7, 11, 13]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, whole(ids).logits, atol=1e-5)


def test_map_from_live_module_loads(tmp_path):
    model = real_model("gpt2", dtype=torch.float32)
    model.save_pretrained(tmp_path / "ckpt")
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    total = model_bytes(model)
    device_map = devmap.plan(skeleton, {"cpu": int(total * 0.6), "disk": 10 * total}, strategy="balanced")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", device_map=device_map, offload_folder=tmp_path / "offload", dtype=torch.float32)
    assert "disk" in set(loaded.hf_device_map.values())
    with torch.no_grad():
        assert loaded(torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, 512)
