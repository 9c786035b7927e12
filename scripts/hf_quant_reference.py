#!/usr/bin/env python3
"""Compute Hugging Face's device maps for one model quantized on load: a devmap-quant-reference/1 file.

    python scripts/hf_quant_reference.py fixtures/quant/models/NAME.json \
        --quant fixtures/quant/configs/bnb-4bit-nf4.json [--quant ...] \
        -o fixtures/quant/reference/NAME.json [--scenarios fixtures/scenarios.json]

NAME.json is a devmap manifest written by scripts/export_manifest.py; the model is rebuilt from
`NAME.config.json` beside it in the manifest's dtype, exactly as export_manifest builds it (meta device,
weights tied). For every quantization config (a `BitsAndBytesConfig(...).to_dict()` JSON), every
scenario of fixtures/scenarios.json and every strategy (balanced, balanced_low_0, sequential; "auto" is
"balanced"), it runs what `from_pretrained(quantization_config=..., device_map=strategy,
max_memory=...)` runs before loading any weight:

1. `AutoHfQuantizer.from_config(config, pre_quantized=False)`;
2. `hf_quantizer.preprocess_model(model, dtype, device_map=strategy)` under the model's default dtype
   (this replaces the modules the quantizer converts, e.g. `nn.Linear` -> `Linear4bit`);
3. the body of `transformers.integrations.accelerate._get_device_map` step by step with the real
   functions (`get_balanced_memory` or `get_max_memory`, `hf_quantizer.adjust_max_memory`,
   `infer_auto_device_map`), so the map the planner computed is kept even when
4. `hf_quantizer.validate_environment(device_map=map)` then rejects it; its message is recorded in
   `error`. The script checks that `_get_device_map` itself gives the same map or raises the same error.

The backend check bitsandbytes makes inside validate_environment (a CUDA/CPU backend for bnb) is about
the machine, not the map; it is reported in `backend_check` and the map verdict is reproduced without
it. Needs torch, transformers 5.23, accelerate and bitsandbytes; no GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import export_manifest  # noqa: E402
import hf_reference  # noqa: E402

STRATEGIES = ["balanced", "balanced_low_0", "sequential"]


def build_quantized(config, torch_dtype, quant_dict: dict, pre_quantized: bool = False):
    """The model as from_pretrained has it when it computes the device map, and its quantizer.

    With `pre_quantized` the quantizer converts the model as it does for a checkpoint that already
    holds packed weights (GPTQ: optimum's `convert_model` swaps the block's Linear/Conv1D for
    gptqmodel's QuantLinear with qweight/qzeros/scales/g_idx buffers on the meta device)."""
    import torch
    from transformers.quantizers.auto import AutoHfQuantizer, AutoQuantizationConfig

    qconfig = AutoQuantizationConfig.from_dict(copy.deepcopy(quant_dict))
    hf_quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=pre_quantized)
    if qconfig.quant_method == "mxfp4":
        # from_pretrained validates before it builds the model; for MXFP4 that is where a machine
        # without a capable GPU, Triton or `kernels` turns `dequantize` on.
        hf_quantizer.validate_environment(device_map="auto", weights_only=True)
    model = export_manifest.build_model(config, torch_dtype)
    export_manifest.tie(model)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch_dtype)
        with torch.device("meta"):
            hf_quantizer.preprocess_model(
                model=model, dtype=torch_dtype, device_map="auto", checkpoint_files=None, use_kernels=False
            )
    finally:
        torch.set_default_dtype(previous)
    return model, hf_quantizer


def map_verdict(hf_quantizer, device_map: dict) -> str | None:
    """validate_environment's verdict on a computed map, without the machine's backend check."""
    from transformers.integrations import bitsandbytes as tf_bnb

    real = tf_bnb.validate_bnb_backend_availability
    try:
        # The check lives in integrations/__init__; the quantizer imports it from there at call time.
        import transformers.integrations as integ

        integ.validate_bnb_backend_availability = lambda *a, **k: True
        hf_quantizer.validate_environment(device_map=device_map)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    finally:
        integ.validate_bnb_backend_availability = real
    return None


def stub_fp8_gpu_check() -> str:
    """The FP8 quantizer's validate_environment asks for a GPU of compute capability >= 8.9 before
    it judges the map (a machine property, like bitsandbytes' backend check): on a CPU-only machine
    answer as an H100/H200 would, so that the map verdict is transformers' own."""
    import torch

    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    return "stubbed: cuda available, capability (9, 0)"


def stub_mxfp4_gpu() -> str:
    """The MXFP4 quantizer keeps gpt-oss' experts packed (`Mxfp4GptOssExperts`) only on a GPU of
    compute capability >= 7.5 with Triton and the `kernels` package; on a CPU it dequantizes them
    to the model's dtype (`dequantize = True`, what the `mxfp4-dequantize` config plans). To record
    the GPU path on this CPU-only machine, answer as an H100/H200 with both packages would: the
    current accelerator is cuda, Triton and kernels are there, and the Triton kernels' Hub download
    in `replace_with_mxfp4_linear` (which only builds meta modules here) returns a placeholder."""
    import torch
    import transformers.integrations.hub_kernels as hub_kernels
    import transformers.quantizers.quantizer_mxfp4 as qm

    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    qm.get_current_accelerator = lambda: torch.device("cuda")
    qm.is_triton_available = lambda *a, **k: True
    qm.is_kernels_available = lambda *a, **k: True
    hub_kernels.get_kernel = lambda *a, **k: object()
    return (
        "stubbed: cuda accelerator, capability (9, 0), triton and kernels available, "
        "get_kernel placeholder (no weights touched)"
    )


