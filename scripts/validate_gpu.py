#!/usr/bin/env python3
"""Validate devmap's predictions on a real GPU: peak memory and ms/token, devmap's map beside
Hugging Face's device_map="auto" with the same max_memory, in the same run.

Runs on a machine with an NVIDIA GPU, PyTorch, transformers and accelerate (no Rust: `--devmap`
is a release binary built elsewhere). In one run it

1. writes a random Llama-3.1-8B-shaped bf16 checkpoint under --work (scripts/bench_load.py's
   writer, ~16 GB), unless it is there, and reads it once into the page cache;
2. runs `devmap calibrate` and scripts/calibrate_runtime.py into WORK/topology.json (unless it
   is there, or --topology is given);
3. for every cap (GiB on GPU 0) and prompt length: plans with devmap (`--format plan-json` when
   the binary has it, else `--format json` plus the table's estimate) under
   `--max-memory 0=CAPGiB,cpu=CPU` and the workload of that prompt; loads devmap's map and
   Hugging Face's `device_map="auto"` with the same max_memory (order alternating per cap) under
   a hard cap equal to the budget (`torch.cuda.set_per_process_memory_fraction`); prefills the
   prompt and decodes --new-tokens greedily, each step timed with a CUDA synchronisation;
   records resident and peak memory (allocated and reserved) and ms/token, or the OOM ("OOM at
   load", "OOM at prefill", "OOM at decode");
4. writes OUT/results.json and OUT/results.md (a copy of the JSON goes to WORK, which
   `--resume` reads to skip cells already measured).

Usage:
  python3 scripts/validate_gpu.py --devmap PATH/devmap --out OUT [--work /tmp/devmap-validate]
      [--caps 6,10,12,14] [--prompts 8,2000,6000,16000] [--new-tokens 16] [--resume]
      [--deadline-s 540]
"""

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

GIB = 1 << 30


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devmap", required=True, help="devmap release binary")
    ap.add_argument("--out", required=True, help="folder for results.json and results.md")
    ap.add_argument("--work", default="/tmp/devmap-validate", help="checkpoint, topology and resumable results")
    ap.add_argument("--caps", default="6,10,12,14", help="GPU 0 budgets in GiB, comma-separated")
    ap.add_argument("--prompts", default="8,2000,6000,16000", help="prompt lengths in tokens")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens decoded after the prefill")
    ap.add_argument("--cpu", default="100GiB", help="cpu budget in max_memory")
    ap.add_argument("--topology", help="use this topology file instead of calibrating")
    ap.add_argument("--strategies", default="devmap,hf", help="which maps to measure: devmap, hf")
    ap.add_argument("--resume", action="store_true", help="skip cells already in WORK/results.json")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="start no new map after this many seconds")
    args = ap.parse_args()
    args.caps = [float(c) for c in args.caps.split(",") if c]
    args.prompts = [int(p) for p in args.prompts.split(",") if p]
    args.strategies = [s for s in args.strategies.split(",") if s]
    return args


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- setup


def prepare_checkpoint(work):
    from bench_load import make_checkpoint, read_into_page_cache

    ckpt = os.path.join(work, "llama8b")
    make_checkpoint(ckpt)
    cfg_path = os.path.join(ckpt, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("max_position_embeddings", 0) < 32768:
        # Llama-3.1's context, so 16k-token prompts are within the model's declared range.
        cfg["max_position_embeddings"] = 131072
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=1)
    cached = read_into_page_cache(ckpt)
    log(f"checkpoint {ckpt}: read {cached['bytes'] / 1e9:.1f} GB at {cached['gib_per_s']:.1f} GiB/s")
    return ckpt, cfg


def prepare_topology(args, cfg):
    if args.topology:
        return args.topology, None
    path = os.path.join(args.work, "topology.json")
    if os.path.exists(path):
        log(f"topology exists: {path}")
    else:
        t0 = time.perf_counter()
        cmd = [args.devmap, "calibrate", "--out", path, "--page-cache-dir", args.work]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({run.returncode}): {run.stderr.strip()}")
        log(f"devmap calibrate ({time.perf_counter() - t0:.1f} s):\n{run.stderr.strip()}")
        from calibrate_runtime import calibrate_runtime

        try:
            calibrate_runtime(path, cfg)
        except Exception as e:  # the copy rates are still worth validating: keep the defaults
            log(f"scripts/calibrate_runtime.py failed, runtime keeps devmap's defaults: {e!r}")
    with open(path) as f:
        return path, json.load(f)


