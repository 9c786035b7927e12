#!/usr/bin/env bash
# Tests scripts/setup.sh's detection (libclang, C++ compiler, cmake, python venv, cargo) with fake
# ldconfig / llvm-config / apt-cache on a PATH that holds nothing else, in dry-run mode.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
passed=0
failed=0

# A bin folder with the basic tools setup.sh needs and fakes for the rest (each case adds more).
base_bin() {
  local bin="$work/$1/bin"
  mkdir -p "$bin"
  for tool in bash awk basename grep sort tail cut id cat; do
    ln -sf "$(command -v "$tool")" "$bin/$tool"
  done
  fake "$1" cmake 'exit 0'
  fake "$1" c++ 'exit 0'
  fake "$1" cargo 'exit 0'
  fake "$1" python3 'exit 0'
  fake "$1" apt-cache 'case "$1" in pkgnames) printf "libclang1-13\nlibclang1-14\nlibclang1-19\n";; *) exit 1;; esac'
  echo "$bin"
}

fake() { # CASE NAME BODY
  printf '#!/bin/sh\n%s\n' "$3" > "$work/$1/bin/$2"
  chmod +x "$work/$1/bin/$2"
}

expect() { # CASE EXPECTED_OUTPUT [env assignments...]
  local name="$1" want="$2"
  shift 2
  local got
  got=$(env -i PATH="$work/$name/bin" SETUP_DRY_RUN=1 "$@" bash "$here/setup.sh" 2>/dev/null) || got="exit $?: $got"
  if [ "$got" = "$want" ]; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    echo "FAILED $name: expected [$want], got [$got]"
  fi
}

# libclang known only to the linker cache (Debian's libclang1-14), no llvm-config.
base_bin ldconfig-only >/dev/null
fake ldconfig-only ldconfig 'printf "\tlibclang-14.so.13 (libc6,x86-64) => /lib/x86_64-linux-gnu/libclang-14.so.13\n"'
expect ldconfig-only ""

# Only the C++ API library (libclang-cpp) present: that is not libclang; newest offered wins.
base_bin cpp-only >/dev/null
fake cpp-only ldconfig 'printf "\tlibclang-cpp.so.14 (libc6,x86-64) => /lib/libclang-cpp.so.14\n"'
expect cpp-only "setup: would install libclang1-19"

# An installed LLVM 14 without libclang: the matching package is picked.
base_bin llvm14 >/dev/null
fake llvm14 ldconfig 'exit 0'
mkdir -p "$work/llvm14/lib"
fake llvm14 llvm-config "case \"\$1\" in --libdir) echo $work/llvm14/lib;; --version) echo 14.0.6;; esac"
expect llvm14 "setup: would install libclang1-14"

# llvm-config's libdir holds libclang (another LLVM version, unknown to ldconfig).
base_bin llvm-libdir >/dev/null
fake llvm-libdir ldconfig 'exit 0'
mkdir -p "$work/llvm-libdir/lib" && touch "$work/llvm-libdir/lib/libclang-17.so.17"
fake llvm-libdir llvm-config "case \"\$1\" in --libdir) echo $work/llvm-libdir/lib;; --version) echo 17.0.1;; esac"
expect llvm-libdir ""

# LIBCLANG_PATH names a folder holding libclang.so (pip's libclang wheel layout).
base_bin libclang-path >/dev/null
fake libclang-path ldconfig 'exit 0'
mkdir -p "$work/native" && touch "$work/native/libclang.so"
expect libclang-path "" LIBCLANG_PATH="$work/native"

# LIBCLANG_PATH naming the library file itself (clang-sys accepts both).
base_bin libclang-file >/dev/null
fake libclang-file ldconfig 'exit 0'
mkdir -p "$work/native-file" && touch "$work/native-file/libclang-18.so.18"
expect libclang-file "" LIBCLANG_PATH="$work/native-file/libclang-18.so.18"

# A stale LIBCLANG_PATH (no libclang there) does not hide the one the linker cache knows.
base_bin stale-path >/dev/null
fake stale-path ldconfig 'printf "\tlibclang-14.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libclang-14.so.1\n"'
mkdir -p "$work/empty"
expect stale-path "" LIBCLANG_PATH="$work/empty"

# Debian 13: only libclang1-19 offered; nothing found.
base_bin trixie >/dev/null
fake trixie ldconfig 'exit 0'
fake trixie apt-cache 'case "$1" in pkgnames) echo libclang1-19;; *) exit 1;; esac'
expect trixie "setup: would install libclang1-19"

# No versioned package offered: the unversioned development package.
base_bin unversioned >/dev/null
fake unversioned ldconfig 'exit 0'
fake unversioned apt-cache 'exit 1'
expect unversioned "setup: would install libclang-dev"

# No C++ compiler, no cmake, no python venv: all of them.
base_bin bare >/dev/null
fake bare ldconfig 'printf "\tlibclang.so.1 (libc6,x86-64) => /lib/libclang.so.1\n"'
rm "$work/bare/bin/c++" "$work/bare/bin/cmake"
fake bare python3 'exit 1'
expect bare "setup: would install cmake g++ python3 python3-venv"

# No cargo: the exact commands to run, and (without dry run) a failure.
base_bin nocargo >/dev/null
fake nocargo ldconfig 'printf "\tlibclang.so.1 (libc6,x86-64) => /lib/libclang.so.1\n"'
rm "$work/nocargo/bin/cargo"
out=$(env -i PATH="$work/nocargo/bin" bash "$here/setup.sh" 2>&1) && rc=0 || rc=$?
if [ "$rc" = 1 ] && echo "$out" | grep -q "sh.rustup.rs" && echo "$out" | grep -q "Rust 1.88"; then
  passed=$((passed + 1))
else
  failed=$((failed + 1))
  echo "FAILED nocargo: rc=$rc output: $out"
fi

echo "setup.sh: $passed passed, $failed failed"
[ "$failed" = 0 ]
