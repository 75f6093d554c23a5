"""What every strategy shares: :class:`Shares` (what a rank owns), :class:`Strategy` (one row of the table), the
NCCL figures and the per-phase adjuster that ``phases.step`` applies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from ....breakdown import Role
from ....spec import OPTIMIZERS
from ....vllm_layout import is_server, server_gpus
from ..constants import C, P
from ..context import Ctx
from ..params import trainable_params

#: NCCL communicator buffers per rank, non-torch: ≈ 544 MB for a 2-GPU communicator and 688 MB for more than 2
#: GPUs on A100 (NVIDIA/nccl#964, measured by the reporter with nvidia-smi; docs/distributed.md §3)
NCCL_BYTES_TWO_GPUS = 544 * 10**6
NCCL_BYTES_MORE_GPUS = 688 * 10**6
#: the components a strategy replaces in every phase (the model states)
MODEL_STATES = (C.WEIGHTS, C.LORA, C.OPTIMIZER_STATES, C.REFERENCE, C.GRADIENTS, C.OPTIMIZER_TEMP)


@dataclass(frozen=True)
class Shares:
    """What one rank owns, in elements: its share of the policy's parameters, of the trained ones, of the frozen
    ones (a LoRA base), and the sizes the gathers are made of."""

    world_size: int
    rank: int
    params: int
    trainable: int
    #: trained parameters in all (Ψ, or the LoRA adapters)
    trainable_total: int


@dataclass(frozen=True)
class Strategy:
    """One sharding strategy: a function per phase returning the rank's model states and transients for it
    (``phase(ctx, shares, one_gpu_parts) -> {component: bytes}``; ``training`` also gets the moment of the
    micro-step, one of ``phases.MOMENTS``), and ``host`` for offloaded memory."""

    name: str
    label: str
    shares: Callable[[Ctx, int], Shares]
    persistent: Callable[[Ctx, Shares], dict]
    generation: Callable[[Ctx, Shares, dict], dict]
    scoring: Callable[[Ctx, Shares, dict], dict]
    training: Callable[[Ctx, Shares, dict, str | None], dict]
    optimizer_step: Callable[[Ctx, Shares, dict], dict]
    host: Callable[[Ctx, Shares], dict]


def optimizer_state_bytes_per_element(ctx: Ctx) -> int:
    """Optimizer state bytes per trained element on an fp32 partition / fp32 master (AdamW: exp_avg + exp_avg_sq
    in fp32 = 8; bitsandbytes' 8-bit states 2): ZeRO and FSDP step on fp32 parameters."""
    state_bytes, _ = OPTIMIZERS[ctx.setup.optim]
    return state_bytes


def foreach_temp(ctx: Ctx, elements: int) -> int:
    """foreach AdamW's state-sized fp32 temporary inside ``step()`` (fused: none), over ``elements``."""
    _, temp = OPTIMIZERS[ctx.setup.optim]
    return elements * 4 if temp else 0


def nccl_bytes(world_size: int) -> int:
    if world_size <= 1:
        return 0
    return NCCL_BYTES_TWO_GPUS if world_size == 2 else NCCL_BYTES_MORE_GPUS


def shares_of(ctx: Ctx, rank: int, params: int, trainable: int | None = None) -> Shares:
    """Rank ``rank``'s :class:`Shares`: ``params`` of the policy's parameters, ``trainable`` of the trained ones
    (default: all of them — nothing partitioned)."""
    total = trainable_params(ctx)
    return Shares(world_size=ctx.setup.world_size, rank=rank, params=params,
                  trainable=total if trainable is None else trainable, trainable_total=total)


def rank0_server_nccl_bytes(ctx: Ctx, shares: Shares) -> int:
    """vLLM server mode: only the main process joins the server's weight-transfer group ("The trainer joins the
    vLLM workers as an extra rank; it is rank 0", trl 1.16 ``VLLMClient.init_communicator``, called under
    ``if accelerator.is_main_process`` in ``vllm_generation.py``) — one more NCCL communicator on rank 0 only,
    of the server's T × D workers + 1."""
    if shares.rank != 0 or not is_server(ctx.setup):
        return 0
    return transfer_group_nccl_bytes(ctx.setup)


def transfer_group_nccl_bytes(setup) -> int:
    """The weight-transfer group's NCCL communicator: the server's T × D workers + the trainer's rank 0."""
    return nccl_bytes(server_gpus(setup) + 1)


def role_ranks(world_size: int) -> dict[str, int]:
    """The GPU roles of a job and the rank standing for each."""
    if world_size == 1:
        return {Role.RANK0.value: 0}
    return {Role.RANK0.value: 0, Role.OTHER_RANKS.value: 1}


def adjuster(ctx: Ctx, strategy: Strategy, shares: Shares) -> Callable[[str, dict], dict]:
    """What ``phases.step`` applies to each phase before the allocator slack: the model states replaced by the
    rank's, the strategy's transients added, and NCCL's buffers."""
    persistent = strategy.persistent(ctx, shares)
    by_phase = {P.PERSISTENT: None, P.GENERATION: strategy.generation, P.SCORING: strategy.scoring,
                P.TRAINING: strategy.training, P.OPTIMIZER: strategy.optimizer_step}

    def adjust(phase: str, parts: dict, moment: str | None = None) -> dict:
        one_gpu = dict(parts)
        rank_parts = {k: v for k, v in parts.items() if k not in MODEL_STATES}
        rank_parts.update(persistent)
        extra = by_phase.get(phase)
        if extra is not None:
            # the training phase also says which moment of the micro-step it is (phases.MOMENTS)
            made = extra(ctx, shares, one_gpu, moment) if phase == P.TRAINING else extra(ctx, shares, one_gpu)
            for name, num_bytes in made.items():
                rank_parts[name] = rank_parts.get(name, 0) + num_bytes if name not in MODEL_STATES else num_bytes
        rank_parts[C.NCCL_BUFFERS] = nccl_bytes(shares.world_size) + rank0_server_nccl_bytes(ctx, shares)
        return rank_parts

    return adjust


def host_phases(ctx: Ctx, strategy: Strategy, shares: Shares) -> Mapping[str, dict] | None:
    """One machine's offloaded memory (every local rank's share), or None when nothing is offloaded. The same
    in every phase: the offloaded states live for the whole run."""
    per_rank = strategy.host(ctx, shares)
    if not per_rank:
        return None
    local_ranks = ctx.setup.world_size // ctx.setup.num_machines
    machine = {name: num_bytes * local_ranks for name, num_bytes in per_rank.items()}
    return {P.PERSISTENT: machine}


def none_host(ctx: Ctx, shares: Shares) -> dict:
    return {}
