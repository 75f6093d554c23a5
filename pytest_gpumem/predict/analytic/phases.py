"""One assembler per phase: the only place that says which components live at each phase's peak.

Every phase lists everything live at its peak — the persistent components as well as its transients — so its
total is comparable with a measured per-phase peak and the step's peak is the largest phase. A new memory
component is a calculator in the concern's module (params, activations, logits, vllm) plus one line here.
"""

from __future__ import annotations

from typing import Callable

from . import activations, logits, params, vllm
from .constants import ALLOCATOR_SLACK_FRACTION, CUDA_CONTEXT_BYTES, NOT_TORCH_ALLOCATED, C, P
from .context import Ctx


def persistent(ctx: Ctx) -> dict[str, int]:
    """Context, weights, LoRA, optimizer states, reference model, vLLM reservation, batch buffers
    (docs/memory-model.md §1, item 1). Gradients are not persistent: ``zero_grad(set_to_none=True)`` frees them."""
    setup = ctx.setup
    parts = {C.CUDA_CONTEXT: CUDA_CONTEXT_BYTES}
    parts[C.WEIGHTS] = params.base_weight_bytes(ctx)
    if setup.is_lora:
        parts[C.LORA] = ctx.lora_params * params.lora_bytes_per_param(ctx)
    parts[C.OPTIMIZER_STATES] = params.optimizer_state_bytes(ctx)
    if setup.beta != 0 and not setup.is_lora:
        parts[C.REFERENCE] = params.reference_weight_bytes(ctx)
    parts.update(vllm.reservation(ctx))
    if ctx.backend.vllm.shares_weights and setup.use_vllm:
        # fast_inference: the training model is built on vLLM's tensors — one copy of the base weights
        parts[C.WEIGHTS] = 0
    # the buffered generation batch: ids + masks (int64), old/ref log-probs and advantages (fp32)
    parts[C.BATCH_BUFFERS] = setup.generation_batch_size * setup.seq_len * (8 + 8 + 4 + 4)
    return parts


