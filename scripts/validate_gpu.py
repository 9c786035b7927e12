#!/usr/bin/env python3
"""Validate devmap's predictions on a real GPU: peak memory and ms/token, devmap's map beside
Hugging Face's device_map="auto" with the same max_memory, in the same run.

Runs on a machine with an NVIDIA GPU, PyTorch, transformers and accelerate (no Rust: `--devmap`
is a release binary built elsewhere). In one run it

1. writes a random bf16 checkpoint under --work (scripts/bench_load.py's writer; `--shape
   llama8b`: Llama-3.1-8B, ~16 GB; `--shape moe`: a small Mixtral, 8 experts, top 2, ~10.5 GB;
   `--shape t5`: T5-3B, an encoder-decoder, ~5.7 GB, whose prompt is the encoder's input),
   unless it is there, and reads it once into the page cache;
2. runs `devmap calibrate` and scripts/calibrate_runtime.py into WORK/topology.json (unless it
   is there, or --topology is given);
3. for every round (--rounds), every cap (GiB on GPU 0) and prompt length: plans with devmap
   (once per call; `--format plan-json` when the binary has it, else `--format json` plus the
   table's estimate) under `--max-memory 0=CAPGiB,cpu=CPU` and the workload of that prompt; loads
   devmap's map and Hugging Face's `device_map="auto"` with the same max_memory (the order
   alternating from cap to cap and flipped every round) under a hard cap equal to the budget
   (`torch.cuda.set_per_process_memory_fraction`); times the copy of up to 1 GiB of the load's
   own offloaded tensors; prefills the prompt and decodes --new-tokens greedily, each step timed
   with a CUDA synchronisation; records resident and peak memory (allocated and reserved), the
   allocator's retries (`num_alloc_retries`) in prefill and decode, and ms/token, or the OOM
   ("OOM at load", "OOM at prefill", "OOM at decode");
4. writes OUT/results.json and OUT/results.md, one of each per call (a copy of the JSON goes to
   WORK, which `--resume` reads to skip cells already measured): every row, and per cell the
   rounds of both maps, their sums and devmap's speed-up.

--one-map-per-cap: devmap's map for the longest prompt runs every prompt of its cap in one load,
so the prompts of a cap differ by their context only (the rows' `planned_for_prompt` says so).

--dry-run needs no GPU: a header-only checkpoint, devmap's plans and Hugging Face's maps (its
planner on a meta model), scored by devmap; nothing is loaded or measured.

Usage:
  python3 scripts/validate_gpu.py --devmap PATH/devmap --out OUT [--work /tmp/devmap-validate]
      [--caps 6,10,12,14] [--prompts 8,2000,6000,16000] [--new-tokens 16] [--rounds 1] [--shape llama8b|moe|t5] [--resume]
      [--deadline-s 540] [--one-map-per-cap] [--dry-run]
"""

import argparse
import gc
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
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
    ap.add_argument("--strategies", default="devmap,hf",
                    help="which maps to measure: devmap (auto with --devmap-args), split / whole (the same with "
                         "--split-blocks true / false), hf (Hugging Face's auto)")
    ap.add_argument("--devmap-args", default="", help="extra arguments for `devmap plan`, e.g. '--split-blocks true'")
    ap.add_argument("--resume", action="store_true", help="skip cells already in WORK/results.json")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="start no new map after this many seconds")
    ap.add_argument("--rounds", type=int, default=1, help="measure every cell this many times, the load order flipped each round")
    ap.add_argument("--dry-run", action="store_true", help="plan and score every cell on the CPU, load nothing")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama8b",
                    help="random checkpoint: llama8b (Llama-3.1-8B) or moe (a small Mixtral: 8 experts, top 2, 9.8 GiB)")
    ap.add_argument("--one-map-per-cap", action="store_true",
                    help="devmap plans each cap for the longest prompt and runs every prompt on that one load")
    args = ap.parse_args()
    args.caps = [float(c) for c in args.caps.split(",") if c]
    args.prompts = [int(p) for p in args.prompts.split(",") if p]
    args.strategies = [s for s in args.strategies.split(",") if s]
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    unknown = [s for s in args.strategies if s not in (*DEVMAP_VARIANTS, "hf")]
    if unknown:
        ap.error(f"--strategies: unknown {', '.join(unknown)} ({', '.join(DEVMAP_VARIANTS)}, hf)")
    return args