def quantizer_versions() -> dict:
    """Versions of the quantization packages installed (those the quantizers import)."""
    from importlib import metadata

    out = {}
    for name in ("bitsandbytes", "optimum", "gptqmodel"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def backend_check() -> str:
    from transformers.integrations import validate_bnb_backend_availability

    try:
        validate_bnb_backend_availability(raise_exception=True)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "ok"


def run_one(model, hf_quantizer, scenario: dict, strategy: str) -> dict:
    from transformers.integrations import accelerate as tfa

    max_memory = hf_reference.user_max_memory(scenario["max_memory"])
    out = {
        "scenario": scenario["name"],
        "strategy": strategy,
        "max_memory": scenario["max_memory"],
        "inferred_max_memory": None,
        "device_map": None,
        "error": None,
    }
    try:
        mm = copy.deepcopy(max_memory)
        if strategy == "sequential":
            inferred = tfa.get_max_memory(mm)
        else:
            inferred = tfa.get_balanced_memory(
                model,
                max_memory=mm,
                no_split_module_classes=model._no_split_modules,
                hf_quantizer=hf_quantizer,
                low_zero=(strategy == "balanced_low_0"),
            )
        inferred = hf_quantizer.adjust_max_memory(inferred)
        out["inferred_max_memory"] = hf_reference.jsonable(inferred)
        device_map = tfa.infer_auto_device_map(
            model,
            max_memory=inferred,
            no_split_module_classes=model._no_split_modules,
            hf_quantizer=hf_quantizer,
            no_placement_params=getattr(model, "_no_placement_params", None),
        )
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    out["device_map"] = dict(device_map)
    out["error"] = map_verdict(hf_quantizer, dict(device_map))
    check_against_get_device_map(model, hf_quantizer, strategy, max_memory, out)
    return out


def check_against_get_device_map(model, hf_quantizer, strategy, max_memory, out) -> None:
    """The step-by-step replay must agree with transformers' own `_get_device_map`."""
    from transformers.integrations import accelerate as tfa
    import transformers.integrations as integ

    real = integ.validate_bnb_backend_availability
    integ.validate_bnb_backend_availability = lambda *a, **k: True
    try:
        got = tfa._get_device_map(model, strategy, copy.deepcopy(max_memory), hf_quantizer)
        got_error = None
    except Exception as e:
        got, got_error = None, f"{type(e).__name__}: {e}"
    finally:
        integ.validate_bnb_backend_availability = real
    if got_error != out["error"] or (got is not None and dict(got) != out["device_map"]):
        raise SystemExit(f"replay differs from _get_device_map for {out['scenario']} / {strategy}")


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("manifest", help="a manifest from export_manifest.py, NAME.config.json beside it")
    ap.add_argument("--quant", action="append", required=True, help="quantization_config JSON (repeatable)")
    ap.add_argument("--scenarios", default=os.path.join(here, "..", "fixtures", "scenarios.json"))
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument(
        "--pre-quantized",
        action="store_true",
        help="plan as for a checkpoint already quantized with these configs (GPTQ), not quantize-on-load",
    )
    ap.add_argument(
        "--no-mxfp4-stub",
        action="store_true",
        help="plan MXFP4 as this machine makes transformers do (on a CPU it dequantizes)",
    )
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args(argv)

    import torch

    warnings.filterwarnings("ignore")
    for name in ("transformers", "accelerate", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as tf_logging

    tf_logging.set_verbosity_error()

    with open(args.manifest) as f:
        manifest = json.load(f)
    stem = args.manifest[: -len(".json")]
    torch_dtype = getattr(torch, export_manifest.DTYPE_ARGS[manifest["dtype"].lower()])
    config = export_manifest.load_config(stem + ".config.json")
    with open(args.scenarios) as f:
        scenarios = json.load(f)["scenarios"]

    runs = []
    gpu_check = None
    mxfp4_check = None
    for qpath in args.quant:
        with open(qpath) as f:
            quant_dict = json.load(f)
        if quant_dict.get("quant_method") == "fp8" and not torch.cuda.is_available():
            gpu_check = stub_fp8_gpu_check()
        mxfp4_packed = quant_dict.get("quant_method") == "mxfp4" and not quant_dict.get("dequantize")
        if mxfp4_packed and mxfp4_check is None and not args.no_mxfp4_stub:
            mxfp4_check = stub_mxfp4_gpu()
        qname = os.path.basename(qpath)[: -len(".json")]
        model, hf_quantizer = build_quantized(config, torch_dtype, quant_dict, args.pre_quantized)
        for sc in scenarios:
            for strategy in args.strategies.split(","):
                r = {"quant": qname, **run_one(model, hf_quantizer, sc, strategy)}
                r["modules_to_not_convert"] = sorted(getattr(hf_quantizer, "modules_to_not_convert", []) or [])
                if getattr(hf_quantizer.quantization_config, "quant_method", None) == "mxfp4":
                    r["dequantize"] = bool(hf_quantizer.quantization_config.dequantize)
                runs.append(r)
                status = (r["error"] or "")[:50] or f"{len(r['device_map'])} entries"
                print(f"{qname:28} {sc['name']:26} {strategy:15} {status}", file=sys.stderr)

    doc = {
        "format": "devmap-quant-reference/1",
        "model": manifest["name"],
        "manifest": os.path.relpath(args.manifest, os.path.join(here, "..")),
        "versions": {**hf_reference.versions(), **quantizer_versions()},
        "pre_quantized": args.pre_quantized,
        "backend_check": backend_check(),
        "fp8_gpu_check": gpu_check,
        "mxfp4_gpu_check": mxfp4_check,
        "host": {"python": platform.python_version(), "platform": platform.platform()},
        "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
