"""primasim: predict, plan and run LLM inference on home clusters of weak, mixed devices."""

from ._errors import PrimasimError as PrimasimError, SpecError as SpecError
from ._model import ModelSpec as ModelSpec, catalogue as catalogue, load_model as load_model

__version__ = "0.1.0"

# Planning API (cost model, Halda, planners), loaded on first use so `import primasim` stays light.
_LAZY = {
    "halda": "._halda", "HaldaResult": "._halda",
    "make_plan": "._planners", "PlanOutcome": "._planners", "SYSTEMS": "._planners",
    "predict_tpot": "._cost", "predict_ttft": "._cost", "memory_pressure": "._cost",
    "coefficients": "._cost", "device_sets": "._cost", "Coefficients": "._cost", "DeviceCorrection": "._cost",
    "reproduce": "._reproduce", "plot_timeline": "._reproduce",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'primasim' has no attribute {name!r}")