def generation(ctx: Ctx) -> dict[str, int]:
    """Rollouts of the whole local generation batch (b × steps_per_generation rows) at once.
    vLLM: its reservation is already persistent. HF generate: dynamic KV cache of all rows, a (rows, V)
    fp32 logits row per step and the prefill's transient (docs/memory-model.md §1, item 2)."""
    setup, spec = ctx.setup, ctx.spec
    if setup.use_vllm:
        return {}
    rows = setup.generation_batch_size
    kv_cache = rows * spec.kv_cache_bytes(setup.seq_len)
    ctx.notes.tensors.append((P.GENERATION, f"generate KV cache, one layer ({rows} rows × {setup.seq_len} tokens)",
                              kv_cache // max(spec.num_hidden_layers, 1)))
    return {C.GENERATE_KV_CACHE: kv_cache, C.GENERATE_LOGITS: logits.generate_logits_bytes(ctx),
            C.ACTIVATIONS: activations.generate_prefill_bytes(ctx)}


def scoring(ctx: Ctx) -> dict[str, int] | None:
    """A no-grad forward over b rows (checkpointing off), or None when TRL runs no scoring pass. Its peak is
    either inside a block (:func:`~.activations.scoring_layer_peak_bytes`) or in the log-prob head, whichever
    is larger (measured with the FakeTensor simulation, tests/test_accuracy_matrix.py); both sit on the hidden
    stream (b·L·h)."""
    if not ctx.setup.scoring_passes:
        return None
    hidden_stream = ctx.tokens * ctx.spec.hidden_size * ctx.residual_bytes
    layer_peak = activations.scoring_layer_peak_bytes(ctx)
    head_peak = logits.logits_bytes(ctx, "scoring")
    if layer_peak >= head_peak:
        parts = {C.ACTIVATIONS: hidden_stream + layer_peak}
    else:
        parts = {C.ACTIVATIONS: hidden_stream, C.LOGITS: head_peak}
    parts[C.ATTENTION_MASK] = activations.mask_bytes(ctx)
    return parts


#: the moments of a training micro-step whose peaks are compared (a sharding strategy transforms each one)
MOMENTS = ("head", "last_block", "first_block", "embedding", "forward_end", "forward", "block_reduce")


def forward_moment(ctx: Ctx) -> dict[str, int]:
    """Inside the forward, before anything is saved: one GPU never peaks here, but a sharded rank can — FSDP2's
    all-gather copy-outs hold two units' all-gather outputs and one unit's unsharded parameters at once
    (``parallel.fsdp.forward_gather_bytes``; LoRA, whose backward is small, peaks there). Only what is alive
    from before the forward: earlier micro-steps' gradients and the attention mask."""
    accumulating = ctx.setup.gradient_accumulation_steps > 1
    return {C.GRADIENTS: params.gradient_parts(ctx)[2] if accumulating else 0,
            C.ATTENTION_MASK: activations.mask_bytes(ctx)}
#: ``block_reduce``: the first block's post-backward (its recomputed activations freed), where FSDP2 copies the
#: block's unsharded gradients into its reduce-scatter input (``parallel.fsdp``); one GPU: ``first_block`` less
#: the recomputed layer.


def training(ctx: Ctx) -> dict[str, int]:
    """One micro-step: the largest of :func:`training_moments`."""
    return max((parts for _, parts in training_moments(ctx)), key=lambda parts: sum(parts.values()))


def training_moments(ctx: Ctx) -> list[tuple[str, dict[str, int]]]:
    """One micro-step's candidate peaks, by moment (:data:`MOMENTS`); one GPU peaks at the largest (checked
    against the FakeTensor simulation, tests/test_accuracy_matrix.py):

    A — backward starts at the head: everything the forward saved + the log-prob path's backward
        transient (+ earlier micro-steps' gradients when gradient_accumulation_steps > 1);
    B — inside the blocks' backward, block i: the gradients of blocks > i and the saved activations of
        blocks ≤ i — linear in i, so the worst is block n−1 (all activations) or block 0 (all block
        gradients) — plus the block being processed (:func:`~.activations.recomputed_layer`);
    C — the embedding's backward, last (full fine-tuning): all gradients plus, with tied embeddings, the
        head's weight gradient parked in autograd's input buffer and the embedding's, summed out of place
        (2 × V·h), plus the new gradient before it is added in place when gradients exist already;
    F — the forward's end with fp32 weights under checkpointing: autocast caches the bf16 copy of every
        trained weight until the forward returns."""
    setup, spec = ctx.setup, ctx.spec
    tokens = ctx.tokens
    n_layers = spec.num_hidden_layers
    vocab, h = spec.vocab_size, spec.hidden_size
    residual = ctx.residual_bytes
    checkpointing = bool(setup.gradient_checkpointing)
    head_grads, layer_grads, all_grads = params.gradient_parts(ctx)
    accumulating = setup.gradient_accumulation_steps > 1
    grads_before = all_grads if accumulating else 0
    saved = activations.saved_activations(ctx)
    mask, mask_copy = activations.mask_bytes(ctx), activations.mask_copy_bytes(ctx)
    casts = activations.autocast_weight_copies(ctx)
    head_cast = logits.head_cast_bytes(ctx)
    mask_live = mask if checkpointing else 0
    candidate_a = {C.GRADIENTS: grads_before, C.ACTIVATIONS: saved,
                   C.LOGITS: logits.logits_bytes(ctx, "backward"),
                   C.ATTENTION_MASK: mask_live + (0 if checkpointing else n_layers * mask_copy),
                   C.WEIGHT_CASTS: (0 if checkpointing else n_layers * casts) + head_cast}
    # B: block n-1 (all saved activations live) or block 0 (all block gradients live)
    if checkpointing and setup.gradient_checkpointing != "unsloth":
        fixed = 2 * tokens * h * residual  # final-norm tensors: released before the blocks
        per_layer_saved = tokens * h * residual
    elif checkpointing:
        fixed, per_layer_saved = 0, 0  # offloaded: the GPU keeps its two buffers either way
    else:
        fixed = 2 * tokens * h * residual
        per_layer_saved = tokens * activations.layer_activation_bytes_per_token(ctx)
    recomputed = activations.recomputed_layer(ctx)
    last_block = {C.GRADIENTS: all_grads if accumulating else head_grads,
                  C.ACTIVATIONS: saved,
                  C.RECOMPUTED_LAYER: recomputed - fixed,
                  C.ATTENTION_MASK: mask_live + (0 if checkpointing else n_layers * mask_copy),
                  C.WEIGHT_CASTS: 0 if checkpointing else n_layers * casts}
    first_block = {C.GRADIENTS: all_grads if accumulating else head_grads + (n_layers - 1) * layer_grads,
                   C.ACTIVATIONS: saved - (n_layers - 1) * per_layer_saved,
                   C.RECOMPUTED_LAYER: recomputed - fixed,
                   C.ATTENTION_MASK: mask_live + (0 if checkpointing else mask_copy),
                   C.WEIGHT_CASTS: 0 if checkpointing else casts}
    candidates = [("head", candidate_a), ("last_block", last_block), ("first_block", first_block)]
    if not setup.is_lora:
        extra = (2 if spec.tie_word_embeddings else 0) + (1 if accumulating else 0)
        embedding_grads = extra * vocab * h * params.trainable_bytes_per_param(ctx)
        candidates.append(("embedding", {C.GRADIENTS: all_grads, C.RECOMPUTED_LAYER: embedding_grads}))
        if (setup.dtype == "float32" and ctx.compute_bytes == 2 and checkpointing and not setup.load_in_4bit
                and setup.gradient_checkpointing != "unsloth"):
            candidates.append(("forward_end", {C.GRADIENTS: grads_before, C.ACTIVATIONS: saved, C.ATTENTION_MASK: mask,
                                               C.WEIGHT_CASTS: spec.linear_params() * 2 + head_cast,
                                               C.LOGITS: logits.head_forward_bytes(ctx)}))
    ctx.notes.tensors.append((P.TRAINING, f"checkpointed layer input ({setup.per_device_train_batch_size}, "
                                          f"{setup.seq_len}, {h})", tokens * h * residual))
    return candidates


def optimizer_step(ctx: Ctx) -> dict[str, int]:
    """``optimizer.step()`` after the last micro-step: all gradients, plus foreach AdamW's temporary."""
    return {C.GRADIENTS: params.gradient_bytes(ctx), C.OPTIMIZER_TEMP: params.optimizer_temp_bytes(ctx)}


def with_slack(parts: dict[str, int]) -> dict[str, int]:
    """Caching-allocator slack on torch's own allocations (not the context nor vLLM's pool)."""
    torch_bytes = sum(v for k, v in parts.items() if k not in NOT_TORCH_ALLOCATED)
    parts[C.ALLOCATOR_SLACK] = int(torch_bytes * ALLOCATOR_SLACK_FRACTION)
    return parts


def step(ctx: Ctx, adjust: Callable[..., dict] | None = None
         ) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Every phase of the step (persistent last: it is printed first) and the raw persistent parts.

    ``adjust(phase, parts, moment)`` — the sharding step of a multi-GPU job (:mod:`.parallel`) — rewrites each
    phase's model states for one rank before the allocator slack is added; the training phase is the largest of
    its moments after that rewrite (a sharded job can peak at another moment than one GPU)."""
    def rank(phase: str, parts: dict, moment: str | None = None) -> dict:
        return adjust(phase, parts, moment) if adjust is not None else parts

    base = persistent(ctx)
    phases: dict[str, dict[str, int]] = {}
    phases[P.GENERATION] = with_slack(rank(P.GENERATION, {**base, **generation(ctx)}))
    awake = vllm.awake(ctx, base)
    scored = scoring(ctx)
    if scored is not None:
        phases[P.SCORING] = with_slack(rank(P.SCORING, {**awake, **scored}))
    candidates = training_moments(ctx)
    if adjust is not None:  # moments only a sharded rank can peak at (their one-GPU parts: never the largest)
        first_block = dict(candidates)["first_block"]
        candidates = candidates + [("forward", forward_moment(ctx)),
                                   ("block_reduce", {k: v for k, v in first_block.items()
                                                     if k != C.RECOMPUTED_LAYER})]
    moments = [with_slack(rank(P.TRAINING, {**awake, **parts}, moment)) for moment, parts in candidates]
    phases[P.TRAINING] = max(moments, key=lambda parts: sum(parts.values()))
    phases[P.OPTIMIZER] = with_slack(rank(P.OPTIMIZER, {**awake, **optimizer_step(ctx)}))
    phases = {P.PERSISTENT: with_slack(rank(P.PERSISTENT, dict(awake))), **phases}
    return phases, rank(P.PERSISTENT, dict(base))
