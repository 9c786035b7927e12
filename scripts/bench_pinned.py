#!/usr/bin/env python3
"""Decode ms/token of one checkpoint under three set-ups, on a GPU machine:

- hf-auto:        from_pretrained(device_map="auto", max_memory=...) as Hugging Face ships it;
- devmap:         from_pretrained(device_map=devmap.plan(...)) with the same max_memory;
- devmap+pinned:  the same devmap map, then devmap.pin_offloaded(model).

    python scripts/bench_pinned.py CHECKPOINT --max-memory 0=10GiB,cpu=64GiB [--tokens 16]
        [--prompt-tokens 32] [--strategy auto] [--max-ram-share 0.5] [-o results.json]

Each set-up loads the model afresh (greedy decoding, KV cache on, one warm-up generate excluded),
times `generate` over --tokens new tokens and reports the median ms per token of --repeat runs,
the map's offloaded bytes and, for the pinned one, the bytes pinned and the pinning time. Needs
torch with CUDA, transformers, accelerate and the devmap package (pip install .).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time


def parse_max_memory(spec: str) -> dict:
    out = {}
    for item in spec.split(","):
        key, value = item.split("=")
        out[int(key) if key.isdigit() else key] = value
    return out


def decode_ms_per_token(model, prompt_tokens: int, tokens: int, repeat: int) -> float:
    import torch

    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), device="cuda:0")
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, use_cache=True)
    model.generate(ids, **kwargs)  # warm-up
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3 / tokens)
    return statistics.median(times)


def run(args, label: str, device_map, pin: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import devmap

    max_memory = parse_max_memory(args.max_memory)
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint, device_map=device_map, max_memory=max_memory if device_map == "auto" else None,
        dtype=torch.bfloat16, offload_folder=args.offload_folder)
    row = {"setup": label, "device_map": dict(model.hf_device_map)}
    if pin:
        report = devmap.pin_offloaded(model, max_ram_share=args.max_ram_share)
        row.update(pinned_bytes=report.bytes, pinned_tensors=report.tensors, pin_seconds=report.seconds)
    row["ms_per_token"] = decode_ms_per_token(model, args.prompt_tokens, args.tokens, args.repeat)
    row["offloaded_modules"] = sum(1 for d in row["device_map"].values() if d in ("cpu", "disk"))
    print(f"{label:15} {row['ms_per_token']:9.1f} ms/token  ({row['offloaded_modules']} modules offloaded)",
          file=sys.stderr)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--max-memory", required=True, help="accelerate's budgets, 0=10GiB,cpu=64GiB")
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-ram-share", type=float, default=0.5)
    ap.add_argument("--offload-folder", default="/tmp/devmap-bench-offload")
    ap.add_argument("-o", "--output")
    args = ap.parse_args(argv)

    import torch
    import transformers

    import devmap

    if not torch.cuda.is_available():
        raise SystemExit("bench_pinned: needs a CUDA GPU")
    plan = devmap.plan_report(args.checkpoint, parse_max_memory(args.max_memory), strategy=args.strategy,
                              dtype="bf16")
    rows = [
        run(args, "hf-auto", "auto", pin=False),
        run(args, "devmap", plan["device_map"], pin=False),
        run(args, "devmap+pinned", plan["device_map"], pin=True),
    ]
    doc = {
        "checkpoint": args.checkpoint, "max_memory": args.max_memory, "strategy": args.strategy,
        "tokens": args.tokens, "prompt_tokens": args.prompt_tokens, "repeat": args.repeat,
        "devmap_estimate_ms": plan["estimate"]["ms_per_token"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "gpu": torch.cuda.get_device_name(0), "rows": rows,
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
