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
