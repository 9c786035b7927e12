#!/usr/bin/env python3
"""Validate devmap on several GPUs: decode ms/token and peak memory per GPU of devmap's map against
Hugging Face's device_map="auto", "sequential" and "balanced_low_0" under the same hard caps, and
`devmap load` across all GPUs against the pinned host-to-device ceiling and from_pretrained.

In one run (a machine with N NVIDIA GPUs, PyTorch, transformers, accelerate; `--devmap` is a
release binary built elsewhere) it

1. writes a random bf16 checkpoint of the chosen shape under --work (scripts/bench_load.py's
   writer), unless it is there, and reads it into the page cache;
2. runs `devmap calibrate` and scripts/calibrate_runtime.py into WORK/topology.json
   (scripts/validate_gpu.py's step; skipped with --topology);
3. load phase (`--phases load`): devmap's plan over every GPU (`--strategy balanced
   --workload none`, budgets discovered), then `devmap load --json` in fresh processes, variants
   interleaved, against the sum of the per-GPU pinned rates `devmap calibrate` measured, PyTorch's
   pinned copies to all GPUs at once, and transformers' from_pretrained with the same map;
4. cells (`--phases cells`): for every cap set (GiB per GPU, e.g. 12+4) and prompt: devmap's `auto` plan and Hugging Face's
   three strategies, each loaded under a hard cap per GPU equal to its budget
   (`torch.cuda.set_per_process_memory_fraction` on every GPU), the order of the maps alternating
   from cap set to cap set; prefill, greedy decode, ms/token and the peak per GPU, beside devmap's
   prediction for that very map (`devmap check --format json` on the map Hugging Face produced);
5. writes OUT/results.json and OUT/results.md.

--dry-run plans every cell on the CPU (no torch.cuda): a header-only (sparse) checkpoint of the same
shape, devmap's plan and Hugging Face's maps (transformers' own `_get_device_map` on a meta model),
each scored by `devmap check`, so the table is the predictions and the run only fills in
measurements. --gpus 1 keeps only the first cap of every set (a smoke test on one GPU).

Usage:
  python3 validate_multi_gpu.py --devmap ./devmap --out OUT [--gpus 2] [--caps 12+4,6+6,10+2]
      [--shape llama8b | --shape llama70b --layers 38] [--prompts 8] [--new-tokens 8]
      [--cpu 64GiB] [--deadline-s 540] [--dry-run] [--phases load,cells] [--compare-devmap OLD]
"""

import argparse
import copy
import gc
import json
import os
import statistics
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_load  # noqa: E402
import validate_gpu as vg  # noqa: E402

GIB = 1 << 30
HF_STRATEGIES = ["auto", "sequential", "balanced_low_0"]
STRATEGIES = ["devmap"] + HF_STRATEGIES

# Llama-3.1-70B's layer shape (hidden 8192, intermediate 28672, 64 heads, 8 KV heads).
LLAMA_31_70B = dict(
    bench_load.LLAMA_31_8B,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=128,
)
SHAPES = {"llama8b": bench_load.LLAMA_31_8B, "llama70b": LLAMA_31_70B}
# Defaults per GPU count: the issue's cap sets. On 4 GPUs, 38 of 70B's 80 layers (64.3 GiB): the
# full 131 GiB would spill to disk under 40+12+8+8 GiB + 64 GiB cpu, and with 38 layers the caps
# are tight enough that the maps differ (dry run: 36 layers fit whole on the GPUs with HF's
# sequential map too, 40 leave devmap's map slower than sequential's predicted-not-to-fit one).
PRESETS = {
    1: {"shape": "llama8b", "layers": None, "caps": "12+4,6+6,10+2"},
    2: {"shape": "llama8b", "layers": None, "caps": "12+4,6+6,10+2"},
    4: {"shape": "llama70b", "layers": 38, "caps": "40+12+8+8"},
}


