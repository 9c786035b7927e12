#!/usr/bin/env python3
"""Measure the runtime constants only Python can see and merge them into a devmap topology file.

`devmap calibrate` measures copies through the CUDA driver; what accelerate, transformers and
eager PyTorch add on top of them is measured here, on one GPU, each constant by its own
measurement (a joint fit of copy latency and hook cost was ill-conditioned: one machine gave
hook 74 µs / latency 7 µs, another hook 0 µs / latency 337 µs). docs/cost-model.md defines each
field; `--dry-run` prints the plan below with the sizes of the given config and exits.

1. `latency`: the median time of a synchronised `.to(device)` of a tiny (8 KiB) pageable tensor,
   the size of a decoder layer's norm weight: the fixed cost of one accelerate copy.
2. `bandwidth`: `.to(device)` copies of one decoder layer's parameter shapes and the head, from
   two kinds of host memory, each shape timed on distinct tensors (none served from the CPU
   caches): file-backed pages of a memory-mapped safetensors file (what transformers 5 leaves
   cpu-mapped weights in: `safe_open` views of the page cache, and accelerate copies from them),
   and ordinary anonymous memory. Per kind, the rate is the layer's bytes over its copy time minus
   one latency per tensor, so `latency + bytes / bandwidth` sums to the measured layer exactly.
   Reported; written only with `--copy-from file|anon` (these short copies of a few tensors ran
   at 8.7 GB/s on a machine whose decode steps copied at 7.1: see 6).
3. `offload_hook_seconds`: a chain of 256 tiny bias-free Linear modules runs resident, then
   dispatched by accelerate with every module on `cpu` (a hook and one 8 KiB copy each); the
   difference per module minus the latency of (1) is the hook. Also reported, not written: the
   same chain hooked but resident (the hook's Python cost without the weight swap).
4. `eager_module_seconds`: Llama-shaped decoders of 2 and 10 layers (random weights built on the
   GPU from the config) decode one token at a time at a 64-token context, timed alternately, the
   fastest kept; at 10 layers, the step minus its weight bytes at the GPU's memory bandwidth (from
   the topology), over the modules with weights.
5. `kv_passes_per_step`: the 10-layer decoder's step at a 16384-token context against the
   64-token one: the extra time, at the GPU's memory bandwidth, in passes over the added KV-cache
   bytes (transformers' `torch.cat` growth, attention's reads, any kernel inefficiency). Timed
   twice uncapped, then once under a hard cap of the prefill's reserved peak + 128 MiB (devmap's
   plans run at their budget; the allocator's retries there are counted); the larger is written.
   The cost model charges that many passes per layer and step.
6. `bandwidth` (written by default): decoders of 8 layers with their last 0, 2 and 6 layers
   file-backed on cpu (`safe_open` views) and dispatched by accelerate, stepped alternately at a
   64-token context; one streamed layer's cost is (t6 - t0) / 6, and its bytes over that cost
   less what the cost model already charges it (one latency per tensor from 1, one hook per
   module from 3) is the rate accelerate sustains on real decode steps from those pages. On the
   lent VM a buffer's plain copy rate depends on the pages it got (4.7-8.3 GB/s between buffers,
   steady within one), so the written rate is that streamed rate's ratio to a plain copy of the
   same pages, times the median plain rate of 12 fresh 256 MiB buffers.

7. With an encoder-decoder's config (`--config` of a T5, `calibrate_encoder_decoder_eager`): the
   eager constant of that architecture's decoder, measured on its own: decoders of 2 and 10
   blocks (a 1-block encoder) decode one token at a time on a cached 64-token encoder output;
   (t10 - t2) less the 8 blocks' bytes at the GPU's memory bandwidth, over the 8 blocks' modules
   with weights that run per step (cross-attention's key and value projections do not: their
   outputs are cached), is written to `runtime.eager_module_seconds_by_model_type.<model_type>`,
   which devmap's cost model uses for models of that `model_type` (T5's decoder does more Python
   per module than Llama's). Nothing else is measured with such a config.

Written: `gpus.<i>.pageable_host_link` (and `default_pageable_host_link` for GPU 0), `runtime`
(`offload_memory`, `offload_hook_seconds`, `eager_module_seconds`, `kv_passes_per_step`,
`source`), and the raw timings under `runtime_calibration` (which `--topology` ignores). About 50
s on an H200 (`--dry-run` estimates it).

Usage: python3 scripts/calibrate_runtime.py --topology topo.json [--config config.json]
           [--device cuda:0] [--copy-from file|anon] [--scratch DIR] [--dry-run]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

DEFAULT_LAYERS = (2, 10)
TINY_MODULES = 256
TINY_WIDTH = 64  # 64 x 64 bf16 = 8 KiB, a hidden-4096 norm weight
TINY_COPIES = 200
COPY_ROUNDS = 3
DECODE_STEPS = 30
SHORT_CONTEXT = 64
KV_CONTEXT = 16384
STREAMED_LAYERS = 8  # layers of the decoder whose last k are streamed in measurement 6
STREAMED_COUNTS = (0, 2, 6)  # k: the slope between the last two is one streamed layer's cost
STREAMED_STEPS = 8
STREAMED_ROUNDS = 3
RATE_SAMPLES = 12  # fresh host buffers whose plain copy rates give the machine's typical rate
RATE_SAMPLE_BYTES = 256 << 20
CAP_HEADROOM = 128 << 20  # above the prefill's reserved peak, for the capped KV measurement
DEVICE = "cuda:0"  # the GPU measured (accelerate's main device); --device changes it


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


def timed_copy(host):
    """Seconds of one synchronised `.to(DEVICE)` of `host` (the GPU copy is dropped, as
    accelerate's `post_forward` drops it)."""
    synchronize()
    t0 = time.perf_counter()
    dev = host.to(DEVICE, copy=True)  # copy=True: a real copy even with --device cpu (a CPU check)
    synchronize()
    seconds = time.perf_counter() - t0
    del dev
    return seconds


# ---------------------------------------------------------------- 1. latency


def copy_latency(copies=TINY_COPIES):
    """Median seconds of an 8 KiB pageable `.to(DEVICE)`, over distinct host tensors."""
    import torch

    pool = [torch.full((TINY_WIDTH, TINY_WIDTH), 0.5, dtype=torch.bfloat16) for _ in range(copies)]
    for t in pool[:10]:  # warm the allocator and the driver's staging buffers
        timed_copy(t)
    times = [timed_copy(t) for t in pool]
    raw = {"bytes": TINY_WIDTH * TINY_WIDTH * 2, "copies": copies, "median_seconds": statistics.median(times),
           "min_seconds": min(times)}
    return raw["median_seconds"], raw


# ---------------------------------------------------------------- 2. bandwidth


def copy_shapes(config):
    """Parameter shapes of one decoder layer's Linear weights (q, k, v, o, gate, up, down)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    q = heads * head_dim
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def head_shape(config):
    return (config["vocab_size"], config["hidden_size"])


def copy_pool(config, copies):
    """{name: (rows, cols)} of `copies` copies of the layer's shapes and one head."""
    names = {}
    for c in range(copies):
        for k, shape in enumerate(copy_shapes(config)):
            names[f"layer{c}.w{k}"] = shape
    names["head"] = head_shape(config)
    return names


def mapped_through_file(tensors, path):
    """`tensors` ({name: tensor}) written to the safetensors file `path` and read back through
    `safe_open` as memory-mapped views of the page cache, as transformers 5 reads cpu-mapped
    weights, every page faulted in once (the decode steps after the first see them mapped).
    Returns (the open handle, to keep as long as the views are used; {name: view})."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file(tensors, path)
    handle = safe_open(path, framework="pt")
    views = {n: handle.get_tensor(n) for n in tensors}
    for t in views.values():
        t.sum()
    return handle, views


def file_backed_pool(config, copies, scratch):
    """The pool as memory-mapped views of a safetensors file (`mapped_through_file`).
    Returns ({name: tensor}, path)."""
    import torch

    path = os.path.join(scratch, "calibrate_runtime_copies.safetensors")
    pool = {n: torch.full(s, 0.5, dtype=torch.bfloat16) for n, s in copy_pool(config, copies).items()}
    handle, tensors = mapped_through_file(pool, path)
    tensors["__handle__"] = handle  # the open file, kept as long as its views are used
    return tensors, path


def anonymous_pool(config, copies):
    import torch

    return {n: torch.full(s, 0.5, dtype=torch.bfloat16) for n, s in copy_pool(config, copies).items()}


def host_memory_kind(tensor):
    """The mapping `tensor`'s data lives in, from /proc/self/maps: a file path or "[anon]"."""
    ptr = tensor.data_ptr()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                span, rest = line.split(" ", 1)
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo <= ptr < hi:
                    fields = rest.split()
                    return fields[4] if len(fields) > 4 else "[anon]"
    except OSError:
        pass
    return "unknown"


def time_pool(pool, config, copies, rounds):
    """Median seconds per layer shape (over copies x rounds distinct-tensor copies) and the head's."""
    shapes = copy_shapes(config)
    samples = [[] for _ in shapes]
    head = []
    for r in range(rounds + 1):
        for c in range(copies):
            for k in range(len(shapes)):
                t = timed_copy(pool[f"layer{c}.w{k}"])
                if r > 0:  # round 0 warms the allocator and the driver
                    samples[k].append(t)
        t = timed_copy(pool["head"])
        if r > 0:
            head.append(t)
    return [statistics.median(s) for s in samples], statistics.median(head)


def rate_of(pool, config, copies, rounds, latency):
    """Copy rate of the pool's memory: the layer's bytes over (its copy time - one latency per
    tensor), beside the rate of each shape and of the head."""
    layer, head = time_pool(pool, config, copies, rounds)
    sizes = [a * b * 2 for a, b in copy_shapes(config)]
    head_bytes = head_shape(config)[0] * head_shape(config)[1] * 2
    busy = sum(layer) - latency * len(layer)
    if busy <= 0:
        raise RuntimeError(f"layer copies took {sum(layer):.6f} s, under {len(layer)} latencies of {latency:.6f} s")
    raw = {
        "bytes": sizes + [head_bytes],
        "median_seconds": layer + [head],
        "gb_per_s": [b / t / 1e9 for b, t in zip(sizes + [head_bytes], layer + [head])],
        "memory": host_memory_kind(pool["head"]),
    }
    return sum(sizes) / busy, raw


def copy_rates(config, latency, scratch, copies=2, rounds=COPY_ROUNDS):
    """{"file": (bandwidth, raw), "anon": (bandwidth, raw)}: both kinds of host memory."""
    out = {}
    file_pool, path = file_backed_pool(config, copies, scratch)
    try:
        out["file"] = rate_of(file_pool, config, copies, rounds, latency)
    finally:
        del file_pool
        os.remove(path)
    anon = anonymous_pool(config, copies)
    out["anon"] = rate_of(anon, config, copies, rounds, latency)
    del anon
    return out


# ---------------------------------------------------------------- 3. hook


def tiny_chain(n, width=TINY_WIDTH):
    import torch

    return torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(n))).to(torch.bfloat16)


