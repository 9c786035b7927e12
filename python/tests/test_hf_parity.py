"""devmap.plan on a live meta-device module equals what from_pretrained(device_map=...) computes.

The reference is computed exactly as scripts/hf_reference.py does: transformers'
`_get_device_map(model, strategy, max_memory, None)` is what `from_pretrained(device_map=strategy,
max_memory=...)` runs before loading (CPU only: no GPU is touched to plan); the accelerate path is
`get_balanced_memory` (or `get_max_memory`) followed by `infer_auto_device_map`."""

from __future__ import annotations

import copy

import pytest
from conftest import MODEL_NAMES, SCENARIOS, budgets, meta_model

import devmap

STRATEGIES = ["sequential", "balanced", "balanced_low_0"]


def transformers_map(model, strategy, max_memory):
    from transformers.integrations import accelerate as tfa

    return dict(tfa._get_device_map(model, strategy, copy.deepcopy(max_memory), None))


def accelerate_map(model, strategy, max_memory):
    import accelerate
    from accelerate.utils import get_balanced_memory, get_max_memory

    no_split = list(model._no_split_modules)
    mm = copy.deepcopy(max_memory)
    if strategy == "sequential":
        inferred = get_max_memory(mm)
    else:
        inferred = get_balanced_memory(model, mm, no_split_module_classes=no_split,
                                       low_zero=(strategy == "balanced_low_0"))
    return dict(accelerate.infer_auto_device_map(model, max_memory=inferred, no_split_module_classes=no_split))


@pytest.fixture(scope="module", params=MODEL_NAMES)
def model(request):
    return meta_model(request.param)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_transformers_path(model, scenario, strategy):
    max_memory = budgets(model, scenario)
    expected = transformers_map(model, strategy, max_memory)
    assert devmap.plan(model, max_memory, strategy=strategy, compat="transformers") == expected


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_accelerate_path(model, scenario, strategy):
    max_memory = budgets(model, scenario)
    expected = accelerate_map(model, strategy, max_memory)
    assert devmap.plan(model, max_memory, strategy=strategy, compat="accelerate") == expected


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_without_compat_same_map_when_it_fits(model, strategy):
    # Without compat devmap refuses to spill to disk, otherwise it is transformers' planner.
    max_memory = budgets(model, "split-offload")
    expected = transformers_map(model, strategy, max_memory)
    assert "disk" not in expected.values()
    assert devmap.plan(model, max_memory, strategy=strategy) == expected


def test_short_budgets_raise_does_not_fit_without_compat(model):
    max_memory = budgets(model, "short")
    assert "disk" in transformers_map(model, "sequential", max_memory).values()
    with pytest.raises(devmap.DoesNotFitError, match="does not fit"):
        devmap.plan(model, max_memory, strategy="sequential")
