#!/usr/bin/env python3
"""Benchmark `devmap load` against transformers' from_pretrained on the same checkpoint and plan.

Runs on a machine with NVIDIA GPUs, PyTorch, transformers and safetensors (no Rust needed:
`--devmap` is a devmap binary built elsewhere). In one run it

1. writes a Llama-3.1-8B-shaped bf16 checkpoint (4 shards + index + config.json, ~16 GB of
   random weights generated on the GPU), unless it is already there;
2. reads every shard once so that the checkpoint is in the page cache;
3. asks devmap for a plan (`devmap plan CKPT --format json`, budgets discovered from the GPUs;
   `--strategy balanced` when there are several GPUs so that all of them receive weights);
4. measures pinned and pageable host-to-device bandwidth with PyTorch (devmap's own figures come
   from `devmap devices --measure`, run by the caller);
5. times `devmap load CKPT --plan PLAN --json` (fresh process each time) with the default options
   and a few variants, then once more with --verify;
6. times transformers' `from_pretrained(CKPT, device_map=PLAN, dtype=torch.bfloat16)` in a fresh
   Python process (CUDA initialised before the timed call, so only the load is timed);
7. writes everything to OUT/results.json and prints a summary.

Usage: python3 scripts/bench_load.py --devmap PATH/devmap --ckpt /tmp/llama8b --out OUT
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

SHARD_BYTES = 5_000_000_000


# A small Mixtral-like MoE (validate_gpu.py --shape moe): 8 experts, top 2, 24 layers of 0.40 GiB,
# 9.8 GiB in all, so that caps of 4-8 GiB offload a part of it.
MIXTRAL_SMALL = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 2048,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


# T5-3B's shape (t5 v1.0: ReLU feed-forward, tied embeddings): an encoder-decoder for
# validate_gpu.py's `--shape t5`, ~5.7 GB of bf16.
T5_3B = {
    "architectures": ["T5ForConditionalGeneration"],
    "model_type": "t5",
    "is_encoder_decoder": True,
    "d_model": 1024,
    "d_ff": 16384,
    "d_kv": 128,
    "num_heads": 32,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "vocab_size": 32128,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "relu",
    "tie_word_embeddings": True,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
}


def meta_tensor_shapes(cfg):
    """Every parameter of `cfg`'s model as transformers registers it (tied ones once), from the
    model built on the meta device: the checkpoint `save_pretrained` would write."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(config)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def mixtral_layer_shapes(cfg, p):
    """One Mixtral layer's tensors as transformers writes them (`save_pretrained` keeps the
    per-expert names w1/w2/w3 and fuses them into `mlp.experts` when it loads)."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [
        (p + "input_layernorm.weight", (h,)),
        (p + "self_attn.q_proj.weight", (q, h)),
        (p + "self_attn.k_proj.weight", (kv, h)),
        (p + "self_attn.v_proj.weight", (kv, h)),
        (p + "self_attn.o_proj.weight", (h, q)),
        (p + "post_attention_layernorm.weight", (h,)),
        (p + "block_sparse_moe.gate.weight", (cfg["num_local_experts"], h)),
    ]
    for e in range(cfg["num_local_experts"]):
        x = f"{p}block_sparse_moe.experts.{e}."
        out += [(x + "w1.weight", (i, h)), (x + "w2.weight", (h, i)), (x + "w3.weight", (i, h))]
    return out


def tensor_shapes(cfg):
    if cfg.get("is_encoder_decoder"):
        return meta_tensor_shapes(cfg)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    if cfg.get("model_type") == "mixtral":
        out = [("model.embed_tokens.weight", (v, h))]
        for layer in range(cfg["num_hidden_layers"]):
            out += mixtral_layer_shapes(cfg, f"model.layers.{layer}.")
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def shard_layout(cfg):
    """The checkpoint's shards: lists of (name, shape), each shard up to SHARD_BYTES of bf16."""
    shards, current, size = [], [], 0
    for name, shape in tensor_shapes(cfg):
        n = 2
        for d in shape:
            n *= d
        if current and size + n > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    shards.append(current)
    return shards


