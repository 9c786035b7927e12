#!/usr/bin/env python3
"""Generate the example model shipped in examples/: a tiny Llama-shaped checkpoint.

Writes, relative to the repository root:

- examples/tiny-llama/model.safetensors  a real safetensors file (BF16, deterministic weights)
- examples/tiny-llama/config.json        its LlamaConfig-style config
- examples/tiny-llama.manifest.json      the same model as a devmap-manifest/1 (module classes,
                                          the rotary buffer, no-split classes), laid out like
                                          fixtures/models/llama-2-7b.json

Standard library only (struct + json + a linear congruential generator), so the output is
byte-for-byte reproducible: run `python3 scripts/make_example.py` and `git diff` shows nothing.

safetensors format: an 8-byte little-endian header length N, N bytes of JSON (padded with spaces
to a multiple of 8), then the raw tensor data at the offsets the header gives.
"""

import json
import os
import struct
import sys

VOCAB = 512
HIDDEN = 64
INTERMEDIATE = 172
LAYERS = 4
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
NAME = "tiny-llama"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "examples", NAME)
MANIFEST = os.path.join(ROOT, "examples", NAME + ".manifest.json")


class Lcg:
    """Numerical Recipes' 32-bit LCG: deterministic on every platform and Python version."""

    def __init__(self, seed):
        self.state = seed & 0xFFFFFFFF

    def next_u32(self):
        self.state = (1664525 * self.state + 1013904223) & 0xFFFFFFFF
        return self.state

    def uniform(self, scale):
        """A float in [-scale, scale)."""
        return (self.next_u32() / 2**32 * 2.0 - 1.0) * scale


def bf16(value):
    """The BF16 bytes of `value` (round to nearest even from its float32 bits)."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    bits += 0x7FFF + ((bits >> 16) & 1)
    return struct.pack("<H", (bits >> 16) & 0xFFFF)


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def tensors():
    """(name, shape, kind) in PyTorch registration order: parameters, then buffers."""
    out = [("model.embed_tokens.weight", [VOCAB, HIDDEN])]
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.self_attn.q_proj.weight", [HEADS * HEAD_DIM, HIDDEN]),
            (f"{p}.self_attn.k_proj.weight", [KV_HEADS * HEAD_DIM, HIDDEN]),
            (f"{p}.self_attn.v_proj.weight", [KV_HEADS * HEAD_DIM, HIDDEN]),
            (f"{p}.self_attn.o_proj.weight", [HIDDEN, HEADS * HEAD_DIM]),
            (f"{p}.mlp.gate_proj.weight", [INTERMEDIATE, HIDDEN]),
            (f"{p}.mlp.up_proj.weight", [INTERMEDIATE, HIDDEN]),
            (f"{p}.mlp.down_proj.weight", [HIDDEN, INTERMEDIATE]),
            (f"{p}.input_layernorm.weight", [HIDDEN]),
            (f"{p}.post_attention_layernorm.weight", [HIDDEN]),
        ]
    out += [("model.norm.weight", [HIDDEN]), ("lm_head.weight", [VOCAB, HIDDEN])]
    return out


def modules():
    """(name, class) in registration order, root excluded (as in the llama-2-7b fixture)."""
    out = [
        ("model", "LlamaModel"),
        ("model.embed_tokens", "Embedding"),
        ("model.layers", "ModuleList"),
    ]
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        out += [
            (p, "LlamaDecoderLayer"),
            (f"{p}.self_attn", "LlamaAttention"),
            (f"{p}.self_attn.q_proj", "Linear"),
            (f"{p}.self_attn.k_proj", "Linear"),
            (f"{p}.self_attn.v_proj", "Linear"),
            (f"{p}.self_attn.o_proj", "Linear"),
            (f"{p}.mlp", "LlamaMLP"),
            (f"{p}.mlp.gate_proj", "Linear"),
            (f"{p}.mlp.up_proj", "Linear"),
            (f"{p}.mlp.down_proj", "Linear"),
            (f"{p}.mlp.act_fn", "SiLUActivation"),
            (f"{p}.input_layernorm", "LlamaRMSNorm"),
            (f"{p}.post_attention_layernorm", "LlamaRMSNorm"),
        ]
    out += [
        ("model.norm", "LlamaRMSNorm"),
        ("model.rotary_emb", "LlamaRotaryEmbedding"),
        ("lm_head", "Linear"),
    ]
    return out


def tensor_bytes(name, shape, rng):
    n = numel(shape)
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return bf16(1.0) * n  # RMSNorm weights start at one
    scale = 0.02 * 3**0.5  # uniform with standard deviation 0.02, HF's initializer_range
    return b"".join(bf16(rng.uniform(scale)) for _ in range(n))


def write_safetensors(path, entries):
    """entries: (name, dtype, shape, data). Header keys sorted, data in the same order (as the
    safetensors library lays out tensors of one dtype)."""
    entries = sorted(entries, key=lambda e: e[0])
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, _, data in entries:
            f.write(data)


def config():
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 256,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def manifest():
    table = [
        {"name": n, "dtype": "BF16", "shape": s, "kind": "param"} for n, s in tensors()
    ]
    table.append(
        {"name": "model.rotary_emb.inv_freq", "dtype": "F32", "shape": [HEAD_DIM // 2], "kind": "buffer"}
    )
    return {
        "format": "devmap-manifest/1",
        "name": NAME,
        "dtype": "BF16",
        "root_class": "LlamaForCausalLM",
        "modules": [{"name": n, "class": c} for n, c in modules()],
        "tensors": table,
        "tied": [],
        "no_split": ["LlamaDecoderLayer"],
        "hidden_size": HIDDEN,
    }


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    rng = Lcg(20240607)
    entries = [(n, "BF16", s, tensor_bytes(n, s, rng)) for n, s in tensors()]
    st = os.path.join(OUT_DIR, "model.safetensors")
    write_safetensors(st, entries)
    with open(os.path.join(OUT_DIR, "config.json"), "w") as f:
        json.dump(config(), f, indent=2)
        f.write("\n")
    with open(MANIFEST, "w") as f:
        json.dump(manifest(), f, indent=1)
        f.write("\n")
    total = sum(len(e[3]) for e in entries)
    print(f"wrote {st} ({len(entries)} tensors, {total} bytes of data)", file=sys.stderr)


if __name__ == "__main__":
    main()