def offload_hook_seconds(latency, n=TINY_MODULES, repeats=20):
    """accelerate's per-module hook: a chain of tiny modules offloaded vs resident, minus one copy."""
    import torch
    from accelerate import dispatch_model
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    x = torch.randn(1, TINY_WIDTH, device=DEVICE, dtype=torch.bfloat16)
    chain = tiny_chain(n).to(DEVICE).eval()
    with torch.no_grad():
        t_plain = timed_steps(lambda: chain(x), repeats)
        for m in chain:
            add_hook_to_module(m, AlignDevicesHook(execution_device=torch.device(DEVICE)))
        t_hooked = timed_steps(lambda: chain(x), repeats)
    del chain
    # force_hooks: with every module on one device dispatch_model would otherwise just move the
    # model there instead of hooking it.
    offloaded = dispatch_model(
        tiny_chain(n).eval(),
        device_map={str(i): "cpu" for i in range(n)},
        main_device=torch.device(DEVICE),
        force_hooks=True,
    )
    with torch.no_grad():
        t_offloaded = timed_steps(lambda: offloaded(x), repeats)
    del offloaded
    empty_cache()
    per_module = (t_offloaded - t_plain) / n
    raw = {
        "modules": n,
        "resident_seconds": t_plain,
        "hooked_resident_seconds": t_hooked,
        "offloaded_seconds": t_offloaded,
        "per_module_offloaded_seconds": per_module,
        "hook_without_copy_seconds": (t_hooked - t_plain) / n,
        "copy_latency_subtracted": latency,
    }
    return max(0.0, per_module - latency), raw


