"""dtype= on a live module: floats counted at the target (never upcast), and transformers'
keep-in-fp32 modules counted at float32 for devmap's own strategy (what from_pretrained loads)."""

from __future__ import annotations

import pytest
from conftest import meta_model

import devmap

torch = pytest.importorskip("torch")
MM = {0: "1GiB", "cpu": "1GiB"}


def expected_bytes(model, target_size: int, kept_prefix: str | None) -> int:
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        size = t.element_size()
        if t.dtype.is_floating_point:
            size = 4 if kept_prefix and name.startswith(kept_prefix) else min(size, target_size)
        total += t.numel() * size
    return total


def used(report) -> int:
    return sum(report["usage"].values())


def test_target_dtype_shrinks_floats():
    model = meta_model("llama", dtype=torch.float32)
    report = devmap.plan_report(model, MM, dtype=torch.bfloat16)
    assert used(report) == expected_bytes(model, 2, None)


def test_keep_in_fp32_strict_stays_fp32_for_auto():
    model = meta_model("llama", dtype=torch.float32)
    model._keep_in_fp32_modules_strict = {"lm_head"}
    assert used(devmap.plan_report(model, MM, dtype="bf16")) == expected_bytes(model, 2, "lm_head")
    # Hugging Face's planner counts them at the target dtype, and so does its strategy here.
    hf = devmap.plan_report(model, MM, strategy="sequential", dtype="bf16")
    assert used(hf) == expected_bytes(model, 2, None)


def test_keep_in_fp32_non_strict_only_for_fp16():
    model = meta_model("llama", dtype=torch.float32)
    model._keep_in_fp32_modules = {"lm_head"}
    assert used(devmap.plan_report(model, MM, dtype="bf16")) == expected_bytes(model, 2, None)
    assert used(devmap.plan_report(model, MM, dtype="fp16")) == expected_bytes(model, 2, "lm_head")
