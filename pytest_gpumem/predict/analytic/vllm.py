"""Colocated vLLM: its reservation (weights, activation peak, non-torch, CUDA graphs, KV pool), sleep mode and
Unsloth's standby, and the start-up checks that make vLLM refuse to start (docs/memory-model.md §3, §3.1).

What changes with the vLLM release (``vllm_version``, the installed vllm by default), each boundary read in
that release's source (wheels from PyPI, ``vllm/...`` paths below):

* **the budget** is ``gpu_memory_utilization × total`` in every modelled release (V0 ``vllm/worker/worker.py``
  0.8.5 l. 253–258: ``memory_for_current_instance = total_gpu_memory * gpu_memory_utilization``;
  V1 ``vllm/v1/worker/gpu_worker.py`` 0.10.2 l. 176 ``requested_memory = total_memory * gpu_memory_utilization``,
  0.20 l. 283 ``request_memory(init_snapshot, cache_config)``); the KV pool is what the budget leaves after
  weights, the profiled activation peak and non-torch memory.
* **CUDA graphs** are captured *after* the KV pool is sized, so they come on top of the budget, until the
  profiler estimates them: ``VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS`` appears in 0.18 (``vllm/envs.py``
  0.18.0 l. 1635–1636, default ``"0"``; absent in 0.17.0) and is on by default from 0.20
  (``vllm/envs.py`` 0.20.0 l. 1724–1725, default ``"1"``); gpu_worker.py 0.20.0 l. 399–424 then subtracts
  ``cudagraph_memory_estimate`` from the KV pool — the graphs move inside the budget.
* **the sampler's share of the activation peak**: the profile run samples ``max_num_seqs`` dummy requests
  with top-k and top-p on (``_dummy_sampler_run``, vllm/v1/worker/gpu_model_runner.py 0.10.2 l. 2840–2875;
  V0's profile run samples the same rows), so its peak holds (max_num_seqs, vocab) tensors — see
  :func:`sampler_bytes_per_logit`.

Unsloth (``fast_inference``) differs from TRL's colocate mode in three ways, each from unsloth_zoo's
``vllm_utils.py``: the requested utilisation scales the memory *free* when vLLM starts
(``approximate_vllm_memory_usage``: ``free_memory = gpu_memory_utilization * free_memory`` …
``actual_gpu_memory_utilization = free_memory / total_memory``); vLLM starts with ``enable_lora=True`` and
LoRA slots of ``max_lora_rank``; and standby (``UNSLOTH_VLLM_STANDBY=1``) overrides the requested utilisation
by a per-release table (:func:`standby_utilization`).
"""

from __future__ import annotations

from ...units import format_gib
from ...versions import parse_version
from .constants import (
    CUDA_CONTEXT_BYTES,
    FP8_BYTES_PER_PARAM,
    NF4_DOUBLE_QUANT_BYTES_PER_PARAM,
    VLLM_CUDA_GRAPH_BYTES,
    VLLM_NON_TORCH_BYTES,
    C,
)
from .context import Ctx

#: first release with VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS on by default (vllm/envs.py 0.20.0 l. 1724–1725)
FIRST_GRAPHS_IN_BUDGET = (0, 20)
#: first release whose V1 sampler applies top-k/top-p with a Triton kernel for ≥ 8 rows
#: (vllm/v1/sample/ops/topk_topp_sampler.py 0.17.0 ``if HAS_TRITON and logits.shape[0] >= 8``)
FIRST_TRITON_TOPK_TOPP = (0, 17)


def colocated(ctx: Ctx) -> bool:
    return bool(ctx.setup.use_vllm and ctx.setup.vllm_mode == "colocate")


def graphs_in_budget(vllm_version: str) -> bool:
    """Whether the KV pool is sized with the CUDA graphs subtracted (vLLM ≥ 0.20 by default)."""
    return parse_version(vllm_version)[:2] >= FIRST_GRAPHS_IN_BUDGET


def kv_cache_bytes(budget_bytes: int, weights_bytes: int, activation_peak_bytes: int, non_torch_bytes: int,
                   cuda_graph_bytes: int = 0) -> int:
    """vLLM's KV pool: ``util × total − (weights + activation peak + non-torch)``, minus the CUDA-graph estimate
    where the release counts it inside the budget (docs/memory-model.md §3; e.g. 71.39 − 9.69 − 1.27 − 2.95 =
    57.48 GiB in a published start-up log). The pool fills its budget whatever the workload."""
    return budget_bytes - weights_bytes - activation_peak_bytes - non_torch_bytes - cuda_graph_bytes


