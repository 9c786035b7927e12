#!/usr/bin/env python3
"""Decode ms/token of one checkpoint under four set-ups, on a GPU machine:

- hf-auto:                from_pretrained(device_map="auto", max_memory=...) as Hugging Face ships it;
- devmap:                 from_pretrained(device_map=devmap.plan(...)) (the same max_memory);
- devmap+pinned:          that model after devmap.pin_offloaded(model);
- devmap+pinned+prefetch: then pin_offloaded(model, prefetch=True) (side-stream prefetch).

    python scripts/bench_pinned.py CHECKPOINT --max-memory 0=10GiB,cpu=64GiB [--tokens 8]
        [--repeat 2] [--prompt-tokens 32] [--strategy auto] [--max-ram-share 0.5] [-o out.json]
    python scripts/bench_pinned.py --random-llama8b /tmp/dv --max-memory 0=10GiB,cpu=64GiB
    python scripts/bench_pinned.py --dry-run      # CPU only, a tiny random Llama: checks the script

--random-llama8b WORK writes (unless present) the random Llama-3.1-8B-shaped bf16 checkpoint that
scripts/validate_gpu.py measures (scripts/bench_load.py's writer, WORK/llama8b) and uses it.

The three devmap set-ups share one load (pinning and prefetch change the loaded model in place,
not its map), so the run is two loads plus the decodes: about 2 minutes for Llama-3.1-8B at a
10 GiB cap on an H200 (hf-auto's and devmap's pageable decodes, ~0.85 s/token, dominate). Each
decode is greedy with the KV cache, after a 2-token warm-up, timed over --tokens new tokens; the
median of --repeat runs. Needs torch with CUDA, transformers, accelerate and devmap (pip install .).

--dry-run runs the same steps on the CPU: a tiny random Llama saved to a temporary folder,
accelerate's cpu offload in place of from_pretrained's (no GPU to execute on), pinning skipped
and prefetch through devmap's in-RAM copier. Its ms/token mean nothing; it checks that every
set-up runs and the output has every field.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time

SETUPS = ["hf-auto", "devmap", "devmap+pinned", "devmap+pinned+prefetch"]


def parse_max_memory(spec: str) -> dict:
    out = {}
    for item in spec.split(","):
        key, value = item.split("=")
        out[int(key) if key.isdigit() else key] = value
    return out


class Gpu:
    """The real run: CUDA device 0, from_pretrained's dispatch, pinning and CUDA-stream prefetch."""

    device = "cuda:0"

    def synchronize(self):
        import torch

        torch.cuda.synchronize()

    def load(self, args, device_map):
        import torch
        from transformers import AutoModelForCausalLM

        auto = device_map == "auto"
        return AutoModelForCausalLM.from_pretrained(
            args.checkpoint, device_map=device_map, dtype=torch.bfloat16,
            max_memory=parse_max_memory(args.max_memory) if auto else None,
            offload_folder=args.offload_folder)

    def pin(self, model, args, prefetch: bool) -> dict:
        import devmap

        report = devmap.pin_offloaded(model, max_ram_share=args.max_ram_share, prefetch=prefetch)
        return dict(pinned_bytes=report.bytes, pinned_tensors=report.tensors,
                    pin_seconds=report.seconds, prefetch_units=report.prefetch_units)

    def release(self):
        import torch

        gc.collect()
        torch.cuda.empty_cache()


class Cpu(Gpu):
    """--dry-run: the same steps without a GPU."""

    device = "cpu"

    def synchronize(self):
        pass

    def load(self, args, device_map):
        import accelerate
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
        model.hf_device_map = {"": "cpu"} if device_map == "auto" else dict(device_map)
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        return model

    def pin(self, model, args, prefetch: bool) -> dict:
        from devmap import _prefetch

        units = len(_prefetch.install(model, _prefetch.CpuCopier()).units) if prefetch else 0
        return dict(pinned_bytes=0, pinned_tensors=0, pin_seconds=0.0, prefetch_units=units)

    def release(self):
        gc.collect()


