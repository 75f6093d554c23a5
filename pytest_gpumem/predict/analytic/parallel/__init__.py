"""The sharding step of the estimate: what one rank of a multi-GPU job keeps and gathers, per strategy.

The one-GPU phases (``phases.py``) say what a micro-step's activations, logits and generation cost; those are
per process and do not change with the world size. A :class:`Strategy` replaces the *model states* of each
phase — weights, LoRA, optimizer states, the reference model, gradients, the optimizer's temporaries — with
what one rank holds under it, and adds the strategy's transients (gathered parameters, reduce buckets, the
weight sync to vLLM). A strategy is one row of :data:`STRATEGIES`: ``ddp`` here, ``zero1``/``zero2``/``zero3`` in
:mod:`.zero`, ``fsdp1``/``fsdp2`` in :mod:`.fsdp`; each formula cites its source there.

Roles: rank 0 (the largest padded shard) and the worst other rank (rank 1: FSDP2's dim-0 chunks shrink towards
the last rank) are GPUs; ``host`` is one machine's CPU memory when optimizer states or parameters are offloaded.
"""

from __future__ import annotations

from . import shapes
from .base import Shares, Strategy, adjuster, host_phases, role_ranks
from .roles import STRATEGIES, estimate_roles

__all__ = ["STRATEGIES", "Shares", "Strategy", "adjuster", "estimate_roles", "host_phases", "role_ranks", "shapes"]
