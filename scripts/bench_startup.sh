#!/usr/bin/env bash
# Start-up time of the devmap binary beside a Rust hello-world built here with rustc -O
# (docs/performance.md, "Start-up"). Uses hyperfine when installed (apt-get install hyperfine),
# else a Python loop of fork+exec (median), then perf stat's CPU time and page faults per process
# when perf is installed. Build the binary first:
#
#   cargo build --release -p devmap-cli && scripts/bench_startup.sh [BINARY ...]
#
# BINARY defaults to target/release/devmap; each is run as `BINARY --version`. RUNS (default
# 1000) sets the number of runs.
set -euo pipefail
cd "$(dirname "$0")/.."

runs="${RUNS:-1000}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
printf 'fn main() { println!("hello"); }\n' > "$work/hello.rs"
rustc -O "$work/hello.rs" -o "$work/hello"

binaries=("$@")
[ ${#binaries[@]} -gt 0 ] || binaries=(target/release/devmap)
commands=("$work/hello")
for b in "${binaries[@]}"; do
  [ -x "$b" ] || { echo "bench_startup: $b is not an executable (cargo build --release -p devmap-cli)" >&2; exit 1; }
  commands+=("$b --version")
done

echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
if command -v hyperfine >/dev/null; then
  hyperfine -N --warmup 100 --runs "$runs" --export-json "$work/times.json" "${commands[@]}"
  python3 - "$work/times.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    print(f"{r['command']}: median {r['median'] * 1e3:.2f} ms, min {r['min'] * 1e3:.2f} ms")
PY
else
  python3 - "$runs" "${commands[@]}" <<'PY'
import statistics, subprocess, sys, time
runs = int(sys.argv[1])
for command in sys.argv[2:]:
    argv = command.split()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
        times.append((time.perf_counter() - start) * 1e3)
    print(f"{command}: median {statistics.median(times):.2f} ms, min {min(times):.2f} ms ({runs} runs)")
PY
fi
# CPU time and page faults per process: steadier than wall time on a shared machine.
if command -v perf >/dev/null; then
  for command in "${commands[@]}"; do
    # shellcheck disable=SC2086 # the command's words
    perf stat -r "$runs" -e task-clock,page-faults $command 2>&1 >/dev/null |
      awk -v c="$command" '/task-clock/ {t=$1} /page-faults/ {f=$1} END {print c ": CPU " t " ms, " f " page faults (perf stat)"}'
  done
fi