# ---------------------------------------------------------------- 4./5. eager and KV


def empty_cache():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_decoder(config, layers):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    fields["max_position_embeddings"] = max(fields.get("max_position_embeddings", 0), 2 * KV_CONTEXT)
    cfg = AutoConfig.for_model(config["model_type"], **{**fields, "num_hidden_layers": layers})
    with torch.device(DEVICE):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def step_seconds(model, context, repeats=DECODE_STEPS, headroom=None):
    """Median seconds of one decode step after a `context`-token prefill (the cache grows by one
    token per step: negligible next to `context`), and the allocator's retries over the steps.
    With `headroom` (bytes), the decode runs under a hard cap of the prefill's reserved peak plus
    that much, as devmap's plans run at their budget (the grid's maps peaked 0.05-0.17 GiB
    below it)."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (1, context), device=DEVICE)
    cuda = torch.cuda.is_available() and torch.device(DEVICE).type == "cuda"
    with torch.no_grad():
        if cuda:
            torch.cuda.reset_peak_memory_stats(DEVICE)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        del out
        if cuda and headroom is not None:
            total = torch.cuda.get_device_properties(DEVICE).total_memory
            cap = torch.cuda.max_memory_reserved(DEVICE) + headroom
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), DEVICE)
        retries = torch.cuda.memory_stats(DEVICE).get("num_alloc_retries", 0) if cuda else 0
        try:
            seconds = timed_steps(lambda: model(input_ids=tok, past_key_values=past, use_cache=True), repeats)
        finally:
            if cuda:
                retries = torch.cuda.memory_stats(DEVICE).get("num_alloc_retries", 0) - retries
                torch.cuda.set_per_process_memory_fraction(1.0, DEVICE)
    del past
    empty_cache()
    return seconds, retries


def weights_and_modules(module):
    """Bytes of `module`'s parameters, and how many of its modules own parameters directly."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    owners = sum(1 for m in module.modules() if any(True for _ in m.parameters(recurse=False)))
    return total, owners


CROSS_KEY_VALUE = {"EncDecAttention": ("k", "v"), "encoder_attn": ("k_proj", "v_proj")}  # as devmap's decode.rs


def runs_per_step(name):
    """Whether the module `name` runs on a decode step of an encoder-decoder's decoder (not a
    cross-attention key or value projection, whose output the cache holds)."""
    parts = name.split(".")
    return not (len(parts) >= 2 and parts[-1] in CROSS_KEY_VALUE.get(parts[-2], ()))


def decoder_block_reads(block):
    """(bytes, modules with weights) a decode step reads in one decoder block."""
    owners = [(n, m) for n, m in block.named_modules() if any(True for _ in m.parameters(recurse=False)) and runs_per_step(n)]
    read = sum(p.numel() * p.element_size() for _, m in owners for p in m.parameters(recurse=False))
    return read, len(owners)