def devmap_features(devmap):
    text = subprocess.run([devmap, "plan", "--help"], capture_output=True, text=True).stdout
    check = subprocess.run([devmap, "check", "--help"], capture_output=True, text=True).stdout
    return {
        "plan_json": "plan-json" in text,
        "workload": "--workload" in text,
        "check_json": "--format" in check and "--topology" in check,
    }


# ---------------------------------------------------------------- planning


def gpu_caps(cap):
    """GiB per GPU: a number is GPU 0's cap, a sequence one cap per GPU (0, 1, ...)."""
    return [float(cap)] if isinstance(cap, (int, float)) else [float(c) for c in cap]


def max_memory_spec(cap, cpu):
    """devmap's --max-memory for `cap` (see gpu_caps) and the cpu budget: `0=12GiB,1=4GiB,cpu=CPU`."""
    return ",".join([f"{g}={c:g}GiB" for g, c in enumerate(gpu_caps(cap))] + [f"cpu={cpu}"])


def max_memory_dict(cap, cpu):
    """The same budgets as Hugging Face's max_memory: {0: "12GiB", 1: "4GiB", "cpu": CPU}."""
    out = {g: f"{c:g}GiB" for g, c in enumerate(gpu_caps(cap))}
    out["cpu"] = cpu
    return out


def workload_flags(features, prompt, new):
    if features["workload"]:
        return ["--workload", f"batch=1,prompt={prompt},new={new}"]
    return ["--kv-cache", f"batch=1,seq={prompt + new}"]


def plan_devmap(args, ckpt, topo, features, cap, prompt):
    base = [args.devmap, "plan", ckpt, "--max-memory", max_memory_spec(cap, args.cpu)]
    base += ["--topology", topo] if topo else []
    base += workload_flags(features, prompt, args.new_tokens)

    def run(extra):
        r = subprocess.run(base + extra, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"devmap plan failed: {r.stderr.strip()}")
        return r.stdout

    if features["plan_json"]:
        plan = json.loads(run(["--format", "plan-json"]))
        return {
            "device_map": plan["device_map"],
            "predicted_ms_per_token": plan.get("estimate_ms_per_token"),
            "predicted_memory": plan.get("memory"),
            "status": plan.get("status"),
        }
    device_map = json.loads(run(["--format", "json"]))
    table = run(["--format", "table"])
    m = re.search(r"estimate ([0-9.]+) ms/token", table)
    return {
        "device_map": device_map,
        "predicted_ms_per_token": float(m.group(1)) if m else None,
        "predicted_memory": None,
        "status": None,
    }


def predict_hf(args, ckpt, topo, features, cap, prompt, device_map):
    """devmap's estimate (ms/token) of Hugging Face's map: `devmap check --format json` when the
    binary scores maps, else the `balanced (transformers)` row of `devmap compare` (devmap's
    reproduction of device_map="auto", equal to it by the parity tests)."""
    budgets = ["--max-memory", max_memory_spec(cap, args.cpu)] + (["--topology", topo] if topo else [])
    budgets += workload_flags(features, prompt, args.new_tokens)
    if features["check_json"]:
        path = os.path.join(args.work, "hf_map.json")
        with open(path, "w") as f:
            json.dump(device_map, f)
        r = subprocess.run([args.devmap, "check", ckpt, "--map", path, "--format", "json"] + budgets, capture_output=True, text=True)
        try:
            return json.loads(r.stdout).get("estimate_ms_per_token")
        except ValueError:
            return None
    r = subprocess.run([args.devmap, "compare", ckpt] + budgets, capture_output=True, text=True)
    m = re.search(r"^balanced \(transformers\)\s+([0-9.]+)", r.stdout, re.M)
    return float(m.group(1)) if m else None


def offloaded_bytes(model):
    """Bytes of weights that accelerate streams on every step (modules mapped to cpu or disk)."""
    dm = getattr(model, "hf_device_map", {}) or {}
    total = 0
    for name, dev in dm.items():
        if dev in ("cpu", "disk"):
            mod = model.get_submodule(name) if name else model
            total += sum(p.numel() * p.element_size() for p in mod.parameters())
    return total


# ---------------------------------------------------------------- measuring


class OOM(Exception):
    """Out of memory in a named phase."""


def free_gpu():
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(0)


