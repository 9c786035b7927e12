"""The exceptions devmap raises. Every one is a :class:`DevmapError`; messages are the CLI's."""

from __future__ import annotations


class DevmapError(Exception):
    """Base class of every error devmap raises."""


class ArgumentError(DevmapError, ValueError):
    """An argument is malformed: unknown strategy, compat, dtype or device; a bad workload, pin,
    no_split or topology; a model that is neither a path nor a ``torch.nn.Module``."""


class BudgetError(ArgumentError):
    """``max_memory`` is malformed, or it was omitted where no GPU can be discovered."""


class ModelError(DevmapError):
    """The model cannot be read (missing file, bad safetensors header or manifest, a tensor dtype
    devmap does not know)."""


class MapError(DevmapError):
    """A device map given to :func:`devmap.check` cannot be parsed (a map that parses but is
    invalid is reported in the result, not raised)."""


class PlanError(DevmapError):
    """No plan satisfies the request (no placement fits, Hugging Face's own planner raises here)."""


class DoesNotFitError(PlanError):
    """The model does not fit the budgets and no disk budget was given."""


class PinError(DevmapError):
    """:func:`devmap.pin_offloaded` refused: pinning would exceed the allowed share of RAM, or the
    model holds no offloaded weights to pin."""


# The native module's error kinds (crates/devmap-py/src/error.rs, Kind::name) -> classes.
BY_KIND = {
    "argument": ArgumentError,
    "budget": BudgetError,
    "model": ModelError,
    "map": MapError,
    "plan": PlanError,
    "does_not_fit": DoesNotFitError,
}
