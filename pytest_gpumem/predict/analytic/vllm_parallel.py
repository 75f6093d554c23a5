"""vLLM across GPUs: one tensor-parallel rank's reservation, the `trl vllm-serve` server as a role of its own, and
the weight sync on both sides (docs/distributed.md §2–3). Built on the one-GPU functions of :mod:`.vllm` (weight
bytes, the KV-pool rule, the constants); what changes with T is here.

Per vLLM rank of a tensor-parallel group of T (vLLM ``model_executor/layers/linear.py``,
``vocab_parallel_embedding.py``, ``fused_moe``):

- **weights**: q and o projections, the MLP (and every expert's intermediate dimension) split 1/T
  (``ColumnParallelLinear`` / ``RowParallelLinear`` / ``FusedMoE``); the embedding and an untied lm_head split by
  vocabulary rows (``VocabParallelEmbedding``, ``ParallelLMHead``; vLLM pads the vocabulary to a multiple of 64,
  ≤ 63 rows, not counted); replicated whole: norms, the router (``ReplicatedLinear``), the row-parallel biases
  (o_proj, down_proj: added after the all-reduce);
- **KV heads**: ``QKVParallelLinear``: ``num_kv_heads = max(1, total_num_kv_heads // tp_size)`` — once T exceeds
  the KV heads each rank holds one replicated head, so the k/v projections and the KV cache per token stop
  shrinking;
- **the KV pool** is each rank's own budget: ``util × total − its weights − its activation peak − non-torch``
  (− CUDA graphs where the release counts them inside, :func:`graphs_inside_budget`); vLLM sizes the pool from
  every worker's figure (they are equal here: the ranks are symmetric);
- **activation peak**: the profile forward's MLP intermediate is split 1/T, the hidden-size tensors are whole; the
  sampler runs on full-vocabulary logits on every rank (V1 all-gathers the logits: ``LogitsProcessor`` with
  ``use_all_gather``);
- **non-torch extras**: the custom all-reduce (``custom_all_reduce.py`` ``CustomAllreduce``, T ∈ {2, 4, 6, 8}:
  ``meta_size() + max_size`` + ``max_size`` IPC buffers + ``rank_data`` 8 MiB, ``max_size=8192 * 1024``: 24 MiB)
  and one NCCL communicator per group the rank is in (TP group, DP group), with the figures of
  ``parallel.base.nccl_bytes`` (NVIDIA/nccl#964). vLLM measures both as its non-torch memory, inside the budget.
- **CUDA graphs**: each rank captures its own graphs; the one-GPU figure per rank (VLLM_CUDA_GRAPH_BYTES; the
  reports run from 0.36 GiB to 2.4 GiB at TP = 4, vllm#7553 — not modelled per T).

The weight sync to a server (trl 1.16 ``VLLMClient.update_named_params`` → vLLM's
``weight_transfer/packed_tensor.py``, read at vllm-project/vllm 00bd149): the trainer's main process packs the
parameters into chunks of ``DEFAULT_PACKED_BUFFER_SIZE_BYTES = 1024 * 1024 * 1024`` (a chunk closes once it
*exceeds* 1 GiB, so it holds up to 1 GiB + one parameter) with ``DEFAULT_PACKED_NUM_BUFFERS = 2`` in flight, and
broadcasts them over an NCCL group of the trainer and every server worker. Each worker (all T × D of them)
receives every chunk whole — the full parameters, before ``load_weights`` keeps its slice: two chunks live. The
trainer's rank 0 holds the previous chunk in flight, the current ``torch.cat`` and the tensors being packed —
gathered copies under ZeRO-3 / FSDP (a packed view keeps a released ZeRO-3 gather alive), views of resident
weights otherwise. (Earlier trl's own server allocated each full parameter with ``torch.empty`` on every worker;
trl 1.16's ``vllm-serve`` is plain ``vllm serve``.)
"""

from __future__ import annotations