def lora_slot_bytes(ctx: Ctx) -> int:
    """``enable_lora=True`` (Unsloth): vLLM allocates, with the weights, A and B stacks of ``max_lora_rank`` for
    every LoRA-capable Linear of every layer, whatever the adapter targets (vllm/lora/layers.py
    ``create_lora_weights``: ``lora_a_stacked`` (max_loras, 1, max_lora_rank, in) and ``lora_b_stacked``
    (max_loras, 1, out, max_lora_rank) in the model dtype; Unsloth passes max_loras=1 — unsloth_zoo
    ``approximate_vllm_memory_usage`` counts the same q/k/v/o and MLP elements)."""
    setup, spec = ctx.setup, ctx.spec
    if not (ctx.backend.vllm.enables_lora and setup.is_lora):
        return 0
    per_layer = sum(fan_in + fan_out for fan_in, fan_out in spec.linear_shapes().values())
    return setup.max_lora_rank * per_layer * spec.num_hidden_layers * 2


def weight_bytes(ctx: Ctx) -> int:
    """vLLM's copy of the weights: 16-bit from the checkpoint; bitsandbytes NF4 linears double-quantised
    (:data:`NF4_DOUBLE_QUANT_BYTES_PER_PARAM`) with embeddings, head and norms in 16 bit; FP8 linears 1 byte
    (+ block scales); plus the LoRA slots (:func:`lora_slot_bytes`)."""
    spec, setup = ctx.spec, ctx.setup
    rest = (spec.num_params - spec.linear_params()) * 2
    if setup.load_in_4bit:
        weights = int(spec.linear_params() * NF4_DOUBLE_QUANT_BYTES_PER_PARAM) + rest
    elif setup.load_in_fp8:
        weights = int(spec.linear_params() * FP8_BYTES_PER_PARAM) + rest
    else:
        weights = spec.num_params * 2
    return weights + lora_slot_bytes(ctx)


def sampler_bytes_per_logit(vllm_version: str, max_num_seqs: int) -> int:
    """Bytes per element of (max_num_seqs, vocab) live at the profile run's sampler peak, by mechanism:

    * before 0.17 (V0: vllm/model_executor/layers/sampler.py 0.8.5 l. 270 ``logits.to(torch.float)``, l. 392
      ``logits.sort``; V1: vllm/v1/sample/ops/topk_topp_sampler.py 0.10.2 l. 145 ``logits.sort`` — the same in
      0.11.2–0.16, where FlashInfer is opt-in): the model's 16-bit logits (2) and their fp32 copy (4) stay alive while
      torch sorts: sorted values (4) and int64 indices (8), and inside ``launch_stable_sort_kernel``
      (aten/src/ATen/native/cuda/Sort.cu) — for ≥ 128 rows ``segmented_sort_pairs``: int64 reverse indices
      (8) and cub's double buffers for keys and values (4 + 8) = **38**; for < 128 rows
      ``segmented_sort_pairs_by_full_sort``: two int2 (index, segment) arrays (8 + 8), the keys output torch
      allocates (4) and cub's buffers for float keys and int2 values (4 + 8) = **50**;
    * from 0.17 with ≥ 8 rows: Triton applies top-k/top-p in place (a per-program buffer only), then
      log-softmax for TRL's ``logprobs_mode="processed_logprobs"`` (4), softmax (4), the exponential draw
      ``q`` (4) and ``probs.div(q)`` (4) beside the 2 + 4 of the logits = **22**.

    FlashInfer's sampler (14 B: logits 2 + 4, the top-k-masked logits 4 and their softmax 4) is used by V1 0.10.x
    when flashinfer is installed (an extra there; ``VLLM_USE_FLASHINFER_SAMPLER`` None means on) and is opt-in by
    0.11.2: not modelled, so the estimate errs high there."""
    if parse_version(vllm_version)[:2] >= FIRST_TRITON_TOPK_TOPP and max_num_seqs >= 8:
        return 2 + 4 + 4 + 4 + 4 + 4
    if max_num_seqs >= 128:
        return 2 + 4 + 4 + 8 + 8 + 4 + 8
    return 2 + 4 + 4 + 8 + 8 + 8 + 4 + 4 + 8


