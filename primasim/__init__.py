"""primasim: predict, plan and run LLM inference on home clusters of weak, mixed devices.

The public API, by layer (docs/architecture.md):

- specs: `load_model`, `catalogue`, `ModelSpec`; `load_cluster`, `builtin_clusters`, `ClusterSpec`,
  `NetworkSpec`, `LinkSpec`, `DeviceSpec`, `GPUSpec`; `Plan`, `DevicePlan`; `Trace`, `Metrics`,
  `metrics`; `SYSTEMS` (every system: its planner, simulated schedule and runtime schedule);
  `runtime_model` (a model as primasim's runtime holds it); the errors;
- planning: `make_plan`, `PlanOutcome`, `halda`, `HaldaResult`, `predict_tpot`, `predict_ttft`,
  `memory_pressure`, `coefficients`, `device_sets`, `Coefficients`, `DeviceCorrection`;
- simulation: `simulate`, `SimConfig`, `SimResult`, `sim_plan`, `SimPlanResult`;
- the runtime: `open_checkpoint`, `write_random_checkpoint`, `load_params`, `load_tokenizer`,
  `generate`, `run_plan`, `RunOptions`, `RunResult`, `cached_random_weights`;
- the loop: `profile_device`, `validate`, `ValidateConfig`, `predict`, `reproduce`, `target_names`,
  `plot_timeline`, `run_sweep`, `load_sweep_spec`, `load_sweep`, `sweep_report`.

The specs load with `import primasim`; every other name loads its module on first use, so
`import primasim` (and with it every `primasim` command) does not load CVXPY, SimPy or JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

from .core.cluster import (
    ClusterSpec as ClusterSpec,
    LinkSpec as LinkSpec,
    NetworkSpec as NetworkSpec,
    builtin_clusters as builtin_clusters,
    load_cluster as load_cluster,
)
from .core.device import DeviceSpec as DeviceSpec, GPUSpec as GPUSpec
from .core.errors import (
    CheckpointError as CheckpointError,
    EmulationError as EmulationError,
    PlanError as PlanError,
    PrimasimError as PrimasimError,
    SpecError as SpecError,
    WireError as WireError,
    WorkerError as WorkerError,
)
from .core.model import ModelSpec as ModelSpec
from .core.model_sources import catalogue as catalogue, load_model as load_model
from .core.plan import DevicePlan as DevicePlan, Plan as Plan
from .core.runtime_facts import runtime_model as runtime_model
from .core.systems import SYSTEMS as SYSTEMS
from .core.trace import Metrics as Metrics, Trace as Trace, metrics as metrics

__version__ = "0.1.0"

_LAZY = {  # name -> the module that defines it, imported on first use
    "make_plan": ".sim", "PlanOutcome": ".plan.planners",
    "halda": ".plan.halda", "HaldaResult": ".plan.halda",
    "predict_tpot": ".plan.cost", "predict_ttft": ".plan.cost", "memory_pressure": ".plan.cost",
    "coefficients": ".plan.cost", "device_sets": ".plan.cost", "Coefficients": ".plan.cost",
    "DeviceCorrection": ".plan.cost",
    "simulate": ".sim", "SimConfig": ".sim", "SimResult": ".sim", "sim_plan": ".sim", "SimPlanResult": ".sim",
    "open_checkpoint": ".runtime.checkpoint", "write_random_checkpoint": ".runtime.checkpoint",
    "load_tokenizer": ".runtime.tokenizer", "load_params": ".runtime.model", "generate": ".runtime.model",
    "run_plan": ".runtime.head", "RunOptions": ".runtime.head", "RunResult": ".runtime.head",
    "cached_random_weights": ".runtime.head",
    "profile_device": ".profile.profiler",
    "validate": ".loop.validate", "ValidateConfig": ".loop.validate", "predict": ".loop.validate",
    "reproduce": ".loop.reproduce", "target_names": ".loop.reproduce", "plot_timeline": ".loop.reproduce",
    "run_sweep": ".loop.sweep", "load_sweep_spec": ".loop.sweep", "load_sweep": ".loop.sweep",
    "sweep_report": ".loop.sweep",
}

__all__ = sorted([
    "ClusterSpec", "LinkSpec", "NetworkSpec", "builtin_clusters", "load_cluster", "DeviceSpec", "GPUSpec",
    "CheckpointError", "EmulationError", "PlanError", "PrimasimError", "SpecError", "WireError", "WorkerError",
    "ModelSpec", "catalogue", "load_model", "DevicePlan", "Plan", "runtime_model", "SYSTEMS", "Metrics", "Trace",
    "metrics", *_LAZY,
])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'primasim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
