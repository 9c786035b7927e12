#!/usr/bin/env python3
"""Measure the runtime constants only Python can see and merge them into a devmap topology file.

`devmap calibrate` measures copies through the CUDA driver; what accelerate and eager PyTorch add
on top of them is measured here, on GPU 0, and written to the topology's `runtime` object
(docs/cost-model.md defines each field):

- `eager_module_seconds`: the fixed time eager PyTorch spends per module with weights in one
  batch-1 decode step, beyond reading those weights. Llama-shaped decoders of 2 and 10 layers
  (random weights, built in GPU memory from the given config.json) decode one token at a time,
  each timed twice, alternating, the fastest kept; at 10 layers, the step time minus all weight
  bytes at the GPU's memory bandwidth (from the topology), over all modules with weights.
- `offload_hook_seconds`: what accelerate's `AlignDevicesHook` costs per streamed module beyond
  the copy. A chain of N tiny bias-free Linear modules runs once fully on GPU 0 and once
  dispatched with every module on `cpu` (so accelerate copies each weight from pageable RAM on
  every forward); the difference per module, minus one pageable copy's latency (from the
  topology), is the hook.

- `pageable_host_link` of GPU 0 (and `default_pageable_host_link`): the copy rate accelerate
  gets, not the driver's 256 MiB benchmark. accelerate copies each offloaded tensor with a
  synchronous `.to(device)` from its ordinary (pageable) state dict into a fresh caching-allocator
  block, one module at a time. Here tensors of the decoder layer's parameter shapes (and the
  vocabulary-wide head) are copied that way from a pool larger than the CPU caches, and
  `seconds = latency + bytes / bandwidth` is fitted over them. On the H200 grid of 2026-12-01 the
  256 MiB driver rate (8.94 GB/s) was 16% above what the decode steps implied (7.49 GB/s fitted,
  scripts/fit_cost_model.py). `devmap calibrate`'s figure stays under `calibration`.

Usage: python3 scripts/calibrate_runtime.py --topology topo.json [--config config.json]
The file is rewritten in place with `runtime` filled in and `runtime_calibration` holding the raw
timings.
"""

import argparse
import json
import statistics
import sys
import time

DEFAULT_LAYERS = (2, 10)
TINY_MODULES = 256
DEVICE = "cuda:0"  # the GPU measured (accelerate's main device)


def synchronize():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(step, repeats):
    """Median seconds of `step()` over `repeats` calls after two warm-ups, synchronised."""
    for _ in range(2):
        step()
    synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decoder_step_seconds(config, layers, context=64, repeats=30):
    """Median seconds of one decode step of a `layers`-layer decoder with `config`'s shape."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    cfg = AutoConfig.for_model(config["model_type"], **{**fields, "num_hidden_layers": layers})
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, context), device=DEVICE)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)

        def step():
            # The cache grows by one token per step: 32 steps on a 64-token context change
            # attention's cost by nothing measurable next to the weight reads.
            model(input_ids=tok, past_key_values=past, use_cache=True)

        seconds = timed_steps(step, repeats)
    layer_bytes, layer_modules = weights_and_modules(model.model.layers[0])
    all_bytes, all_modules = weights_and_modules(model)
    del model, past, out
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # Outside the layers: embedding, final norm, head (devmap charges their whole bytes too).
    outer = (all_bytes - layers * layer_bytes, all_modules - layers * layer_modules)
    return seconds, layer_bytes, layer_modules, outer[0], outer[1]


def weights_and_modules(module):
    """Bytes of `module`'s parameters, and how many of its modules own parameters directly."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    owners = sum(1 for m in module.modules() if any(True for _ in m.parameters(recurse=False)))
    return total, owners


def eager_module_seconds(config, gpu_bandwidth, layers=DEFAULT_LAYERS, rounds=2):
    """Eager per-module overhead: a decode step's time minus its weight reads at the GPU's
    bandwidth, over the modules with weights, at the largest layer count.

    Each layer count is timed `rounds` times, alternating, and the fastest kept: the first model
    built in a process was measured 7x slower per step than later ones (cold GPU and libraries),
    which made a slope over layer counts negative.
    """
    best = {}
    for _ in range(rounds):
        for n in layers:
            t, layer_bytes, layer_modules, outer_bytes, outer_modules = decoder_step_seconds(config, n)
            best[n] = min(best.get(n, t), t)
    per_count = {}
    for n, t in best.items():
        read = n * layer_bytes + outer_bytes
        modules = n * layer_modules + outer_modules
        per_count[n] = max(0.0, t - read / gpu_bandwidth) / modules
    raw = {
        "layers": list(layers),
        "step_seconds": [best[n] for n in layers],
        "per_module_seconds": [per_count[n] for n in layers],
        "layer_bytes": layer_bytes,
        "modules_per_layer": layer_modules,
        "outer_bytes_read": outer_bytes,
        "outer_modules": outer_modules,
        "gpu_bandwidth": gpu_bandwidth,
    }
    return per_count[max(layers)], raw


def tiny_chain(n, width=64):
    import torch

    return torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(n))).to(torch.bfloat16)


