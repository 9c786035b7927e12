#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test devmap: HiGHS (the MIP solver, built
# from source by highs-sys) needs cmake and a C++ compiler, bindgen needs a libclang shared library,
# and scripts/test_python.sh needs python3 with venv. Idempotent and quiet when all is present.
#
#   SETUP_DRY_RUN=1 scripts/setup.sh   prints "setup: would install PKG..." and installs nothing
#   (scripts/test_setup.sh tests the detection with fake ldconfig / llvm-config / apt-cache).
set -euo pipefail

# libclang the way clang-sys (bindgen's loader) finds it: LIBCLANG_PATH (a directory or the file),
# then `llvm-config --libdir`, then the linker cache (`ldconfig -p`). No globs: under pipefail an
# unmatched glob must not turn a present libclang into a missing one.
is_libclang_name() {
  case "$(basename "$1")" in
    libclang-cpp*) return 1 ;; # the C++ API library, not the one bindgen loads
    libclang.so | libclang.so.* | libclang-*.so | libclang-*.so.*) return 0 ;;
    *) return 1 ;;
  esac
}

dir_has_libclang() {
  local f
  [ -d "$1" ] || return 1
  for f in "$1"/libclang*; do
    [ -e "$f" ] && is_libclang_name "$f" && return 0
  done
  return 1
}

have_libclang() {
  if [ -n "${LIBCLANG_PATH:-}" ]; then
    if [ -f "$LIBCLANG_PATH" ] || dir_has_libclang "$LIBCLANG_PATH"; then
      return 0
    fi
    echo "setup: warning: LIBCLANG_PATH=$LIBCLANG_PATH holds no libclang shared library" >&2
  fi
  local libdir
  if libdir=$(llvm-config --libdir 2>/dev/null) && dir_has_libclang "$libdir"; then
    return 0
  fi
  local path
  while read -r path; do
    is_libclang_name "$path" && return 0
  done < <( (ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true) | awk '/libclang/ {print $NF}')
  return 1
}

# The libclang package apt offers here: Debian 12 has libclang1-14 (and -13..-16, -19, -22 in
# security updates), Debian 13 libclang1-19: the one matching an installed LLVM (llvm-config),
# else the newest versioned one, else the unversioned names.
pick_libclang_package() {
  local offered best llvm
  offered=$(apt-cache pkgnames libclang1- 2>/dev/null | grep -E '^libclang1-[0-9]+$' | sort -t- -k2 -n || true)
  llvm=$(llvm-config --version 2>/dev/null | cut -d. -f1 || true)
  best=$(echo "$offered" | tail -n 1)
  if [ -n "$llvm" ] && echo "$offered" | grep -qx "libclang1-$llvm"; then
    best="libclang1-$llvm"
  fi
  if [ -n "$best" ]; then
    echo "$best"
  elif apt-cache show libclang1 >/dev/null 2>&1; then
    echo libclang1
  else
    echo libclang-dev
  fi
}

have_cxx() {
  command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1
}

have_python_venv() {
  command -v python3 >/dev/null 2>&1 && python3 -c "import venv, ensurepip" >/dev/null 2>&1
}

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
have_cxx || missing+=(g++)
have_libclang || missing+=("$(pick_libclang_package)")
have_python_venv || missing+=(python3 python3-venv)

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found. devmap needs Rust 1.88 or newer (Debian's rustc is older); run:" >&2
  echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy" >&2
  echo '  . "$HOME/.cargo/env"' >&2
  echo "then run this script again." >&2
  [ -n "${SETUP_DRY_RUN:-}" ] || exit 1
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ -n "${SETUP_DRY_RUN:-}" ]; then
  echo "setup: would install ${missing[*]}"
  exit 0
fi

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing ${missing[*]} (needed to build the HiGHS solver and test the Python package)" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then
  echo "setup: installing ${missing[*]} with sudo (needed to build the HiGHS solver and test the Python package)" >&2
  sudo apt-get update -qq >/dev/null
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "setup: missing ${missing[*]}. Run: apt-get install -y ${missing[*]}" >&2
  echo "       (without apt: pip install cmake libclang, then export LIBCLANG_PATH=<site-packages>/clang/native)" >&2
  exit 1
fi
