"""``python -m devmap ...``: the ``devmap`` command (see ``devmap._cli``)."""

import sys

from ._cli import main

sys.exit(main(["devmap", *sys.argv[1:]]))
