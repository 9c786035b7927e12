"""Small transformers models built on the meta device, and budgets scaled to their size.

These tests run against the installed wheel (scripts/test_python.sh) and real torch, transformers
and accelerate, CPU only."""

from __future__ import annotations

import logging
import warnings

import pytest

torch = pytest.importorskip("torch", reason="scripts/test_python.sh installs torch; never skipped there")
import transformers  # noqa: E402
from transformers.utils import logging as tf_logging  # noqa: E402

warnings.filterwarnings("ignore")
tf_logging.set_verbosity_error()
logging.getLogger("accelerate").setLevel(logging.ERROR)

SMALL = dict(vocab_size=512)


def configs() -> dict:
    """name -> (config, auto class): decoder-only (tied and untied heads), GPT-2, OPT, T5."""
    llama = dict(SMALL, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2)
    return {
        "llama": (transformers.LlamaConfig(**llama, tie_word_embeddings=False), transformers.AutoModelForCausalLM),
        "llama-tied": (transformers.LlamaConfig(**llama, tie_word_embeddings=True), transformers.AutoModelForCausalLM),
        "qwen2": (transformers.Qwen2Config(**llama), transformers.AutoModelForCausalLM),
        "gpt2": (transformers.GPT2Config(**SMALL, n_embd=64, n_layer=6, n_head=4, n_positions=128),
                 transformers.AutoModelForCausalLM),
        "opt": (transformers.OPTConfig(**SMALL, hidden_size=64, ffn_dim=128, num_hidden_layers=6,
                                       num_attention_heads=4, max_position_embeddings=128,
                                       word_embed_proj_dim=64), transformers.AutoModelForCausalLM),
        "t5": (transformers.T5Config(**SMALL, d_model=64, d_ff=128, d_kv=16, num_layers=3,
                                     num_decoder_layers=3, num_heads=4), transformers.AutoModelForSeq2SeqLM),
    }


CONFIGS = configs()
MODEL_NAMES = sorted(CONFIGS)


def meta_model(name: str, dtype=None):
    """The model on the meta device, as from_pretrained builds it before loading."""
    config, auto = CONFIGS[name]
    with torch.device("meta"):
        return auto.from_config(config, dtype=dtype or torch.bfloat16)


def real_model(name: str, dtype=None):
    """The same model with real (seeded random) weights on the cpu."""
    config, auto = CONFIGS[name]
    torch.manual_seed(0)
    return auto.from_config(config, dtype=dtype or torch.bfloat16)


def model_bytes(model) -> int:
    """Bytes of the model's distinct parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# GPU, GPU, cpu budgets as shares of the model's size: two GPUs that take part of it, a tight
# first GPU, everything fitting on the GPUs, and a total too small without a disk budget.
SCENARIOS = {
    "split-offload": (0.3, 0.3, 2.0),
    "fits-gpus": (0.6, 0.7, 2.0),
    "tight-gpu0": (0.12, 0.5, 2.0),
    "short": (0.2, 0.2, 0.3),
}


def budgets(model, scenario: str) -> dict:
    """accelerate's max_memory dict for a scenario, in bytes, GPU keys as ints."""
    g0, g1, cpu = SCENARIOS[scenario]
    total = model_bytes(model)
    return {0: int(total * g0), 1: int(total * g1), "cpu": int(total * cpu)}


def resolve(device_map: dict, name: str):
    """The device of tensor `name` under a device map (longest matching key, as accelerate)."""
    best = None
    for key, device in device_map.items():
        if key == "" or name == key or name.startswith(key + "."):
            if best is None or len(key) > len(best[0]):
                best = (key, device)
    return None if best is None else best[1]


def assert_loads_like_whole(ckpt, device_map: dict, offload_folder) -> None:
    """`from_pretrained(ckpt, device_map=...)` puts every parameter where the map says and gives
    the logits of the same checkpoint loaded whole (float32, CPU)."""
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt, device_map=device_map, offload_folder=offload_folder, dtype=torch.float32)
    for name, _ in loaded.named_parameters():
        assert resolve(loaded.hf_device_map, name) == resolve(device_map, name), name
    whole = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 7, 11, 13]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, whole(ids).logits, atol=1e-5)