def build_encoder_decoder(config, decoder_layers):
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    fields.update(num_layers=1, num_decoder_layers=decoder_layers)
    cfg = AutoConfig.for_model(config["model_type"], **fields)
    with torch.device(DEVICE):
        return AutoModelForSeq2SeqLM.from_config(cfg, dtype=torch.bfloat16).eval()


def seq2seq_inputs(model, ids):
    """An encoder-decoder's decode inputs, as `generate` gives them: the prefill's (the prompt
    `ids` for the encoder, the start token for the decoder's first step), and a function of the
    prefill's output giving each later step's for a token (the decoder alone on the cached
    encoder output: the encoder's weights are not read again)."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    start = torch.full((1, 1), model.config.decoder_start_token_id or 0, device=ids.device)

    def step_inputs(prefilled):
        encoded = BaseModelOutput(last_hidden_state=prefilled.encoder_last_hidden_state)
        return lambda tok: dict(encoder_outputs=encoded, decoder_input_ids=tok)

    return dict(input_ids=ids, decoder_input_ids=start), step_inputs


def encoder_decoder_step_seconds(model, context=SHORT_CONTEXT, repeats=DECODE_STEPS):
    """Median seconds of one decoder step on a cached `context`-token encoder output."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (1, context), device=DEVICE)
    prefill_inputs, step_inputs = seq2seq_inputs(model, ids)
    with torch.no_grad():
        out = model(**prefill_inputs, use_cache=True)
        step_of = step_inputs(out)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        del out
        seconds = timed_steps(lambda: model(**step_of(tok), past_key_values=past, use_cache=True), repeats)
    del past
    empty_cache()
    return seconds


def encoder_decoder_eager(config, gpu_bandwidth, layers=DEFAULT_LAYERS, rounds=2):
    """(eager seconds per module of the decoder, raw): see measurement 7 of the module docs."""
    models = {n: build_encoder_decoder(config, n) for n in layers}
    best = {}
    for _ in range(rounds):
        for n, model in models.items():
            best[n] = min(best.get(n, float("inf")), encoder_decoder_step_seconds(model))
    small, big = min(layers), max(layers)
    block_bytes, block_modules = decoder_block_reads(models[big].get_decoder().block[1])
    del models, model
    empty_cache()
    added = big - small
    per_module = max(0.0, best[big] - best[small] - added * block_bytes / gpu_bandwidth) / (added * block_modules)
    raw = {"model_type": config["model_type"], "decoder_layers": list(layers), "step_seconds": [best[n] for n in layers],
           "block_bytes_read": block_bytes, "block_modules_run": block_modules, "gpu_bandwidth": gpu_bandwidth,
           "per_module_seconds": per_module}
    return per_module, raw


def calibrate_encoder_decoder_eager(topo_path, config):
    """Measurement 7: merge the encoder-decoder's own eager constant into the topology at
    `topo_path` (`runtime.eager_module_seconds_by_model_type`), beside the machine's others."""
    import torch

    with open(topo_path) as f:
        topo = json.load(f)
    bandwidth = gpu_rates(topo, torch.device(DEVICE).index or 0)
    per_module, raw = encoder_decoder_eager(config, bandwidth)
    runtime = topo.setdefault("runtime", {})
    runtime.setdefault("eager_module_seconds_by_model_type", {})[config["model_type"]] = per_module
    topo.setdefault("runtime_calibration", {})[f"eager_{config['model_type']}"] = raw
    with open(topo_path, "w") as f:
        json.dump(topo, f, indent=2)
    print(f"{config['model_type']} decoder: eager {per_module * 1e6:.1f} µs per module ({raw['block_modules_run']} modules "
          f"and {raw['block_bytes_read'] / 2**20:.0f} MiB per block per step; steps "
          + ", ".join(f"{n} blocks {t * 1e3:.2f} ms" for n, t in zip(raw["decoder_layers"], raw["step_seconds"])) + ")",
          flush=True)
    return per_module


def kv_bytes_per_token(config, layers):
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return layers * 2 * config.get("num_key_value_heads", heads) * head_dim * 2