def decode_ms_per_token(model, machine, args) -> float:
    import torch

    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), device=machine.device)
    kwargs = dict(do_sample=False, use_cache=True, pad_token_id=0)
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
    times = []
    for _ in range(args.repeat):
        machine.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, **kwargs)
        machine.synchronize()
        times.append((time.perf_counter() - start) * 1e3 / args.tokens)
    return statistics.median(times)


def measure(model, machine, args, label: str, extra: dict) -> dict:
    device_map = dict(model.hf_device_map)
    row = {"setup": label, **extra, "ms_per_token": decode_ms_per_token(model, machine, args),
           "offloaded_modules": sum(1 for d in device_map.values() if d in ("cpu", "disk")),
           "device_map": device_map}
    print(f"{label:24} {row['ms_per_token']:9.1f} ms/token  ({row['offloaded_modules']} modules offloaded)",
          file=sys.stderr)
    return row


def run_setups(args, machine, device_map) -> list:
    model = machine.load(args, "auto")
    rows = [measure(model, machine, args, "hf-auto", {})]
    del model
    machine.release()
    model = machine.load(args, device_map)
    rows.append(measure(model, machine, args, "devmap", {}))
    rows.append(measure(model, machine, args, "devmap+pinned", machine.pin(model, args, prefetch=False)))
    rows.append(measure(model, machine, args, "devmap+pinned+prefetch", machine.pin(model, args, prefetch=True)))
    del model
    machine.release()
    return rows


def tiny_checkpoint(folder: str) -> None:
    """A random 6-layer Llama (a few MB) saved to ``folder``: the --dry-run model."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def random_llama8b(work: str) -> str:
    """validate_gpu.py's checkpoint: written once under ``work``, then read into the page cache."""
    import os

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_load import make_checkpoint, read_into_page_cache

    folder = os.path.join(work, "llama8b")
    make_checkpoint(folder)
    read_into_page_cache(folder)
    return folder


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--max-memory", help="accelerate's budgets, 0=10GiB,cpu=64GiB")
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--max-ram-share", type=float, default=0.5)
    ap.add_argument("--offload-folder", default="/tmp/devmap-bench-offload")
    ap.add_argument("--dry-run", action="store_true", help="CPU only, a tiny random Llama")
    ap.add_argument("--random-llama8b", metavar="WORK",
                    help="write/use validate_gpu.py's random Llama-3.1-8B-shaped checkpoint under WORK")
    ap.add_argument("-o", "--output")
    args = ap.parse_args(argv)
    if not args.dry_run and not ((args.checkpoint or args.random_llama8b) and args.max_memory):
        ap.error("CHECKPOINT (or --random-llama8b WORK) and --max-memory are required (or --dry-run)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    import devmap

    with tempfile.TemporaryDirectory(prefix="devmap-bench-") as tmp:
        if args.dry_run:
            tiny_checkpoint(tmp)
            args.checkpoint, args.max_memory = tmp, "0=400KiB,cpu=1GiB"
            machine = Cpu()
        elif not torch.cuda.is_available():
            raise SystemExit("bench_pinned: needs a CUDA GPU (or --dry-run)")
        else:
            machine = Gpu()
            if args.random_llama8b:
                args.checkpoint = random_llama8b(args.random_llama8b)
        plan = devmap.plan_report(args.checkpoint, parse_max_memory(args.max_memory),
                                  strategy=args.strategy, dtype="bf16")
        rows = run_setups(args, machine, plan["device_map"])
    doc = {
        "checkpoint": args.checkpoint, "max_memory": args.max_memory, "strategy": args.strategy,
        "tokens": args.tokens, "prompt_tokens": args.prompt_tokens, "repeat": args.repeat,
        "dry_run": args.dry_run, "devmap_estimate_ms": plan["estimate"]["ms_per_token"],
        "offloaded_bytes": plan["offloaded_bytes"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "devmap": devmap.__version__},
        "gpu": torch.cuda.get_device_name(0) if not args.dry_run else None, "rows": rows,
    }
    text = json.dumps(doc, indent=1) + "\n"
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
