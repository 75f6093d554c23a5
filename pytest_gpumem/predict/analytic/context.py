"""What every calculator of the estimate reads (:class:`Ctx`) and what it may write (:class:`Notes`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...backends import Backend
from ...gpus import GPU
from ...models import ModelSpec
from ...spec import GRPOSetup
from .constants import DTYPE_BYTES


@dataclass
class Notes:
    """What an estimate says besides its numbers, collected while it is computed."""

    assumptions: list[str]
    warnings: list[str] = field(default_factory=list)
    #: (phase, description, bytes) of single allocations, for the largest one an OOM would report
    tensors: list[tuple[str, str, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Ctx:
    """One estimate's inputs, resolved once: every calculator is a function of a Ctx."""

    setup: GRPOSetup
    spec: ModelSpec
    gpu: GPU | None
    backend: Backend
    notes: Notes
    #: the adapted Linears (resolved once: the estimate asks for them many times)
    lora_targets: frozenset
    #: LoRA (PEFT): an adapted Linear adds ``r · (in + out)`` (docs/memory-model.md §4); 0 without LoRA
    lora_params: int
    weight_bytes_per_param: int
    #: the residual stream's dtype: fp32 weights under bf16 autocast keep an fp32 residual stream (linears emit
    #: bf16, the adds promote to fp32); bf16 weights keep it bf16
    residual_bytes: int
    #: LoRA adapters in bf16 (a quantised base under a backend that casts them); else fp32
    adapters_bf16: bool
    #: bytes per element of what the Linears compute in: 2 under bf16/fp16 autocast or 16-bit weights; 4 for
    #: pure fp32 (``bf16=False`` and no ``fp16`` with fp32 weights: no autocast, every activation fp32)
    compute_bytes: int = 2
    #: the dtype the weights were loaded in (the setup's); the compute dtype differs under ZeRO / FSDP, whose
    #: mixed precision computes in bf16 whatever was loaded
    loaded_dtype: str = ""

    @classmethod
    def of(cls, setup: GRPOSetup, gpu: GPU | None, loaded_dtype: str | None = None,
           adapters_bf16: bool = False) -> "Ctx":
        spec = setup.model_spec
        backend = setup.backend_profile
        targets = frozenset(setup.resolve_target_modules()) if setup.is_lora else frozenset()
        lora_params = 0
        if setup.is_lora:
            shapes = spec.linear_shapes()
            per_layer = sum(shapes[name][0] + shapes[name][1] for name in targets)
            lora_params = setup.lora_rank * per_layer * spec.num_hidden_layers
        return cls(setup=setup, spec=spec, gpu=gpu, backend=backend, notes=Notes(list(setup.resolution_notes)),
                   lora_targets=targets, lora_params=lora_params, weight_bytes_per_param=DTYPE_BYTES[setup.dtype],
                   residual_bytes=4 if setup.dtype == "float32" else 2,
                   adapters_bf16=adapters_bf16 or bool(setup.load_in_4bit and backend.adapters_bf16_on_4bit_base),
                   compute_bytes=4 if (setup.dtype == "float32" and setup.bf16 is False and not setup.fp16) else 2,
                   loaded_dtype=loaded_dtype or setup.dtype)

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch: ``b · L``."""
        return self.setup.per_device_train_batch_size * self.setup.seq_len

    @property
    def pass_tokens(self) -> int:
        """Tokens of one forward pass of the loss: the micro-batch, or one of Unsloth's ``unsloth_grpo_mini_batch``
        passes (``ceil(b / passes)`` rows; None: one pass — Unsloth's autotune depends on the free memory)."""
        passes = self.setup.unsloth_grpo_mini_batch
        if not (passes and self.backend.mini_batch_passes):
            return self.tokens
        b = self.setup.per_device_train_batch_size
        return -(-b // min(passes, b)) * self.setup.seq_len
