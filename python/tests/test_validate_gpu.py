"""The CPU parts of scripts/validate_gpu.py: the load order of the rounds and the per-cell summary
of paired rounds (the figures the speed-up verdict is read from)."""

from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import validate_gpu as vg  # noqa: E402


def test_each_map_loads_first_equally_often():
    orders = [vg.round_order(["devmap", "hf"], k, r) for r in (1, 2) for k in range(3)]
    assert orders == [
        ["devmap", "hf"], ["hf", "devmap"], ["devmap", "hf"],  # round 1: alternating from cap to cap
        ["hf", "devmap"], ["devmap", "hf"], ["hf", "devmap"],  # round 2: each cap flipped
    ]


def row(strategy, rnd, ms, cap=6.0, prompt=8, predicted=None):
    return {"strategy": strategy, "round": rnd, "cap_gib": cap, "prompt": prompt, "ms_per_token": ms,
            "predicted_ms_per_token": predicted}


def test_round_summary_pairs_rounds_and_sums_them():
    rows = [
        row("devmap", 1, 100.0, predicted=90.0), row("hf", 1, 120.0, predicted=110.0),
        row("devmap", 2, 200.0), row("hf", 2, 180.0),
        row("devmap", 3, 150.0),  # no HF row in round 3: left out of the pairs
        {"strategy": "hf", "round": 1, "cap_gib": 10.0, "prompt": 8, "error": "OOM at prefill"},
    ]
    (cell,) = vg.round_summary(rows)
    assert cell["rounds"] == [1, 2]
    assert cell["devmap_ms"] == [100.0, 200.0] and cell["hf_ms"] == [120.0, 180.0]
    assert cell["speedup_per_round"] == pytest.approx([1.2, 0.9])
    assert cell["speedup"] == pytest.approx(300.0 / 300.0)
    assert (cell["devmap_predicted_ms"], cell["hf_predicted_ms"]) == (90.0, 110.0)
    text = vg.rounds_markdown([cell])
    assert "| 6 | 8 | devmap | 2 | 100.0, 200.0 | 120.0, 180.0 | 1.20, 0.90 | 300.0 / 300.0 | **1.00x** | 90.0 / 110.0 | 1.22x |" in text


def test_each_devmap_variant_is_paired_with_hf_on_its_own():
    rows = [row("split", 1, 90.0), row("whole", 1, 110.0), row("hf", 1, 132.0)]
    cells = {c["strategy"]: c for c in vg.round_summary(rows)}
    assert set(cells) == {"split", "whole"}
    assert cells["split"]["speedup"] == pytest.approx(132.0 / 90.0)
    assert cells["whole"]["speedup"] == pytest.approx(132.0 / 110.0)


def test_variants_add_their_split_flag_to_the_plan_command():
    assert vg.DEVMAP_VARIANTS["split"] == "--split-blocks true"
    assert vg.DEVMAP_VARIANTS["whole"] == "--split-blocks false"
    assert vg.DEVMAP_VARIANTS["devmap"] == ""


def test_rows_without_a_round_count_as_round_one():
    # Rows of grids written before --rounds existed (docs/validation-data) resume as round 1.
    assert vg.row_key({"cap_gib": 6.0, "prompt": 8, "strategy": "hf"}) == (1, 6.0, 8, "hf")


def test_the_t5_shape_is_the_checkpoint_transformers_would_save():
    """`--shape t5`: names and shapes from the model transformers builds (tied embeddings once),
    and the runtime calibration times Llama decoders, not the encoder-decoder."""
    import bench_load

    cfg = vg.shape_config("t5")
    assert "max_position_embeddings" not in cfg
    shapes = dict(bench_load.tensor_shapes(cfg))
    assert shapes["shared.weight"] == (32128, 1024)
    assert "lm_head.weight" not in shapes and "encoder.embed_tokens.weight" not in shapes
    assert shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == (32, 32)
    assert shapes["decoder.block.23.layer.1.EncDecAttention.k.weight"] == (4096, 1024)
    assert shapes["decoder.block.23.layer.2.DenseReluDense.wi.weight"] == (16384, 1024)
    # 24 + 24 blocks: q, k, v, o, norm; wi, wo, norm (8), the decoder's with cross-attention's
    # q, k, v, o, norm too (13); block 0 of each adds the relative attention bias.
    assert sum(1 for n in shapes if n.startswith("encoder.block.")) == 24 * 8 + 1
    assert sum(1 for n in shapes if n.startswith("decoder.block.")) == 24 * 13 + 1
    assert vg.calibration_config(cfg)["model_type"] == "llama"
    assert vg.calibration_config(vg.shape_config("moe"))["model_type"] == "mixtral"