# devmap's variants: `auto` with --devmap-args, and the same with split blocks forced on or off.
DEVMAP_VARIANTS = {"devmap": "", "split": "--split-blocks true", "whole": "--split-blocks false"}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- setup


SHAPES = {"llama8b": "LLAMA_31_8B", "moe": "MIXTRAL_SMALL", "t5": "T5_3B"}  # names in bench_load.py


def shape_config(shape):
    """The config of a --shape, its long-context limit raised so 16k-token prompts are in range."""
    import bench_load

    cfg = dict(getattr(bench_load, SHAPES[shape]))
    if not cfg.get("is_encoder_decoder"):  # T5's relative positions have no such limit
        cfg["max_position_embeddings"] = max(cfg.get("max_position_embeddings", 0), 131072)
    return cfg


def calibration_config(cfg):
    """The decoder calibrate_runtime.py times: the shape's own, or Llama-3.1-8B's for an
    encoder-decoder (its constants are the machine's and accelerate's, not the model's)."""
    return shape_config("llama8b") if cfg.get("is_encoder_decoder") else cfg


def checkpoint_dir(work, shape):
    # The Llama checkpoint keeps its old folder, so warm machines reuse it.
    return os.path.join(work, "llama8b" if shape == "llama8b" else f"{shape}-random")


