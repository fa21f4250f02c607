"""primasim: predict, plan and run LLM inference on home clusters of weak, mixed devices."""

from .core.errors import PrimasimError as PrimasimError, SpecError as SpecError
from .core.model import ModelSpec as ModelSpec, catalogue as catalogue, load_model as load_model

__version__ = "0.1.0"

# Planning API (cost model, Halda, planners), loaded on first use so `import primasim` stays light.
_LAZY = {
    "halda": ".plan.halda", "HaldaResult": ".plan.halda",
    "make_plan": ".plan.planners", "PlanOutcome": ".plan.planners", "SYSTEMS": ".plan.planners",
    "predict_tpot": ".plan.cost", "predict_ttft": ".plan.cost", "memory_pressure": ".plan.cost",
    "coefficients": ".plan.cost", "device_sets": ".plan.cost", "Coefficients": ".plan.cost", "DeviceCorrection": ".plan.cost",
    "reproduce": ".loop.reproduce.framework", "plot_timeline": ".loop.reproduce.framework",
    "run_sweep": ".loop.sweep", "load_sweep_spec": ".loop.sweep", "load_sweep": ".loop.sweep",
    "sweep_report": ".loop.sweep",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'primasim' has no attribute {name!r}")