def parse_caps(text, gpus):
    """`12+4,6+6` -> [(12.0, 4.0), (6.0, 6.0)], each set cut to its first `gpus` caps."""
    sets = []
    for item in (s for s in text.split(",") if s.strip()):
        try:
            caps = tuple(float(c) for c in item.split("+"))
        except ValueError:
            raise SystemExit(f"--caps: {item!r} is not GiB per GPU joined by '+' (e.g. 12+4)")
        if len(caps) < gpus:
            raise SystemExit(f"--caps: {item!r} names {len(caps)} GPUs, --gpus is {gpus}")
        if any(c <= 0 for c in caps):
            raise SystemExit(f"--caps: {item!r} has a cap that is not positive")
        sets.append(caps[:gpus])
    if not sets:
        raise SystemExit("--caps: no cap set given")
    return sets


def cap_label(caps):
    return "+".join(f"{c:g}" for c in caps)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devmap", required=True, help="devmap release binary")
    ap.add_argument("--out", required=True, help="folder for results.json and results.md")
    ap.add_argument("--work", default="/tmp/devmap-multi", help="checkpoint, topology")
    ap.add_argument("--gpus", type=int, help="GPUs to use (default: all; --dry-run: the cap sets' length)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="checkpoint shape (default per GPU count)")
    ap.add_argument("--layers", type=int, help="decoder layers of that shape (default per GPU count)")
    ap.add_argument("--caps", help="cap sets, GiB per GPU: 12+4,6+6,10+2 (default per GPU count)")
    ap.add_argument("--prompts", default="8", help="prompt lengths in tokens")
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens decoded after the prefill")
    ap.add_argument("--cpu", default="64GiB", help="cpu budget in max_memory")
    ap.add_argument("--topology", help="use this topology file instead of calibrating")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="devmap and HF strategies")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="start no new map after this")
    ap.add_argument("--dry-run", action="store_true", help="plan every cell on CPU, measure nothing")
    ap.add_argument("--phases", default="load,cells", help="what to measure after preparing the checkpoint and topology: load (devmap load), cells (decode), or prepare (nothing more)")
    ap.add_argument("--load-repeats", type=int, default=5, help="devmap load processes per variant")
    ap.add_argument("--hf-load-repeats", type=int, default=2, help="from_pretrained calls")
    ap.add_argument("--compare-devmap", help="another devmap build timed in the load phase too")
    args = ap.parse_args(argv)
    args.prompts = [int(p) for p in args.prompts.split(",") if p]
    args.strategies = [s for s in args.strategies.split(",") if s]
    args.phases = [p for p in args.phases.split(",") if p]
    if not set(args.phases) <= {"prepare", "load", "cells"}:
        raise SystemExit(f"--phases: {args.phases}; known: prepare, load, cells")
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"--strategies: unknown {unknown}; known: {STRATEGIES}")
    return args


def resolve_defaults(args, gpus):
    """Fill shape, layers and caps from the preset of `gpus` GPUs, then the model's config."""
    preset = PRESETS.get(gpus, PRESETS[4] if gpus > 4 else PRESETS[2])
    args.gpus = gpus
    args.shape = args.shape or preset["shape"]
    if args.layers is None and args.shape == preset["shape"]:
        args.layers = preset["layers"]
    args.caps = parse_caps(args.caps or preset["caps"], gpus)
    return model_config(args.shape, args.layers)


def model_config(shape, layers):
    cfg = dict(SHAPES[shape])
    if layers:
        cfg["num_hidden_layers"] = layers
    # Llama-3.1's context, so long prompts are within the model's declared range.
    cfg["max_position_embeddings"] = 131072
    return cfg


def checkpoint_dir(work, cfg):
    return os.path.join(work, f"llama-h{cfg['hidden_size']}-l{cfg['num_hidden_layers']}")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- checkpoints


