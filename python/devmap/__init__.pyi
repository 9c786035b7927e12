"""Type stubs of the `devmap` package (docstrings in devmap/__init__.py)."""

import os
from typing import Any, Mapping, Sequence, TypedDict, Union

from ._errors import (
    ArgumentError as ArgumentError,
    BudgetError as BudgetError,
    DevmapError as DevmapError,
    DoesNotFitError as DoesNotFitError,
    MapError as MapError,
    ModelError as ModelError,
    PinError as PinError,
    PlanError as PlanError,
)
from ._pin import PinReport as PinReport

__version__: str

Device = Union[int, str]
DeviceMap = dict[str, Device]
MaxMemory = Mapping[Any, Union[int, str]]
PathLike = Union[str, os.PathLike[str]]
Model = Any  # a path (PathLike) or a torch.nn.Module
DType = Any  # a string such as "bf16" or a torch.dtype
Workload = Union[str, Mapping[str, Any]]

class Estimate(TypedDict):
    objective_seconds: float
    ms_per_token: float
    latency_seconds: float
    busiest_seconds: float
    device_changes: int
    streamed_bytes: int

class Solve(TypedDict):
    objective_seconds: float
    bound_seconds: float
    gap: float
    status: str
    start: str
    units: int
    overhead: dict[Device, int]

class PlanReport(TypedDict):
    strategy: str
    device_map: DeviceMap
    usage: dict[Device, int]
    budgets: dict[Device, int]
    budgets_used: dict[Device, int]
    offloaded_bytes: int
    estimate: Estimate
    solve: Solve | None
    elapsed_s: float

class CheckReport(TypedDict):
    valid: bool
    usage: dict[Device, int]
    budgets: dict[Device, int] | None
    errors: list[str]
    warnings: list[str]
    tensors: int

def plan(
    model: Model,
    max_memory: MaxMemory | str | None = None,
    strategy: str = "auto",
    no_split: str | Sequence[str] | None = None,
    dtype: DType | None = None,
    workload: Workload | None = None,
    pins: Mapping[str, Device] | None = None,
    topology: PathLike | None = None,
    compat: str | None = None,
    *,
    time_limit: float | None = None,
    runtime: str | None = None,
    split_blocks: bool | None = None,
) -> DeviceMap: ...
def plan_report(
    model: Model,
    max_memory: MaxMemory | str | None = None,
    strategy: str = "auto",
    no_split: str | Sequence[str] | None = None,
    dtype: DType | None = None,
    workload: Workload | None = None,
    pins: Mapping[str, Device] | None = None,
    topology: PathLike | None = None,
    compat: str | None = None,
    *,
    time_limit: float | None = None,
    runtime: str | None = None,
    split_blocks: bool | None = None,
) -> PlanReport: ...
def check(
    model: Model,
    device_map: Mapping[str, Device],
    max_memory: MaxMemory | str | None = None,
    dtype: DType | None = None,
    no_split: str | Sequence[str] | None = None,
) -> CheckReport: ...
def compare(
    model: Model,
    max_memory: MaxMemory | str | None = None,
    no_split: str | Sequence[str] | None = None,
    dtype: DType | None = None,
    workload: Workload | None = None,
    pins: Mapping[str, Device] | None = None,
    topology: PathLike | None = None,
    *,
    time_limit: float | None = None,
    runtime: str | None = None,
    split_blocks: bool | None = None,
) -> list[dict[str, Any]]: ...
def manifest(model: Any, name: str | None = None) -> dict[str, Any]: ...
def pin_offloaded(model: Any, max_ram_share: float = 0.5, prefetch: bool = False) -> PinReport: ...
