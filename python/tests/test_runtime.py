"""`runtime=` picks the rates offloaded weights stream at, as the CLI's `--runtime` does."""

from __future__ import annotations

from pathlib import Path

import devmap

LLAMA = Path(__file__).resolve().parents[2] / "fixtures" / "models" / "llama-2-7b.json"


def test_pinned_runtime_streams_faster_on_the_same_map():
    # Sequential keeps the map fixed, so only the rates differ between the runtimes. About 3 GiB of
    # a 12.6 GiB fp16 model streams from cpu: 7.5 GB/s pageable against 25 GB/s pinned by default.
    mm = {0: "10GiB", "cpu": "64GiB"}
    default = devmap.plan_report(str(LLAMA), mm, strategy="sequential")
    pageable = devmap.plan_report(str(LLAMA), mm, strategy="sequential", runtime="accelerate")
    pinned = devmap.plan_report(str(LLAMA), mm, strategy="sequential", runtime="pinned")
    assert default["device_map"] == pageable["device_map"] == pinned["device_map"]
    streamed = pinned["estimate"]["streamed_bytes"]
    assert streamed > 2 * 2**30
    assert default["estimate"]["ms_per_token"] == pageable["estimate"]["ms_per_token"]
    # The byte term alone saves streamed * (1/7.5 - 1/25) ns; per-copy latencies move it by < 1%.
    saved_ms = 1e3 * streamed * (1 / 7.5e9 - 1 / 25e9)
    gap = pageable["estimate"]["ms_per_token"] - pinned["estimate"]["ms_per_token"]
    assert abs(gap - saved_ms) < 0.01 * saved_ms, (gap, saved_ms)