def load(ckpt, device_map, cap, cpu, work):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            ckpt,
            device_map=device_map,
            max_memory=max_memory_dict(cap, cpu),
            dtype=torch.bfloat16,
            offload_folder=os.path.join(work, "offload"),
        ).eval()
    except torch.OutOfMemoryError as e:
        raise OOM("OOM at load") from e
    except Exception as e:  # recorded as the cell's result, so the rest of the grid still runs
        raise OOM(f"load failed: {e!r}"[:500]) from e


def generate(model, prompt, new_tokens):
    """Prefill `prompt` random tokens, then decode greedily; seconds of the prefill and of each step."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device="cuda:0")
    with torch.no_grad():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
        except torch.OutOfMemoryError as e:
            raise OOM("OOM at prefill") from e
        prefill = time.perf_counter() - t0
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1).to("cuda:0")
        del out
        steps = []
        try:
            for _ in range(new_tokens):
                t = time.perf_counter()
                out = model(input_ids=tok, past_key_values=past, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1).to("cuda:0")
                past = out.past_key_values
                torch.cuda.synchronize()
                steps.append(time.perf_counter() - t)
        except torch.OutOfMemoryError as e:
            raise OOM("OOM at decode") from e
    return prefill, steps


def measure_prompt(model, prompt, new_tokens):
    import torch

    torch.cuda.reset_peak_memory_stats(0)
    row = {"prompt": prompt, "new_tokens": new_tokens}
    try:
        prefill, steps = generate(model, prompt, new_tokens)
        timed = steps[1:] or steps  # the first step allocates the cache's next block
        row.update(
            prefill_s=prefill,
            ms_per_token=1e3 * statistics.mean(timed),
            ms_per_token_median=1e3 * statistics.median(timed),
        )
    except OOM as e:
        row["error"] = str(e)
    row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(0) / GIB
    row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(0) / GIB
    gc.collect()
    torch.cuda.empty_cache()
    return row


def measure_map(args, ckpt, strategy, device_map, cap, prompts):
    """Load one map and run every prompt on it; one row per prompt."""
    import torch

    free_gpu()
    t0 = time.perf_counter()
    base = {"strategy": strategy, "cap_gib": cap}
    try:
        model = load(ckpt, device_map, cap, args.cpu, args.work)
    except OOM as e:
        free_gpu()
        return [dict(base, prompt=p, new_tokens=args.new_tokens, error=str(e)) for p in prompts]
    base.update(
        load_s=time.perf_counter() - t0,
        resident_gib=torch.cuda.memory_allocated(0) / GIB,
        offloaded_gib=offloaded_bytes(model) / GIB,
        device_map=dict(model.hf_device_map) if hasattr(model, "hf_device_map") else device_map,
    )
    rows = []
    for p in prompts:
        row = dict(base, **measure_prompt(model, p, args.new_tokens))
        log(f"{strategy:>6} cap {cap:g} GiB prompt {p}: " + (row.get("error") or f"{row['ms_per_token']:.1f} ms/token, peak {row['peak_allocated_gib']:.2f} GiB"))
        rows.append(row)
    del model
    free_gpu()
    return rows


# ---------------------------------------------------------------- the grid


def cap_gpu(cap):
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GIB / total), 0)


def devmap_cells(args, ckpt, topo, features, cap, prompts):
    """devmap's plans for one cap: {map as JSON text: (plan, [(prompt, plan)])}, identical maps
    shared, and a row for every prompt devmap could not plan."""
    groups, failed = {}, []
    for p in prompts:
        try:
            plan = plan_devmap(args, ckpt, topo, features, cap, p)
        except RuntimeError as e:
            failed.append({"strategy": "devmap", "cap_gib": cap, "prompt": p, "new_tokens": args.new_tokens, "error": str(e)})
            continue
        key = json.dumps(plan["device_map"], sort_keys=True)
        groups.setdefault(key, [plan, []])[1].append((p, plan))
    return groups, failed


def run_cap(args, ckpt, topo, features, cap, order, done, started):
    rows = []
    for strategy in order:
        todo = [p for p in args.prompts if (cap, p, strategy) not in done]
        if not todo:
            continue
        if time.perf_counter() - started > args.deadline_s:
            log(f"deadline reached: skipping {strategy} at cap {cap:g}")
            continue
        if strategy == "hf":
            measured = measure_map(args, ckpt, "hf", "auto", cap, todo)
            for row in measured:
                if "device_map" in row:
                    row["predicted_ms_per_token"] = predict_hf(args, ckpt, topo, features, cap, row["prompt"], row["device_map"])
            rows += measured
            continue
        groups, failed = devmap_cells(args, ckpt, topo, features, cap, todo)
        rows += failed
        for plan, members in groups.values():
            measured = measure_map(args, ckpt, "devmap", plan["device_map"], cap, [p for p, _ in members])
            for row, (_, own) in zip(measured, members):
                row.update(
                    predicted_ms_per_token=own["predicted_ms_per_token"],
                    predicted_memory=own["predicted_memory"],
                    status=own["status"],
                )
            rows += measured
    return rows


def load_done(args):
    path = os.path.join(args.work, "results.json")
    if not (args.resume and os.path.exists(path)):
        return []
    with open(path) as f:
        return json.load(f)["rows"]


def this_call_copy_link(cfg):
    """accelerate-style pageable copy rate measured in this process (calibrate_runtime.py)."""
    from calibrate_runtime import pageable_copy_link

    try:
        link, _ = pageable_copy_link(cfg, rounds=3)
    except Exception as e:  # a result to record, not a reason to stop
        log(f"pageable copy measurement failed: {e!r}")
        return None
    log(f"pageable .to() copies in this process: {link['bandwidth'] / 1e9:.2f} GB/s + {link['latency'] * 1e6:.1f} µs")
    return link


def main():
    args = parse_args()
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("validate_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    ckpt, cfg = prepare_checkpoint(args.work)
    topo, topo_json = prepare_topology(args, cfg)
    features = devmap_features(args.devmap)
    rows = load_done(args)
    done = {(r["cap_gib"], r["prompt"], r["strategy"]) for r in rows}
    copy_now = this_call_copy_link(cfg)
    for k, cap in enumerate(args.caps):
        cap_gpu(cap)
        order = args.strategies if k % 2 == 0 else list(reversed(args.strategies))
        new_rows = run_cap(args, ckpt, topo, features, cap, order, done, started)
        for r in new_rows:
            # The copy rate of this process: a --resume call reuses the first call's topology,
            # and on 2026-12-01 the second call's decode steps ran ~15% slower at equal bytes.
            r["pageable_copy_this_call"] = copy_now
        rows += new_rows
        write_results(args, rows, topo_json, features)
    write_results(args, rows, topo_json, features)
    log(f"done in {time.perf_counter() - started:.0f} s")


# ---------------------------------------------------------------- reports


def environment():
    import accelerate
    import torch
    import transformers

    return {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "command": " ".join(sys.argv),
    }


def write_results(args, rows, topo_json, features):
    doc = {"environment": environment(), "devmap_features": features, "topology": topo_json, "rows": rows}
    for folder in (args.out, args.work):
        with open(os.path.join(folder, "results.json"), "w") as f:
            json.dump(doc, f, indent=1, default=str)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(rows, doc["environment"]))


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(rows, env):
    lines = [
        f"GPU: {env['gpu']} · torch {env['torch']} · transformers {env['transformers']} · accelerate {env['accelerate']}",
        f"Command: `{env['command']}`",
        "",
        "| cap GiB | prompt | map | offloaded GiB | resident GiB | peak alloc GiB | peak reserved GiB | predicted ms/tok | measured ms/tok | result |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r["cap_gib"], r["prompt"], r["strategy"] != "devmap")
    for r in sorted(rows, key=key):
        lines.append(
            f"| {r['cap_gib']:g} | {r['prompt']} | {r['strategy']} | {fmt(r.get('offloaded_gib'), '.2f')} | "
            f"{fmt(r.get('resident_gib'), '.2f')} | {fmt(r.get('peak_allocated_gib'), '.2f')} | "
            f"{fmt(r.get('peak_reserved_gib'), '.2f')} | {fmt(r.get('predicted_ms_per_token'), '.1f')} | "
            f"{fmt(r.get('ms_per_token'), '.1f')} | {r.get('error', 'ok')} |"
        )
    lines += ["", speedups(rows)]
    return "\n".join(lines) + "\n"


def speedups(rows):
    """devmap's decode speed-up over Hugging Face's map per cell where both decoded."""
    by = {(r["cap_gib"], r["prompt"], r["strategy"]): r for r in rows}
    out = []
    for (cap, prompt, s), r in sorted(by.items()):
        hf = by.get((cap, prompt, "hf"))
        if s == "devmap" and hf and r.get("ms_per_token") and hf.get("ms_per_token"):
            out.append(f"cap {cap:g} GiB, prompt {prompt}: devmap {hf['ms_per_token'] / r['ms_per_token']:.2f}x faster than HF auto")
    return "\n".join(f"- {line}" for line in out)


if __name__ == "__main__":
    main()
