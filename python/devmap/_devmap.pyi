"""Type stubs of the native module (crates/devmap-py). Each function takes one JSON request and
returns one JSON answer; use the functions of `devmap` instead."""

__version__: str

class NativeError(Exception):
    """A failed request; ``args`` are ``(kind, message)``."""

def plan(request: str) -> str: ...
def check(request: str) -> str: ...
def compare(request: str) -> str: ...
def cli(argv: list[str]) -> int:
    """Run the ``devmap`` command (program name first); returns its exit status."""
