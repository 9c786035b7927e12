#!/usr/bin/env python3
"""What `from_pretrained` allocates on the GPU while it loads a map, and what it leaves behind.

For the small Mixtral of validate_gpu.py (`--shape moe`) transformers 5 fuses the checkpoint's
per-expert tensors into 3-D `mlp.experts` parameters while it loads; under a hard cap both
devmap's and Hugging Face's maps failed in that conversion or in the first copies after it
(docs/validation.md, "The small Mixtral under hard caps"). This probe measures it, one fresh
process per (map, allocator setting, cap or not), so every load starts from an empty allocator:

- load: the allocator's peak allocated and reserved bytes during `from_pretrained`, what is
  allocated and reserved after it, the reserved-but-unallocated bytes in split blocks
  (`inactive_split_bytes`), the allocator's retries;
- run: prefill of `--prompt` tokens and `--new-tokens` greedy steps, their peaks, ms/token.

Maps: devmap's plan for every `--caps` entry (`plan --format plan-json` with the prompt's
workload; its per-device prediction is recorded beside) and Hugging Face's `device_map="auto"`
with the same max_memory. Allocator settings (`--alloc`): `default` and `expandable`
(`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`). `--capped` adds runs under a hard cap
equal to the budget (`torch.cuda.set_per_process_memory_fraction`), as validate_gpu.py loads.

Usage (GPU machine):
  python3 scripts/probe_load_memory.py --devmap PATH/devmap --out OUT --work /tmp/dv --shape moe
      --caps 4,6,8 [--topology FILE] [--alloc default,expandable] [--capped] [--strategies devmap,hf]
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
ALLOC_CONF = {"default": None, "expandable": "expandable_segments:True"}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devmap", help="devmap release binary (parent)")
    ap.add_argument("--out", help="folder for results.json (parent)")
    ap.add_argument("--work", default="/tmp/devmap-validate")
    ap.add_argument("--shape", default="moe")
    ap.add_argument("--caps", default="4,6,8")
    ap.add_argument("--cpu", default="100GiB")
    ap.add_argument("--topology", help="topology for devmap's plans (defaults otherwise)")
    ap.add_argument("--alloc", default="default,expandable")
    ap.add_argument("--strategies", default="devmap,hf")
    ap.add_argument("--capped", action="store_true", help="also load under a hard cap equal to the budget")
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=6)
    ap.add_argument("--deadline-s", type=float, default=500.0)
    ap.add_argument("--child", help="(internal) one measurement, a JSON job")
    return ap.parse_args()


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- child: one load


def stats():
    import torch

    s = torch.cuda.memory_stats(0)
    return {
        "allocated": torch.cuda.memory_allocated(0),
        "reserved": torch.cuda.memory_reserved(0),
        "peak_allocated": torch.cuda.max_memory_allocated(0),
        "peak_reserved": torch.cuda.max_memory_reserved(0),
        "inactive_split": s.get("inactive_split_bytes.all.current", 0),
        "alloc_retries": s.get("num_alloc_retries", 0),
    }


def child(job):
    import torch
    from transformers import AutoModelForCausalLM

    from validate_gpu import OOM, generate, max_memory_dict

    row = dict(job)
    if job["capped"]:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, job["cap_gib"] * GIB / total), 0)
    torch.cuda.init()
    torch.cuda.reset_peak_memory_stats(0)
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            job["ckpt"], device_map=job["device_map"], max_memory=max_memory_dict(job["cap_gib"], job["cpu"]),
            dtype=torch.bfloat16, offload_folder=os.path.join(job["work"], "offload"),
        ).eval()
    except Exception as e:
        row.update(load=stats(), error=f"load: {e!r}"[:400])
        return row
    torch.cuda.synchronize()
    row["load_s"] = time.perf_counter() - t0
    row["load"] = stats()
    row["gpu_param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cuda")
    row["hf_device_map"] = getattr(model, "hf_device_map", None)
    torch.cuda.reset_peak_memory_stats(0)
    try:
        prefill, steps = generate(model, job["prompt"], job["new_tokens"])
        row["ms_per_token"] = 1e3 * sum(steps[1:]) / max(1, len(steps) - 1)
    except OOM as e:
        row["error"] = str(e)
    row["run"] = stats()
    return row


# ---------------------------------------------------------------- parent


def plan(args, ckpt, cap):
    from validate_gpu import max_memory_spec

    cmd = [args.devmap, "plan", ckpt, "--max-memory", max_memory_spec(cap, args.cpu), "--format", "plan-json",
           "--workload", f"batch=1,prompt={args.prompt},new={args.new_tokens}"]
    cmd += ["--topology", args.topology] if args.topology else []
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def run_child(job, alloc):
    env = dict(os.environ)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if ALLOC_CONF[alloc]:
        env["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF[alloc]
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True, env=env)
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return dict(job, error=f"child failed ({r.returncode}): {r.stderr[-600:]}")


def summary(row):
    ld, rn = row.get("load", {}), row.get("run", {})
    g = lambda v: f"{v / GIB:.2f}" if isinstance(v, (int, float)) else "–"
    return (f"{row['strategy']:6} cap {row['cap_gib']:g} {row['alloc']:10} capped={row['capped']!s:5} "
            f"load peak alloc {g(ld.get('peak_allocated'))} reserved {g(ld.get('peak_reserved'))} | after alloc "
            f"{g(ld.get('allocated'))} reserved {g(ld.get('reserved'))} split-free {g(ld.get('inactive_split'))} | run peak "
            f"alloc {g(rn.get('peak_allocated'))} reserved {g(rn.get('peak_reserved'))} | "
            f"{row.get('ms_per_token', float('nan')):.1f} ms/token {row.get('error', '')}")


def main():
    args = parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    from validate_gpu import prepare_checkpoint

    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    ckpt, _ = prepare_checkpoint(args.work, args.shape)
    rows = []
    caps = [float(c) for c in args.caps.split(",")]
    for cap in caps:
        maps = {}
        if "devmap" in args.strategies:
            p = plan(args, ckpt, cap)
            maps["devmap"] = (p["device_map"], p.get("memory"))
        if "hf" in args.strategies:
            maps["hf"] = ("auto", None)
        for strategy, (dm, predicted) in maps.items():
            for alloc in args.alloc.split(","):
                for capped in ([False, True] if args.capped else [False]):
                    if time.perf_counter() - started > args.deadline_s:
                        log("deadline: stopping")
                        break
                    job = {"strategy": strategy, "cap_gib": cap, "alloc": alloc, "capped": capped, "ckpt": ckpt,
                           "device_map": dm, "cpu": args.cpu, "work": args.work, "prompt": args.prompt,
                           "new_tokens": args.new_tokens}
                    row = run_child(job, alloc)
                    row["predicted_memory"] = predicted
                    if strategy == "devmap":
                        row.pop("hf_device_map", None)
                    rows.append(row)
                    log(summary(row))
                    with open(os.path.join(args.out, "results.json"), "w") as f:
                        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