def safetensors_header(shard):
    """The header bytes of one shard of (name, shape) bf16 tensors, and its data length."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shard:
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def write_header_only(path, cfg):
    """The checkpoint's files with real headers and sparse (unwritten) data: devmap plans from the
    headers, nothing reads the weights. Returns the bytes the weights would take."""
    os.makedirs(path, exist_ok=True)
    shards = bench_load.shard_layout(cfg)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, data = safetensors_header(shard)
        with open(os.path.join(path, fname), "wb") as f:
            f.write(header)
            f.truncate(len(header) + data)
        weight_map.update({name: fname for name, _ in shard})
        total += data
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return total


def prepare_checkpoint(args, cfg):
    ckpt = checkpoint_dir(args.work, cfg)
    if args.dry_run:
        total = write_header_only(ckpt + "-headers", cfg)
        log(f"header-only checkpoint {ckpt}-headers: {total / GIB:.2f} GiB of weights (sparse)")
        return ckpt + "-headers"
    bench_load.make_checkpoint(ckpt, cfg)
    cached = bench_load.read_into_page_cache(ckpt)
    log(f"checkpoint {ckpt}: read {cached['bytes'] / 1e9:.1f} GB at {cached['gib_per_s']:.1f} GiB/s")
    return ckpt


# ---------------------------------------------------------------- planning


def devmap_json(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    return json.loads(r.stdout)


def budget_flags(args, topo, caps, prompt):
    flags = ["--max-memory", vg.max_memory_spec(caps, args.cpu)]
    flags += ["--topology", topo] if topo else []
    return flags + vg.workload_flags(args.features, prompt, args.new_tokens)


def plan_devmap(args, ckpt, topo, caps, prompt):
    plan = devmap_json([args.devmap, "plan", ckpt, "--format", "plan-json"] + budget_flags(args, topo, caps, prompt))
    return {
        "device_map": plan["device_map"],
        "predicted_ms_per_token": plan.get("estimate_ms_per_token"),
        "predicted_memory": plan.get("memory"),
        "predicted_fits": plan.get("fits"),
        "status": plan.get("status"),
    }


def score_map(args, ckpt, topo, caps, prompt, device_map):
    """devmap's estimate of any map under these budgets: `devmap check --format json`."""
    path = os.path.join(args.work, "scored_map.json")
    with open(path, "w") as f:
        json.dump(device_map, f)
    cmd = [args.devmap, "check", ckpt, "--map", path, "--format", "json"] + budget_flags(args, topo, caps, prompt)
    r = subprocess.run(cmd, capture_output=True, text=True)
    try:
        out = json.loads(r.stdout)
    except ValueError:
        return {"predicted_error": (r.stderr.strip() or "no JSON from devmap check")[-500:]}
    return {
        "predicted_ms_per_token": out.get("estimate_ms_per_token"),
        "predicted_memory": out.get("memory"),
        "predicted_fits": out.get("fits"),
    }


class MetaModel:
    """The checkpoint's model on the meta device, for Hugging Face's planner without a GPU."""

    def __init__(self, ckpt):
        import torch

        import export_manifest

        config = export_manifest.load_config(os.path.join(ckpt, "config.json"))
        self.model = export_manifest.build_model(config, torch.bfloat16)
        export_manifest.tie(self.model)

    def hf_map(self, strategy, caps, cpu):
        """What `from_pretrained(device_map=strategy, max_memory=...)` computes."""
        from transformers.integrations import accelerate as tfa

        mm = copy.deepcopy(vg.max_memory_dict(caps, cpu))
        return dict(tfa._get_device_map(self.model, strategy, mm, None))


def gpu_gib(memory, gpus):
    """Predicted total GiB per GPU from a plan-json / check `memory` object."""
    if not memory:
        return None
    return [memory.get(str(g), {}).get("total", 0) / GIB for g in range(gpus)]


def offloaded_gib(memory):
    if not memory:
        return None
    return sum(v.get("weights", 0) for k, v in memory.items() if k in ("cpu", "disk")) / GIB


