"""The multi-GPU levers: a stronger sharding strategy, offload, more GPUs, FSDP resharding, smaller DeepSpeed
buckets — each a one-step change that :func:`~.levers.rank_levers` re-estimates like any other lever.

A lever that switches strategy names ``distributed`` in its changes; applying it drops the old strategy's own
knobs (``GRPOSetup.with_strategy``)."""

from __future__ import annotations

from typing import Any

from ..distributed import DEFAULT_PREFETCH_BUCKET_ELEMENTS, DEFAULT_REDUCE_BUCKET_ELEMENTS, ZERO_STRATEGIES

#: a DeepSpeed bucket lever divides by this (5e8 → 5e7 elements, the size DeepSpeed's own tuning guide tries
#: first for memory); the prefetch bucket likewise from 5e7
BUCKET_DIVISOR = 10
#: tensor-parallel sizes worth proposing: vLLM's custom all-reduce supports 2, 4, 6, 8 ranks; beyond one node's 8
#: GPUs TP crosses the network
MAX_TENSOR_PARALLEL = 8


def strategy_candidates(s: Any) -> list[tuple[str, dict[str, Any], str]]:
    """``(name, {field: new value}, trade_off)`` for every multi-GPU lever that applies to ``s``."""
    if not s.is_distributed:
        return []
    out: list[tuple[str, dict[str, Any], str]] = []
    n = s.world_size
    if s.distributed in ("ddp", "zero1"):
        out.append(("ZeRO-2", {"distributed": "zero2"},
                    "gradients and optimizer states partitioned: a reduce-scatter per bucket instead of one "
                    "all-reduce"))
    if s.distributed in ("ddp", "zero1", "zero2"):
        out.append(("ZeRO-3", {"distributed": "zero3"},
                    "parameters partitioned too: every layer all-gathered in forward and backward (more "
                    "communication); HF generate gathers the whole model per rank"))
    if s.distributed == "ddp":
        out.append(("FSDP2", {"distributed": "fsdp2"},
                    "fully sharded (fp32 shards, bf16 compute): per-layer all-gathers and reduce-scatters"))
    if s.distributed in ZERO_STRATEGIES and not s.offload_optimizer:
        out.append(("optimizer offload", {"offload_optimizer": True},
                    "fp32 master and optimizer states in pinned host memory, the step on the CPU "
                    "(DeepSpeedCPUAdam): slower step, host RAM per machine (see the host role)"))
    if s.distributed == "zero3" and s.offload_optimizer and not s.offload_params:
        out.append(("parameter offload", {"offload_params": True},
                    "bf16 parameter partitions in host memory: every gather goes over PCIe, much slower"))
    if s.distributed in ("fsdp1", "fsdp2") and not s.offload_params:
        out.append(("FSDP CPU offload", {"offload_params": True},
                    "parameters, gradients and the optimizer step on the host: much slower step"))
    if s.distributed in ("fsdp1", "fsdp2") and not s.reshard_after_forward:
        out.append(("reshard after forward", {"reshard_after_forward": True},
                    "each unit all-gathered again in backward: more communication"))
    if s.distributed in ("fsdp1", "fsdp2") and s.fsdp_wrap == "none":
        out.append(("wrap each decoder layer", {"fsdp_wrap": "transformer_layer"},
                    "one FSDP unit per decoder layer (accelerate's TRANSFORMER_BASED_WRAP): more, smaller "
                    "collectives"))
    if s.distributed in ZERO_STRATEGIES and s.reduce_bucket_size >= DEFAULT_REDUCE_BUCKET_ELEMENTS // BUCKET_DIVISOR:
        smaller = s.reduce_bucket_size // BUCKET_DIVISOR
        out.append(("smaller reduce bucket", {"reduce_bucket_size": smaller},
                    "more, smaller gradient reductions: slower backward on a slow interconnect"))
    if s.distributed == "zero3" and s.stage3_prefetch_bucket_size >= DEFAULT_PREFETCH_BUCKET_ELEMENTS // 2:
        out.append(("smaller prefetch bucket", {"stage3_prefetch_bucket_size": s.stage3_prefetch_bucket_size // 2},
                    "less of the next layers gathered ahead: less overlap of communication with compute"))
    if s.distributed in ("zero1", "zero2") and s.overlap_comm:
        out.append(("overlap_comm off", {"overlap_comm": False},
                    "one IPG bucket instead of two: gradient reduction no longer overlaps the backward"))
    if s.distributed not in ("ddp",):
        out.append(("twice the GPUs", {"world_size": 2 * n},
                    f"needs {2 * n} GPUs; every shard halves (activations and generation do not)"))
    return out


def generation_candidates(s: Any) -> list[tuple[str, dict[str, Any], str]]:
    """Training-GPU levers: a colocated TP group twice as wide (each rank holds half the vLLM weights)."""
    out: list[tuple[str, dict[str, Any], str]] = []
    tp = s.vllm_tensor_parallel_size
    if s.use_vllm and s.vllm_mode == "colocate" and s.world_size % (2 * tp) == 0 and 2 * tp <= MAX_TENSOR_PARALLEL:
        out.append(("colocated vLLM tensor parallel ×2", {"vllm_tensor_parallel_size": 2 * tp},
                    f"each vLLM shard spans {2 * tp} training ranks: its weights halve, an all-reduce per layer "
                    "and every rank decodes the whole group's prompts"))
    return out
