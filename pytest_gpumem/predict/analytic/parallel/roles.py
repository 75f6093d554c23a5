"""A multi-GPU estimate: the one-GPU phases re-run per role with the strategy's sharding step."""

from __future__ import annotations

import dataclasses

from ....breakdown import Breakdown, Role
from ....spec import GRPOSetup
from .. import phases, vllm_parallel
from ..context import Ctx
from . import ddp, fsdp, zero
from .base import adjuster, host_phases, nccl_bytes, role_ranks

#: distributed name -> strategy (``none`` is the one-GPU estimate itself)
STRATEGIES = {"ddp": ddp.DDP, **zero.STRATEGIES, **fsdp.STRATEGIES}


def compute_ctx(ctx: Ctx) -> Ctx:
    """ZeRO and FSDP under accelerate's ``mixed_precision: bf16`` compute in bf16 whatever the model was loaded
    in (DeepSpeed casts the module; FSDP's ``param_dtype``): activations, logits and gradients are those of a
    bf16 model. DDP keeps the loaded dtype under autocast, as on one GPU."""
    setup = ctx.setup
    if setup.distributed not in zero.STRATEGIES and setup.distributed not in fsdp.STRATEGIES:
        return ctx
    bf16 = setup.replace(dtype="bfloat16") if setup.dtype != "bfloat16" else setup
    compute = Ctx.of(bf16, ctx.gpu, loaded_dtype=setup.dtype, adapters_bf16=setup.distributed in zero.STRATEGIES)
    return dataclasses.replace(compute, notes=ctx.notes)


def estimate_roles(ctx: Ctx) -> tuple[Breakdown, dict[str, int], Ctx]:
    """(the per-role breakdown, rank 0's persistent parts, the compute context) of a multi-GPU setup."""
    setup: GRPOSetup = ctx.setup
    strategy = STRATEGIES[setup.distributed] if setup.distributed != "none" else ddp.DDP
    compute = compute_ctx(ctx)
    roles, rank0_persistent, host = {}, {}, None
    # generation across GPUs (vllm_parallel): a colocated TP rank's vLLM shard, a server's sync and GPUs
    colocated = vllm_parallel.colocate_reservation(compute) if vllm_parallel.colocate_tp(compute) > 1 else None
    server = vllm_parallel.server_mode(compute)
    for role, rank in role_ranks(setup.world_size).items():
        shares = strategy.shares(compute, rank)
        adjust = adjuster(compute, strategy, shares)
        if colocated is not None:
            adjust = vllm_parallel.colocate_adjuster(colocated, adjust)
        if server:
            adjust = vllm_parallel.server_sync_adjuster(compute, rank, adjust)
        by_phase, persistent = phases.step(compute, adjust)
        roles[role] = by_phase
        if rank == 0:
            rank0_persistent = persistent
            host = host_phases(compute, strategy, shares)
    if server:
        roles[Role.VLLM_SERVER.value] = vllm_parallel.server_phases(compute)
    if host is not None:
        roles[Role.HOST.value] = host
    _note(ctx, strategy.label)
    return Breakdown.from_roles(roles, source="estimate"), rank0_persistent, compute


def _note(ctx: Ctx, label: str) -> None:
    setup, add = ctx.setup, ctx.notes.assumptions.append
    add(f"{label} on {setup.world_size} GPU(s) ({setup.num_machines} machine(s)): per-rank memory, the worst "
        "training rank shown; activations, logits and generation are per process")
    if setup.distributed in zero.STRATEGIES or setup.distributed in fsdp.STRATEGIES:
        add("mixed_precision bf16 (as TRL's accelerate configs): compute weights in bf16, fp32 master / sharded "
            "parameters for the optimizer")
    if setup.world_size > 1:
        add(f"NCCL communicator buffers: {nccl_bytes(setup.world_size) / 1e6:.0f} MB per rank, non-torch "
            "(A100 figures, NVIDIA/nccl#964)")
