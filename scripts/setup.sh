#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build devmap: HiGHS (the MIP solver, built from
# source by highs-sys) needs cmake, and bindgen needs a libclang shared library.
# Idempotent and quiet when everything is present.
set -euo pipefail

have_libclang() {
  [ -n "${LIBCLANG_PATH:-}" ] && return 0
  ls /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/x86_64-linux-gnu/libclang*.so* 2>/dev/null | grep -q 'libclang[-.0-9]*so' 
}

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
have_libclang || missing+=(libclang1-14)
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing ${missing[*]} (needed to build the HiGHS solver)" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then
  echo "setup: installing ${missing[*]} with sudo (needed to build the HiGHS solver)" >&2
  sudo apt-get update -qq >/dev/null
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "setup: missing ${missing[*]}. Run: apt-get install -y cmake libclang1-14" >&2
  echo "       (without apt: pip install cmake libclang, then export LIBCLANG_PATH=<site-packages>/clang/native)" >&2
  exit 1
fi