def eager_and_kv(config, gpu_bandwidth, layers=DEFAULT_LAYERS, rounds=2, kv_context=KV_CONTEXT):
    """(eager seconds per module, KV passes per step, raw): both decoders built once, each layer
    count timed `rounds` times alternately (the first model timed in a process was once 7x slower
    per step than later ones), the fastest kept; then the largest at `kv_context`."""
    models = {n: build_decoder(config, n) for n in layers}
    best = {}
    for _ in range(rounds):
        for n, model in models.items():
            best[n] = min(best.get(n, float("inf")), step_seconds(model, SHORT_CONTEXT)[0])
    big = max(layers)
    long_step = min(step_seconds(models[big], kv_context)[0] for _ in range(rounds))
    try:
        capped_step, capped_retries = step_seconds(models[big], kv_context, headroom=CAP_HEADROOM)
        capped_error = None
    except RuntimeError as e:  # torch.OutOfMemoryError is one: the cap was too tight for the cache's growth
        capped_step, capped_retries, capped_error = None, None, repr(e)[:300]
    layer_bytes, layer_modules = weights_and_modules(models[big].model.layers[0])
    all_bytes, all_modules = weights_and_modules(models[big])
    del models, model
    empty_cache()
    # Outside the layers: embedding, final norm, head (devmap charges their whole bytes too).
    outer_bytes, outer_modules = all_bytes - big * layer_bytes, all_modules - big * layer_modules
    per_module = {}
    for n, t in best.items():
        read = n * layer_bytes + outer_bytes
        per_module[n] = max(0.0, t - read / gpu_bandwidth) / (n * layer_modules + outer_modules)
    added_kv = (kv_context - SHORT_CONTEXT) * kv_bytes_per_token(config, big)
    passes = max(0.0, long_step - best[big]) * gpu_bandwidth / added_kv
    raw = {
        "layers": list(layers),
        "step_seconds": [best[n] for n in layers],
        "per_module_seconds": [per_module[n] for n in layers],
        "layer_bytes": layer_bytes,
        "modules_per_layer": layer_modules,
        "outer_bytes_read": outer_bytes,
        "outer_modules": outer_modules,
        "gpu_bandwidth": gpu_bandwidth,
        "kv_context": kv_context,
        "kv_step_seconds": long_step,
        "kv_added_bytes": added_kv,
        "kv_passes_uncapped": passes,
        "kv_capped_headroom_bytes": CAP_HEADROOM,
    }
    if capped_error:
        raw["kv_capped_error"] = capped_error
        return per_module[big], passes, raw
    capped_passes = max(0.0, capped_step - best[big]) * gpu_bandwidth / added_kv
    raw.update(kv_capped_step_seconds=capped_step, kv_capped_alloc_retries=capped_retries, kv_passes_at_cap=capped_passes)
    # devmap's plans run at their budget: the capped figure is what they see (equal to the
    # uncapped one unless the allocator has to free and retry there).
    return per_module[big], max(passes, capped_passes), raw


# ---------------------------------------------------------------- 6. streamed layers


def file_backed_layers(model, names, scratch, tag="layers"):
    """Replace the parameters of the modules `names` by memory-mapped views of a safetensors file
    of them (page cache, `scratch/calibrate_runtime_<tag>.safetensors`: one file per model, as
    rewriting a mapped file would change the views), as transformers 5 leaves cpu-mapped weights.
    Returns the open handle."""
    params = {f"{n}.{p}": t for n in names for p, t in model.get_submodule(n).named_parameters()}
    path = os.path.join(scratch, f"calibrate_runtime_{tag}.safetensors")
    handle, views = mapped_through_file({k: t.detach().cpu().contiguous() for k, t in params.items()}, path)
    for key, param in params.items():
        param.data = views[key]
    return handle


def streamed_device_map(model, streamed, gpu):
    """accelerate's device_map for `model` (a decoder from `build_decoder`) with its last
    `streamed` layers on cpu and every other module on `gpu`."""
    device_map = {name: gpu for name, _ in model.named_children() if name != "model"}
    for name, _ in model.model.named_children():
        if name != "layers":
            device_map[f"model.{name}"] = gpu
    layers = len(model.model.layers)
    for i in range(layers):
        device_map[f"model.layers.{i}"] = "cpu" if i >= layers - streamed else gpu
    return device_map


def streamed_decoder(config, streamed, scratch):
    """A `STREAMED_LAYERS`-layer decoder (the config's shape, random) with its last `streamed`
    layers file-backed on cpu and dispatched by accelerate (hooks, one module copied at a time:
    what `from_pretrained(device_map=...)` builds), the rest on the GPU."""
    import torch
    from accelerate import dispatch_model

    model = build_decoder(config, STREAMED_LAYERS)
    device = torch.device(DEVICE)
    gpu = (device.index or 0) if device.type == "cuda" else device.type
    device_map = streamed_device_map(model, streamed, gpu)
    streamed_names = [n for n, d in device_map.items() if d == "cpu"]
    handle = file_backed_layers(model, streamed_names, scratch, tag=f"streamed{streamed}")
    return dispatch_model(model, device_map=device_map, main_device=device), handle


def own_memory_rate(handle, latency):
    """Plain `.to()` rate of the tensors behind `handle` (the streamed layers' own pages): bytes
    over copy time less one latency per tensor."""
    keys = list(handle.keys())
    if not keys:
        return None
    tensors = [handle.get_tensor(k) for k in keys]
    for t in tensors[:2]:
        timed_copy(t)  # warm the driver's staging buffers
    seconds = sum(timed_copy(t) for t in tensors) - latency * len(tensors)
    return sum(t.numel() * t.element_size() for t in tensors) / seconds