def prepare_checkpoint(work, shape="llama8b"):
    from bench_load import make_checkpoint, read_into_page_cache

    ckpt = checkpoint_dir(work, shape)
    make_checkpoint(ckpt, shape_config(shape))
    cfg_path = os.path.join(ckpt, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("max_position_embeddings", 0) < 32768 and not cfg.get("is_encoder_decoder"):
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
            calibrate_runtime(path, calibration_config(cfg))
        except Exception as e:  # the copy rates are still worth validating: keep the defaults
            log(f"scripts/calibrate_runtime.py failed, runtime keeps devmap's defaults: {e!r}")
        if cfg.get("is_encoder_decoder"):
            from calibrate_runtime import calibrate_encoder_decoder_eager

            try:
                calibrate_encoder_decoder_eager(path, cfg)
            except Exception as e:
                log(f"the encoder-decoder's eager constant was not measured: {e!r}")
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


def plan_devmap(args, ckpt, topo, features, cap, prompt, variant=""):
    base = [args.devmap, "plan", ckpt, "--max-memory", max_memory_spec(cap, args.cpu)]
    base += ["--topology", topo] if topo else []
    base += workload_flags(features, prompt, args.new_tokens)
    base += shlex.split(getattr(args, "devmap_args", "")) + shlex.split(variant)

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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    seq2seq = AutoConfig.from_pretrained(ckpt).is_encoder_decoder
    auto_class = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    try:
        return auto_class.from_pretrained(
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


def alloc_retries(device=0):
    """The caching allocator's count of allocations it retried after freeing its cache (each one
    a synchronising cudaFree of every cached block): a map that runs at its cap pays them."""
    import torch

    return torch.cuda.memory_stats(device).get("num_alloc_retries", 0)


def generate(model, prompt, new_tokens, counters=None):
    """Prefill `prompt` random tokens, then decode greedily; seconds of the prefill and of each
    step. `counters`, if given, receives the allocator retries of each phase."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device="cuda:0")
    if model.config.is_encoder_decoder:
        from calibrate_runtime import seq2seq_inputs

        prefill_inputs, step_inputs = seq2seq_inputs(model, ids)
    else:
        prefill_inputs, step_inputs = dict(input_ids=ids, logits_to_keep=1), lambda out: lambda tok: dict(input_ids=tok)
    return timed_decode(model, prefill_inputs, step_inputs, new_tokens, {} if counters is None else counters)


def timed_decode(model, prefill_inputs, step_inputs, new_tokens, counters):
    """The prefill (`model(**prefill_inputs)`) and `new_tokens` greedy steps (`step_inputs(the
    prefill's output)(token)` each, with the cache), each timed with a CUDA synchronisation; the
    allocator retries of each phase into `counters`; an OOM names its phase."""
    import torch

    with torch.no_grad():
        torch.cuda.synchronize()
        before = alloc_retries()
        t0 = time.perf_counter()
        try:
            out = model(**prefill_inputs, use_cache=True)
            torch.cuda.synchronize()
        except torch.OutOfMemoryError as e:
            raise OOM("OOM at prefill") from e
        finally:
            counters["alloc_retries_prefill"] = alloc_retries() - before
        prefill = time.perf_counter() - t0
        step_of = step_inputs(out)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1).to("cuda:0")
        del out
        steps = []
        before = alloc_retries()
        try:
            for _ in range(new_tokens):
                t = time.perf_counter()
                out = model(**step_of(tok), past_key_values=past, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1).to("cuda:0")
                past = out.past_key_values
                torch.cuda.synchronize()
                steps.append(time.perf_counter() - t)
        except torch.OutOfMemoryError as e:
            raise OOM("OOM at decode") from e
        finally:
            counters["alloc_retries_decode"] = alloc_retries() - before
    return prefill, steps


def measure_prompt(model, prompt, new_tokens):
    import torch

    torch.cuda.reset_peak_memory_stats(0)
    row = {"prompt": prompt, "new_tokens": new_tokens}
    counters = {}
    try:
        prefill, steps = generate(model, prompt, new_tokens, counters)
        timed = steps[1:] or steps  # the first step allocates the cache's next block
        row.update(
            prefill_s=prefill,
            ms_per_token=1e3 * statistics.mean(timed),
            ms_per_token_median=1e3 * statistics.median(timed),
            step_ms=[1e3 * s for s in steps],
        )
    except OOM as e:
        row["error"] = str(e)
    row.update(counters)
    row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(0) / GIB
    row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(0) / GIB
    gc.collect()
    torch.cuda.empty_cache()
    return row


def offloaded_tensors(model, limit):
    """Up to `limit` bytes of the host tensors accelerate copies on every step (its hooks'
    weights maps), in execution order."""
    from accelerate.utils import named_module_tensors

    out, total = [], 0
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            if not getattr(h, "offload", False) or h.weights_map is None:
                continue
            for name, _ in named_module_tensors(module, include_buffers=h.offload_buffers, recurse=h.place_submodules):
                tensor = h.weights_map[name]
                if tensor.device.type == "cpu" and total < limit:
                    out.append(tensor)
                    total += tensor.numel() * tensor.element_size()
    return out


def offload_copy_probe(model, limit=1 << 30):
    """The copy accelerate makes, timed on the loaded model's own offloaded tensors (`.to()` of
    its weights maps, the file-backed views transformers loaded), beside the same tensors copied
    into anonymous memory: tells the copy rate of this very load from the model's other terms."""
    from calibrate_runtime import host_memory_kind, timed_copy

    tensors = offloaded_tensors(model, limit)
    if not tensors:
        return None
    size = sum(t.numel() * t.element_size() for t in tensors)
    timed_copy(tensors[0])  # warm the allocator at this size
    own = sum(timed_copy(t) for t in tensors)
    clones = [t.clone() for t in tensors]
    anon = sum(timed_copy(t) for t in clones)
    memory = host_memory_kind(tensors[0])
    del clones
    return {"bytes": size, "tensors": len(tensors), "memory": memory, "gb_per_s": size / own / 1e9,
            "anon_gb_per_s": size / anon / 1e9}


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
    try:
        base["offload_copy_probe"] = offload_copy_probe(model)
    except Exception as e:  # a diagnostic, not a reason to lose the cell
        base["offload_copy_probe"] = {"error": repr(e)[:300]}
    rows = []
    for p in prompts:
        row = dict(base, **measure_prompt(model, p, args.new_tokens))
        rows.append(row)
        log(f"{strategy:>6} cap {cap:g} GiB prompt {p}: " + (row.get("error") or f"{row['ms_per_token']:.1f} ms/token, peak {row['peak_allocated_gib']:.2f} GiB, "
                                                           f"{row.get('alloc_retries_decode', 0)} alloc retries in decode"))
    try:  # the same copy after the prompts: the drift of this load's copy rate while it decoded
        after = offload_copy_probe(model)
    except Exception as e:
        after = {"error": repr(e)[:300]}
    for row in rows:
        row["offload_copy_probe_after"] = after
    del model
    free_gpu()
    return rows


def predicted_rows(args, ckpt, strategy, device_map, cap, prompts):
    """--dry-run: the rows a load would give, without loading (nothing measured)."""
    return [{"strategy": strategy, "cap_gib": cap, "prompt": p, "new_tokens": args.new_tokens,
             "device_map": device_map, "error": "dry run: not measured"} for p in prompts]


# ---------------------------------------------------------------- the grid


def cap_gpu(cap):
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GIB / total), 0)