def dry_run_cells(args, ckpt, topo):
    """Every cell planned and scored, nothing measured."""
    meta = MetaModel(ckpt) if any(s in HF_STRATEGIES for s in args.strategies) else None
    rows = []
    for caps in args.caps:
        for prompt in args.prompts:
            for strategy in args.strategies:
                row = {"strategy": strategy, "caps_gib": list(caps), "prompt": prompt, "new_tokens": args.new_tokens}
                try:
                    if strategy == "devmap":
                        row.update(plan_devmap(args, ckpt, topo, caps, prompt))
                    else:
                        row["device_map"] = meta.hf_map(strategy, caps, args.cpu)
                        row.update(score_map(args, ckpt, topo, caps, prompt, row["device_map"]))
                except Exception as e:  # a cell that cannot be planned is a result
                    row["error"] = f"planning failed: {e}"[:500]
                finish_prediction(row, args.gpus)
                rows.append(row)
                log(f"{cap_label(caps)} prompt {prompt} {strategy}: " + describe(row))
    return rows


def finish_prediction(row, gpus):
    row["predicted_gpu_gib"] = gpu_gib(row.get("predicted_memory"), gpus)
    row["predicted_offloaded_gib"] = offloaded_gib(row.get("predicted_memory"))


def describe(row):
    if "error" in row and "ms_per_token" not in row:
        return row["error"][:120]
    pred = vg.fmt(row.get("predicted_ms_per_token"), ".1f")
    meas = vg.fmt(row.get("ms_per_token"), ".1f")
    return f"predicted {pred} ms/token, measured {meas}"


# ---------------------------------------------------------------- measuring


def cap_gpus(caps):
    """Hard cap per GPU equal to its budget (the process may not allocate past it)."""
    import torch

    for g, cap in enumerate(caps):
        total = torch.cuda.get_device_properties(g).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GIB / total), g)


def free_gpus(gpus):
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    for g in range(gpus):
        torch.cuda.reset_peak_memory_stats(g)


def measure_prompt(model, prompt, new_tokens, gpus):
    import torch

    free_gpus(gpus)
    row = {"prompt": prompt, "new_tokens": new_tokens}
    try:
        prefill, steps = vg.generate(model, prompt, new_tokens)
        timed = steps[1:] or steps  # the first step allocates the cache's next block
        row.update(
            prefill_s=prefill,
            ms_per_token=1e3 * statistics.mean(timed),
            ms_per_token_median=1e3 * statistics.median(timed),
        )
    except vg.OOM as e:
        row["error"] = str(e)
    row["peak_allocated_gib"] = [torch.cuda.max_memory_allocated(g) / GIB for g in range(gpus)]
    row["peak_reserved_gib"] = [torch.cuda.max_memory_reserved(g) / GIB for g in range(gpus)]
    return row


def measure_map(args, ckpt, strategy, device_map, caps):
    """Load one map (a dict, or an HF strategy name) and run every prompt on it."""
    import torch

    free_gpus(args.gpus)
    base = {"strategy": strategy, "caps_gib": list(caps)}
    t0 = time.perf_counter()
    try:
        model = vg.load(ckpt, device_map, caps, args.cpu, args.work)
    except vg.OOM as e:
        free_gpus(args.gpus)
        return [dict(base, prompt=p, new_tokens=args.new_tokens, error=str(e)) for p in args.prompts]
    base.update(
        load_s=time.perf_counter() - t0,
        resident_gib=[torch.cuda.memory_allocated(g) / GIB for g in range(args.gpus)],
        offloaded_gib=vg.offloaded_bytes(model) / GIB,
        device_map=dict(getattr(model, "hf_device_map", None) or device_map),
    )
    rows = [dict(base, **measure_prompt(model, p, args.new_tokens, args.gpus)) for p in args.prompts]
    del model
    free_gpus(args.gpus)
    return rows


def measure_cells(args, ckpt, topo, started, doc):
    rows = doc["rows"] = []
    for k, caps in enumerate(args.caps):
        cap_gpus(caps)
        order = args.strategies if k % 2 == 0 else list(reversed(args.strategies))
        for strategy in order:
            if time.perf_counter() - started > args.deadline_s:
                log(f"deadline reached: skipping {strategy} at {cap_label(caps)}")
                continue
            rows += measure_strategy(args, ckpt, topo, caps, strategy)
        write_results(args, doc)


