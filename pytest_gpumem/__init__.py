"""pytest-gpumem: GPU memory of GRPO training as a predicted, simulated, measured and tested quantity.

The public API. Pure Python at import time: torch, transformers, trl, vllm and pynvml are imported only by the
functions that need them. Every name but the errors and the version is loaded on first use (PEP 562
``__getattr__``): importing the pytest plugin (``pytest_gpumem.plugin``) imports this package first, in every
pytest run of an environment that has it installed, and the estimate's modules alone cost that run ≈ 20 ms
(tests/test_layers.py's LAZY table; README "What the plugin costs"). ``simulate`` (the FakeTensor
simulation, the ``[sim]`` extra) is never loaded by the plugin, and neither is torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import GpuMemError, SetupError, UnknownModelError  # light (no imports): loaded with the package
from .versions import PACKAGE_VERSION as __version__  # importlib.metadata, which pytest has imported already

if TYPE_CHECKING:  # what the names are, for type checkers and editors; at run time __getattr__ loads them
    from .breakdown import Breakdown, Component, Phase
    from .gpus import resolve_gpu
    from .models import ModelSpec, resolve_model
    from .predict.analytic import Estimate, estimate
    from .predict.faketensor import simulate
    from .spec import GRPOSetup
    from .units import format_both, parse_size

__all__ = [
    "Breakdown", "Component", "Phase", "GpuMemError", "SetupError", "UnknownModelError", "Estimate",
    "estimate", "resolve_gpu", "ModelSpec", "resolve_model", "GRPOSetup", "format_both", "parse_size",
    "__version__", "simulate",
]


def __getattr__(name: str) -> Any:
    if name in ("Breakdown", "Component", "Phase"):
        from . import breakdown as module
    elif name == "resolve_gpu":
        from . import gpus as module
    elif name in ("ModelSpec", "resolve_model"):
        from . import models as module
    elif name in ("Estimate", "estimate"):
        from .predict import analytic as module
    elif name == "GRPOSetup":
        from . import spec as module
    elif name in ("format_both", "parse_size"):
        from . import units as module
    elif name == "simulate":
        from .predict.faketensor import simulate  # the [sim] extra: loaded on first use, never with the plugin

        return simulate
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # once loaded, a plain attribute (no __getattr__ call on the next access)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
