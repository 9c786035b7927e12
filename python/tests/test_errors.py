"""Bad arguments raise the documented DevmapError subclasses, with the CLI's messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import meta_model

import devmap

MM = {0: "1MiB", "cpu": "1GiB"}


@pytest.fixture(scope="module")
def model():
    return meta_model("llama")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(max_memory={0: "2xx"}), devmap.BudgetError, r'device "0": invalid memory size "2xx"'),
    (dict(max_memory={"gpu7": "1GiB"}), devmap.BudgetError, r'unknown device "gpu7"'),
    (dict(max_memory={0: 1.5}), devmap.BudgetError, r"a budget is bytes"),
    (dict(max_memory=[1, 2]), devmap.BudgetError, r"must be a dict"),
    (dict(max_memory=MM, strategy="fastest"), devmap.ArgumentError, r'unknown strategy "fastest"'),
    (dict(max_memory=MM, compat="pytorch"), devmap.ArgumentError, r'unknown compat path "pytorch"'),
    (dict(max_memory=MM, dtype="f12"), devmap.ArgumentError, r'unknown dtype "f12"'),
    (dict(max_memory=MM, no_split="NoSuchBlock"), devmap.ArgumentError, r'"NoSuchBlock" matches no module'),
    (dict(max_memory=MM, no_split=3), devmap.ArgumentError, r"no_split must be"),
    (dict(max_memory=MM, workload={"batch": 1, "sequence": 4}), devmap.ArgumentError, r"unknown keys \['sequence'\]"),
    (dict(max_memory=MM, workload="batch=x,seq=4"), devmap.ArgumentError, r'batch "x" is not an integer'),
    (dict(max_memory=MM, pins={"lm_head": "tpu"}), devmap.ArgumentError, r'pins\["lm_head"\]: unknown device "tpu"'),
    (dict(max_memory=MM, pins={"nothing.here": 0}), devmap.ArgumentError, r"nothing\.here"),
    (dict(max_memory=MM, topology={"gpus": {}}), devmap.ArgumentError, r"path of a topology JSON"),
    (dict(max_memory=MM, runtime="vllm"), devmap.ArgumentError, r'runtime "vllm" is not "accelerate" or "pinned"'),
    (dict(max_memory=MM, runtime=1), devmap.ArgumentError, r"runtime must be"),
    (dict(max_memory={0: "1KiB", "cpu": "1KiB"}), devmap.DoesNotFitError, r"does not fit: .* disk, which has no budget"),
])
def test_bad_arguments(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        devmap.plan(model, **kwargs)


def test_every_error_is_a_devmap_error():
    for cls in (devmap.ArgumentError, devmap.BudgetError, devmap.ModelError, devmap.MapError,
                devmap.PlanError, devmap.DoesNotFitError, devmap.PinError):
        assert issubclass(cls, devmap.DevmapError)
    assert issubclass(devmap.BudgetError, ValueError) and issubclass(devmap.ArgumentError, ValueError)


def test_model_must_be_path_or_module():
    with pytest.raises(devmap.ArgumentError, match="not dict"):
        devmap.plan({"a": 1}, MM)


def test_missing_path_names_it(tmp_path):
    with pytest.raises(devmap.ModelError, match=f"reading model {tmp_path}/none"):
        devmap.plan(tmp_path / "none", MM)


def test_bad_manifest_names_the_tensor(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"format": "devmap-manifest/1", "tensors": [
        {"name": "w", "dtype": "F12", "shape": [2]}]}))
    with pytest.raises(devmap.ModelError, match=r'tensor "w" has unknown dtype "F12"'):
        devmap.plan(path, MM)


def test_no_max_memory_without_gpu_says_what_to_pass(model):
    with pytest.raises(devmap.BudgetError, match="max_memory is required here"):
        devmap.plan(model)


def test_check_reports_problems_and_raises_on_unparsable_maps(model):
    report = devmap.check(model, {"model": 0}, max_memory={0: "1KiB"})
    assert not report["valid"]
    assert any("1 tensor(s) have no device: lm_head.weight" in e for e in report["errors"])
    assert any("budget is 1.00 KiB" in e for e in report["errors"])
    assert devmap.check(model, {"": "cpu"})["valid"]
    with pytest.raises(devmap.MapError):
        devmap.check(model, {"model": [0]})
    with pytest.raises(devmap.MapError):
        devmap.check(model, ["model"])


def test_path_models_do_not_import_torch(tmp_path):
    # A path is planned in Rust: torch is never imported (it takes seconds).
    manifest = devmap.manifest(meta_model("llama"))
    path = tmp_path / "llama.json"
    path.write_text(json.dumps(manifest))
    code = ("import sys, devmap; m = devmap.plan(sys.argv[1], {0: '1MiB', 'cpu': '1GiB'}); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(len(m))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 0