def measure_strategy(args, ckpt, topo, caps, strategy):
    """One strategy at one cap set: devmap plans per prompt (equal maps share a load); HF's map is
    what from_pretrained made of the strategy, scored afterwards."""
    if strategy != "devmap":
        rows = measure_map(args, ckpt, strategy, strategy, caps)
        for row in rows:
            if "device_map" in row:
                row.update(score_map(args, ckpt, topo, caps, row["prompt"], row["device_map"]))
    else:
        plans = {}
        for p in args.prompts:
            try:
                plans[p] = plan_devmap(args, ckpt, topo, caps, p)
            except RuntimeError as e:
                plans[p] = {"error": str(e)[:500]}
        rows = []
        for p in args.prompts:
            if "error" in plans[p]:
                rows.append({"strategy": "devmap", "caps_gib": list(caps), "prompt": p, "error": plans[p]["error"]})
                continue
            one = copy.copy(args)
            one.prompts = [p]
            measured = measure_map(one, ckpt, "devmap", plans[p]["device_map"], caps)[0]
            rows.append(dict(measured, **{k: v for k, v in plans[p].items() if k != "device_map"}))
    for row in rows:
        finish_prediction(row, args.gpus)
        log(f"{cap_label(caps)} prompt {row['prompt']} {strategy}: " + describe(row))
    return rows


# ---------------------------------------------------------------- the load phase


def calibrated_pinned(topo_json, gpus):
    """Per-GPU pinned host-to-device GiB/s that `devmap calibrate` measured (one GPU at a time)."""
    per = []
    for g in range(gpus):
        link = (topo_json or {}).get("gpus", {}).get(str(g), {}).get("host_link") or {}
        per.append(link.get("bandwidth", 0) / GIB if link else None)
    return per


def load_phase(args, ckpt, topo_json):
    """devmap load over every GPU against the pinned ceiling and from_pretrained, same map."""
    plan_path = os.path.join(args.out, "load_plan.json")
    plan = devmap_json([args.devmap, "plan", ckpt, "--format", "json", "--strategy", "balanced", "--workload", "none"])
    with open(plan_path, "w") as f:
        json.dump(plan, f)
    out = {"plan": plan, "calibrated_pinned_gib_per_s": calibrated_pinned(topo_json, args.gpus)}
    out["torch_h2d"] = bench_load.torch_h2d()
    # Defaults first (load_summary relies on it); then the suspects of a host-side bound:
    # page faults of the mapping (pread) and rings that outgrow the CPU cache (12 slots per GPU).
    configs = [(args.devmap, []), (args.devmap, ["--read", "pread"]), (args.devmap, ["--staging-buffers", "12"])]
    if args.compare_devmap:
        configs.append((args.compare_devmap, []))
    out["devmap"] = bench_load.interleaved(configs, ckpt, plan_path, args.load_repeats)
    # The loaded bytes read back and compared with the files (xxh3-64), once.
    verified = bench_load.devmap_once(args.devmap, ckpt, plan_path, ["--verify"])
    out["verify"] = verified.get("verify") or {"error": verified.get("error")}
    out["transformers"] = bench_load.transformers_load(ckpt, plan_path, args.hf_load_repeats)
    out["summary"] = load_summary(out, args.gpus)
    log(f"load phase: {json.dumps(out['summary'])}")
    return out


def verify_mismatches(report):
    """Tensors whose loaded bytes differ from the file, or the error that stopped the check."""
    if not report:
        return None
    if "mismatches" not in report:
        return report.get("error") or "no verify report"
    return len(report["mismatches"])