def offload_hook_seconds(pageable_latency, n=TINY_MODULES, repeats=20):
    """accelerate's per-module hook cost: a chain of tiny modules offloaded vs resident."""
    import torch
    from accelerate import dispatch_model

    x = torch.randn(1, 64, device=DEVICE, dtype=torch.bfloat16)
    resident = tiny_chain(n).to(DEVICE).eval()
    with torch.no_grad():
        t_gpu = timed_steps(lambda: resident(x), repeats)
    del resident
    # force_hooks: with every module on one device dispatch_model would otherwise just move the
    # model there instead of hooking it.
    offloaded = dispatch_model(
        tiny_chain(n).eval(),
        device_map={str(i): "cpu" for i in range(n)},
        main_device=torch.device(DEVICE),
        force_hooks=True,
    )
    with torch.no_grad():
        t_cpu = timed_steps(lambda: offloaded(x), repeats)
    del offloaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    per_module = (t_cpu - t_gpu) / n
    raw = {"modules": n, "resident_seconds": t_gpu, "offloaded_seconds": t_cpu, "per_module_seconds": per_module, "pageable_latency": pageable_latency}
    return max(0.0, per_module - pageable_latency), raw


def copy_shapes(config):
    """Parameter shapes of one decoder layer (q, k, v, o, gate, up, down) and the head."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    q = heads * head_dim
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i), (v, h)]


def pageable_copy_link(config, rounds=5, pool_bytes=3 << 30):
    """Fit `latency + bytes / bandwidth` to accelerate-style copies: `.to(DEVICE)` of ordinary
    CPU tensors (pageable), synchronised, the GPU copy dropped after each (as the hook does)."""
    import torch

    shapes = copy_shapes(config)
    per_round = sum(a * b * 2 for a, b in shapes)
    copies = max(2, pool_bytes // per_round)
    # Distinct host tensors per round so that none is served from the CPU caches.
    pool = [[torch.full((a, b), 0.5, dtype=torch.bfloat16) for a, b in shapes] for _ in range(copies)]
    samples = {shape: [] for shape in shapes}
    for r in range(rounds + 1):
        for shape, host in zip(shapes, pool[r % copies]):
            synchronize()
            t0 = time.perf_counter()
            dev = host.to(DEVICE)
            synchronize()
            if r > 0:  # the first round warms the allocator and the driver's staging buffers
                samples[shape].append(time.perf_counter() - t0)
            del dev
    del pool
    points = [(a * b * 2, statistics.median(ts)) for (a, b), ts in samples.items()]
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    if slope <= 0:
        raise RuntimeError(f"pageable copies did not grow with their size: {points}")
    latency = max(0.0, my - slope * mx)
    raw = {"bytes": [x for x, _ in points], "median_seconds": [y for _, y in points], "rounds": rounds}
    return {"bandwidth": 1.0 / slope, "latency": latency}, raw


def gpu0_rates(topo):
    """GPU 0's memory bandwidth and pageable copy latency from the topology (defaults if absent)."""
    gpu = topo.get("gpus", {}).get("0", {})
    bandwidth = gpu.get("memory_bandwidth") or topo.get("default_gpu", {}).get("memory_bandwidth", 2.0e12)
    pageable = gpu.get("pageable_host_link") or topo.get("default_pageable_host_link") or {"latency": 20e-6}
    return bandwidth, pageable["latency"]


def calibrate_runtime(topo_path, config):
    """Measure both constants and merge them into the topology file at `topo_path`."""
    import torch
    import transformers
    import accelerate

    with open(topo_path) as f:
        topo = json.load(f)
    bandwidth, _ = gpu0_rates(topo)
    try:
        link, copy_raw = pageable_copy_link(config)
        topo.setdefault("gpus", {}).setdefault("0", {"memory_bandwidth": bandwidth})["pageable_host_link"] = link
        topo["default_pageable_host_link"] = link
    except RuntimeError as e:  # keep devmap calibrate's link; the other constants still run
        copy_raw = {"error": repr(e)}
        print(f"pageable copy fit failed, keeping the topology's link: {e!r}", flush=True)
    _, latency = gpu0_rates(topo)
    eager, eager_raw = eager_module_seconds(config, bandwidth)
    hook, hook_raw = offload_hook_seconds(latency)
    runtime = topo.setdefault("runtime", {})
    runtime["offload_memory"] = "pageable"
    runtime["eager_module_seconds"] = eager
    runtime["offload_hook_seconds"] = hook
    runtime["source"] = (
        f"scripts/calibrate_runtime.py on {torch.cuda.get_device_name(0) if torch.cuda.is_available() else DEVICE}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, accelerate {accelerate.__version__}"
    )
    topo["runtime_calibration"] = {"eager": eager_raw, "hook": hook_raw, "pageable_copies": copy_raw}
    with open(topo_path, "w") as f:
        json.dump(topo, f, indent=2)
    link = topo.get("default_pageable_host_link", {"bandwidth": float("nan"), "latency": latency})
    print(f"pageable .to() copies {link['bandwidth'] / 1e9:.2f} GB/s + {link['latency'] * 1e6:.1f} µs, "
          f"eager per module {eager * 1e6:.1f} µs, accelerate hook per module {hook * 1e6:.1f} µs -> {topo_path}", flush=True)
    return runtime


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--topology", required=True, help="topology JSON from `devmap calibrate` (rewritten in place)")
    ap.add_argument("--config", help="config.json of the decoder to time (default: Llama-3.1-8B's shape)")
    args = ap.parse_args()
    if args.config:
        with open(args.config) as f:
            config = json.load(f)
    else:
        sys.path.insert(0, __file__.rsplit("/", 1)[0])
        from bench_load import LLAMA_31_8B as config
    calibrate_runtime(args.topology, config)


if __name__ == "__main__":
    main()