class Grid:
    """What stays fixed across rounds: the checkpoint, topology, devmap's plans per (cap, prompt)
    and devmap's estimates of Hugging Face's maps, each computed once per call."""

    def __init__(self, args, ckpt, topo, features):
        self.args, self.ckpt, self.topo, self.features = args, ckpt, topo, features
        self.plans, self.scores, self.hf_maps = {}, {}, {}
        self.measure = predicted_rows if args.dry_run else measure_map

    def plan(self, cap, prompt, strategy="devmap"):
        key = (cap, prompt, strategy)
        if key not in self.plans:
            try:
                self.plans[key] = plan_devmap(self.args, self.ckpt, self.topo, self.features, cap, prompt,
                                              DEVMAP_VARIANTS[strategy])
            except RuntimeError as e:
                self.plans[key] = {"error": str(e)}
        return self.plans[key]

    def score(self, cap, prompt, device_map):
        """devmap's estimate of any map at this cap and prompt's workload (once per call)."""
        key = (cap, prompt, json.dumps(device_map, sort_keys=True))
        if key not in self.scores:
            self.scores[key] = predict_hf(self.args, self.ckpt, self.topo, self.features, cap, prompt, device_map)
        return self.scores[key]

    def hf_map(self, cap):
        """"auto" for a load; --dry-run: what from_pretrained would compute, on a meta model."""
        if not self.args.dry_run:
            return "auto"
        if cap not in self.hf_maps:
            import validate_multi_gpu

            self.hf_maps[cap] = validate_multi_gpu.MetaModel(self.ckpt).hf_map("auto", cap, self.args.cpu)
        return self.hf_maps[cap]

    def devmap_cells(self, cap, prompts, strategy):
        """devmap's plans for one cap: {map as JSON text: (plan, [prompt])}, identical maps shared,
        and a row for every prompt devmap could not plan."""
        groups, failed = {}, []
        for p in prompts:
            # --one-map-per-cap: the plan for the longest prompt runs every prompt in one load, so
            # the prompts differ by their context only (not by the load's copy rate).
            plan = self.plan(cap, max(self.args.prompts) if self.args.one_map_per_cap else p, strategy)
            if "error" in plan:
                failed.append({"strategy": strategy, "cap_gib": cap, "prompt": p, "new_tokens": self.args.new_tokens, "error": plan["error"]})
                continue
            groups.setdefault(json.dumps(plan["device_map"], sort_keys=True), [plan, []])[1].append(p)
        return groups, failed

    def run_hf(self, cap, prompts):
        rows = self.measure(self.args, self.ckpt, "hf", self.hf_map(cap), cap, prompts)
        for row in rows:
            if "device_map" in row:
                row["predicted_ms_per_token"] = self.score(cap, row["prompt"], row["device_map"])
        return rows

    def run_devmap(self, cap, prompts, strategy):
        groups, rows = self.devmap_cells(cap, prompts, strategy)
        for plan, members in groups.values():
            measured = self.measure(self.args, self.ckpt, strategy, plan["device_map"], cap, members)
            for row in measured:
                planned_for = max(self.args.prompts) if self.args.one_map_per_cap else row["prompt"]
                own = self.plan(cap, planned_for, strategy)
                row["planned_for_prompt"] = planned_for
                row.update(predicted_ms_per_token=own["predicted_ms_per_token"], predicted_memory=own["predicted_memory"],
                           status=own["status"])
                if planned_for != row["prompt"]:  # the map scored at this prompt's own workload
                    row["predicted_ms_per_token"] = self.score(cap, row["prompt"], plan["device_map"])
            rows += measured
        return rows

    def run_cap(self, cap, order, done, started, rnd):
        rows = []
        for strategy in order:
            todo = [p for p in self.args.prompts if (rnd, cap, p, strategy) not in done]
            if not todo:
                continue
            if time.perf_counter() - started > self.args.deadline_s:
                log(f"deadline reached: skipping {strategy} at cap {cap:g}, round {rnd}")
                continue
            new = self.run_hf(cap, todo) if strategy == "hf" else self.run_devmap(cap, todo, strategy)
            for row in new:
                row["round"] = rnd
            rows += new
        return rows


