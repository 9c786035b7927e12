"""The CPU parts of scripts/validate_multi_gpu.py: cap sets, the header-only checkpoint, a dry run
through the real devmap binary and transformers' planner, and the load-phase arithmetic.

The dry run needs the devmap CLI: $DEVMAP_BIN, else target/debug/devmap (built by `cargo test
--workspace`, which the README runs before scripts/test_python.sh)."""

from __future__ import annotations

import json
import os
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import validate_multi_gpu as vm  # noqa: E402

# Llama-3.1-8B: 8,030,261,248 parameters (embeddings and head 2 x 128256 x 4096, 32 layers of
# 218,112,000, the final norm 4096), 2 bytes each.
LLAMA_8B_BYTES = 16_060_522_496


def devmap_bin() -> str:
    path = os.environ.get("DEVMAP_BIN") or os.path.join(REPO, "target", "debug", "devmap")
    if not os.path.exists(path):
        pytest.fail(f"no devmap binary at {path}: run `cargo build -p devmap-cli` or set DEVMAP_BIN")
    return path


def test_cap_sets_are_cut_to_the_gpus_in_use():
    assert vm.parse_caps("12+4,6+6,10+2", 2) == [(12.0, 4.0), (6.0, 6.0), (10.0, 2.0)]
    assert vm.parse_caps("12+4,6+6", 1) == [(12.0,), (6.0,)]
    assert vm.parse_caps("40+12+8+8", 4) == [(40.0, 12.0, 8.0, 8.0)]


@pytest.mark.parametrize(
    "text,gpus,says",
    [("12+4", 4, "names 2 GPUs"), ("12+x", 2, r"'12\+x' is not GiB"), ("12+0", 2, "not positive"), (",", 1, "no cap set")],
)
def test_bad_cap_sets_are_named(text, gpus, says):
    with pytest.raises(SystemExit, match=says):
        vm.parse_caps(text, gpus)


def test_max_memory_covers_every_gpu_of_the_set():
    assert vm.vg.max_memory_spec((12.0, 4.0), "64GiB") == "0=12GiB,1=4GiB,cpu=64GiB"
    assert vm.vg.max_memory_dict((40, 12, 8, 8), "64GiB") == {0: "40GiB", 1: "12GiB", 2: "8GiB", 3: "8GiB", "cpu": "64GiB"}
    # validate_gpu.py's single-GPU form still works.
    assert vm.vg.max_memory_spec(6, "100GiB") == "0=6GiB,cpu=100GiB"


def test_header_only_checkpoint_reads_as_the_real_shape(tmp_path):
    from safetensors import safe_open

    cfg = vm.model_config("llama8b", None)
    total = vm.write_header_only(str(tmp_path), cfg)
    assert total == LLAMA_8B_BYTES
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    seen = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(tmp_path / fname), "pt") as f:
            for name in f.keys():
                seen[name] = f.get_slice(name).get_shape()
    assert len(seen) == 291
    assert seen["lm_head.weight"] == [128256, 4096]
    assert seen["model.layers.31.mlp.down_proj.weight"] == [4096, 14336]
    assert set(seen) == set(index["weight_map"])
    # Sparse: the files are as long as the data, the disk holds next to nothing.
    used = sum(os.stat(tmp_path / f).st_blocks * 512 for f in os.listdir(tmp_path))
    assert used < 1 << 20
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["max_position_embeddings"] == 131072


def test_four_gpu_preset_is_a_cut_down_70b_shape():
    args = vm.parse_args(["--devmap", "x", "--out", "y"])
    cfg = vm.resolve_defaults(args, 4)
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (8192, 28672, 38)
    assert args.caps == [(40.0, 12.0, 8.0, 8.0)]


def test_dry_run_plans_every_cell_and_devmap_is_never_predicted_slower(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    vm.main(["--devmap", devmap_bin(), "--out", str(out), "--work", str(work), "--dry-run",
             "--gpus", "2", "--caps", "12+4,10+2", "--strategies", "devmap,sequential,auto"])
    with open(out / "results.json") as f:
        doc = json.load(f)
    rows = doc["rows"]
    assert doc["mode"] == "dry-run" and len(rows) == 6
    assert not [r for r in rows if r.get("error")]
    for caps in ([12.0, 4.0], [10.0, 2.0]):
        cell = {r["strategy"]: r for r in rows if r["caps_gib"] == caps}
        # Every map names GPUs of this set only, and devmap's places weights on both.
        for r in cell.values():
            assert set(r["device_map"].values()) <= {0, 1, "cpu", "disk"}, r["device_map"]
            assert len(r["predicted_gpu_gib"]) == 2
        assert {0, 1} <= set(cell["devmap"]["device_map"].values())
        # `auto` minimises devmap's estimate: no map under the same budgets can score lower.
        for hf in ("sequential", "auto"):
            assert cell["devmap"]["predicted_ms_per_token"] <= cell[hf]["predicted_ms_per_token"] + 1e-6
    # 12+4 GiB holds the whole 14.96 GiB model: devmap offloads nothing.
    twelve = next(r for r in rows if r["strategy"] == "devmap" and r["caps_gib"] == [12.0, 4.0])
    assert twelve["predicted_offloaded_gib"] == 0
    md = (out / "results.md").read_text()
    assert md.index("| 12+4 |") < md.index("| 10+2 |")  # in the order the caps were given
    assert "12+4 GiB, prompt 8 (predicted): devmap" in md


def test_load_summary_relates_devmap_to_the_ceilings():
    gib = vm.GIB
    phase = {
        "calibrated_pinned_gib_per_s": [50.0, 52.0],
        "torch_h2d": {"pinned": {"median_gib_per_s": 51.0}, "pinned_all_gpus_at_once": {"median_gib_per_s": 100.0}},
        "devmap": [
            {"binary": "devmap", "options": [], "copy_gib_per_s_median": 81.6, "load_call_seconds_median": 0.5,
             "bytes": 40 * gib, "device_gib_per_s_median": {"0": 41.0, "1": 40.8}},
            {"binary": "devmap", "options": ["--read", "pread"], "copy_gib_per_s_median": 70.0,
             "load_call_seconds_median": 0.6, "bytes": 40 * gib},
        ],
        "transformers": {"median_seconds": 4.0},
        "verify": {"tensors": 291, "mismatches": []},
    }
    s = vm.load_summary(phase, 2)
    assert s["sum_of_calibrated_pinned_gib_per_s"] == 102.0
    assert s["torch_pinned_all_gpus_at_once_gib_per_s"] == 100.0
    assert s["devmap_vs_ceiling"] == pytest.approx(0.8)
    assert s["devmap_vs_torch_all_at_once"] == pytest.approx(0.816)
    assert s["transformers_gib_per_s"] == pytest.approx(10.0)
    assert s["speedup_vs_transformers"] == pytest.approx(8.0)
    assert [v["options"] for v in s["variants"]] == [[], ["--read", "pread"]]
    assert s["verify_mismatches"] == 0
    md = vm.load_markdown(s)
    assert "80% of the calibrated sum" in md and "0 tensors differ" in md
    phase["verify"] = {"error": "error: lm_head.weight on GPU 1: loaded bytes hash to 1, the file's to 2"}
    assert "lm_head.weight" in vm.load_summary(phase, 2)["verify_mismatches"]
    # A GPU calibrate did not measure leaves the sum unknown rather than low.
    phase["calibrated_pinned_gib_per_s"] = [50.0, None]
    assert vm.load_summary(phase, 2)["sum_of_calibrated_pinned_gib_per_s"] is None