def make_checkpoint(path, cfg=LLAMA_31_8B):
    """Random bf16 weights of `cfg`'s Llama (or Mixtral, or T5) shape (generated on the GPU) under
    `path`, unless its index is there."""
    import torch
    from safetensors.torch import save_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        print(f"checkpoint exists: {path}", flush=True)
        return
    os.makedirs(path, exist_ok=True)
    t0 = time.perf_counter()
    gen = torch.Generator(device="cuda").manual_seed(0)
    shards = shard_layout(cfg)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            x = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32)
            tensors[name] = (x * 0.02).to(torch.bfloat16).cpu()
            weight_map[name] = fname
            total += tensors[name].numel() * 2
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        del tensors
        print(f"wrote {fname}", flush=True)
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    subprocess.run(["sync"], check=False)
    print(f"checkpoint: {total / 1e9:.2f} GB in {len(shards)} shards, {time.perf_counter() - t0:.1f} s", flush=True)


def read_into_page_cache(path):
    total, t0 = 0, time.perf_counter()
    buf = bytearray(64 << 20)
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb", buffering=0) as f:
                while True:
                    n = f.readinto(buf)
                    if not n:
                        break
                    total += n
    dt = time.perf_counter() - t0
    return {"bytes": total, "seconds": dt, "gib_per_s": total / dt / 2**30}


def torch_h2d():
    import torch

    out = {}
    for kind in ("pinned", "pageable"):
        n = (1 << 30) if kind == "pinned" else (256 << 20)
        x = torch.randint(0, 255, (n,), dtype=torch.uint8)
        if kind == "pinned":
            x = x.pin_memory()
        y = torch.empty(n, dtype=torch.uint8, device="cuda")
        y.copy_(x, non_blocking=True)
        torch.cuda.synchronize()
        rates = []
        for _ in range(10 if kind == "pinned" else 3):
            t = time.perf_counter()
            y.copy_(x, non_blocking=True)
            torch.cuda.synchronize()
            rates.append(n / (time.perf_counter() - t))
        out[kind] = {"bytes": n, "median_gib_per_s": statistics.median(rates) / 2**30,
                     "best_gib_per_s": max(rates) / 2**30}
        del x, y
        torch.cuda.empty_cache()
    n_gpus = torch.cuda.device_count()
    if n_gpus > 1:
        # All GPUs at once, each from its own pinned buffer: the aggregate host-to-device ceiling.
        n = 1 << 30
        xs = [torch.randint(0, 255, (n,), dtype=torch.uint8).pin_memory() for _ in range(n_gpus)]
        ys = [torch.empty(n, dtype=torch.uint8, device=f"cuda:{g}") for g in range(n_gpus)]
        streams = [torch.cuda.Stream(device=g) for g in range(n_gpus)]
        rates = []
        for r in range(6):
            for g in range(n_gpus):
                torch.cuda.synchronize(g)
            t = time.perf_counter()
            for g in range(n_gpus):
                with torch.cuda.stream(streams[g]):
                    ys[g].copy_(xs[g], non_blocking=True)
            for g in range(n_gpus):
                torch.cuda.synchronize(g)
            if r > 0:
                rates.append(n * n_gpus / (time.perf_counter() - t))
        out["pinned_all_gpus_at_once"] = {"gpus": n_gpus, "bytes_per_gpu": n,
                                          "median_gib_per_s": statistics.median(rates) / 2**30}
        del xs, ys
        torch.cuda.empty_cache()
    return out


