"""How the child loads a model and starts a trainer, per backend: the :class:`TrainerBackend` protocol and the
table of its implementations, keyed by the setup's ``backend`` (``backends.BACKENDS`` holds each backend's
defaults and traits; this is the measurement side of the same names).

A new backend (DeepSpeed ZeRO-3, say) is one module here implementing the protocol, one row in
:data:`TRAINER_BACKENDS`, and a profile in ``pytest_gpumem/backends.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import trl, unsloth

if TYPE_CHECKING:
    from ..process import Child


class TrainerBackend(Protocol):
    """What the child asks of a backend, in the order it asks."""

    #: the model must be loaded from a saved directory (the backend's loader reads one)
    needs_model_dir: bool

    def check(self, child: Child) -> None:
        """Raise ``results.Skip`` when this backend cannot run here (not installed, needs CUDA)."""

    def import_first(self) -> None:
        """Imports that must come before transformers and trl (Unsloth patches them)."""

    def load(self, child: Child, model_dir: Path, tokenizer: Any) -> tuple[Any, Any, Any]:
        """``(model, tokenizer, peft_config)`` from ``model_dir``, ready for the trainer."""

    def before_trainer(self, child: Child) -> None:
        """Called just before ``GRPOTrainer`` is built (e.g. to measure vLLM's start-up)."""


#: the setup's ``backend`` -> its implementation
TRAINER_BACKENDS: dict[str, TrainerBackend] = {"trl": trl.TRL, "unsloth": unsloth.UNSLOTH}
