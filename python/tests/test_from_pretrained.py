"""The dict devmap.plan returns goes straight into from_pretrained(device_map=...): a CPU-only
machine loads a saved model under a cpu + disk map, accelerate dispatches it as mapped, and its
logits equal those of the model loaded whole."""

from __future__ import annotations

import pytest
from conftest import assert_loads_like_whole, model_bytes, real_model

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

    assert_loads_like_whole(tmp_path / "ckpt", device_map, tmp_path / "offload")


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
