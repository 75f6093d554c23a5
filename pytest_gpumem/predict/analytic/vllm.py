"""Colocated vLLM: its reservation (weights, activation peak, non-torch, CUDA graphs, KV pool), sleep mode,
and the start-up checks that make vLLM refuse to start (docs/memory-model.md §3, §3.1).

Version-dependent vLLM behaviour (the CUDA-graph accounting changed in 0.21) belongs here, keyed by the vLLM
version, when more than one version is modelled.
"""

from __future__ import annotations

from ...units import format_gib
from .constants import (
    CUDA_CONTEXT_BYTES,
    NF4_BYTES_PER_PARAM,
    VLLM_CUDA_GRAPH_BYTES,
    VLLM_MAX_BATCHED_TOKENS,
    VLLM_NON_TORCH_BYTES,
    C,
)
from .context import Ctx


def colocated(ctx: Ctx) -> bool:
    return bool(ctx.setup.use_vllm and ctx.setup.vllm_mode == "colocate")


def kv_cache_bytes(budget_bytes: int, weights_bytes: int, activation_peak_bytes: int, non_torch_bytes: int,
                   cuda_graph_bytes: int = 0) -> int:
    """vLLM's KV pool: ``util × total − (weights + activation peak + non-torch)`` − the CUDA-graph estimate
    (counted inside the budget since vLLM 0.21). The pool fills its budget whatever the workload
    (docs/memory-model.md §3; e.g. 71.39 − 9.69 − 1.27 − 2.95 = 57.48 GiB in a published start-up log)."""
    return budget_bytes - weights_bytes - activation_peak_bytes - non_torch_bytes - cuda_graph_bytes


def weight_bytes(ctx: Ctx) -> int:
    """vLLM's own copy of the weights: bf16 from the checkpoint's dtype, or bitsandbytes 4-bit linears."""
    spec = ctx.spec
    if ctx.setup.load_in_4bit:
        return int(spec.linear_params() * NF4_BYTES_PER_PARAM) + (spec.num_params - spec.linear_params()) * 2
    return spec.num_params * 2


def activation_peak(ctx: Ctx) -> int:
    """vLLM profiles one dummy forward of max_num_batched_tokens tokens: the MLP's gate/up outputs and
    activation (3·I) plus norms/attention (4·h) in bf16, and the sampler's fp32 logits for max_num_seqs rows.
    Checked against the measured 0.32 GiB at 4096 tokens for a 7.56 GiB model (docs/memory-model.md §3)."""
    spec = ctx.spec
    intermediate = spec.moe_intermediate_size * spec.num_experts_per_tok if spec.is_moe else spec.intermediate_size
    tokens = VLLM_MAX_BATCHED_TOKENS
    max_num_seqs = ctx.setup.generation_batch_size
    return tokens * (3 * intermediate + 4 * spec.hidden_size) * 2 + max_num_seqs * spec.vocab_size * 4 * 2


def reservation(ctx: Ctx) -> dict[str, int]:
    """Colocated vLLM: ``gpu_memory_utilization × total`` split into weights, activation peak, non-torch,
    CUDA graphs and KV cache (the pool fills the rest of the budget; docs/memory-model.md §3)."""
    setup = ctx.setup
    if not colocated(ctx):
        return {}
    vllm_weights = weight_bytes(ctx)
    activations = activation_peak(ctx)
    if ctx.gpu is not None:
        total = ctx.gpu.total_bytes
        if ctx.backend.vllm.budget_excludes_context:
            # the utilisation scales the memory free when vLLM starts (first, on an empty card)
            budget = int(setup.vllm_gpu_memory_utilization * (total - CUDA_CONTEXT_BYTES))
        else:
            budget = int(setup.vllm_gpu_memory_utilization * total)
        kv_cache = kv_cache_bytes(budget, vllm_weights, activations, VLLM_NON_TORCH_BYTES, VLLM_CUDA_GRAPH_BYTES)
    else:
        # without a card the reservation is unknown: size the KV pool for one generation batch
        kv_cache = setup.generation_batch_size * ctx.spec.kv_cache_bytes(setup.seq_len)
        ctx.notes.assumptions.append("no GPU given: vLLM's KV cache sized for one generation batch; on a card it "
                                     "fills gpu_memory_utilization × total — pass gpu= for the real reservation")
    return {C.VLLM_WEIGHTS: vllm_weights, C.VLLM_ACTIVATIONS: activations, C.VLLM_NON_TORCH: VLLM_NON_TORCH_BYTES,
            C.VLLM_CUDA_GRAPHS: VLLM_CUDA_GRAPH_BYTES, C.VLLM_KV_CACHE: max(kv_cache, 0)}


def awake(ctx: Ctx, persistent: dict[str, int]) -> dict[str, int]:
    """The persistent parts outside generation: sleep mode (level 2) frees vLLM's weights and KV cache there;
    graphs, non-torch and the context stay (docs/memory-model.md §3)."""
    if not (colocated(ctx) and ctx.setup.vllm_enable_sleep_mode):
        return dict(persistent)
    return {k: v for k, v in persistent.items() if k not in (C.VLLM_WEIGHTS, C.VLLM_KV_CACHE, C.VLLM_ACTIVATIONS)}


def check_start(ctx: Ctx, persistent: dict[str, int]) -> None:
    """vLLM refuses to start when free memory < util × total; its KV pool must hold one full sequence."""
    setup = ctx.setup
    if not colocated(ctx) or ctx.gpu is None:
        return
    total = ctx.gpu.total_bytes
    desired = int(setup.vllm_gpu_memory_utilization * total)
    warnings = ctx.notes.warnings
    if ctx.backend.vllm.policy_loaded_first:
        # in colocate mode the policy (and a reference model) is on the GPU before vLLM starts
        already = CUDA_CONTEXT_BYTES + persistent.get(C.WEIGHTS, 0) \
            + persistent.get(C.LORA, 0) + persistent.get(C.REFERENCE, 0)
        free = total - already
        if free < desired:
            warnings.append(
                f"vLLM would refuse to start: free memory on device ({format_gib(free)}) is less than desired GPU "
                f"memory utilization ({setup.vllm_gpu_memory_utilization} × {format_gib(total)} = "
                f"{format_gib(desired)}); lower vllm_gpu_memory_utilization to ≤ {free / total:.2f}")
    kv_cache = persistent.get(C.VLLM_KV_CACHE, 0)
    one_sequence = ctx.spec.kv_cache_bytes(setup.seq_len)
    if kv_cache < one_sequence:
        warnings.append(
            f"vLLM would refuse to start: its KV cache ({format_gib(kv_cache)}) cannot hold one sequence of "
            f"{setup.seq_len} tokens ({format_gib(one_sequence)}); raise vllm_gpu_memory_utilization or shorten "
            "max_prompt_length + max_completion_length")
