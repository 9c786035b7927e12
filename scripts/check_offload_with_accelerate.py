#!/usr/bin/env python3
"""Check that accelerate reads an offload folder written by `devmap offload`, unchanged.

    python scripts/check_offload_with_accelerate.py check FOLDER SOURCE.safetensors [SOURCE...]
        [--alias NAME=NAME_IN_SOURCE ...]
    python scripts/check_offload_with_accelerate.py selftest --devmap target/release/devmap
        [--workdir DIR] [--examples examples]

`check` loads every tensor of FOLDER/index.json through accelerate's own readers and compares it,
dtype, shape and every byte, with `safetensors.torch.load_file` of the source checkpoint:

- `.dat` entries through `accelerate.utils.load_offloaded_weight(FOLDER/NAME.dat, entry)`;
- every entry (`.dat` and `safetensors_file` forms) through
  `accelerate.utils.OffloadedWeightsLoader(save_folder=FOLDER)[NAME]`.

A `.dat` entry is compared with the source tensor of the same name (or `--alias`: a tied head copied
from its embedding); a safetensors entry with its `weight_name`.

`selftest` runs devmap itself (`--devmap`, the built binary) in a scratch folder and checks:

1. every dtype devmap knows (F64 ... BOOL, F8_E4M3, F8_E5M2, unsigned types), 2-d, 0-d and empty
   tensors, whole model on disk, `--copy` and reference forms: `check` as above;
2. `dispatch_model(model, device_map=PLAN, main_device="cpu", offload_dir=FOLDER)` on real
   transformers models (examples/tiny-llama, BF16, and a generated Llama with tied embeddings), with
   the plan printed by `devmap plan --max-memory cpu=...,disk=... --format json` (auto and
   sequential), twice: on the model loaded whole with its disk-mapped weights overwritten with
   garbage before dispatch, and on a model built under `init_empty_weights` with only its
   non-disk weights loaded (docs/offload.md's low-memory recipe). Logits must equal those of the
   same model run without offloading, bit for bit: the disk weights can only have come from
   devmap's folder;
3. the same with a small torch model in float32 (not a transformers class).

Needs torch, safetensors, transformers and accelerate (checked with torch 2.15 CPU, transformers
5.23.0, accelerate 1.15.0). No GPU. Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from accelerate import dispatch_model, init_empty_weights
from accelerate.utils import OffloadedWeightsLoader, load_offloaded_weight, set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import load_file, save_file

DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
    torch.float8_e5m2, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint64,
    torch.uint32, torch.uint16, torch.uint8, torch.bool,
]


def raw_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def same(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if got.dtype != expected.dtype or tuple(got.shape) != tuple(expected.shape):
        raise AssertionError(
            f"{what}: {got.dtype} {tuple(got.shape)} != expected {expected.dtype} {tuple(expected.shape)}")
    if raw_bytes(got) != raw_bytes(expected):
        raise AssertionError(f"{what}: bytes differ")


def check(folder: Path, sources: list[Path], aliases: dict[str, str]) -> tuple[int, int]:
    """Returns (dat entries, safetensors entries) checked; raises on the first difference."""
    index = json.loads((folder / "index.json").read_text())
    source: dict[str, torch.Tensor] = {}
    for s in sources:
        source.update(load_file(str(s)))
    loader = OffloadedWeightsLoader(save_folder=str(folder))
    dat = refs = 0
    for name, entry in index.items():
        if entry.get("safetensors_file") is None:
            expected = source[aliases.get(name, name)]
            same(load_offloaded_weight(str(folder / f"{name}.dat"), entry), expected,
                 f"{name} via load_offloaded_weight")
            dat += 1
        else:
            expected = source[entry.get("weight_name", name)]
            refs += 1
        same(loader[name], expected, f"{name} via OffloadedWeightsLoader")
    return dat, refs


def run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out.stdout


def offload_both(devmap: str, model: Path, plan: Path, work: Path, tag: str) -> dict[str, Path]:
    folders = {}
    for form, extra in (("reference", []), ("copy", ["--copy"])):
        folder = work / f"{tag}-{form}"
        shutil.rmtree(folder, ignore_errors=True)
        run([devmap, "offload", str(model), "--plan", str(plan), "--folder", str(folder), *extra])
        run([devmap, "offload", "--verify", str(folder)])
        folders[form] = folder
    return folders


def selftest_dtypes(devmap: str, work: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dt in enumerate(DTYPES):
        size = torch.empty((), dtype=dt).element_size()
        for suffix, shape in (("weight", (3, 5 + i)), ("scalar", ()), ("empty", (0, 4))):
            n = 1
            for d in shape:
                n *= d
            if dt == torch.bool:
                t = torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8).view(torch.bool)
            else:
                t = torch.randint(0, 256, (n * size,), generator=g, dtype=torch.uint8).view(dt)
            tensors[f"m{i}.{suffix}"] = t.reshape(shape)
    d = work / "dtypes"
    d.mkdir(parents=True, exist_ok=True)
    ckpt = d / "model.safetensors"
    save_file(tensors, str(ckpt))
    plan = d / "plan.json"
    plan.write_text('{"": "disk"}')
    for form, folder in offload_both(devmap, ckpt, plan, d, "offload").items():
        dat, refs = check(folder, [ckpt], {})
        print(f"dtypes/{form}: {len(tensors)} tensors in {len(DTYPES)} dtypes read back byte-identical "
              f"({dat} .dat entries through load_offloaded_weight and OffloadedWeightsLoader, "
              f"{refs} safetensors entries through OffloadedWeightsLoader)")


def garbage_disk_weights(model: torch.nn.Module, plan: dict, keep: set[str]) -> int:
    """Overwrite, in memory, every weight the plan sends to disk (except `keep`)."""
    n = 0
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            key = max((k for k in plan if k == "" or name == k or name.startswith(k + ".")),
                      key=len, default=None)
            if key is not None and plan[key] == "disk" and name not in keep:
                p.copy_(torch.full_like(p, 7))
                n += 1
    return n


def plan_device(name: str, plan: dict):
    key = max((k for k in plan if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
    return None if key is None else plan[key]


def meta_model_without_disk_weights(meta_fn, sources: list[Path], plan: dict) -> torch.nn.Module:
    """The low-memory recipe of docs/offload.md: build the model on the meta device, load only the
    tensors the plan does not send to disk; the disk ones stay on meta until dispatch_model's hooks
    read them from the offload folder."""
    with init_empty_weights():
        model = meta_fn()
    for src in sources:
        with safe_open(str(src), framework="pt") as f:
            for name in f.keys():
                if plan_device(name, plan) != "disk":
                    set_module_tensor_to_device(model, name, "cpu", value=f.get_tensor(name))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def logits(model, inputs):
    with torch.no_grad():
        out = model(inputs)
    return getattr(out, "logits", out)


def dispatch_check(model_fn, meta_fn, ckpt_dir: Path, plan_path: Path, folder: Path,
                   inputs: torch.Tensor, aliases: dict[str, str], label: str) -> None:
    plan = json.loads(plan_path.read_text())
    assert "disk" in plan.values(), f"{label}: the plan sends nothing to disk: {plan}"
    sources = sorted(ckpt_dir.glob("*.safetensors"))
    expected = logits(model_fn().eval(), inputs)

    # 1. A model loaded whole, its disk weights overwritten in memory before dispatch.
    model = model_fn().eval()
    overwritten = garbage_disk_weights(model, plan, set())
    model = dispatch_model(model, device_map=plan, main_device="cpu", offload_dir=str(folder))
    got = logits(model, inputs)
    if not torch.equal(got, expected):
        raise AssertionError(f"{label}: logits differ (max abs diff {(got - expected).abs().max()})")

    # 2. A model built on meta with only its non-disk weights loaded (the low-memory recipe).
    model = meta_model_without_disk_weights(meta_fn, sources, plan).eval()
    on_meta = sum(p.device.type == "meta" for p in model.parameters())
    model = dispatch_model(model, device_map=plan, main_device="cpu", offload_dir=str(folder))
    got = logits(model, inputs)
    if not torch.equal(got, expected):
        raise AssertionError(f"{label} (meta): logits differ (max abs diff {(got - expected).abs().max()})")

    dat, refs = check(folder, sources, aliases)
    print(f"{label}: dispatch_model forward equals the non-offloaded model bit for bit, "
          f"from a loaded model ({overwritten} disk weights overwritten first) and from a meta model "
          f"({on_meta} weights never loaded); index: {dat} .dat, {refs} safetensors")


def selftest_transformers(devmap: str, work: Path, examples: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tiny = examples / "tiny-llama"
    inputs = torch.tensor([[1, 5, 9, 200, 3, 77, 12, 400]])
    for strategy in ("auto", "sequential"):
        plan = work / f"tiny-llama-{strategy}.json"
        plan.write_text(run([devmap, "plan", str(tiny), "--max-memory", "cpu=200KiB,disk=1GiB",
                             "--strategy", strategy, "--format", "json"]))
        config = AutoConfig.from_pretrained(str(tiny))
        for form, folder in offload_both(devmap, tiny, plan, work, f"tiny-llama-{strategy}").items():
            dispatch_check(lambda: AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.bfloat16),
                           lambda: AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16),
                           tiny, plan, folder, inputs, {},
                           f"tiny-llama (bf16, {strategy} plan {plan.read_text().strip()}, {form})")

    # Tied embeddings: the checkpoint has no lm_head.weight; devmap restores it from config.json.
    tied = work / "tied-llama"
    tied.mkdir(exist_ok=True)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(tied))
    assert "lm_head.weight" not in load_file(str(tied / "model.safetensors"))
    plan = work / "tied-llama-plan.json"
    plan.write_text(json.dumps({"model.embed_tokens": "disk", "model.layers.0": "cpu",
                                "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "disk"}))
    for form, folder in offload_both(devmap, tied, plan, work, "tied-llama").items():
        dispatch_check(lambda: AutoModelForCausalLM.from_pretrained(str(tied), dtype=torch.float32),
                       lambda: AutoModelForCausalLM.from_config(config, dtype=torch.float32),
                       tied, plan, folder, inputs % 256,
                       {"lm_head.weight": "model.embed_tokens.weight"},
                       f"tied-llama (f32, embed_tokens and lm_head on disk, {form})")


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(width, 2 * width)
        self.fc2 = torch.nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 32)
        self.layers = torch.nn.ModuleList([Block(32) for _ in range(4)])
        self.norm = torch.nn.LayerNorm(32)
        self.head = torch.nn.Linear(32, 64, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def selftest_torch(devmap: str, work: Path) -> None:
    d = work / "tiny-torch"
    d.mkdir(exist_ok=True)
    torch.manual_seed(2)
    state = Tiny().state_dict()
    save_file(state, str(d / "model.safetensors"))

    def make():
        m = Tiny()
        m.load_state_dict(state)
        return m

    plan = d / "plan.json"
    plan.write_text(json.dumps({"embed": "cpu", "layers.0": "cpu", "layers.1": "disk", "layers.2": "disk",
                                "layers.3": "cpu", "norm": "disk", "head": "disk"}))
    for form, folder in offload_both(devmap, d / "model.safetensors", plan, d, "offload").items():
        dispatch_check(make, Tiny, d, plan, folder, torch.tensor([[1, 2, 3, 40, 63]]), {},
                       f"tiny torch model (f32, {form})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("folder", type=Path)
    c.add_argument("sources", type=Path, nargs="+")
    c.add_argument("--alias", action="append", default=[], metavar="NAME=NAME_IN_SOURCE")
    s = sub.add_parser("selftest")
    s.add_argument("--devmap", required=True)
    s.add_argument("--workdir", type=Path)
    s.add_argument("--examples", type=Path, default=Path(__file__).resolve().parent.parent / "examples")
    args = ap.parse_args()
    if args.cmd == "check":
        aliases = dict(a.split("=", 1) for a in args.alias)
        dat, refs = check(args.folder, args.sources, aliases)
        print(f"{args.folder}: {dat} .dat and {refs} safetensors entries read back byte-identical by accelerate")
        return 0
    devmap = str(Path(args.devmap).resolve())
    work = args.workdir or Path(tempfile.mkdtemp(prefix="devmap-accelerate-"))
    work.mkdir(parents=True, exist_ok=True)
    import accelerate
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"accelerate {accelerate.__version__}; work folder {work}")
    selftest_dtypes(devmap, work)
    selftest_transformers(devmap, work, args.examples)
    selftest_torch(devmap, work)
    print("all checks passed")
    if args.workdir is None:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
