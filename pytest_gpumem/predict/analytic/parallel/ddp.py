"""DDP (accelerate's MULTI_GPU): every rank holds the whole model, as on one GPU, plus the Reducer's buckets."""

from __future__ import annotations

from typing import Callable

from .. import params
from ..constants import C
from ..context import Ctx
from .base import Shares, Strategy, none_host, shares_of


def _ddp_shares(ctx: Ctx, rank: int) -> Shares:
    return shares_of(ctx, rank, ctx.spec.num_params)


def _ddp_persistent(ctx: Ctx, shares: Shares) -> dict:
    """DDP replicates everything, as on one GPU; its Reducer keeps flat buckets covering every gradient
    (torch DDP docs, ``gradient_as_bucket_view``: "the saved memory size will be equal to the total gradients
    size" when on; accelerate 1.16's DistributedDataParallelKwargs default is ``gradient_as_bucket_view=False``)."""
    parts = {C.WEIGHTS: params.base_weight_bytes(ctx), C.OPTIMIZER_STATES: params.optimizer_state_bytes(ctx),
             C.REDUCE_BUCKETS: params.gradient_bytes(ctx)}
    if ctx.setup.is_lora:
        parts[C.LORA] = ctx.lora_params * params.lora_bytes_per_param(ctx)
    reference = params.reference_weight_bytes(ctx)
    if reference:
        parts[C.REFERENCE] = reference
    return parts


def _keep(*names: str) -> Callable[..., dict]:
    """A phase whose model states are the one-GPU ones (``names`` kept from the one-GPU phase)."""
    def phase(ctx: Ctx, shares: Shares, one_gpu: dict, moment: str | None = None) -> dict:
        return {name: one_gpu[name] for name in names if name in one_gpu}
    return phase


DDP = Strategy(name="ddp", label="DDP", shares=_ddp_shares, persistent=_ddp_persistent,
               generation=_keep(), scoring=_keep(), training=_keep(C.GRADIENTS),
               optimizer_step=_keep(C.GRADIENTS, C.OPTIMIZER_TEMP), host=none_host)
