#!/usr/bin/env python3
"""Validate devmap's quantized plans on a real GPU: a bnb 4-bit and an FP8 Llama-3.1-8B-shaped
model loaded by transformers under a hard cap, with devmap's `auto` map and with Hugging Face's
device_map="auto", in one run: resident and peak memory, devmap's predicted resident bytes, decode
ms/token.

Runs on one NVIDIA GPU with torch, transformers and accelerate (no Rust: `--devmap` is a release
binary built elsewhere). bitsandbytes is installed from `--bnb-wheel` (`pip install --no-deps`)
when `import bitsandbytes` fails. In one run it

1. writes a random Llama-3.1-8B-shaped bf16 checkpoint under --work (scripts/bench_load.py's
   writer, ~16 GB) unless it is there, and reads it once into the page cache;
2. writes each method's quantization_config (`BitsAndBytesConfig(...).to_dict()`,
   `FineGrainedFP8Config().to_dict()`) to WORK/<method>.json;
3. per method and cap: plans with `devmap plan --quantization-config WORK/<method>.json
   --max-memory 0=CAPGiB,cpu=CPU --workload batch=1,prompt=P,new=N --format plan-json`; loads
   devmap's map and device_map="auto" with the same max_memory and quantization_config (order
   alternating) under `torch.cuda.set_per_process_memory_fraction(CAP / total)`; prefills P random
   tokens and decodes N greedily; records resident bytes after load, peak allocated/reserved,
   devmap's predicted weights and total on GPU 0, ms/token, or the error (transformers'
   quantizer rejection, OOM at load/prefill/decode);
4. writes OUT/results.json and OUT/results.md.

Usage (about 5 minutes on one H200 with the defaults):
  python3 scripts/validate_quant_gpu.py --devmap PATH/devmap --out OUT [--work /tmp/devmap-quant]
      [--bnb-wheel PATH/bitsandbytes-*.whl] [--methods bnb4,fp8] [--caps-bnb4 7] [--caps-fp8 9]
      [--prompt 512] [--new-tokens 16] [--dry-run]

--dry-run (no GPU needed): a tiny Llama-shaped checkpoint instead of the 8B one, the config files
and devmap's plans for every cell, nothing loaded; prints what it would measure.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

GIB = 1 << 30
METHODS = ("bnb4", "fp8")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devmap", required=True, help="devmap binary (release build)")
    ap.add_argument("--out", required=True, help="folder for results.json and results.md")
    ap.add_argument("--work", default="/tmp/devmap-quant", help="checkpoint and config files")
    ap.add_argument("--bnb-wheel", help="bitsandbytes wheel to pip install --no-deps when import fails")
    ap.add_argument("--methods", default="bnb4,fp8", help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--caps-bnb4", default="7", help="GPU 0 caps in GiB for bnb 4-bit")
    ap.add_argument("--caps-fp8", default="9", help="GPU 0 caps in GiB for FP8")
    ap.add_argument("--cpu", default="100GiB", help="cpu budget in max_memory")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens (prefill)")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens decoded after the prefill")
    ap.add_argument("--strategies", default="devmap,hf", help="which maps to load: devmap, hf")
    ap.add_argument("--topology", help="a devmap topology file for planning")
    ap.add_argument("--deadline-s", type=float, default=480.0, help="start no new load after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="tiny checkpoint, plans only, no GPU")
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}; expected {', '.join(METHODS)}")
    args.caps = {
        "bnb4": [float(c) for c in args.caps_bnb4.split(",") if c],
        "fp8": [float(c) for c in args.caps_fp8.split(",") if c],
    }
    args.strategies = [s for s in args.strategies.split(",") if s]
    if set(args.strategies) - {"devmap", "hf"}:
        ap.error("--strategies: expected devmap and/or hf")
    return args


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- setup


def ensure_bitsandbytes(wheel):
    try:
        import bitsandbytes  # noqa: F401

        return
    except ImportError:
        pass
    if not wheel:
        raise SystemExit("bitsandbytes is not installed: pass --bnb-wheel PATH/bitsandbytes-*.whl")
    log(f"pip install --no-deps {wheel}")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", wheel], check=True)


TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def write_tiny_checkpoint(path):
    """A small random Llama-shaped bf16 checkpoint (CPU), the shapes of bench_load.tensor_shapes."""
    import torch
    from bench_load import tensor_shapes
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {
        name: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        for name, shape in tensor_shapes(TINY)
    }
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(TINY, f, indent=1)
    return path


def prepare_checkpoint(args):
    if args.dry_run:
        return write_tiny_checkpoint(os.path.join(args.work, "tiny-llama"))
    from bench_load import make_checkpoint, read_into_page_cache

    ckpt = os.path.join(args.work, "llama8b")
    make_checkpoint(ckpt)
    cached = read_into_page_cache(ckpt)
    log(f"checkpoint {ckpt}: read {cached['bytes'] / 1e9:.1f} GB at {cached['gib_per_s']:.1f} GiB/s")
    return ckpt


def quant_config(method):
    """The transformers config object of a method (what from_pretrained takes)."""
    import torch
    from transformers import BitsAndBytesConfig, FineGrainedFP8Config

    if method == "bnb4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return FineGrainedFP8Config()


def write_quant_config(work, method):
    """WORK/<method>.json: the config's to_dict(), as devmap's --quantization-config reads it."""
    path = os.path.join(work, f"{method}.json")
    with open(path, "w") as f:
        json.dump(quant_config(method).to_dict(), f, indent=1, default=str)
    return path


# ---------------------------------------------------------------- planning


def plan_devmap(args, ckpt, qfile, cap):
    cmd = [
        args.devmap, "plan", ckpt, "--quantization-config", qfile,
        "--max-memory", f"0={cap:g}GiB,cpu={args.cpu}",
        "--workload", f"batch=1,prompt={args.prompt},new={args.new_tokens}",
        "--format", "plan-json",
    ]
    if args.topology:
        cmd += ["--topology", args.topology]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"command": " ".join(cmd), "error": r.stderr.strip()}
    plan = json.loads(r.stdout)
    gpu0 = (plan.get("memory") or {}).get("0") or {}
    quant = (plan.get("quantization") or {}).get("bytes", {}).get("0", {})
    return {
        "command": " ".join(cmd),
        "device_map": plan["device_map"],
        "predicted_ms_per_token": plan.get("estimate_ms_per_token"),
        "predicted_weights_gib": gpu0.get("weights", 0) / GIB,
        "predicted_total_gib": gpu0.get("total", 0) / GIB,
        "predicted_load_peak_gib": gpu0.get("load_peak", 0) / GIB,
        "predicted_quantized_gib": quant.get("quantized", 0) / GIB,
        "predicted_full_precision_gib": quant.get("full_precision", 0) / GIB,
        "status": plan.get("status"),
    }


# ---------------------------------------------------------------- measuring


def cap_gpu(cap):
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GIB / total), 0)


def load(args, ckpt, method, device_map, cap):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        ckpt,
        device_map=device_map,
        max_memory={0: f"{cap:g}GiB", "cpu": args.cpu},
        dtype=torch.bfloat16,
        quantization_config=quant_config(method),
    ).eval()


def measure(args, ckpt, method, strategy, device_map, cap):
    """Load one map, prefill and decode; one row."""
    import torch
    from validate_gpu import free_gpu, measure_prompt, offloaded_bytes

    free_gpu()
    row = {"method": method, "strategy": strategy, "cap_gib": cap}
    t0 = time.perf_counter()
    failed = None
    try:
        model = load(args, ckpt, method, device_map, cap)
    except torch.OutOfMemoryError as e:
        # How far the load got: the allocator's peak before the failing allocation, and its message.
        peak = torch.cuda.max_memory_allocated(0) / GIB
        failed = dict(row, error="OOM at load", load_peak_allocated_gib=peak, oom_message=str(e)[:400])
    except Exception as e:  # the quantizer's rejection is this cell's result
        failed = dict(row, error=f"load failed: {e!r}"[:600])
    if failed is not None:
        # Outside the handler: the exception's frames (and the tensors they hold) are gone by now,
        # so the next cell starts from an empty GPU; what is still allocated is recorded.
        free_gpu()
        failed["left_allocated_gib"] = torch.cuda.memory_allocated(0) / GIB
        log(f"{method} {strategy:>6} cap {cap:g} GiB: {failed['error']}")
        return failed
    row.update(
        load_s=time.perf_counter() - t0,
        resident_gib=torch.cuda.memory_allocated(0) / GIB,
        # free_gpu reset the peak: this is the load's own (devmap's plan-json `load_peak`).
        load_peak_allocated_gib=torch.cuda.max_memory_allocated(0) / GIB,
        load_peak_reserved_gib=torch.cuda.max_memory_reserved(0) / GIB,
        offloaded_gib=offloaded_bytes(model) / GIB,
        device_map=dict(getattr(model, "hf_device_map", {}) or {}),
    )
    try:
        row.update(measure_prompt(model, args.prompt, args.new_tokens))
    except Exception as e:  # e.g. a missing quantized kernel: keep the load's figures
        row.update(error=f"decode failed: {e!r}"[:600])
    del model
    free_gpu()
    log(f"{method} {strategy:>6} cap {cap:g} GiB: " + (row.get("error") or f"{row['ms_per_token']:.1f} ms/token, resident {row['resident_gib']:.2f} GiB, peak {row['peak_allocated_gib']:.2f} GiB"))
    return row


def run_cell(args, ckpt, method, qfile, cap, k, started):
    plan = plan_devmap(args, ckpt, qfile, cap)
    log(f"{method} cap {cap:g} GiB: devmap plan: " + (plan.get("error") or f"{plan['device_map']} predicted weights {plan['predicted_weights_gib']:.2f} GiB"))
    if args.dry_run:
        return [dict(method=method, strategy="devmap", cap_gib=cap, plan=plan, dry_run=True)]
    order = args.strategies if k % 2 == 0 else list(reversed(args.strategies))
    rows = []
    for strategy in order:
        if time.perf_counter() - started > args.deadline_s:
            log(f"deadline reached: skipping {method} {strategy} at cap {cap:g}")
            continue
        if strategy == "devmap" and "error" in plan:
            rows.append(dict(method=method, strategy="devmap", cap_gib=cap, plan=plan, error=plan["error"]))
            continue
        device_map = plan["device_map"] if strategy == "devmap" else "auto"
        row = measure(args, ckpt, method, strategy, device_map, cap)
        if strategy == "devmap":
            row["plan"] = plan
        rows.append(row)
    return rows


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("validate_quant_gpu.py needs a CUDA GPU (or --dry-run)")
        if "bnb4" in args.methods:
            ensure_bitsandbytes(args.bnb_wheel)
    ckpt = prepare_checkpoint(args)
    rows = []
    k = 0
    for method in args.methods:
        qfile = write_quant_config(args.work, method)
        for cap in args.caps[method]:
            if not args.dry_run:
                cap_gpu(cap)
            rows += run_cell(args, ckpt, method, qfile, cap, k, started)
            k += 1
            write_results(args, rows)
    write_results(args, rows)
    log(f"done in {time.perf_counter() - started:.0f} s")
    return rows


# ---------------------------------------------------------------- reports


def environment(dry_run):
    import accelerate
    import torch
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "command": " ".join(sys.argv),
        "gpu": None if dry_run else torch.cuda.get_device_name(0),
    }
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        env["bitsandbytes"] = None
    return env


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def write_results(args, rows):
    env = environment(args.dry_run)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1, default=str)
    lines = [
        f"GPU: {env['gpu']} · torch {env['torch']} · transformers {env['transformers']} · accelerate {env['accelerate']} · bitsandbytes {env['bitsandbytes']}",
        f"Command: `{env['command']}`",
        "",
        "| method | cap GiB | map | predicted weights GiB (GPU 0) | resident GiB | predicted total GiB | peak alloc GiB | peak reserved GiB | predicted ms/tok | measured ms/tok | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r.get("plan") or {}
        lines.append(
            f"| {r['method']} | {r['cap_gib']:g} | {r['strategy']} | {fmt(p.get('predicted_weights_gib'), '.2f')} | "
            f"{fmt(r.get('resident_gib'), '.2f')} | {fmt(p.get('predicted_total_gib'), '.2f')} | "
            f"{fmt(r.get('peak_allocated_gib'), '.2f')} | {fmt(r.get('peak_reserved_gib'), '.2f')} | "
            f"{fmt(p.get('predicted_ms_per_token'), '.1f')} | {fmt(r.get('ms_per_token'), '.1f')} | "
            f"{'dry run' if r.get('dry_run') else r.get('error', 'ok')} |"
        )
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
