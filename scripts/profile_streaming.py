"""Where does a streamed decode step spend its time? One map against Hugging Face's auto under a cap.

Runs on a CUDA machine with transformers and accelerate (no Rust). It writes (or reuses) the
random Llama-3.1-8B-shaped checkpoint of validate_gpu.py under /tmp/dv, times pageable `.to()`
copies of single tensors at four sizes, then for each cell loads the map under a hard cap, times
12 greedy decode steps after an 8-token prompt, counts the allocator's retries, and profiles one
more step with torch.profiler (host-to-device copies, cudaMalloc/cudaFree, kernels).

    python3 profile_streaming.py MAPS.json        # MAPS.json: {"devmap6": {...device map...}}
Writes $OUT/profile6.json (docs/validation.md, "Where a streamed step spends its time").
"""
import gc, json, os, statistics, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from validate_gpu import prepare_checkpoint, cap_gpu, GIB
from transformers import AutoModelForCausalLM

OUT = os.environ.get("OUT", "/tmp/out")
work = "/tmp/dv"
os.makedirs(work, exist_ok=True)
ckpt, cfg = prepare_checkpoint(work)
maps = json.load(open(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "maps.json")))
res = {"copies": [], "cells": []}

def log(m): print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)

# 1. raw pageable .to() copies by size
for mib in (8, 32, 112, 1002):
    t = torch.empty(mib * 2**20 // 2, dtype=torch.bfloat16)
    t.normal_()
    ts = []
    for _ in range(6):
        torch.cuda.synchronize(); a = time.perf_counter()
        g = t.to("cuda:0"); torch.cuda.synchronize()
        ts.append(time.perf_counter() - a); del g
    med = statistics.median(ts[1:])
    res["copies"].append({"mib": mib, "ms": med * 1e3, "gb_s": mib * 2**20 / med / 1e9})
    log(f"copy {mib} MiB: {med*1e3:.2f} ms = {mib*2**20/med/1e9:.2f} GB/s")

def step_loop(model, n):
    ids = torch.randint(0, cfg["vocab_size"], (1, 8), device="cuda:0")
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1).to("cuda:0")
        steps = []
        for _ in range(n):
            torch.cuda.synchronize(); a = time.perf_counter()
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1).to("cuda:0"); past = out.past_key_values
            torch.cuda.synchronize(); steps.append(time.perf_counter() - a)
        return steps, tok, past

def profile_step(model, tok, past):
    from torch.profiler import profile, ProfilerActivity
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        torch.cuda.synchronize()
    summary = {}
    for e in p.key_averages():
        if e.count and (e.key.startswith("Memcpy") or e.key.startswith("cuda") or e.key in (
                "aten::to", "aten::copy_", "aten::_to_copy", "aten::mm", "aten::empty_strided")):
            summary[e.key] = {"count": e.count, "cpu_ms": e.cpu_time_total / 1e3,
                              "dev_ms": getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 1e3}
    return summary

def cell(name, device_map, cap, n=12):
    gc.collect(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(0)
    cap_gpu(cap)
    r0 = torch.cuda.memory_stats(0).get("num_alloc_retries", 0)
    a = time.perf_counter()
    kw = dict(device_map=device_map, max_memory={0: f"{cap}GiB", "cpu": "100GiB"}, dtype=torch.bfloat16,
              offload_folder=os.path.join(work, "offload"))
    model = AutoModelForCausalLM.from_pretrained(ckpt, **kw).eval()
    load = time.perf_counter() - a
    steps, tok, past = step_loop(model, n)
    r1 = torch.cuda.memory_stats(0).get("num_alloc_retries", 0)
    prof = profile_step(model, tok, past)
    row = {"name": name, "cap": cap, "load_s": load, "ms": [s * 1e3 for s in steps],
           "ms_mean": 1e3 * statistics.mean(steps[1:]), "ms_median": 1e3 * statistics.median(steps[1:]),
           "alloc_retries": r1 - r0, "peak_reserved_gib": torch.cuda.max_memory_reserved(0) / GIB,
           "profile": prof, "hf_map": dict(getattr(model, "hf_device_map", {}))}
    log(f"{name} cap {cap}: mean {row['ms_mean']:.0f} median {row['ms_median']:.0f} ms retries {row['alloc_retries']} peak {row['peak_reserved_gib']:.2f}")
    for k, v in sorted(prof.items()):
        log(f"   {k}: n={v['count']} cpu={v['cpu_ms']:.1f} dev={v['dev_ms']:.1f}")
    res["cells"].append(row)
    del model, past, tok; gc.collect(); torch.cuda.empty_cache()
    json.dump(res, open(os.path.join(OUT, "profile6.json"), "w"), indent=1)

dm, hf = maps["devmap6"], maps["hf6"]
for rnd in range(2):
    order = [("devmap", dm, 6), ("hf", "auto", 6)] if rnd == 0 else [("hf", "auto", 6), ("devmap", dm, 6)]
    for name, m, cap in order:
        cell(f"{name}-r{rnd}", m, cap)
cell("devmap-cap7", dm, 7)
cell("hfmap-as-dict", hf, 6)
