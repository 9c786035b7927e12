#!/usr/bin/env bash
# Everything devmap-cuda needs measured on a GPU machine, in one go (docs/performance.md and
# docs/cuda.md quote its output). The machine needs the NVIDIA driver, Python with PyTorch,
# transformers and safetensors; no Rust: the binaries come prebuilt in $BIN:
#   devmap               cargo build --release -p devmap-cli
#   devmap-cuda-tests    cargo test --release -p devmap-cuda --no-run  (tests/gpu.rs)
#   devmap-cli-tests     cargo test --release -p devmap-cli --test cuda_cli --no-run
# Usage: BIN=.gpu-bin OUT=/tmp/out scripts/gpu_bench.sh [--variants]
set -u
BIN=${BIN:-.gpu-bin}
OUT=${OUT:-/tmp/out}
CKPT=${CKPT:-/tmp/llama8b}
mkdir -p "$OUT"
chmod +x "$BIN"/* 2>/dev/null
export PYTHONUNBUFFERED=1

echo "== machine"
nvidia-smi --query-gpu=index,name,memory.total,memory.free,pcie.link.gen.max,pcie.link.width.max,driver_version --format=csv
nvidia-smi topo -m 2>/dev/null
nproc; free -g; uname -r

echo "== devmap devices"
"$BIN/devmap" devices 2>&1
"$BIN/devmap" devices --json > "$OUT/devices.json" 2>&1
"$BIN/devmap" devices --measure 2>&1 | tee "$OUT/devices-measure.txt"

echo "== GPU tests (devmap-cuda)"
"$BIN/devmap-cuda-tests" --nocapture --test-threads=1 2>&1 | tee "$OUT/tests.txt"

echo "== CLI tests"
# The CLI test binary runs the devmap path it was built with (/work/main/target/release/devmap).
if [ ! -e /work/main ]; then mkdir -p /work && ln -s "$PWD" /work/main; fi
mkdir -p /work/main/target/release && cp "$BIN/devmap" /work/main/target/release/devmap
"$BIN/devmap-cli-tests" --test-threads=1 2>&1 | tee -a "$OUT/tests.txt"

echo "== errors"
n=$(nvidia-smi -L | wc -l)
echo "{\"\": $n}" > /tmp/absent-gpu.json
"$BIN/devmap" load examples/tiny-llama --plan /tmp/absent-gpu.json 2>&1
echo '{"model": 0, "lm_head": 0, "vision_tower": 0}' > /tmp/bad-key.json
"$BIN/devmap" load examples/tiny-llama --plan /tmp/bad-key.json 2>&1

echo "== load benchmark"
python3 scripts/bench_load.py --devmap "$BIN/devmap" --ckpt "$CKPT" --out "$OUT" "$@"