def round_order(strategies, cap_index, rnd):
    """The load order at one cap in round `rnd` (1-based): alternating from cap to cap, and
    flipped every round, so each map runs first as often as the other."""
    flip = (cap_index + rnd - 1) % 2 == 1
    return list(reversed(strategies)) if flip else list(strategies)


def row_key(row):
    return (row.get("round", 1), row["cap_gib"], row["prompt"], row["strategy"])


def load_done(args):
    path = os.path.join(args.work, "results.json")
    if not (args.resume and os.path.exists(path)):
        return []
    with open(path) as f:
        return json.load(f)["rows"]


def this_call_copy_link(cfg):
    """accelerate-style pageable copies measured in this process (calibrate_runtime.py's latency
    and layer-shaped rates, from file-backed and anonymous memory)."""
    from calibrate_runtime import copy_latency, copy_rates

    try:
        latency, _ = copy_latency()
        rates = copy_rates(cfg, latency, tempfile.gettempdir(), copies=1, rounds=1)
    except Exception as e:  # a result to record, not a reason to stop
        log(f"pageable copy measurement failed: {e!r}")
        return None
    link = {"bandwidth": rates["file"][0], "latency": latency, "anon_bandwidth": rates["anon"][0]}
    log(f"pageable .to() copies in this process: {link['bandwidth'] / 1e9:.2f} GB/s from file-backed memory, "
        f"{link['anon_bandwidth'] / 1e9:.2f} GB/s from anonymous, + {latency * 1e6:.1f} µs")
    return link


def prepare(args):
    """(checkpoint, config, topology path, topology JSON, devmap's features): real for a GPU run;
    --dry-run: a header-only checkpoint and the given topology (or devmap's defaults)."""
    if args.dry_run:
        import validate_multi_gpu

        ckpt = checkpoint_dir(args.work, args.shape) + "-headers"
        cfg = shape_config(args.shape)
        validate_multi_gpu.write_header_only(ckpt, cfg)
        topo_json = None
        if args.topology:
            with open(args.topology) as f:
                topo_json = json.load(f)
        return ckpt, cfg, args.topology, topo_json, devmap_features(args.devmap)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("validate_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False; --dry-run plans only)")
    ckpt, cfg = prepare_checkpoint(args.work, args.shape)
    topo, topo_json = prepare_topology(args, cfg)
    return ckpt, cfg, topo, topo_json, devmap_features(args.devmap)


def main():
    args = parse_args()
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    ckpt, cfg, topo, topo_json, features = prepare(args)
    grid = Grid(args, ckpt, topo, features)
    rows = load_done(args)
    done = {row_key(r) for r in rows}
    copy_now = None if args.dry_run else this_call_copy_link(calibration_config(cfg))
    for rnd in range(1, args.rounds + 1):
        for k, cap in enumerate(args.caps):
            if not args.dry_run:
                cap_gpu(cap)
            order = round_order(args.strategies, k, rnd)
            log(f"round {rnd}/{args.rounds}, cap {cap:g} GiB: {' then '.join(order)}")
            new_rows = grid.run_cap(cap, order, done, started, rnd)
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
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (dry run)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "command": " ".join(sys.argv),
    }


def write_results(args, rows, topo_json, features):
    """One JSON and one Markdown file in OUT (the lent machine returns few files), a JSON copy in WORK."""
    doc = {"environment": environment(), "devmap_features": features, "topology": topo_json, "rows": rows,
           "rounds": round_summary(rows)}
    for folder in (args.out, args.work):
        with open(os.path.join(folder, "results.json"), "w") as f:
            json.dump(doc, f, indent=1, default=str)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(rows, doc["environment"], doc["rounds"]))


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def probe_rates(r):
    """This load's copy rate before / after its prompts, GB/s (offload_copy_probe)."""
    before = (r.get("offload_copy_probe") or {}).get("gb_per_s")
    after = (r.get("offload_copy_probe_after") or {}).get("gb_per_s")
    return f"{fmt(before, '.2f')} / {fmt(after, '.2f')}"