def run(cmd):
    print("$ " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        print(p.stdout + p.stderr, flush=True)
    return p, wall


def devmap_once(devmap, ckpt, plan, extra):
    p, wall = run([devmap, "load", ckpt, "--plan", plan, "--json"] + extra)
    if p.returncode != 0:
        return {"error": p.stderr.strip()}
    r = json.loads(p.stdout)
    r["process_wall_seconds"] = wall
    return r


def devmap_load(devmap, ckpt, plan, extra, repeats):
    return summarize(extra, [devmap_once(devmap, ckpt, plan, extra) for _ in range(repeats)])


def interleaved(configs, ckpt, plan, rounds):
    """Each config once per round, rounds in turn: slow drift of the machine hits all alike."""
    runs = {i: [] for i in range(len(configs))}
    for _ in range(rounds):
        for i, (binary, extra) in enumerate(configs):
            runs[i].append(devmap_once(binary, ckpt, plan, extra))
    out = []
    for i, (binary, extra) in enumerate(configs):
        s = summarize(extra, runs[i])
        s["binary"] = os.path.basename(binary)
        out.append(s)
    return out


def summarize(extra, runs):
    ok = [r for r in runs if "error" not in r]
    summary = {"options": extra, "runs": len(ok)}
    if ok:
        for key, get in [
            ("copy_gib_per_s", lambda r: r["copy_gib_per_s"]),
            ("total_gib_per_s", lambda r: r["total_gib_per_s"]),
            ("copy_seconds", lambda r: r["stats"]["copy_seconds"]),
            ("setup_seconds", lambda r: r["stats"]["setup_seconds"]),
            ("load_call_seconds", lambda r: r["stats"]["total_seconds"]),
            ("command_seconds", lambda r: r["command_seconds"]),
            ("process_wall_seconds", lambda r: r["process_wall_seconds"]),
        ]:
            summary[key + "_median"] = statistics.median(get(r) for r in ok)
            summary[key + "_all"] = [round(get(r), 4) for r in ok]
        per = {}
        for r in ok:
            for d in r["stats"]["devices"]:
                per.setdefault(str(d["device"]), []).append(d["bytes"] / d["seconds"] / 2**30)
        summary["device_gib_per_s_median"] = {k: statistics.median(v) for k, v in per.items()}
        summary["bytes"] = ok[0]["stats"]["bytes"]
    else:
        summary["error"] = runs[0].get("error")
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_all")}), flush=True)
    return summary


TRANSFORMERS_SNIPPET = r"""
import gc, json, sys, time, torch, transformers
from transformers import AutoModelForCausalLM
ckpt, plan_path, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
plan = json.load(open(plan_path))
torch.zeros(1, device="cuda"); torch.cuda.synchronize()   # CUDA context up before timing
times = []
for _ in range(repeats):
    torch.cuda.synchronize()
    t = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(ckpt, device_map=plan, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
    devices = sorted({str(p.device) for p in m.parameters()})
    del m; gc.collect(); torch.cuda.empty_cache()
print(json.dumps({"times": times, "devices": devices, "transformers": transformers.__version__,
                  "torch": torch.__version__}))
"""


def transformers_load(ckpt, plan, repeats):
    p, wall = run([sys.executable, "-c", TRANSFORMERS_SNIPPET, ckpt, plan, str(repeats)])
    if p.returncode != 0:
        return {"error": p.stderr[-3000:]}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["median_seconds"] = statistics.median(r["times"])
    r["process_wall_seconds"] = wall
    print(json.dumps(r), flush=True)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devmap", required=True)
    ap.add_argument("--ckpt", default="/tmp/llama8b")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--hf-repeats", type=int, default=3)
    ap.add_argument("--variants", action="store_true", help="also time option variants")
    ap.add_argument("--compare-binary", help="another devmap build to time alongside (variants)")
    ap.add_argument("--probe", help="h2d_probe example binary, run on the first shard")
    args = ap.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    results = {"gpus": gpus, "gpu_name": torch.cuda.get_device_name(0)}
    make_checkpoint(args.ckpt)
    results["page_cache_read"] = read_into_page_cache(args.ckpt)
    results["page_cache_read_again"] = read_into_page_cache(args.ckpt)
    print(json.dumps(results), flush=True)

    plan = os.path.join(args.out, "plan.json")
    cmd = [args.devmap, "plan", args.ckpt, "--format", "json"]
    if gpus > 1:
        cmd += ["--strategy", "balanced"]
    p, _ = run(cmd)
    with open(plan, "w") as f:
        f.write(p.stdout)
    results["plan"] = json.loads(p.stdout)
    results["plan_stderr"] = p.stderr.strip()
    print("plan:", p.stdout.strip()[:300], flush=True)

    results["torch_h2d"] = torch_h2d()
    print(json.dumps(results["torch_h2d"]), flush=True)

    if args.probe:
        shard = sorted(f for f in os.listdir(args.ckpt) if f.endswith(".safetensors"))[0]
        p, _ = run([args.probe, os.path.join(args.ckpt, shard)])
        results["probe"] = p.stdout + p.stderr
        print(results["probe"], flush=True)

    results["devmap"] = devmap_load(args.devmap, args.ckpt, plan, [], args.repeats)
    if gpus > 1:
        single = os.path.join(args.out, "plan-gpu0.json")
        with open(single, "w") as f:
            f.write('{"": 0}')
        results["devmap_one_gpu"] = devmap_load(args.devmap, args.ckpt, single, [], 3)
    if args.variants:
        configs = [(args.devmap, [])]
        configs += [
            (args.devmap, extra)
            for extra in (
                ["--staging-buffers", "16"],
                ["--staging-mib", "1", "--staging-buffers", "32"],
                ["--staging-mib", "4", "--staging-buffers", "24"],
                ["--staging-mib", "16", "--staging-buffers", "18"],
                ["--staging-mib", "16", "--staging-buffers", "18", "--staging-memory", "write-combined"],
                ["--read", "pread"],
                ["--threads", "12"],
            )
        ]
        if args.compare_binary:
            configs.append((args.compare_binary, []))
            configs.append((args.compare_binary, ["--no-write-combined", "--staging-mib", "8", "--staging-buffers", "4"]))
        results["variants"] = interleaved(configs, args.ckpt, plan, 3)
    p, wall = run([args.devmap, "load", args.ckpt, "--plan", plan, "--verify"])
    results["verify_output"] = p.stdout + p.stderr
    results["verify_exit"] = p.returncode
    print(p.stdout + p.stderr, flush=True)

    # GPU and pinned host memory together: a plan that keeps part of the model in RAM.
    mixed = os.path.join(args.out, "plan-mixed.json")
    p, _ = run([args.devmap, "plan", args.ckpt, "--max-memory", "0=8GiB,cpu=100GiB", "--format", "json"])
    with open(mixed, "w") as f:
        f.write(p.stdout)
    p, _ = run([args.devmap, "load", args.ckpt, "--plan", mixed, "--verify"])
    results["mixed_output"] = p.stdout + p.stderr
    results["mixed_exit"] = p.returncode
    print(p.stdout + p.stderr, flush=True)

    results["transformers"] = transformers_load(args.ckpt, plan, args.hf_repeats)
    # devmap again after transformers, so page-cache or clock drift shows up as a difference.
    results["devmap_after"] = devmap_load(args.devmap, args.ckpt, plan, [], 3)

    d, hf = results["devmap"], results["transformers"]
    if "median_seconds" in hf and "load_call_seconds_median" in d:
        results["speedup_load_call"] = hf["median_seconds"] / d["load_call_seconds_median"]
        results["speedup_command"] = hf["median_seconds"] / d["process_wall_seconds_median"]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("SUMMARY " + json.dumps({
        "gpus": gpus,
        "torch_pinned_gib_s": results["torch_h2d"]["pinned"]["median_gib_per_s"],
        "devmap_copy_gib_s": d.get("copy_gib_per_s_median"),
        "devmap_load_call_s": d.get("load_call_seconds_median"),
        "devmap_process_s": d.get("process_wall_seconds_median"),
        "hf_s": hf.get("median_seconds"),
        "speedup_load_call": results.get("speedup_load_call"),
        "speedup_command": results.get("speedup_command"),
        "verify_exit": results["verify_exit"],
    }), flush=True)


if __name__ == "__main__":
    main()
