"""The CPU parts of scripts/calibrate_runtime.py and scripts/fit_cost_model.py: where
transformers leaves cpu-mapped weights (the memory calibrate_runtime.py times copies from), the
plan --dry-run prints, and the constants re-derived from an older run's raw timings."""

from __future__ import annotations

import json
import os
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import bench_load  # noqa: E402
import calibrate_runtime as cr  # noqa: E402
import fit_cost_model as fit  # noqa: E402

MIB = 1 << 20


def test_safetensors_views_are_file_backed_and_clones_are_not(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(256, 256, dtype=torch.bfloat16)}, str(path))
    view = safe_open(str(path), framework="pt").get_tensor("w")
    assert cr.host_memory_kind(view) == str(path)
    assert cr.host_memory_kind(view.clone()) != str(path)


def test_the_plan_names_the_llama_layer_and_head_sizes():
    text = "\n".join(cr.plan(bench_load.LLAMA_31_8B))
    # q/o 4096 x 4096, k/v 1024 x 4096, gate/up/down 14336 x 4096 in bf16; head 128256 x 4096.
    assert "(32, 8, 8, 32, 112, 112, 112 MiB)" in text
    assert "the head (1002 MiB)" in text
    assert "16384-token context" in text


def test_rederived_constants_separate_latency_and_hook():
    topo = json.load(open(os.path.join(REPO, "docs/validation-data/h200-topology-2026-12-01b.json")))
    out = fit.rederived(topo)
    latency = 7.976899536132811e-06  # devmap calibrate's 8 KiB pageable copy on that machine
    link = out["gpus"]["0"]["pageable_host_link"]
    assert link["latency"] == latency
    # The tiny chain: 106.29 us per offloaded module, minus one copy's latency.
    assert out["runtime"]["offload_hook_seconds"] == pytest.approx(1.0628598632808628e-04 - latency)
    # One layer: 2 x 32 MiB (4.8475 ms), 2 x 8 MiB (1.3449 ms), 2 x 112 MiB gate/up (16.2732 ms),
    # 1 x 112 MiB down (16.0569 ms), one latency less per tensor.
    seconds = 2 * 4.847509999997612e-3 + 2 * 1.3448919999987652e-3 + 2 * 16.273214499996413e-3 + 16.056855999991626e-3
    assert link["bandwidth"] == pytest.approx((2 * 32 + 2 * 8 + 3 * 112) * MIB / (seconds - 7 * latency))
    assert out["default_pageable_host_link"] == link
    assert topo["runtime"]["offload_hook_seconds"] == 0.0, "the input is left as it was"
