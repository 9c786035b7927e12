"""The ``devmap`` command of the wheel: the Rust CLI (devmap-cli's ``run``) inside the native module.

``pip install`` writes a ``devmap`` script that calls :func:`main`; it accepts exactly what the
``devmap`` binary built by cargo accepts and prints the same output.
"""

from __future__ import annotations

import signal
import sys


def main(argv: "list[str] | None" = None) -> int:
    """Run ``devmap`` with ``argv`` (default ``sys.argv``, program name first); return its status."""
    from . import _devmap

    # The command runs in Rust without the GIL, where Python's KeyboardInterrupt cannot reach it:
    # Ctrl-C ends the process, as it ends the binary.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.stdout.flush()
    sys.stderr.flush()
    return _devmap.cli(list(sys.argv if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
