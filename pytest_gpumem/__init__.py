"""pytest-gpumem: GPU memory of GRPO training as a predicted, simulated, measured and tested quantity.

Pure-Python at import time: torch, transformers, trl, vllm and pynvml are imported only by the functions
that need them (simulate, measure, run).
"""

from .breakdown import Breakdown, Component, Phase
from .errors import GpuMemError, SetupError, UnknownModelError
from .predict.analytic import Estimate, estimate
from .gpus import resolve_gpu
from .models import ModelSpec, resolve_model
from .spec import GRPOSetup
from .units import format_both, parse_size
from .versions import PACKAGE_VERSION as __version__


__all__ = [
    "Breakdown", "Component", "Phase", "GpuMemError", "SetupError", "UnknownModelError", "Estimate",
    "estimate", "resolve_gpu", "ModelSpec", "resolve_model", "GRPOSetup", "format_both", "parse_size",
    "__version__",
]
