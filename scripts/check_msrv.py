#!/usr/bin/env python3
"""Checks that the workspace's rust-version (one for every member) is at least what every locked
dependency states (cargo metadata's rust_version of each package in Cargo.lock), so the stated
minimum is true for the lock. It prints the dependency that sets the floor.

    python3 scripts/check_msrv.py     # exit 1 with the offending crates otherwise
"""

from __future__ import annotations

import json
import subprocess
import sys


def version(text: str) -> tuple[int, ...]:
    parts = [int(x) for x in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def main() -> int:
    meta = json.loads(subprocess.check_output(
        ["cargo", "metadata", "--format-version", "1", "--locked"], text=True))
    members = set(meta["workspace_members"])
    ours = {p["rust_version"] for p in meta["packages"] if p["id"] in members}
    if len(ours) != 1 or None in ours:
        print(f"check_msrv: workspace members disagree on rust-version: {sorted(map(str, ours))}")
        return 1
    stated = version(ours.pop())
    needs = sorted(((version(p["rust_version"]), f"{p['name']} {p['version']}") for p in meta["packages"]
                    if p["id"] not in members and p.get("rust_version")), reverse=True)
    too_new = [(v, n) for v, n in needs if v > stated]
    if too_new:
        listed = ", ".join(f"{n} needs {'.'.join(map(str, v))}" for v, n in too_new)
        print(f"check_msrv: rust-version {'.'.join(map(str, stated))} is too low: {listed}")
        return 1
    highest = needs[0] if needs else ((0,), "nothing")
    print(f"check_msrv: rust-version {'.'.join(map(str, stated))} covers every locked dependency "
          f"(highest: {highest[1]} needs {'.'.join(map(str, highest[0]))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
