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


TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "num_hidden_layers": 2,
}


def test_file_backed_layers_are_views_of_the_file_and_compute_the_same(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(cr, "DEVICE", "cpu")
    torch.manual_seed(0)
    model = cr.build_decoder(TINY_LLAMA, 3)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    handle = cr.file_backed_layers(model, ["model.layers.1", "model.layers.2"], str(tmp_path))
    path = str(tmp_path / "calibrate_runtime_layers.safetensors")
    for i in (1, 2):
        for name, p in model.model.layers[i].named_parameters():
            assert cr.host_memory_kind(p) == path, name
    assert all(cr.host_memory_kind(p) != path for p in model.model.layers[0].parameters())
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    del handle


def test_streamed_device_map_puts_the_last_layers_on_cpu(monkeypatch):
    monkeypatch.setattr(cr, "DEVICE", "cpu")
    model = cr.build_decoder(TINY_LLAMA, 4)
    placed = cr.streamed_device_map(model, 3, 0)
    assert [placed[f"model.layers.{i}"] for i in range(4)] == [0, "cpu", "cpu", "cpu"]
    # Every parameter and buffer of the model belongs to one mapped module (dispatch_model
    # refuses a map that misses one).
    owners = set(placed)
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        assert any(name == o or name.startswith(o + ".") for o in owners), name
    assert placed["lm_head"] == 0 and placed["model.embed_tokens"] == 0


def test_streamed_decoder_steps_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(cr, "DEVICE", "cpu")
    monkeypatch.setattr(cr, "STREAMED_LAYERS", 4)
    model, handle = cr.streamed_decoder(TINY_LLAMA, 3, str(tmp_path))
    assert model.hf_device_map["model.layers.1"] == "cpu"
    seconds, retries = cr.step_seconds(model, 8, repeats=2)
    assert seconds > 0 and retries == 0
    del handle


def test_plain_rates_of_a_file_and_of_fresh_buffers_are_positive(tmp_path, monkeypatch):
    monkeypatch.setattr(cr, "DEVICE", "cpu")
    model = cr.build_decoder(TINY_LLAMA, 2)
    handle = cr.file_backed_layers(model, ["model.layers.1"], str(tmp_path))
    assert cr.own_memory_rate(handle, 0.0) > 0
    empty = cr.file_backed_layers(model, [], str(tmp_path), tag="none")
    assert cr.own_memory_rate(empty, 0.0) is None  # nothing streamed, nothing to time
    rates = cr.fresh_memory_rates(samples=2, size=1 << 20)
    assert len(rates) == 2 and all(r > 0 for r in rates)


TINY_T5 = {"model_type": "t5", "is_encoder_decoder": True, "d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4,
           "num_layers": 2, "num_decoder_layers": 2, "vocab_size": 64, "decoder_start_token_id": 0,
           "feed_forward_proj": "relu", "tie_word_embeddings": True}


def test_a_t5_decoder_block_runs_eleven_modules_with_weights_per_step(monkeypatch):
    """Measurement 7 counts what a decode step runs: self-attention's q, k, v, o and norm,
    cross-attention's q, o and norm (its k and v are cached), the feed-forward's wi, wo, norm."""
    monkeypatch.setattr(cr, "DEVICE", "cpu")
    model = cr.build_encoder_decoder(TINY_T5, 3)
    assert len(model.get_decoder().block) == 3 and len(model.get_encoder().block) == 1
    read, modules = cr.decoder_block_reads(model.get_decoder().block[1])
    assert modules == 11
    d, inner, ff = 32, 4 * 8, 64
    # bf16: q, k, v, o of self-attention, q and o of cross-attention, wi and wo, three norms.
    assert read == 2 * (4 * d * inner + 2 * d * inner + 2 * d * ff + 3 * d)
    assert not cr.runs_per_step("layer.1.EncDecAttention.k") and cr.runs_per_step("layer.1.EncDecAttention.q")
    assert not cr.runs_per_step("encoder_attn.v_proj") and cr.runs_per_step("self_attn.v_proj")


def test_the_encoder_decoder_eager_constant_is_merged_under_its_model_type(tmp_path, monkeypatch):
    monkeypatch.setattr(cr, "DEVICE", "cpu")
    topo = tmp_path / "t.json"
    topo.write_text(json.dumps({"runtime": {"eager_module_seconds": 6e-5}, "gpus": {"0": {"memory_bandwidth": 1e11}}}))
    monkeypatch.setattr(cr, "DECODE_STEPS", 3)
    per_module = cr.calibrate_encoder_decoder_eager(str(topo), TINY_T5)
    written = json.loads(topo.read_text())
    assert written["runtime"]["eager_module_seconds"] == 6e-5, "the machine's constant is kept"
    assert written["runtime"]["eager_module_seconds_by_model_type"] == {"t5": per_module}
    assert per_module >= 0 and written["runtime_calibration"]["eager_t5"]["block_modules_run"] == 11