def activation_peak(ctx: Ctx, tp: int = 1, rows: int | None = None, tokens: int | None = None) -> int:
    """The profile run's peak above the weights: one dummy forward of ``max_num_batched_tokens`` tokens (the
    MLP's gate/up outputs and activation, 3·I, plus norms/attention, 4·h, in 16 bit — checked against the
    measured 0.32 GiB at 4096 tokens for a 7.56 GiB model, docs/memory-model.md §3), or the sampler run over
    ``max_num_seqs`` rows (:func:`sampler_bytes_per_logit`) with the forward's hidden states (tokens × h × 2)
    still held, whichever is larger. On a rank of a tensor-parallel group of ``tp`` the MLP intermediate is split
    1/T (``rows`` / ``tokens`` default to the setup's max_num_seqs / max_num_batched_tokens)."""
    spec, setup = ctx.spec, ctx.setup
    intermediate = spec.moe_intermediate_size * spec.num_experts_per_tok if spec.is_moe else spec.intermediate_size
    tokens = setup.vllm_max_num_batched_tokens if tokens is None else tokens
    rows = setup.vllm_max_num_seqs if rows is None else rows
    forward = tokens * (3 * (intermediate // tp) + 4 * spec.hidden_size) * 2
    sampler = rows * spec.vocab_size * sampler_bytes_per_logit(setup.vllm_version, rows) \
        + tokens * spec.hidden_size * 2
    return max(forward, sampler)


#: unsloth_zoo vllm_utils.py ``load_vllm`` standby targets, by release: (first unsloth release it applies to,
#: whether it also lowers a higher request, [(10% of the card in GB ≥, target)], final factor)
_STANDBY_TABLES = (
    # commit 2afbcc19 (2025-09-16): `if unsloth_vllm_standby and gpu_memory_utilization <= 0.9:` set to the tier
    ("2025.9", True, ((4.0, 0.925), (2.0, 0.9), (1.4, 0.85), (1.0, 0.8), (0.0, 0.75)), 1.0),
    # commit 65939946 (2025-11-04): a finer table, only ever raises (`if ... < standby_target_gpu_util`)
    ("2025.11", False, ((4.0, 0.925), (2.5, 0.9), (2.0, 0.875), (1.4, 0.85), (1.0, 0.8), (0.0, 0.75)), 1.0),
    # commit fa82dcc2 (2026-02-09): raises or lowers; vLLM ≥ 0.11 gets the same table × 0.95
    ("2026.2", True, ((4.0, 0.925), (2.5, 0.9), (2.0, 0.875), (1.4, 0.85), (1.0, 0.8), (0.0, 0.75)), 0.95),
)
#: fa82dcc2's table for vLLM < 0.11 (no 0.95 factor)
_STANDBY_OLD_VLLM = ((9.0, 0.9), (4.0, 0.875), (2.5, 0.85), (2.0, 0.825), (1.4, 0.8), (1.0, 0.75), (0.0, 0.7))


def standby_utilization(requested: float, total_bytes: int, unsloth_version: str, vllm_version: str) -> float:
    """The utilisation Unsloth's standby actually asks vLLM for: a target by the card's size ("10% of your GPU
    VRAM" in GB of 2^30 bytes) that replaces the request, per the unsloth-zoo release (:data:`_STANDBY_TABLES`;
    e.g. 0.5 requested on an A100-40GB became ~0.88 with unsloth 2025.9.6: the 0.9 tier × free/total)."""
    version = parse_version(unsloth_version)[:2]
    table = None
    for first, lowers, tiers, factor in _STANDBY_TABLES:
        if version >= parse_version(first)[:2]:
            table = (first, lowers, tiers, factor)
    if table is None:  # standby predates 2025.9: the request stands
        return requested
    first, lowers, tiers, factor = table
    if first == "2026.2" and parse_version(vllm_version)[:2] < (0, 11):
        tiers, factor = _STANDBY_OLD_VLLM, 1.0
    ten_percent_gb = total_bytes / 2 ** 30 * 0.1
    target = next(value for floor, value in tiers if ten_percent_gb >= floor) * factor
    if first == "2025.9":
        return target if requested <= 0.9 else requested
    if requested < target or (lowers and requested > target):
        return target
    return requested


def requested_utilization(ctx: Ctx, total_bytes: int) -> float:
    setup = ctx.setup
    if setup.unsloth_vllm_standby:
        return standby_utilization(setup.vllm_gpu_memory_utilization, total_bytes, setup.unsloth_version,
                                   setup.vllm_version)
    return setup.vllm_gpu_memory_utilization


def budget_bytes(ctx: Ctx, total_bytes: int) -> int:
    """``util × total`` (TRL), or Unsloth's ``util × free at start`` with free = total − the CUDA context."""
    util = requested_utilization(ctx, total_bytes)
    if ctx.backend.vllm.budget_excludes_context:
        return int(util * (total_bytes - CUDA_CONTEXT_BYTES))
    return int(util * total_bytes)


def reservation(ctx: Ctx) -> dict[str, int]:
    """Colocated vLLM: weights, activation peak, non-torch, CUDA graphs and the KV pool that fills the rest of
    the budget (graphs outside the budget before vLLM 0.20, inside from it; docs/memory-model.md §3)."""
    setup = ctx.setup
    if not colocated(ctx):
        return {}
    vllm_weights = weight_bytes(ctx)
    activations = activation_peak(ctx)
    inside = graphs_in_budget(setup.vllm_version)
    if ctx.gpu is not None:
        budget = budget_bytes(ctx, ctx.gpu.total_bytes)
        kv_cache = kv_cache_bytes(budget, vllm_weights, activations, VLLM_NON_TORCH_BYTES,
                                  VLLM_CUDA_GRAPH_BYTES if inside else 0)
        if setup.unsloth_vllm_standby:
            util = requested_utilization(ctx, ctx.gpu.total_bytes)
            ctx.notes.assumptions.append(
                f"unsloth standby (unsloth {setup.unsloth_version}): gpu_memory_utilization "
                f"{setup.vllm_gpu_memory_utilization} → {util:.4g} (unsloth_zoo's standby table)")
    else:
        # without a card the reservation is unknown: size the KV pool for one generation batch
        kv_cache = setup.generation_batch_size * ctx.spec.kv_cache_bytes(setup.seq_len)
        ctx.notes.assumptions.append("no GPU given: vLLM's KV cache sized for one generation batch; on a card it "
                                     "fills gpu_memory_utilization × total — pass gpu= for the real reservation")
    if ctx.backend.vllm.default_max_num_seqs and "vllm_max_num_seqs" not in setup.explicit_fields:
        ctx.notes.assumptions.append(
            f"max_num_seqs not given: {setup.vllm_max_num_seqs} assumed (load_vllm's default); Unsloth releases pick "
            "it from the memory left (128–320 in public start-up logs) — pass max_num_seqs as your run prints it")
    ctx.notes.assumptions.append(
        f"vllm {setup.vllm_version}: CUDA graphs {'inside' if inside else 'on top of'} the utilisation budget; "
        f"profile run of max_num_seqs={setup.vllm_max_num_seqs}, "
        f"max_num_batched_tokens={setup.vllm_max_num_batched_tokens}")
    return {C.VLLM_WEIGHTS: vllm_weights, C.VLLM_ACTIVATIONS: activations, C.VLLM_NON_TORCH: VLLM_NON_TORCH_BYTES,
            C.VLLM_CUDA_GRAPHS: VLLM_CUDA_GRAPH_BYTES, C.VLLM_KV_CACHE: max(kv_cache, 0)}


def awake(ctx: Ctx, persistent: dict[str, int]) -> dict[str, int]:
    """The persistent parts outside generation. TRL's sleep mode (level 2) frees vLLM's weights and KV cache
    there; Unsloth's standby sleeps the KV cache only — the training model *is* vLLM's weights
    (unsloth_zoo: ``wake_up(tags=["kv_cache"])``); graphs, non-torch and the context stay."""
    if not colocated(ctx):
        return dict(persistent)
    if ctx.setup.unsloth_vllm_standby:
        return {k: v for k, v in persistent.items() if k not in (C.VLLM_KV_CACHE, C.VLLM_ACTIVATIONS)}
    if not ctx.setup.vllm_enable_sleep_mode:
        return dict(persistent)
    return {k: v for k, v in persistent.items() if k not in (C.VLLM_WEIGHTS, C.VLLM_KV_CACHE, C.VLLM_ACTIVATIONS)}


def check_start(ctx: Ctx, persistent: dict[str, int]) -> None:
    """vLLM refuses to start when free memory < util × total; its KV pool must hold one full sequence."""
    setup = ctx.setup
    if not colocated(ctx) or ctx.gpu is None:
        return
    total = ctx.gpu.total_bytes
    util = requested_utilization(ctx, total)
    desired = int(util * total)
    warnings = ctx.notes.warnings
    if ctx.backend.vllm.policy_loaded_first:
        # in colocate mode the policy (and a reference model) is on the GPU before vLLM starts
        already = CUDA_CONTEXT_BYTES + persistent.get(C.WEIGHTS, 0) \
            + persistent.get(C.LORA, 0) + persistent.get(C.REFERENCE, 0)
        free = total - already
        if free < desired:
            warnings.append(
                f"vLLM would refuse to start: free memory on device ({format_gib(free)}) is less than desired GPU "
                f"memory utilization ({util} × {format_gib(total)} = "
                f"{format_gib(desired)}); lower vllm_gpu_memory_utilization to ≤ {free / total:.2f}")
    kv_cache = persistent.get(C.VLLM_KV_CACHE, 0)
    one_sequence = ctx.spec.kv_cache_bytes(setup.seq_len)
    # a colocated tensor-parallel rank holds max(1, kv_heads // T) of the KV heads (vllm_parallel.kv_heads_per_rank)
    kv_heads = ctx.spec.num_key_value_heads
    one_sequence = one_sequence * max(1, kv_heads // setup.vllm_tensor_parallel_size) // kv_heads
    if kv_cache < one_sequence:
        warnings.append(
            f"vLLM would refuse to start: its KV cache ({format_gib(kv_cache)}) cannot hold one sequence of "
            f"{setup.seq_len} tokens ({format_gib(one_sequence)}); raise vllm_gpu_memory_utilization or shorten "
            "max_prompt_length + max_completion_length")
