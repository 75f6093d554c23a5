"""pytest-gpumem: GPU memory of GRPO training as a predicted, simulated, measured and tested quantity.

The public API. Pure Python at import time: torch, transformers, trl, vllm and pynvml are imported only by the
functions that need them. ``simulate`` (the FakeTensor simulation, the ``[sim]`` extra) is loaded on first
use, so importing the package — or the pytest plugin — imports neither it nor torch.
"""

from typing import Any

from .breakdown import Breakdown, Component, Phase
from .errors import GpuMemError, SetupError, UnknownModelError
from .gpus import resolve_gpu
from .models import ModelSpec, resolve_model
from .predict.analytic import Estimate, estimate
from .spec import GRPOSetup
from .units import format_both, parse_size
from .versions import PACKAGE_VERSION as __version__

__all__ = [
    "Breakdown", "Component", "Phase", "GpuMemError", "SetupError", "UnknownModelError", "Estimate",
    "estimate", "resolve_gpu", "ModelSpec", "resolve_model", "GRPOSetup", "format_both", "parse_size",
    "__version__", "simulate",
]


def __getattr__(name: str) -> Any:
    if name == "simulate":
        from .predict.faketensor import simulate  # the [sim] extra: loaded on first use, never with the plugin

        return simulate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