def fresh_memory_rates(samples=RATE_SAMPLES, size=RATE_SAMPLE_BYTES):
    """Plain `.to()` rates of `samples` freshly allocated host buffers, 3 copies each, medians.

    On the lent H200 machine (a VM whose RAM grows as it is used) the rate depends on the pages a
    buffer gets: 4.7-8.3 GB/s between buffers, steady within one (docs/validation.md). A load of
    a checkpoint is one such draw; these samples give the distribution the decode steps see."""
    import torch

    rates = []
    for _ in range(samples):
        host = torch.empty(size // 2, dtype=torch.bfloat16).fill_(0.5)
        times = [timed_copy(host) for _ in range(3)]
        rates.append(size / statistics.median(times))
        del host
    return rates


def streamed_layer_bandwidth(config, latency, hook, scratch):
    """The pageable rate accelerate sustains while it streams whole layers on decode steps, at
    this machine's typical host memory: decoders with 0, 2 and 6 file-backed layers streamed,
    stepped alternately, medians. One layer's streaming cost is (t6 - t0) / 6; what the cost model
    charges it besides its bytes (one latency per tensor, one hook per module) is taken off, and
    its bytes over the rest is the streamed rate of that decoder's own pages. Its ratio to a plain
    copy of those same pages (accelerate's efficiency) times the median plain rate over fresh
    buffers is written: the pages one file got are one draw of a wide distribution."""
    counts = STREAMED_COUNTS
    models, handles = {}, {}
    for k in counts:
        models[k], handles[k] = streamed_decoder(config, k, scratch)
    times = {k: [] for k in counts}
    for _ in range(STREAMED_ROUNDS):
        for k in counts:
            times[k].append(step_seconds(models[k], SHORT_CONTEXT, repeats=STREAMED_STEPS)[0])
    layer = models[counts[0]].model.layers[0]
    layer_bytes, modules = weights_and_modules(layer)
    tensors = sum(1 for _ in layer.parameters())
    del models, layer
    empty_cache()
    most = counts[-1]
    own_rate = own_memory_rate(handles[most], latency)
    handles.clear()
    fresh = fresh_memory_rates()
    median = {k: statistics.median(v) for k, v in times.items()}
    per_layer = (median[most] - median[0]) / most
    busy = per_layer - tensors * latency - modules * hook
    if busy <= 0 or not own_rate:
        raise RuntimeError(f"one streamed layer cost {per_layer:.6f} s, under its {tensors} latencies and {modules} hooks")
    streamed_rate = layer_bytes / busy
    efficiency = streamed_rate / own_rate
    raw = {
        "layers": STREAMED_LAYERS,
        "streamed": list(counts),
        "step_seconds": {str(k): v for k, v in times.items()},
        "median_step_seconds": {str(k): v for k, v in median.items()},
        "per_layer_seconds": per_layer,
        # What streaming costs a step beyond its layers (a sync, the first hook): reported only.
        "fixed_seconds": median[counts[1]] - counts[1] * per_layer - median[0],
        "layer_bytes": layer_bytes,
        "tensors_per_layer": tensors,
        "modules_per_layer": modules,
        "latency_subtracted": latency,
        "hook_subtracted": hook,
        "memory": "file-backed (safe_open views)",
        "streamed_rate_own_pages": streamed_rate,
        "plain_rate_own_pages": own_rate,
        "efficiency": efficiency,
        "fresh_buffer_rates": fresh,
        "fresh_buffer_bytes": RATE_SAMPLE_BYTES,
    }
    return efficiency * statistics.median(fresh), raw


# ---------------------------------------------------------------- the plan and the file


def plan(config, copies=2, rounds=COPY_ROUNDS, kv_context=KV_CONTEXT):
    """The measurements, in order, with their sizes (what --dry-run prints)."""
    sizes = [a * b * 2 for a, b in copy_shapes(config)]
    head = head_shape(config)[0] * head_shape(config)[1] * 2
    pool = copies * sum(sizes) + head
    layers = ", ".join(f"{s / 2**20:.0f}" for s in sizes)
    return [
        f"1. latency: {TINY_COPIES} synchronised .to({DEVICE}) of distinct 8 KiB bf16 tensors, median",
        f"2. bandwidth: a {pool / 2**30:.2f} GiB safetensors file (page cache, mmap views via safe_open) and the "
        f"same tensors in anonymous memory; per kind {rounds} rounds x {copies} copies of the layer's shapes "
        f"({layers} MiB) and the head ({head / 2**20:.0f} MiB), medians per shape",
        f"3. hook: {TINY_MODULES} tiny Linear modules resident, hooked-resident, and dispatched to cpu "
        f"(accelerate, force_hooks); 20 forwards each, medians",
        f"4. eager: decoders of {' and '.join(map(str, DEFAULT_LAYERS))} layers (config shape, random, on {DEVICE}), "
        f"{DECODE_STEPS} steps at a {SHORT_CONTEXT}-token context, 2 alternating rounds, fastest",
        f"5. KV passes: the {max(DEFAULT_LAYERS)}-layer decoder at a {kv_context}-token context, "
        f"{DECODE_STEPS} steps x 2 uncapped and x 1 capped at the prefill's reserved peak + "
        f"{CAP_HEADROOM >> 20} MiB (allocator retries counted), against 4.",
        f"6. streamed layers: {STREAMED_LAYERS}-layer decoders with the last {' and '.join(map(str, STREAMED_COUNTS))} layers "
        f"file-backed on cpu, dispatched by accelerate; {STREAMED_ROUNDS} alternating rounds x {STREAMED_STEPS} steps, "
        f"medians; (t6 - t0) / 6 per streamed layer less its latencies and hooks, over a plain copy of the same pages, "
        f"times the median plain rate of {RATE_SAMPLES} fresh {RATE_SAMPLE_BYTES >> 20} MiB buffers, is written",
    ]


def estimated_seconds(config, copies=2, rounds=COPY_ROUNDS):
    """Rough wall time at 7 GB/s pageable copies and H200-class decode steps (plus imports)."""
    sizes = sum(a * b * 2 for a, b in copy_shapes(config))
    head = head_shape(config)[0] * head_shape(config)[1] * 2
    copies_s = 2 * (rounds + 1) * (copies * sizes + head) / 7e9 + (copies * sizes + head) / 1e9  # + file write
    decode_s = 2 * 2 * (DECODE_STEPS + 2) * 0.01 + 3 * (DECODE_STEPS + 2) * 0.012 + 3 * 0.3 + 4.0  # + prefills, builds
    streamed_s = STREAMED_ROUNDS * (STREAMED_STEPS + 2) * sum(STREAMED_COUNTS) * sizes / 7e9 + sum(STREAMED_COUNTS) * sizes / 1e9
    return 5.0 + copies_s + 0.5 + decode_s + streamed_s


def gpu_rates(topo, index):
    """The GPU's memory bandwidth from the topology (its own, else the default, else 2 TB/s)."""
    gpu = topo.get("gpus", {}).get(str(index), {})
    return gpu.get("memory_bandwidth") or (topo.get("default_gpu") or {}).get("memory_bandwidth") or 2.0e12


def attempt(raw, name, step):
    """`step()`, or None with the error kept under raw[name]: one failed measurement leaves the
    others (and the topology's field for it) as they are."""
    try:
        return step()
    except Exception as e:  # recorded and reported, the calibration goes on
        raw[name] = {"error": repr(e)[:500]}
        print(f"calibrate_runtime: {name} failed, its field is left as it was: {e!r}", flush=True)
        return None


def measure(config, bandwidth, scratch, copy_from, fallback_latency):
    """Every constant, each measured separately: (link fields, runtime fields, raw), each dict
    holding only what was measured."""
    raw, link, runtime = {"written_copy_memory": copy_from}, {}, {}
    got = attempt(raw, "latency", copy_latency)
    if got:
        link["latency"], raw["latency"] = got
    latency = link.get("latency", fallback_latency)
    rates = attempt(raw, "pageable_copies", lambda: copy_rates(config, latency, scratch))
    if rates:
        raw["pageable_copies"] = {kind: dict(r, bandwidth=bw) for kind, (bw, r) in rates.items()}
        if copy_from in rates:
            link["bandwidth"] = rates[copy_from][0]
    got = attempt(raw, "hook", lambda: offload_hook_seconds(latency))
    if got:
        runtime["offload_hook_seconds"], raw["hook"] = got
    got = attempt(raw, "eager", lambda: eager_and_kv(config, bandwidth))
    if got:
        runtime["eager_module_seconds"], runtime["kv_passes_per_step"], raw["eager"] = got
    hook = runtime.get("offload_hook_seconds", 0.0)
    got = attempt(raw, "streamed", lambda: streamed_layer_bandwidth(config, latency, hook, scratch))
    if got:
        raw["streamed"] = dict(got[1], bandwidth=got[0])
        if copy_from == "streamed":
            link["bandwidth"] = got[0]
    if copy_from == "streamed" and not got and rates:
        link["bandwidth"] = rates["file"][0]  # the copies' rate when the streamed one failed
        raw["written_copy_memory"] = "file (the streamed measurement failed)"
    return link, runtime, raw


def merge(topo, index, link, runtime, source):
    """The topology with the measured link and runtime fields written where the cost model reads
    them (a field not measured keeps its value)."""
    gpu = topo.setdefault("gpus", {}).setdefault(str(index), {"memory_bandwidth": gpu_rates(topo, index)})
    old = gpu.get("pageable_host_link") or topo.get("default_pageable_host_link") or {"bandwidth": 7.5e9, "latency": 7e-6}
    merged = dict(old, **link)
    gpu["pageable_host_link"] = merged
    if index == 0:
        topo["default_pageable_host_link"] = dict(merged)
    fields = topo.setdefault("runtime", {})
    fields.update(runtime, offload_memory="pageable", source=source)
    return topo


def calibrate_runtime(topo_path, config, copy_from="streamed", scratch=None):
    """Measure every constant and merge them into the topology file at `topo_path`."""
    import accelerate
    import torch
    import transformers

    with open(topo_path) as f:
        topo = json.load(f)
    index = torch.device(DEVICE).index or 0
    bandwidth = gpu_rates(topo, index)
    driver = (topo.get("gpus", {}).get(str(index), {}).get("pageable_host_link") or topo.get("default_pageable_host_link")
              or {"latency": 7e-6})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        link, runtime, raw = measure(config, bandwidth, tmp, copy_from, driver["latency"])
    raw["seconds"] = time.perf_counter() - t0
    name = torch.cuda.get_device_name(index) if torch.cuda.is_available() else DEVICE
    source = (f"scripts/calibrate_runtime.py on {name}, torch {torch.__version__}, transformers "
              f"{transformers.__version__}, accelerate {accelerate.__version__}; copies from {copy_from} memory")
    merge(topo, index, link, runtime, source)
    topo["runtime_calibration"] = raw
    with open(topo_path, "w") as f:
        json.dump(topo, f, indent=2)
    report(topo["gpus"][str(index)]["pageable_host_link"], topo["runtime"], raw, topo_path)
    return topo["runtime"]


def report(link, runtime, raw, topo_path):
    """What was measured and written, one line per measurement (a failed one says so)."""
    lines = [f"copy latency (8 KiB .to()): {link['latency'] * 1e6:.1f} µs" if "latency" in raw and "error" not in raw["latency"]
             else f"copy latency: not measured, kept {link['latency'] * 1e6:.1f} µs"]
    copies = raw.get("pageable_copies", {})
    for kind in ("file", "anon"):
        if kind in copies:
            c = copies[kind]
            sizes = ", ".join(f"{b / 2**20:.0f} MiB {r:.2f}" for b, r in zip(c["bytes"], c["gb_per_s"]))
            lines.append(f"pageable copies from {kind} memory ({c['memory']}): layer {c['bandwidth'] / 1e9:.2f} GB/s (GB/s per size: {sizes})")
    hook = raw.get("hook", {})
    if "per_module_offloaded_seconds" in hook:
        lines.append(f"accelerate hook {runtime['offload_hook_seconds'] * 1e6:.1f} µs per streamed module "
                     f"({hook['per_module_offloaded_seconds'] * 1e6:.1f} µs per offloaded tiny module - "
                     f"{hook['copy_latency_subtracted'] * 1e6:.1f} µs copy; hooked but resident: "
                     f"{hook['hook_without_copy_seconds'] * 1e6:.1f} µs)")
    e = raw.get("eager", {})
    if "kv_context" in e:
        capped = (f"at the cap {e['kv_passes_at_cap']:.1f}: {e['kv_capped_step_seconds'] * 1e3:.2f} ms, "
                  f"{e['kv_capped_alloc_retries']} alloc retries" if "kv_passes_at_cap" in e else f"at the cap: {e.get('kv_capped_error')}")
        lines.append(f"eager {runtime['eager_module_seconds'] * 1e6:.1f} µs per module; KV {runtime['kv_passes_per_step']:.1f} passes "
                     f"per step at {e['kv_context']} tokens (uncapped {e['kv_passes_uncapped']:.1f}: {e['kv_step_seconds'] * 1e3:.2f} vs "
                     f"{e['step_seconds'][-1] * 1e3:.2f} ms; {capped})")
    st = raw.get("streamed", {})
    if "per_layer_seconds" in st:
        med = st["median_step_seconds"]
        fresh = sorted(st["fresh_buffer_rates"])
        lines.append(f"streamed layers: {st['bandwidth'] / 1e9:.2f} GB/s written = efficiency {st['efficiency']:.3f} "
                     f"({st['streamed_rate_own_pages'] / 1e9:.2f} GB/s streamed vs {st['plain_rate_own_pages'] / 1e9:.2f} plain "
                     f"from the same pages) x median of fresh buffers {statistics.median(fresh) / 1e9:.2f} GB/s "
                     f"(range {fresh[0] / 1e9:.2f}-{fresh[-1] / 1e9:.2f}); {st['per_layer_seconds'] * 1e3:.1f} ms per streamed "
                     f"layer of {st['layer_bytes'] / 2**20:.0f} MiB; fixed {st['fixed_seconds'] * 1e3:.1f} ms; steps " +
                     ", ".join(f"{k} streamed {v * 1e3:.1f} ms" for k, v in med.items()))
    lines.append(f"written pageable rate: {link['bandwidth'] / 1e9:.2f} GB/s ({raw.get('written_copy_memory')})")
    lines.append(f"{raw['seconds']:.1f} s -> {topo_path}")
    print("\n".join(lines), flush=True)


def load_config(path):
    if path:
        with open(path) as f:
            return json.load(f)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_load import LLAMA_31_8B

    return LLAMA_31_8B


def main():
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--topology", help="topology JSON from `devmap calibrate` (rewritten in place)")
    ap.add_argument("--config", help="config.json of the decoder to time (default: Llama-3.1-8B's shape)")
    ap.add_argument("--device", default=DEVICE, help="the GPU to measure (default cuda:0)")
    ap.add_argument("--copy-from", choices=("streamed", "file", "anon"), default="streamed",
                    help="which measured rate is written: the rate accelerate sustains streaming layers on decode "
                         "steps (default), or the single copies' from file-backed or anonymous memory")
    ap.add_argument("--scratch", help="folder for the temporary safetensors file (default: the system's temp)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan of measurements and exit")
    args = ap.parse_args()
    DEVICE = args.device
    config = load_config(args.config)
    if args.dry_run:
        print("\n".join(plan(config)))
        print(f"estimated {estimated_seconds(config):.0f} s; writes gpus.<i>.pageable_host_link, default_pageable_host_link "
              "(GPU 0), runtime.{offload_memory, offload_hook_seconds, eager_module_seconds, kv_passes_per_step, source}, "
              "runtime_calibration")
        return
    if not args.topology:
        ap.error("--topology is required (except with --dry-run)")
    if config.get("is_encoder_decoder"):
        calibrate_encoder_decoder_eager(args.topology, config)
    else:
        calibrate_runtime(args.topology, config, args.copy_from, args.scratch)


if __name__ == "__main__":
    main()