from ...gpus import GPU, resolve_gpu
from ...units import MIB, format_gib
from ...vllm_layout import is_server, server_batch_defaults
from . import vllm
from .constants import CUDA_CONTEXT_BYTES, VLLM_CUDA_GRAPH_BYTES, VLLM_NON_TORCH_BYTES, C, P
from .context import Ctx
from .parallel.base import nccl_bytes, transfer_group_nccl_bytes
from .parallel.shapes import largest_param

#: CustomAllreduce per rank: meta (meta_size ≈ 0 + 8 MiB) + IPC buffer 8 MiB + rank_data 8 MiB
CUSTOM_ALL_REDUCE_BYTES = 24 * MIB
CUSTOM_ALL_REDUCE_SIZES = (2, 4, 6, 8)  # CustomAllreduce._SUPPORTED_WORLD_SIZES
#: vllm/distributed/weight_transfer/packed_tensor.py
PACKED_BUFFER_BYTES = 1024 * 1024 * 1024
PACKED_NUM_BUFFERS = 2
BF16, FP32 = 2, 4


# -- one rank's shapes --------------------------------------------------------------------------------------
def kv_heads_per_rank(spec, tp: int) -> int:
    return max(1, spec.num_key_value_heads // tp)


def rank_elements(spec, tp: int) -> tuple[int, int]:
    """(decoder linear weight elements, everything else) one rank of T holds; T = 1 gives the whole model."""
    h, hd = spec.hidden_size, spec.head_dim
    q_out, kv_out = spec.q_out // tp, kv_heads_per_rank(spec, tp) * hd
    attention = h * q_out + 2 * h * kv_out + q_out * h
    if spec.is_moe:
        inter = (spec.moe_intermediate_size or spec.intermediate_size) // tp
        mlp = spec.num_experts * 3 * h * inter + h * spec.num_experts  # the router replicated
    else:
        inter = spec.intermediate_size // tp
        mlp = 3 * h * inter
    linear = spec.num_hidden_layers * (attention + mlp)
    per_layer = spec.norms_per_layer * h
    if spec.qkv_bias:
        per_layer += q_out + 2 * kv_out
    if spec.o_proj_bias:
        per_layer += h
    if spec.qk_norm:
        per_layer += 2 * hd
    if spec.attention_sinks:
        per_layer += spec.num_attention_heads // tp
    if spec.is_moe and spec.expert_bias:
        per_layer += spec.num_experts * (2 * inter + h) + spec.num_experts
    elif not spec.is_moe and spec.mlp_bias:
        per_layer += 2 * inter + h
    vocab_rows = -(-spec.vocab_size // tp)
    rest = spec.num_hidden_layers * per_layer + h + vocab_rows * h * (1 if spec.tie_word_embeddings else 2)
    return linear, rest


def rank_weight_bytes(ctx: Ctx, tp: int) -> int:
    """One rank's weights: its linear elements at the bytes the one-GPU :func:`.vllm.weight_bytes` gives the
    linears (16-bit, NF4 or FP8), the rest in 16 bit."""
    spec = ctx.spec
    whole_rest = (spec.num_params - spec.linear_params()) * BF16
    linear_bytes = vllm.weight_bytes(ctx) - whole_rest
    linear, rest = rank_elements(spec, tp)
    return int(linear_bytes * linear / spec.linear_params()) + rest * BF16 if spec.linear_params() else rest * BF16


def rank_kv_bytes(spec, tp: int, tokens: int) -> int:
    """KV cache of one sequence of ``tokens`` on one rank: the rank's share of the KV heads (replicated past T =
    kv_heads)."""
    return spec.kv_cache_bytes(tokens) * kv_heads_per_rank(spec, tp) // spec.num_key_value_heads


def activation_peak(ctx: Ctx, tp: int, rows: int, tokens: int) -> int:
    """The profile run's peak on one rank: :func:`.vllm.activation_peak`'s terms with the MLP intermediate split
    1/T — a forward of ``tokens`` (3·I/T + 4·h in 16 bit), or the sampler over ``rows`` × the whole vocabulary
    (:func:`.vllm.sampler_bytes_per_logit`, by vLLM version) with the forward's hidden states held, whichever is
    larger. T = 1 with the setup's max_num_seqs / max_num_batched_tokens is the one-GPU figure, and
    tests/test_vllm_parallel.py holds it there."""
    return vllm.activation_peak(ctx, tp, rows, tokens)


def graphs_inside_budget(ctx: Ctx) -> bool:
    """Whether the KV pool is sized with the CUDA graphs subtracted — by vLLM version, as on one GPU
    (:func:`.vllm.graphs_in_budget`)."""
    return vllm.graphs_in_budget(ctx.setup.vllm_version)


def group_non_torch_bytes(tp: int, dp: int = 1) -> int:
    """What a rank of a TP group (and a DP group of ``dp`` replicas) adds to vLLM's non-torch memory."""
    extra = CUSTOM_ALL_REDUCE_BYTES if tp in CUSTOM_ALL_REDUCE_SIZES else 0
    return extra + nccl_bytes(tp) + nccl_bytes(dp)


def rank_reservation(ctx: Ctx, tp: int, rows: int, tokens: int, budget_bytes: int | None, dp: int = 1,
                     kv_rows: int | None = None) -> dict[str, int]:
    """One vLLM rank's components: weights, activation peak, non-torch (+ the group's extras), CUDA graphs, and
    the KV pool that fills the rest of ``budget_bytes`` (None: no card — a pool for ``kv_rows`` sequences)."""
    weights = rank_weight_bytes(ctx, tp)
    activations = activation_peak(ctx, tp, rows, tokens)
    non_torch = VLLM_NON_TORCH_BYTES + group_non_torch_bytes(tp, dp)
    graphs = VLLM_CUDA_GRAPH_BYTES
    if budget_bytes is not None:
        kv = vllm.kv_cache_bytes(budget_bytes, weights, activations, non_torch,
                                 graphs if graphs_inside_budget(ctx) else 0)
    else:
        kv = (kv_rows if kv_rows is not None else rows) * rank_kv_bytes(ctx.spec, tp, ctx.setup.seq_len)
    return {C.VLLM_WEIGHTS: weights, C.VLLM_ACTIVATIONS: activations, C.VLLM_NON_TORCH: non_torch,
            C.VLLM_CUDA_GRAPHS: graphs, C.VLLM_KV_CACHE: max(kv, 0)}


# -- the generation batch in the pool ---------------------------------------------------------------------------
def check_batch_fits(ctx: Ctx, kv_pool_bytes: int, tp: int, rows: int, max_num_seqs: int, where: str) -> None:
    """Warn when the pool cannot hold the running sequences at full length: vLLM then preempts (recomputes)
    sequences — slower, not an OOM."""
    setup = ctx.setup
    running = min(rows, max_num_seqs)
    one = rank_kv_bytes(ctx.spec, tp, setup.seq_len)
    if one and running * one > kv_pool_bytes:
        ctx.notes.warnings.append(
            f"{where}: the KV pool ({format_gib(kv_pool_bytes)} per rank) holds {kv_pool_bytes // one} of the "
            f"{running} sequences it runs at once at {setup.seq_len} tokens ({format_gib(one)} each on a rank of "
            f"T = {tp}): vLLM will preempt and recompute sequences — slower generation, not an OOM")


# -- colocate with tensor parallel --------------------------------------------------------------------------
def colocate_tp(ctx: Ctx) -> int:
    setup = ctx.setup
    return setup.vllm_tensor_parallel_size if vllm.colocated(ctx) else 1


def colocate_rows(ctx: Ctx) -> int:
    """A TP group generates for all its ranks' prompts (all_gather_object over the group), and TRL passes
    ``max_num_seqs = per_device_train_batch_size × vllm_tensor_parallel_size × steps_per_generation``
    (grpo_trainer.py) — unless the setup gives max_num_seqs."""
    setup = ctx.setup
    if "vllm_max_num_seqs" in setup.explicit_fields:
        return setup.vllm_max_num_seqs
    return setup.generation_batch_size * colocate_tp(ctx)


def colocate_reservation(ctx: Ctx) -> dict[str, int]:
    """One colocated TP rank's vLLM components (noted once per estimate)."""
    tp = colocate_tp(ctx)
    rows = colocate_rows(ctx)
    budget = vllm.budget_bytes(ctx, ctx.gpu.total_bytes) if ctx.gpu else None
    group_rows = ctx.setup.generation_batch_size * tp
    reservation = rank_reservation(ctx, tp, rows, ctx.setup.vllm_max_num_batched_tokens, budget, kv_rows=group_rows)
    check_batch_fits(ctx, reservation[C.VLLM_KV_CACHE], tp, group_rows, rows, f"colocated vLLM (T = {tp})")
    ctx.notes.assumptions.append(
        f"colocated vLLM with tensor parallel T = {tp} (external_launcher): per rank "
        f"{format_gib(reservation[C.VLLM_WEIGHTS])} of weights, {kv_heads_per_rank(ctx.spec, tp)} of "
        f"{ctx.spec.num_key_value_heads} KV heads, {group_rows} sequences per group (max_num_seqs {rows})")
    return reservation


def colocate_adjuster(reservation: dict[str, int], base=None):
    """A phase adjuster (``phases.step``'s ``adjust``) replacing the one-GPU vLLM components by one TP rank's."""
    def adjust(phase: str, parts: dict, moment: str | None = None) -> dict:
        parts = base(phase, parts, moment) if base is not None else dict(parts)
        for name, num_bytes in reservation.items():
            if name in parts:
                parts[name] = num_bytes
        return parts

    return adjust


# -- server mode: the trainer side -------------------------------------------------------------------------------
def sync_dtype_bytes(ctx: Ctx) -> int:
    """Bytes per element the trainer streams: ZeRO's bf16 module, FSDP's fp32 master (``full_tensor()`` of the
    fp32 shard; the loaded dtype with PEFT), else the loaded weights."""
    distributed = ctx.setup.distributed
    if distributed.startswith("zero"):
        return BF16
    if distributed.startswith("fsdp"):
        return ctx.weight_bytes_per_param if ctx.setup.is_lora else FP32
    return ctx.weight_bytes_per_param


def packed_chunk_bytes(ctx: Ctx) -> int:
    """One packed chunk: up to 1 GiB plus the parameter that overflows it, at most the whole model."""
    per = sync_dtype_bytes(ctx)
    return min(ctx.spec.num_params * per, PACKED_BUFFER_BYTES + largest_param(ctx.spec) * per)


def gathers_copies(ctx: Ctx) -> bool:
    """Whether the sync iterator yields new full tensors (ZeRO-3's gather, FSDP's full_tensor / summon) rather than
    views of resident weights (DDP, ZeRO-1/2, one GPU, and PEFT's already-gathered model)."""
    distributed = ctx.setup.distributed
    return not ctx.setup.is_lora and (distributed == "zero3" or distributed.startswith("fsdp"))


def server_sync_adjuster(ctx: Ctx, rank: int, base=None):
    """Rank 0 of a server-mode trainer: the packed send buffers in the generation phase (the sync runs before
    each generation); other ranks only join the gathers. On one GPU (no ``base``) also the weight-transfer NCCL
    communicator — a multi-GPU rank gets it from ``parallel.base.rank0_server_nccl_bytes``."""
    setup = ctx.setup
    chunk = packed_chunk_bytes(ctx)
    copies = gathers_copies(ctx)
    transfer_group = transfer_group_nccl_bytes(setup) if base is None else 0

    def adjust(phase: str, parts: dict, moment: str | None = None) -> dict:
        parts = base(phase, parts, moment) if base is not None else dict(parts)
        if rank != 0:
            return parts
        if phase == P.GENERATION:
            held = parts.get(C.WEIGHT_SYNC, 0)
            # with copies the one gathered parameter the strategy counts is among the packed list
            parts[C.WEIGHT_SYNC] = chunk * (PACKED_NUM_BUFFERS + 1) if copies else held + chunk * PACKED_NUM_BUFFERS
        if transfer_group:
            parts[C.NCCL_BUFFERS] = parts.get(C.NCCL_BUFFERS, 0) + transfer_group
        return parts

    return adjust


# -- server mode: the server's GPUs -------------------------------------------------------------------------------
def server_gpu(ctx: Ctx) -> GPU | None:
    """The server's card: ``vllm_server_gpu``, else the trainer's."""
    return resolve_gpu(ctx.setup.vllm_server_gpu, field="vllm_server_gpu") or ctx.gpu


def server_rows(ctx: Ctx) -> int:
    """Sequences one data-parallel replica generates per generation: TRL's main process sends the whole
    generation batch (``gather_object(prompts)``, n = num_generations: b × world_size × steps_per_generation
    completions) and vLLM's API server spreads the requests over the D replicas."""
    setup = ctx.setup
    total = setup.per_device_train_batch_size * setup.world_size * setup.steps_per_generation
    return -(-total // setup.vllm_server_data_parallel_size)


def server_phases(ctx: Ctx) -> dict[str, dict[str, int]]:
    """One server GPU (every worker is alike): persistent = the CUDA context, the rank's reservation and the
    weight-transfer communicator; generation = that + the larger of the activation peak and the sync's two
    received chunks (the sync runs between generations, not during one)."""
    setup = ctx.setup
    tp, dp = setup.vllm_server_tensor_parallel_size, setup.vllm_server_data_parallel_size
    gpu = server_gpu(ctx)
    default_seqs, default_tokens = server_batch_defaults(gpu)
    max_num_seqs = setup.vllm_server_max_num_seqs or default_seqs
    tokens = setup.vllm_server_max_num_batched_tokens or default_tokens
    rows = server_rows(ctx)
    budget = int(setup.vllm_server_gpu_memory_utilization * gpu.total_bytes) if gpu is not None else None
    reservation = rank_reservation(ctx, tp, max_num_seqs, tokens, budget, dp, kv_rows=min(rows, max_num_seqs))
    notes = ctx.notes
    where = "no card given: the KV pool sized for the batch" if gpu is None else gpu.name
    notes.assumptions.append(
        f"vLLM server (trl vllm-serve) T = {tp}, D = {dp}: {tp * dp} GPU(s) ({where}), "
        f"gpu_memory_utilization {setup.vllm_server_gpu_memory_utilization}, max_num_seqs {max_num_seqs}, "
        f"max_num_batched_tokens {tokens}; {rows} sequences per replica per generation")
    if gpu is not None:
        check_batch_fits(ctx, reservation[C.VLLM_KV_CACHE], tp, rows, max_num_seqs, "vLLM server")
        desired = budget + CUDA_CONTEXT_BYTES
        if desired > gpu.total_bytes:
            notes.warnings.append(f"vLLM would refuse to start on the server: util × total "
                                  f"({format_gib(budget)}) + its CUDA context exceed {gpu.name}")
        if reservation[C.VLLM_KV_CACHE] < rank_kv_bytes(ctx.spec, tp, setup.seq_len):
            notes.warnings.append(
                f"vLLM would refuse to start on the server: its KV pool per rank "
                f"({format_gib(reservation[C.VLLM_KV_CACHE])}) cannot hold one sequence of {setup.seq_len} tokens; "
                "raise vllm_server_gpu_memory_utilization or vllm_server_tensor_parallel_size")
    if dp > 1 and not ctx.spec.is_moe:
        notes.warnings.append(f"vllm_server_data_parallel_size={dp} with a dense model: trl 1.16 says D > 1 for dense "
                              "models 'is not supported/useful and will error out (see vLLM PR #30739)' "
                              "(trl/scripts/vllm_serve.py); the per-GPU figures assume it runs")
    base = {C.CUDA_CONTEXT: CUDA_CONTEXT_BYTES, **reservation, C.NCCL_BUFFERS: transfer_group_nccl_bytes(setup)}
    activations = base.pop(C.VLLM_ACTIVATIONS)
    received = PACKED_NUM_BUFFERS * packed_chunk_bytes(ctx)
    moment = {C.VLLM_ACTIVATIONS: activations} if activations >= received else {C.VLLM_WEIGHT_SYNC: received}
    return {P.PERSISTENT: dict(base), P.GENERATION: {**base, **moment}}


def server_mode(ctx: Ctx) -> bool:
    return is_server(ctx.setup)