def load_summary(phase, gpus):
    per = [p for p in phase["calibrated_pinned_gib_per_s"] if p]
    ceiling = sum(per) if len(per) == gpus else None
    together = phase["torch_h2d"].get("pinned_all_gpus_at_once", {}).get("median_gib_per_s")
    if gpus == 1:
        together = phase["torch_h2d"].get("pinned", {}).get("median_gib_per_s")
    best = [c for c in phase["devmap"] if c.get("copy_gib_per_s_median")]
    # load_phase times --devmap with its defaults first.
    default = phase["devmap"][0] if phase["devmap"][0].get("copy_gib_per_s_median") else None
    hf = phase["transformers"].get("median_seconds")
    out = {
        "sum_of_calibrated_pinned_gib_per_s": ceiling,
        "torch_pinned_all_gpus_at_once_gib_per_s": together,
        "variants": [
            {
                "binary": c["binary"],
                "options": c["options"],
                "copy_gib_per_s": c["copy_gib_per_s_median"],
                "load_call_s": c["load_call_seconds_median"],
                "per_device_gib_per_s": c.get("device_gib_per_s_median"),
            }
            for c in best
        ],
        "transformers_s": hf,
        "verify_mismatches": verify_mismatches(phase.get("verify")),
    }
    if default:
        bytes_ = default["bytes"]
        out["transformers_gib_per_s"] = bytes_ / hf / GIB if hf else None
        out["devmap_vs_ceiling"] = default["copy_gib_per_s_median"] / ceiling if ceiling else None
        out["devmap_vs_torch_all_at_once"] = default["copy_gib_per_s_median"] / together if together else None
        out["speedup_vs_transformers"] = hf / default["load_call_seconds_median"] if hf else None
    return out


# ---------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    if args.dry_run:
        gpus = args.gpus or (len(args.caps.split(",")[0].split("+")) if args.caps else 2)
    else:
        if args.gpus and "CUDA_VISIBLE_DEVICES" not in os.environ:
            # Before CUDA starts: this process, devmap (its discovered budgets, calibrate, load)
            # and transformers' subprocess then all see the same first --gpus GPUs.
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(args.gpus))
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("validate_multi_gpu.py needs CUDA GPUs (or --dry-run)")
        gpus = args.gpus or torch.cuda.device_count()
        if gpus > torch.cuda.device_count():
            raise SystemExit(f"--gpus {gpus}: this machine has {torch.cuda.device_count()}")
    cfg = resolve_defaults(args, gpus)
    args.features = vg.devmap_features(args.devmap)
    if not args.features["plan_json"] or not args.features["check_json"]:
        raise SystemExit(f"{args.devmap} lacks `plan --format plan-json` or `check --format json`")
    ckpt = prepare_checkpoint(args, cfg)
    doc = {"mode": "dry-run" if args.dry_run else "measured", "gpus": gpus, "config": cfg, "caps_gib": args.caps}
    if args.dry_run:
        topo = args.topology
        doc["topology"] = json.load(open(topo)) if topo else "devmap's defaults"
        doc["rows"] = dry_run_cells(args, ckpt, topo)
    else:
        topo, topo_json = vg.prepare_topology(args, cfg)
        doc["topology"] = topo_json or json.load(open(topo))
        if "load" in args.phases:
            doc["load"] = load_phase(args, ckpt, doc["topology"])
            write_results(args, doc)
        if "cells" in args.phases:
            measure_cells(args, ckpt, topo, started, doc)
    write_results(args, doc)
    log(f"done in {time.perf_counter() - started:.0f} s")


# ---------------------------------------------------------------- reports


def environment(args):
    env = {"command": " ".join(sys.argv), "devmap": args.devmap}
    try:
        import accelerate
        import torch
        import transformers

        env.update(torch=torch.__version__, transformers=transformers.__version__, accelerate=accelerate.__version__)
        if not args.dry_run:
            env["gpus"] = [torch.cuda.get_device_name(g) for g in range(args.gpus)]
    except ImportError as e:
        env["import_error"] = str(e)
    return env


def write_results(args, doc):
    doc = dict(doc, environment=environment(args))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(doc, args))


def per_gpu(values, spec=".2f"):
    return "-" if not values else " / ".join(vg.fmt(v, spec) for v in values)


