"""primasim: predict, plan and run LLM inference on home clusters of weak, mixed devices."""

from ._errors import PrimasimError as PrimasimError, SpecError as SpecError
from ._model import ModelSpec as ModelSpec, catalogue as catalogue, load_model as load_model

__version__ = "0.1.0"
