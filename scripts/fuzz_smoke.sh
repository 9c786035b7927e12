#!/usr/bin/env bash
# A short run of every fuzz target (docs/testing.md, "Fuzzing"): SECONDS_PER_TARGET seconds each
# (default 30), one target at a time, one process. Not part of CI's default path.
#
#   scripts/fuzz_smoke.sh                 # every target, 30 s each
#   scripts/fuzz_smoke.sh 600 manifest    # one target, 10 minutes
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). Only the stable toolchain is assumed: cargo-fuzz's
# nightly flags (-Zsanitizer=address, sancov passes) are enabled with RUSTC_BOOTSTRAP=1.
# New corpus entries go to fuzz/corpus/<target> (ignored by git), seeded from fuzz/seeds/<target>;
# a crash leaves its input in fuzz/artifacts/<target>/ and makes the script exit non-zero.
set -euo pipefail

cd "$(dirname "$0")/.."
seconds="${1:-30}"
shift || true
all=(safetensors_header manifest max_memory device_map config offload_index)
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 2
fi

# The targets write their scratch files under the system temp folder: give them one of their own.
scratch="$(mktemp -d -t devmap-fuzz-smoke.XXXXXX)"
trap 'rm -rf "$scratch"' EXIT

export RUSTC_BOOTSTRAP=1

failed=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    echo "== $t: ${seconds}s"
    if TMPDIR="$scratch" cargo fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$scratch/$t.log" 2>&1; then
        grep -E "^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)" "$scratch/$t.log" || true
    else
        failed+=("$t")
        tail -n 40 "$scratch/$t.log"
        echo "!! $t failed; the input is in fuzz/artifacts/$t/" >&2
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
echo "all ${#targets[@]} targets ran ${seconds}s without a crash"