def markdown(doc, args):
    env = doc["environment"]
    lines = [
        f"Mode: {doc.get('mode', '-')} · {doc.get('gpus', '-')} GPUs {env.get('gpus', '')} · torch {env.get('torch')} · "
        f"transformers {env.get('transformers')} · accelerate {env.get('accelerate')}",
        f"Command: `{env['command']}`",
        "",
        "| caps GiB | prompt | map | offloaded GiB pred / meas | GPU GiB predicted | GPU peak reserved GiB | "
        "predicted ms/tok | measured ms/tok | error | result |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {s: i for i, s in enumerate(STRATEGIES)}
    sets = [list(c) for c in args.caps]
    for r in sorted(doc.get("rows", []), key=lambda r: (sets.index(r["caps_gib"]), r["prompt"], order[r["strategy"]])):
        pred, meas = r.get("predicted_ms_per_token"), r.get("ms_per_token")
        err = f"{(pred - meas) / meas:+.0%}" if pred and meas else "-"
        lines.append(
            f"| {cap_label(r['caps_gib'])} | {r['prompt']} | {r['strategy']} | "
            f"{vg.fmt(r.get('predicted_offloaded_gib'), '.2f')} / {vg.fmt(r.get('offloaded_gib'), '.2f')} | "
            f"{per_gpu(r.get('predicted_gpu_gib'))} | {per_gpu(r.get('peak_reserved_gib'))} | "
            f"{vg.fmt(pred, '.1f')} | {vg.fmt(meas, '.1f')} | {err} | {result(r)} |"
        )
    lines += ["", speedups(doc.get("rows", []), "ms_per_token" if doc.get("mode") == "measured" else "predicted_ms_per_token")]
    if "load" in doc:
        lines += ["", load_markdown(doc["load"]["summary"])]
    return "\n".join(lines) + "\n"


def result(r):
    if r.get("error"):
        return r["error"][:80]
    if r.get("predicted_fits") is False:
        return "ok (devmap: does not fit)" if "ms_per_token" in r else "predicted not to fit"
    return "ok"


def speedups(rows, key):
    """devmap against every HF strategy per cell, by `key` (measured or predicted ms/token)."""
    by = {(tuple(r["caps_gib"]), r["prompt"], r["strategy"]): r for r in rows}
    out = []
    for (caps, prompt, s), r in sorted(by.items()):
        if s != "devmap" or not r.get(key):
            continue
        parts = []
        for hf in HF_STRATEGIES:
            o = by.get((caps, prompt, hf))
            if o and o.get(key):
                parts.append(f"{o[key] / r[key]:.2f}x {hf}")
            elif o:
                parts.append(f"{hf}: {o.get('error', 'no figure')[:40]}")
        label = "measured" if key == "ms_per_token" else "predicted"
        out.append(f"- {cap_label(caps)} GiB, prompt {prompt} ({label}): devmap " + ", ".join(parts))
    return "\n".join(out)


def load_markdown(s):
    lines = [
        "Load phase (devmap's balanced plan over every GPU, `devmap load --json`, medians):",
        "",
        f"- ceiling: sum of `devmap calibrate`'s per-GPU pinned rates {vg.fmt(s.get('sum_of_calibrated_pinned_gib_per_s'), '.1f')} GiB/s; "
        f"PyTorch pinned copies to every GPU at once {vg.fmt(s.get('torch_pinned_all_gpus_at_once_gib_per_s'), '.1f')} GiB/s",
    ]
    for v in s["variants"]:
        per = ", ".join(f"{k} {x:.1f}" for k, x in (v.get("per_device_gib_per_s") or {}).items())
        lines.append(f"- {v['binary']} {' '.join(v['options']) or '(defaults)'}: copies {v['copy_gib_per_s']:.1f} GiB/s ({per}), load call {v['load_call_s']:.3f} s")
    lines.append(
        f"- transformers from_pretrained, same map: {vg.fmt(s.get('transformers_s'), '.2f')} s "
        f"({vg.fmt(s.get('transformers_gib_per_s'), '.1f')} GiB/s); devmap {vg.fmt(s.get('speedup_vs_transformers'), '.1f')}x faster (load call)"
    )
    lines.append(f"- `devmap load --verify`: {s.get('verify_mismatches', '-')} tensors differ from the files")
    lines.append(
        f"- devmap (defaults) at {vg.fmt(s.get('devmap_vs_ceiling'), '.0%')} of the calibrated sum, "
        f"{vg.fmt(s.get('devmap_vs_torch_all_at_once'), '.0%')} of PyTorch's all-at-once rate"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
