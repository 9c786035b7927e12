#!/usr/bin/env python3
"""Build the folder corpus: tiny real checkpoints of many architectures and transformers' own maps.

    python scripts/gen_folder_corpus.py build     [--out fixtures/folders] [--only TYPE,...] [--jobs N]
    python scripts/gen_folder_corpus.py reference [--out fixtures/folders] [--refs fixtures/folder-reference]
                                                  [--only NAME,...]

`build`: for every `model_type` of transformers' auto mappings, one model class (the first of
ImageTextToText, Seq2SeqLM, SpeechSeq2Seq, CausalLM, MaskedLM, the base model that exists for it),
a config shrunk to a few layers, hidden size 32, vocabulary 128, 4 experts (structure kept: same
sub-configs, layer-type lists cut to the new depth), a real model built on CPU with seed 0, cast to
bf16 and written by `save_pretrained(folder, max_shard_size=S/3)` so that every folder has >= 2
shards and an index. Classes that declare tied weights get a second folder with
`tie_word_embeddings` flipped (`-tied` / `-untied`). Failures are listed in
`fixtures/folders/BUILD_FAILURES.json` with the reason.

`reference`: for every folder × scenario (budgets as fractions of the checkpoint's tensor bytes S,
see SCENARIOS) × strategy (auto, balanced, balanced_low_0, sequential), runs
`Class.from_pretrained(folder, device_map=strategy, max_memory=...)` with the planner
(`transformers.modeling_utils._get_device_map`) wrapped: the wrapper calls the real function,
keeps its map (or the exception it raised) and stops the load there, since the GPU ids do not exist
on a CPU-only machine. It also records, once per folder, the keys `from_pretrained` checks a map
against: `model.state_dict()` of the model `from_pretrained` built (what `expand_device_map` and
accelerate's `check_device_map` use), with the module names and `_no_split_modules`. Output:
`fixtures/folder-reference/NAME.json` (format devmap-folder-reference/1, docs/testing.md).

Needs torch, transformers 5.23 and accelerate 1.15 (CPU only).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
STRATEGIES = ["auto", "balanced", "balanced_low_0", "sequential"]

# Budgets as fractions of S, the checkpoint's tensor bytes. GPU ids are ints; "cpu" and "disk" keys.
SCENARIOS = [
    {"name": "1gpu-fits", "fractions": {"0": 2.0, "cpu": 4.0}},
    {"name": "2gpu", "fractions": {"0": 0.7, "1": 0.7, "cpu": 2.0}},
    {"name": "4gpu", "fractions": {"0": 0.4, "1": 0.4, "2": 0.4, "3": 0.4, "cpu": 2.0}},
    {"name": "gpu0-too-small", "fractions": {"0": 0.05, "1": 0.5, "cpu": 2.0}},
    {"name": "offload-no-disk", "fractions": {"0": 0.25, "cpu": 0.4}},
]

# Which auto mapping picks the class, in order of preference.
MAPPING_ORDER = [
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_MAPPING_NAMES",
]

# Mappings whose model types are built, in the order they are kept under the size budget.
MAPPING_PRIORITY = [
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
]
# Always kept (the issue names them): encoder-decoders, vision-language and MoE models.
MUST_HAVE = {"t5", "bart", "whisper", "m2m_100", "llava", "qwen2_vl", "mllama", "mixtral", "qwen2_moe",
             "olmoe", "dbrx", "llama", "gpt2", "gemma", "gemma2", "qwen2", "mistral", "phi3", "opt",
             "deepseek_v2", "deepseek_v3", "qwen3_moe", "mt5", "pegasus", "marian", "gemma3",
             "idefics3", "paligemma", "qwen2_5_vl", "llava_next", "bert", "roberta", "gpt_neox", "falcon"}
# Architectures built with tie_word_embeddings both true and false.
TIE_VARIANTS = {"llama", "mistral", "qwen2", "gemma", "gpt2", "t5", "bart", "phi3", "llava", "qwen2_vl",
                "whisper", "m2m_100", "opt", "mixtral", "qwen2_moe", "gemma3", "mllama", "olmoe"}
MAX_FOLDER_BYTES = 300_000
MAX_MUST_HAVE_BYTES = 800_000
# Config fields a real checkpoint's config.json has and the default config lacks (the model reads them).
CONFIG_PATCHES = {"dbrx": {"attn_config": {"rope_theta": 10000.0}}}

HIDDEN = 32
KEYS_HIDDEN = ("hidden_size", "d_model", "n_embd", "n_embed", "embed_dim", "dim", "hidden_dim",
               "word_embed_proj_dim", "projection_dim", "text_embed_dim", "vision_embed_dim")
KEYS_FFN = ("intermediate_size", "d_ff", "ffn_dim", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim",
            "ffn_hidden_size", "mlp_dim")
KEYS_MOE_FFN = ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size")
KEYS_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers",
               "n_layers", "num_decoder_layers", "num_encoder_layers", "depth", "text_layers",
               "vision_layers", "num_global_layers")
KEYS_HEADS = ("num_attention_heads", "n_head", "encoder_attention_heads", "decoder_attention_heads",
              "num_heads", "n_heads")
KEYS_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
KEYS_TOPK = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts")
KEYS_POSITIONS = ("max_position_embeddings", "n_positions", "max_source_positions", "max_target_positions")


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("transformers", "accelerate", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as tf_logging

    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()


def pick_classes() -> list[tuple[str, str, str]]:
    """(model_type, class name, mapping) for every model_type an auto mapping lists."""
    from transformers.models.auto import modeling_auto

    chosen: dict[str, tuple[str, str]] = {}
    for mapping in MAPPING_ORDER:
        for model_type, cls in getattr(modeling_auto, mapping).items():
            if isinstance(cls, (list, tuple)):
                cls = cls[0]
            chosen.setdefault(model_type, (cls, mapping))
    return sorted((t, c, m) for t, (c, m) in chosen.items())


def shrink_value(key: str, value, layers_before: dict):
    """The small value for one config field, or the value unchanged."""
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    if key in KEYS_HIDDEN + ("out_hidden_size",) and value > HIDDEN:
        return HIDDEN
    if key in KEYS_FFN and value > 2 * HIDDEN:
        return 2 * HIDDEN
    if key in KEYS_MOE_FFN and value > HIDDEN:
        return HIDDEN
    if key in KEYS_LAYERS and value > 2:
        layers_before[key] = value
        return 2
    if key in KEYS_HEADS and value > 4:
        return 4
    if key == "num_key_value_heads" and value > 2:
        return 2
    if key in ("d_kv", "head_dim", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank", "q_lora_rank") and value > 8:
        return 8 if key != "kv_lora_rank" else 16
    if key == "qk_rope_head_dim" and value > 8:
        return 8
    if key in KEYS_EXPERTS and value > 4:
        return 4
    if key in KEYS_TOPK and value > 2:
        return 2
    if key in ("n_shared_experts", "num_shared_experts") and value > 1:
        return 1
    if key in ("n_group", "topk_group") and value > 1:
        return 1
    if key == "vocab_size" and value > 128:
        return 128
    if key in KEYS_POSITIONS and value > 64:
        return 64
    if key == "image_size" and value > 32:
        return 32
    if key == "num_channels" and value > 3:
        return 3
    return value


def is_layer_index_list(key: str, value, depth: int) -> bool:
    """A list of layer indices (cross-attention layers, full-attention blocks, tapped layers)."""
    if not isinstance(value, list) or not value:
        return False
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < depth for i in value):
        return False
    return any(w in key for w in ("layer", "index", "indices", "idx", "block"))


def shrink_dict(d: dict) -> dict:
    """Shrink a config dict in place (sub-config dicts too); cut per-layer lists to the new depth."""
    layers_before: dict = {}
    for key in list(d):
        value = d[key]
        if isinstance(value, dict) and ("model_type" in value or key.endswith("_config")):
            d[key] = shrink_dict(value)
        else:
            d[key] = shrink_value(key, value, layers_before)
    if isinstance(d.get("patch_size"), int) and not isinstance(d["patch_size"], bool):
        d["patch_size"] = min(d["patch_size"], 8)
    depths = set(layers_before.values())
    for key, value in list(d.items()):
        if isinstance(value, list) and len(value) in depths and len(value) > 2:
            d[key] = value[:2]
        elif depths and is_layer_index_list(key, value, max(depths)):
            d[key] = [i for i in value if i < 2] or [1]  # keep one such layer: the structure stays
    if "vision_output_dim" in d and isinstance(d.get("intermediate_layers_indices"), list):
        # mllama: the vision output concatenates the last and the intermediate layers' states
        d["vision_output_dim"] = d["hidden_size"] * (len(d["intermediate_layers_indices"]) + 1)
    vocab = d.get("vocab_size")
    if isinstance(vocab, int):
        for key, value in list(d.items()):
            if (key.endswith("_token_id") or key.endswith("_token_index")) and isinstance(value, int):
                if value >= vocab:
                    d[key] = vocab - 1 - (hash(key) % 8)
    return d


def small_config(model_type: str, tie: bool | None, rebuild: bool):
    """The default config of `model_type`, shrunk. `rebuild`: shrink its dict and rebuild it (derived
    fields recomputed); otherwise shrink the live objects in place (for configs whose rebuild fails)."""
    from transformers import AutoConfig, PretrainedConfig

    base = AutoConfig.for_model(model_type)
    if rebuild:
        d = shrink_dict(base.to_dict())
        for key, fields in CONFIG_PATCHES.get(model_type, {}).items():
            d[key].update(fields)
        for key in ("_name_or_path", "transformers_version", "model_type"):
            d.pop(key, None)
        if tie is not None:
            d["tie_word_embeddings"] = tie
        return type(base).from_dict(d)

    def shrink_live(config):
        d = {k: v for k, v in vars(config).items() if not isinstance(v, PretrainedConfig)}
        for k, v in shrink_dict(d).items():
            setattr(config, k, v)
        for v in vars(config).values():
            if isinstance(v, PretrainedConfig):
                shrink_live(v)

    shrink_live(base)
    if tie is not None:
        base.tie_word_embeddings = tie
    return base


def tensor_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def build_one(model_type: str, cls_name: str, tie: bool | None, folder: str) -> dict:
    import torch
    import transformers

    cls = getattr(transformers, cls_name)
    try:
        config = small_config(model_type, tie, rebuild=True)
        torch.manual_seed(0)
        model = cls(config)
    except Exception:
        config = small_config(model_type, tie, rebuild=False)
        torch.manual_seed(0)
        model = cls(config)
    model = model.to(torch.bfloat16)
    model.eval()
    total = tensor_bytes(model)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    model.save_pretrained(folder, max_shard_size=max(total // 3, 1024))
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index):
        shutil.rmtree(folder)
        raise RuntimeError("save_pretrained wrote a single file (one tensor larger than S/3)")
    try:  # the folder must be loadable: some configs do not survive their own save
        transformers.AutoConfig.from_pretrained(folder)
    except Exception as e:
        shutil.rmtree(folder)
        raise RuntimeError(f"the saved config.json does not load: {type(e).__name__}: {e}") from e
    cap = MAX_MUST_HAVE_BYTES if model_type in MUST_HAVE else MAX_FOLDER_BYTES
    if total > cap:
        shutil.rmtree(folder)
        raise RuntimeError(f"too big to commit: {total} bytes > {cap}")
    with open(index) as f:
        total = json.load(f)["metadata"]["total_size"]  # S: bytes of the tensors the checkpoint holds
    for extra in os.listdir(folder):
        if extra not in ("config.json", "model.safetensors.index.json") and not extra.endswith(".safetensors"):
            os.remove(os.path.join(folder, extra))
    return {"bytes": total, "shards": len([f for f in os.listdir(folder) if f.endswith(".safetensors")])}


def variants(model_type: str) -> list[tuple[str, bool | None]]:
    """(suffix, tie_word_embeddings override) per folder: the config's default, and for the
    architectures of TIE_VARIANTS also the other setting."""
    if model_type not in TIE_VARIANTS:
        return [("", None)]
    return [("-tied", True), ("-untied", False)]


def priority(model_type: str, mapping: str) -> int:
    """Lower is kept first when the corpus must shrink to its size budget."""
    if model_type in MUST_HAVE:
        return 0
    return 1 + MAPPING_PRIORITY.index(mapping)


def prune(out: str, built: dict, budget: int) -> dict:
    """Remove folders, lowest priority (then largest) first, until the corpus fits `budget` bytes."""
    order = sorted(built, key=lambda n: (built[n]["priority"], built[n]["bytes"], n))
    kept, used = {}, 0
    for name in order:
        if used + built[name]["bytes"] <= budget:
            kept[name] = built[name]
            used += built[name]["bytes"]
        else:
            shutil.rmtree(os.path.join(out, name))
    return kept


def cmd_build(args) -> int:
    quiet()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    failures, built = {}, {}
    for model_type, cls_name, mapping in pick_classes():
        if (only and model_type not in only) or (mapping not in MAPPING_PRIORITY and not args.all):
            continue
        for suffix, tie in variants(model_type):
            name = f"{model_type}{suffix}".replace("_", "-")
            try:
                info = build_one(model_type, cls_name, tie, os.path.join(out, name))
                built[name] = {"class": cls_name, "model_type": model_type, "mapping": mapping,
                               "tie_word_embeddings": tie, "priority": priority(model_type, mapping), **info}
                print(f"built  {name:40} {cls_name:45} {info['bytes']:>9} B {info['shards']} shards",
                      file=sys.stderr)
            except Exception as e:  # recorded: the corpus lists what could not be built and why
                failures[name] = f"{cls_name}: {type(e).__name__}: {str(e)[:300]}"
                print(f"FAILED {name:40} {failures[name][:150]}", file=sys.stderr)
                if args.verbose:
                    traceback.print_exc()
    if not only:
        before = set(built)
        built = prune(out, built, int(args.max_total_mb * 1e6))
        for name in sorted(before - set(built)):
            failures[name] = "left out: the corpus size budget (--max-total-mb)"
    write_json(os.path.join(out, "BUILD_FAILURES.json"), {"failures": failures}, merge=bool(only), drop=built)
    write_json(os.path.join(out, "CORPUS.json"), {"folders": built}, merge=bool(only), drop=failures)
    print(f"{len(built)} folders built, {len(failures)} failed", file=sys.stderr)
    return 0


def write_json(path: str, doc: dict, merge: bool, drop: dict) -> None:
    """Write a listing; with merge, entries of the existing file that this run did not touch stay,
    except the names in `drop` (those this run moved to the other listing)."""
    if merge and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        for key, value in doc.items():
            entries = {k: v for k, v in old.get(key, {}).items() if k not in drop}
            entries.update(value)
            old[key] = entries
        doc = old
    for key in doc:
        doc[key] = dict(sorted(doc[key].items()))
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


class Captured(Exception):
    """Raised by the wrapped planner to stop from_pretrained once the map is known."""


def scenario_budgets(fractions: dict, size: int) -> dict:
    """Scenario fractions of S -> integer byte budgets, JSON keys (strings)."""
    return {k: int(f * size) for k, f in fractions.items()}


def capture(cls, folder: str, strategy: str, max_memory: dict, seen: dict) -> dict:
    """One from_pretrained call with the planner wrapped: its map, or the error it raised."""
    import transformers.modeling_utils as mu

    original = mu._get_device_map

    def wrapped(model, device_map, max_memory_arg, hf_quantizer):
        if "keys" not in seen:
            seen["keys"] = list(model.state_dict().keys())
            seen["modules"] = [n for n, _ in model.named_modules() if n]
            seen["no_split"] = sorted(model._no_split_modules or [])
            seen["dtype"] = str(next(iter(model.state_dict().values())).dtype)
        try:
            result = original(model, device_map, max_memory_arg, hf_quantizer)
        except Exception as e:
            raise Captured({"error": f"{type(e).__name__}: {e}"}) from e
        raise Captured({"device_map": {str(k): v for k, v in result.items()}})

    mu._get_device_map = wrapped
    try:
        user_mm = {(int(k) if k.isdigit() else k): v for k, v in max_memory.items()}
        cls.from_pretrained(folder, device_map=strategy, max_memory=copy.deepcopy(user_mm))
        return {"error": "from_pretrained returned without computing a map"}
    except Captured as c:
        return c.args[0]
    except Exception as e:  # raised before the planner ran
        return {"error": f"{type(e).__name__}: {e}", "before_planner": True}
    finally:
        mu._get_device_map = original


def reference_one(name: str, entry: dict, folder: str) -> dict:
    import transformers

    cls = getattr(transformers, entry["class"])
    seen: dict = {}
    runs = []
    for sc in SCENARIOS:
        budgets = scenario_budgets(sc["fractions"], entry["bytes"])
        for strategy in STRATEGIES:
            r = capture(cls, folder, strategy, budgets, seen)
            runs.append({"scenario": sc["name"], "strategy": strategy, "max_memory": budgets,
                         "device_map": r.get("device_map"), "error": r.get("error")})
    return {
        "format": "devmap-folder-reference/1",
        "model": name,
        "folder": f"fixtures/folders/{name}",
        "class": entry["class"],
        "model_type": entry["model_type"],
        "checkpoint_bytes": entry["bytes"],
        "dtype": seen.get("dtype"),
        "no_split_modules": seen.get("no_split"),
        "checked_keys": seen.get("keys"),
        "modules": seen.get("modules"),
        "versions": versions(),
        "runs": runs,
    }


def versions() -> dict:
    import accelerate
    import safetensors
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "safetensors": safetensors.__version__}


def cmd_reference(args) -> int:
    quiet()
    out = os.path.abspath(args.out)
    refs = os.path.abspath(args.refs)
    os.makedirs(refs, exist_ok=True)
    with open(os.path.join(out, "CORPUS.json")) as f:
        corpus = json.load(f)["folders"]
    only = set(args.only.split(",")) if args.only else None
    for name, entry in corpus.items():
        if only and name not in only:
            continue
        try:
            doc = reference_one(name, entry, os.path.join(out, name))
        except Exception as e:
            print(f"FAILED {name}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        errors = sum(1 for r in doc["runs"] if r["error"])
        print(f"{name:40} {len(doc['runs'])} runs, {errors} errors, {len(doc['checked_keys'] or [])} keys",
              file=sys.stderr)
        with open(os.path.join(refs, f"{name}.json"), "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", default=os.path.join(ROOT, "fixtures", "folders"))
    b.add_argument("--only", help="model types to build (comma-separated)")
    b.add_argument("--all", action="store_true", help="also base models (MODEL_MAPPING_NAMES)")
    b.add_argument("--max-total-mb", type=float, default=13.0, help="size budget of the corpus's tensors")
    b.add_argument("--verbose", action="store_true")
    r = sub.add_parser("reference")
    r.add_argument("--out", default=os.path.join(ROOT, "fixtures", "folders"))
    r.add_argument("--refs", default=os.path.join(ROOT, "fixtures", "folder-reference"))
    r.add_argument("--only", help="folder names (comma-separated)")
    args = ap.parse_args(argv)
    return cmd_build(args) if args.cmd == "build" else cmd_reference(args)


if __name__ == "__main__":
    sys.exit(main())
