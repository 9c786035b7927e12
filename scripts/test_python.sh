#!/usr/bin/env bash
# Builds the devmap wheel, installs it into a cached venv beside pinned torch, transformers and
# accelerate, and runs the Python tests (python/tests) against them; then the setup.sh detection
# tests. Never skips: a missing dependency is installed, and a failure to install is a failure.
#
#   DEVMAP_CI_CACHE      cache folder (default ~/.cache/devmap-ci): venv/ and wheels/ live there, so
#                        reruns are warm (the first install downloads about 4 GB: torch with its
#                        CUDA libraries; 7 min 25 s on the 2-core dev machine)
#   DEVMAP_WHEEL_PROFILE cargo profile of the wheel (default dev: it reuses `cargo test`'s build;
#                        `pip install .` builds release)
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${DEVMAP_CI_CACHE:-$HOME/.cache/devmap-ci}"
venv="$cache/venv"
profile="${DEVMAP_WHEEL_PROFILE:-dev}"
# The versions the reference maps were made with (fixtures/reference) and the tests were run with.
pins=(torch==2.15.0 transformers==5.23.0 accelerate==1.15.0 pytest==9.2.0 maturin==1.16.0)

if [ ! -x "$venv/bin/python" ]; then
  echo "test_python: creating $venv" >&2
  mkdir -p "$cache"
  python3 -m venv "$venv" || { echo "test_python: python3 -m venv failed; run scripts/setup.sh (installs python3-venv)" >&2; exit 1; }
fi
py="$venv/bin/python"

have_pins() {
  "$py" - "${pins[@]}" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
}

if ! have_pins; then
  echo "test_python: installing ${pins[*]} into $venv (first time: several minutes)" >&2
  start=$(date +%s)
  "$py" -m pip install -q "${pins[@]}"
  echo "test_python: installed in $(( $(date +%s) - start )) s" >&2
fi

rm -rf "$cache/wheels"
"$venv/bin/maturin" build --quiet --profile "$profile" --interpreter "$py" --out "$cache/wheels" >&2
"$py" -m pip install -q --force-reinstall --no-deps "$cache"/wheels/devmap-*.whl
# The tests must import the installed wheel, not python/devmap from this checkout.
(cd "$cache" && "$py" -c "import devmap, devmap._devmap; assert 'site-packages' in devmap.__file__, devmap.__file__")
# The wheel's `devmap` command (a console script into the Rust CLI): python/tests/test_cli.py
# checks its maps and errors; this says early and plainly when pip did not install it.
"$venv/bin/devmap" --version >&2 || { echo "test_python: the wheel installed no working devmap command" >&2; exit 1; }

(cd python/tests && "$py" -m pytest -q -p no:cacheprovider .)
bash scripts/test_setup.sh
