#!/usr/bin/env python3
"""Write the small pre-quantized checkpoints of fixtures/quant/checkpoints/ (zeros: only the
safetensors headers and config.json matter to devmap). Each holds a tiny Llama (or gpt-oss for
MXFP4) in the layout the quantizer serializes: FP8 fine-grained (fp8 `weight` + float32
`weight_scale_inv` per 128x128 block), GPTQ 4-bit (`qweight`/`qzeros`/`scales`/`g_idx`), AWQ 4-bit
GEMM (`qweight`/`qzeros`/`scales`), bitsandbytes 4-bit nf4 (uint8 `weight` + `absmax`,
`quant_map`, `quant_state`), MXFP4 (gpt-oss `*_blocks`/`*_scales` experts).

    python scripts/gen_quant_checkpoints.py [-o fixtures/quant/checkpoints]

Needs torch, safetensors and transformers (gpt-oss's module tree, built on the meta device).
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_load import tensor_shapes  # noqa: E402

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 256, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fp8(prefix, out, inp):
    return {
        f"{prefix}.weight": torch.zeros((out, inp), dtype=torch.float8_e4m3fn),
        f"{prefix}.weight_scale_inv": torch.zeros(((out + 127) // 128, (inp + 127) // 128)),
    }


def gptq(prefix, out, inp, group=128):
    return {
        f"{prefix}.qweight": torch.zeros((inp // 8, out), dtype=torch.int32),
        f"{prefix}.qzeros": torch.zeros((inp // group, out // 8), dtype=torch.int32),
        f"{prefix}.scales": torch.zeros((inp // group, out), dtype=torch.float16),
        f"{prefix}.g_idx": torch.zeros((inp,), dtype=torch.int32),
    }


def awq(prefix, out, inp, group=128):
    return {
        f"{prefix}.qweight": torch.zeros((inp, out // 8), dtype=torch.int32),
        f"{prefix}.qzeros": torch.zeros((inp // group, out // 8), dtype=torch.int32),
        f"{prefix}.scales": torch.zeros((inp // group, out), dtype=torch.float16),
    }


def bnb4(prefix, out, inp):
    n = out * inp
    return {
        f"{prefix}.weight": torch.zeros((n // 2, 1), dtype=torch.uint8),
        f"{prefix}.weight.absmax": torch.zeros((n // 64,)),
        f"{prefix}.weight.quant_map": torch.zeros((16,)),
        f"{prefix}.weight.quant_state.bitsandbytes__nf4": torch.zeros((120,), dtype=torch.uint8),
    }


QUANTIZED_LLAMAS = {
    "fp8": ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}, fp8),
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}, gptq),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}, awq),
    "bnb-4bit": ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                  "bnb_4bit_use_double_quant": False}, bnb4),
}


def write(folder, tensors, config):
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def llama(out_dir, name):
    qc, pack = QUANTIZED_LLAMAS[name]
    tensors = {}
    for tname, shape in tensor_shapes(LLAMA):
        prefix = tname.removesuffix(".weight")
        if prefix.rsplit(".", 1)[-1] in LINEARS:
            tensors.update(pack(prefix, *shape))
        else:
            tensors[tname] = torch.zeros(shape, dtype=torch.bfloat16)
    write(os.path.join(out_dir, name), tensors, dict(LLAMA, quantization_config=qc))


def gpt_oss(out_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "gpt_oss", hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, num_local_experts=4, num_experts_per_tok=2, vocab_size=256,
        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tensors = {}
    for tname, p in list(model.named_parameters()) + list(model.named_buffers()):
        if tname.endswith("experts.gate_up_proj") or tname.endswith("experts.down_proj"):
            e, rows_in, cols_out = p.shape  # stored transposed: [E, in, out]
            tensors[tname + "_blocks"] = torch.zeros((e, cols_out, rows_in // 32, 16), dtype=torch.uint8)
            tensors[tname + "_scales"] = torch.zeros((e, cols_out, rows_in // 32), dtype=torch.uint8)
        elif "rotary" not in tname:
            tensors[tname] = torch.zeros(p.shape, dtype=p.dtype)
    config = cfg.to_dict()
    config["architectures"] = ["GptOssForCausalLM"]
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    write(os.path.join(out_dir, "mxfp4"), tensors, config)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--out", default=os.path.join(os.path.dirname(__file__), "..", "fixtures", "quant", "checkpoints"))
    args = ap.parse_args()
    for name in QUANTIZED_LLAMAS:
        llama(args.out, name)
    gpt_oss(args.out)
    for name in sorted(os.listdir(args.out)):
        size = os.path.getsize(os.path.join(args.out, name, "model.safetensors"))
        print(f"{name}: {size} bytes")


if __name__ == "__main__":
    main()
