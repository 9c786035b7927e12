"""scripts/bench_pinned.py --dry-run: every set-up of the GPU benchmark runs on the CPU (a tiny
random Llama behind accelerate's offload hooks) and the JSON has every field the lead reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench_pinned.py")


def test_dry_run_runs_every_setup(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--tokens", "2", "--repeat", "1",
                           "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    rows = {row["setup"]: row for row in doc["rows"]}
    assert list(rows) == ["hf-auto", "devmap", "devmap+pinned", "devmap+pinned+prefetch"]
    assert all(row["ms_per_token"] > 0 for row in rows.values())
    # The 400 KiB GPU budget cannot hold the ~1.2 MB model: devmap's map offloads modules.
    assert doc["offloaded_bytes"] > 0 and rows["devmap"]["offloaded_modules"] > 0
    assert rows["devmap+pinned+prefetch"]["prefetch_units"] > 0
    assert rows["devmap+pinned"]["prefetch_units"] == 0


def test_needs_a_checkpoint_without_dry_run():
    done = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "CHECKPOINT (or --random-llama8b WORK) and --max-memory are required" in done.stderr
