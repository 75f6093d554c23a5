"""Guard a real training run: ``GRPOTrainer(..., callbacks=[GpuMemCallback()])`` and ``explain_oom(trainer)``.

The only layer that imports transformers at its top (it subclasses ``transformers.TrainerCallback``); nothing in the
package imports it, so ``import pytest_gpumem`` and the pytest plugin stay free of torch. README "In your training
script" shows the use.
"""

from .callback import GpuMemCallback, PredictedOverrunError, StepMemory
from .oom import explain_oom

__all__ = ["GpuMemCallback", "PredictedOverrunError", "StepMemory", "explain_oom"]
