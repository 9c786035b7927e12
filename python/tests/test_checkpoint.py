"""The map from a live module equals the map from the same model's saved checkpoint.

A checkpoint has no module classes and no non-persistent buffers (rotary `inv_freq`), so a live
map can carry keys for tensorless or buffer-only modules (`model.rotary_emb`, `transformer.drop`)
that the checkpoint's lacks: the comparison is per checkpoint tensor, each resolved to its device
as accelerate resolves it. For `auto`, equal-cost alternatives are equally optimal (layers of
equal size are interchangeable): the estimate and the offloaded bytes must agree."""

from __future__ import annotations

import json
import os

import pytest
from conftest import MODEL_NAMES, budgets, meta_model, real_model, resolve

import devmap

HF_STRATEGIES = ["sequential", "balanced", "balanced_low_0"]


# Every model, T5 included: the architecture registry restores registration order (encoder
# before decoder) that a safetensors checkpoint does not carry.
@pytest.fixture(scope="module", params=MODEL_NAMES)
def saved(request, tmp_path_factory):
    """(name, checkpoint folder, tensor names stored in it)."""
    folder = tmp_path_factory.mktemp(request.param)
    real_model(request.param).save_pretrained(folder)
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return request.param, str(folder), sorted(k for k in header if k != "__metadata__")


@pytest.mark.parametrize("scenario", ["split-offload", "fits-gpus", "tight-gpu0"])
@pytest.mark.parametrize("strategy", HF_STRATEGIES)
def test_hf_strategies_place_every_checkpoint_tensor_alike(saved, scenario, strategy):
    name, folder, stored = saved
    live = meta_model(name)
    max_memory = budgets(live, scenario)
    from_module = devmap.plan(live, max_memory, strategy=strategy, compat="transformers")
    from_folder = devmap.plan(folder, max_memory, strategy=strategy, compat="transformers")
    assert {t: resolve(from_module, t) for t in stored} == {t: resolve(from_folder, t) for t in stored}


@pytest.mark.parametrize("scenario", ["split-offload", "fits-gpus"])
def test_auto_is_equally_good(saved, scenario):
    name, folder, stored = saved
    live = meta_model(name)
    max_memory = budgets(live, scenario)
    # The budgets are sized to these KiB-sized models' weights: weights only, not the default
    # workload's 2048-token prompt.
    a = devmap.plan_report(live, max_memory, workload="none")
    b = devmap.plan_report(folder, max_memory, workload="none")
    assert a["estimate"]["ms_per_token"] == pytest.approx(b["estimate"]["ms_per_token"], rel=1e-3)
    assert a["offloaded_bytes"] == pytest.approx(b["offloaded_bytes"], rel=0.02)
    # Every stored tensor is mapped by both.
    assert all(resolve(a["device_map"], t) is not None for t in stored)
    assert all(resolve(b["device_map"], t) is not None for t in stored)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_manifest_lists_every_parameter_and_buffer(name, tmp_path):
    real_model(name).save_pretrained(tmp_path)
    with open(tmp_path / "model.safetensors", "rb") as f:
        stored = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    stored.pop("__metadata__", None)
    live = meta_model(name)
    doc = devmap.manifest(live)
    names = {t["name"] for t in doc["tensors"]}
    assert set(stored) <= names
    assert {n for n, _ in live.named_parameters(remove_duplicate=False)} <= names
    assert {n for n, _ in live.named_buffers()} <= names
    assert doc["no_split"] == sorted(live._no_split_modules)
