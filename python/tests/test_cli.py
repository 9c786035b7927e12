"""The wheel's `devmap` command (the console script pip writes beside the venv's python): it is the
Rust CLI, so its maps equal transformers' own, its errors are the CLI's, and `python -m devmap` is
the same command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import budgets, meta_model, real_model, resolve
from test_hf_parity import transformers_map

import devmap

COMMAND = os.path.join(os.path.dirname(sys.executable), "devmap")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([COMMAND, *args], capture_output=True, text=True, timeout=120)


def test_the_command_is_installed_beside_python():
    assert os.access(COMMAND, os.X_OK), f"pip did not install {COMMAND}"
    done = run("--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"devmap {devmap.__version__}")


def test_python_dash_m_is_the_same_command():
    done = subprocess.run([sys.executable, "-m", "devmap", "--version"], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, f"devmap {devmap.__version__}")


@pytest.mark.parametrize("strategy", ["sequential", "balanced"])
def test_plan_json_equals_from_pretrained_map(tmp_path, strategy):
    real_model("llama").save_pretrained(tmp_path)
    max_memory = budgets(meta_model("llama"), "split-offload")
    spec = ",".join(f"{device}={size}" for device, size in max_memory.items())
    done = run("plan", str(tmp_path), "--max-memory", spec, "--strategy", strategy,
               "--compat", "transformers", "--format", "json")
    assert done.returncode == 0, done.stderr
    ours = json.loads(done.stdout)
    theirs = transformers_map(meta_model("llama"), strategy, max_memory)
    assert set(ours.values()) >= {0, 1}, ours  # the scenario really splits
    tensors = [name for name, _ in meta_model("llama").named_parameters()]
    assert {t: resolve(ours, t) for t in tensors} == {t: resolve(theirs, t) for t in tensors}


def test_errors_are_the_clis(tmp_path):
    missing = tmp_path / "missing"
    done = run("plan", str(missing), "--max-memory", "0=1GiB")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith(f"error: reading model {missing}"), done.stderr
    usage = run("plan")
    assert usage.returncode == 2 and "Usage: devmap plan" in usage.stderr, usage.stderr


MEASURED = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "measured", "llama-3.1-8b-shaped.json")
MEASURED_MM = {0: "12GiB", "cpu": "64GiB"}


@pytest.mark.parametrize("workload, flags", [
    (None, []),
    ("none", ["--workload", "none"]),
    ("batch=1,prompt=6000,new=64", ["--workload", "batch=1,prompt=6000,new=64"]),
    ({"prompt": 6000, "new": 64}, ["--workload", "batch=1,prompt=6000,new=64"]),
    ("batch=1,seq=6064", ["--kv-cache", "batch=1,seq=6064"]),
])
def test_plan_takes_the_clis_workload(workload, flags):
    """`devmap.plan(path, max_memory, workload=...)` is `devmap plan PATH --max-memory ... [flags]`:
    the same rule picks the workload (the CLI's default when none is given)."""
    done = run("plan", MEASURED, "--max-memory", "0=12GiB,cpu=64GiB", *flags, "--format", "json")
    assert done.returncode == 0, done.stderr
    assert devmap.plan(MEASURED, max_memory=MEASURED_MM, workload=workload) == json.loads(done.stdout)


def test_the_default_workload_makes_room_weights_only_does_not():
    """The default workload (KV cache and activations of a 2048-token prompt) moves layers to cpu
    that a weights-only plan keeps on the GPU, so the cases above compare different maps."""
    default = devmap.plan(MEASURED, max_memory=MEASURED_MM)
    weights_only = devmap.plan(MEASURED, max_memory=MEASURED_MM, workload="none")
    assert sum(d == "cpu" for d in default.values()) > sum(d == "cpu" for d in weights_only.values())
