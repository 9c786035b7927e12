"""A no-split decoder layer divided at module granularity between the execution device and the
offload tiers (the maps `auto --split-blocks true` emits: a block split across the main GPU, cpu
and disk) loads with from_pretrained and runs with the logits of the model loaded whole. On a CPU
machine the cpu is the execution device, so the split here is cpu + disk; on a GPU machine
accelerate runs the cpu/disk modules on the main GPU the same way (AlignDevicesHook per module)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import assert_loads_like_whole, real_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")


def split_map(layers: int) -> dict:
    """Layer 1 split module by module between cpu and disk, the others whole."""
    split = {
        "model.layers.1.self_attn.q_proj": "cpu",
        "model.layers.1.self_attn.k_proj": "disk",
        "model.layers.1.self_attn.v_proj": "cpu",
        "model.layers.1.self_attn.o_proj": "disk",
        "model.layers.1.mlp.gate_proj": "cpu",
        "model.layers.1.mlp.up_proj": "disk",
        "model.layers.1.mlp.down_proj": "disk",
        "model.layers.1.input_layernorm": "cpu",
        "model.layers.1.post_attention_layernorm": "disk",
    }
    whole = {f"model.layers.{i}": ("cpu" if i % 2 == 0 else "disk") for i in range(layers) if i != 1}
    return {"model.embed_tokens": "cpu", **split, **whole, "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "disk"}


def test_a_block_split_by_module_loads_and_runs(tmp_path):
    model = real_model("llama", dtype=torch.float32)
    model.save_pretrained(tmp_path / "ckpt")
    device_map = split_map(model.config.num_hidden_layers)
    # accelerate's own check: the map covers every parameter exactly once.
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    accelerate.utils.check_device_map(skeleton, device_map)

    assert_loads_like_whole(tmp_path / "ckpt", device_map, tmp_path / "offload")


MEASURED = Path(__file__).resolve().parents[2] / "fixtures" / "measured" / "llama-3.1-8b-shaped.json"


def test_auto_splits_streamed_layers_by_default_and_split_blocks_false_keeps_them_whole():
    import devmap

    args = dict(max_memory={0: "6GiB", "cpu": "100GiB"}, workload="batch=1,prompt=8,new=12")
    split = devmap.plan_report(MEASURED, **args)
    whole = devmap.plan_report(MEASURED, **args, split_blocks=False)
    layer_module = re.compile(r"^model\.layers\.\d+\.")
    assert any(layer_module.match(k) for k in split["device_map"])
    assert not any(layer_module.match(k) for k in whole["device_map"])
    assert split["solve"]["status"] == whole["solve"]["status"] == "optimal"
    assert split["estimate"]["ms_per_token"] < whole["estimate"]["ms_per_token"]
    with pytest.raises(devmap.ArgumentError, match="split_blocks"):
        devmap.plan(MEASURED, **args, split_blocks="yes")