def markdown(rows, env, rounds):
    lines = [
        f"GPU: {env['gpu']} · torch {env['torch']} · transformers {env['transformers']} · accelerate {env['accelerate']}",
        f"Command: `{env['command']}`",
        "",
        "| round | cap GiB | prompt | map | offloaded GiB | resident GiB | peak alloc GiB | peak reserved GiB | alloc retries (prefill / decode) "
        "| offload copy GB/s (before / after) | predicted ms/tok | measured ms/tok | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r.get("round", 1), r["cap_gib"], r["prompt"], r["strategy"] == "hf", r["strategy"])
    for r in sorted(rows, key=key):
        retries = f"{fmt(r.get('alloc_retries_prefill'), 'd')} / {fmt(r.get('alloc_retries_decode'), 'd')}"
        lines.append(
            f"| {r.get('round', 1)} | {r['cap_gib']:g} | {r['prompt']} | {r['strategy']} | {fmt(r.get('offloaded_gib'), '.2f')} | "
            f"{fmt(r.get('resident_gib'), '.2f')} | {fmt(r.get('peak_allocated_gib'), '.2f')} | "
            f"{fmt(r.get('peak_reserved_gib'), '.2f')} | {retries} | {probe_rates(r)} | "
            f"{fmt(r.get('predicted_ms_per_token'), '.1f')} | {fmt(r.get('ms_per_token'), '.1f')} | {r.get('error', 'ok')} |"
        )
    lines += ["", rounds_markdown(rounds)]
    return "\n".join(lines) + "\n"


def round_summary(rows):
    """Per (cap, prompt, devmap variant) where it and Hugging Face's map decoded in some round:
    each round's ms/token of both, the per-round speed-up, and the speed-up of the sums over the
    rounds both completed."""
    by = {}
    for r in rows:
        if r.get("ms_per_token"):
            by.setdefault((r["cap_gib"], r["prompt"]), {}).setdefault(r["strategy"], {})[r.get("round", 1)] = r
    out = []
    for (cap, prompt), maps in sorted(by.items()):
        for strategy in (s for s in DEVMAP_VARIANTS if s in maps):
            out += summary_of(cap, prompt, strategy, maps[strategy], maps.get("hf", {}))
    return out


def summary_of(cap, prompt, strategy, dm, hf):
    """[the summary of one devmap variant against HF at one cap and prompt], or [] with no round of both."""
    both = sorted(set(dm) & set(hf))
    if not both:
        return []
    d = [dm[k]["ms_per_token"] for k in both]
    h = [hf[k]["ms_per_token"] for k in both]
    return [{
        "cap_gib": cap, "prompt": prompt, "strategy": strategy, "rounds": both,
        "devmap_ms": d, "hf_ms": h, "speedup_per_round": [b / a for a, b in zip(d, h)],
        "devmap_sum_ms": sum(d), "hf_sum_ms": sum(h), "speedup": sum(h) / sum(d),
        "devmap_predicted_ms": dm[both[0]].get("predicted_ms_per_token"),
        "hf_predicted_ms": hf[both[0]].get("predicted_ms_per_token"),
    }]


def rounds_markdown(rounds):
    if not rounds:
        return "No cell where both maps decoded."
    lines = [
        "| cap GiB | prompt | devmap variant | rounds | devmap ms/token per round | HF auto ms/token per round | speed-up per round "
        "| sum devmap / HF ms | speed-up (sums) | predicted devmap / HF ms | predicted speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rounds:
        joined = lambda xs, spec: ", ".join(format(x, spec) for x in xs)
        pd, ph = s["devmap_predicted_ms"], s["hf_predicted_ms"]
        predicted = f"{ph / pd:.2f}x" if pd and ph else "-"
        lines.append(
            f"| {s['cap_gib']:g} | {s['prompt']} | {s.get('strategy', 'devmap')} | {len(s['rounds'])} | {joined(s['devmap_ms'], '.1f')} | {joined(s['hf_ms'], '.1f')} | "
            f"{joined(s['speedup_per_round'], '.2f')} | {s['devmap_sum_ms']:.1f} / {s['hf_sum_ms']:.1f} | **{s['speedup']:.2f}x** | "
            f"{fmt(pd, '.1f')} / {fmt(ph, '.1f')} | {predicted} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
