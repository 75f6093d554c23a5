"""The log-prob path: the usual biggest transient (docs/memory-model.md §2.1), per backend and logits mode."""

from __future__ import annotations

from .constants import (
    CHUNKED_TOKEN_TILE,
    CHUNKED_VOCAB_TILE,
    MATERIALIZED_FP32_LOGITS_BYTES,
    UNSLOTH_CHUNK_BYTES_PER_LOGIT,
    P,
)
from .context import Ctx


def logits_bytes(ctx: Ctx, when: str) -> int:
    """The log-prob path's transient for ``when`` in (forward, backward, scoring).

    materialised: the multipliers of docs/memory-model.md §2.1 × b·C·V (fp32 logits through accelerate).
    chunked (TRL 1.16 ``ChunkedLogProbFunction``): a [4096, 32768] projection tile in the compute dtype,
    the compacted completion hidden states, fp32 per-token statistics; in backward an fp32 grad of those
    hidden states and, when the head is trained (full fine-tuning), an fp32 [V, h] weight gradient.
    Unsloth: per chunk ``tokens × V × 10 B`` (bf16 logits + fp32 copy)."""
    setup, spec = ctx.setup, ctx.spec
    b, completion = setup.per_device_train_batch_size, setup.max_completion_length
    vocab, h = spec.vocab_size, spec.hidden_size
    phase = P.SCORING if when == "scoring" else P.TRAINING
    tensors = ctx.notes.tensors
    if not ctx.backend.model_head_logprobs:
        length = setup.seq_len
        tokens_per_chunk = -(-length // max(4, length // 4096))
        chunk = tokens_per_chunk * vocab * UNSLOTH_CHUNK_BYTES_PER_LOGIT
        tensors.append((phase, f"Unsloth logits chunk ({tokens_per_chunk}, {vocab}) float32",
                        tokens_per_chunk * vocab * 4))
        return chunk
    if setup.logits == "materialized" and not setup.use_liger_kernel:
        elements = b * completion * vocab
        tensors.append((phase, f"logits ({b}, {completion + 1}, {vocab}) float32", b * (completion + 1) * vocab * 4))
        return int(elements * MATERIALIZED_FP32_LOGITS_BYTES[when])
    # chunked / fused head (Liger's fused linear cross-entropy is chunked the same way)
    tokens = b * completion
    compute_bytes = 4 if setup.cast_lm_head_to_fp32 else 2
    tile = min(tokens, CHUNKED_TOKEN_TILE) * min(vocab, CHUNKED_VOCAB_TILE) * compute_bytes
    weight_tile_copy = (min(vocab, CHUNKED_VOCAB_TILE) * h * compute_bytes
                        if ctx.weight_bytes_per_param != compute_bytes else 0)
    hidden_compact = tokens * h * ctx.residual_bytes
    statistics = tokens * 4 * 8
    tensors.append((phase, f"log-prob tile ({min(tokens, CHUNKED_TOKEN_TILE)}, "
                           f"{min(vocab, CHUNKED_VOCAB_TILE)}) {'float32' if compute_bytes == 4 else 'bfloat16'}",
                    tile))
    total = tile + weight_tile_copy + hidden_compact + statistics
    if when == "backward":
        total += tokens * h * 4  # fp32 grad of the hidden states
        # the backward loop's `w_chunk = weight[start:end].to(compute_dtype)` holds the previous vocabulary
        # chunk's copy until the next one is assigned: two copies at once (FakeTensor simulation, fp32 head)
        total += weight_tile_copy
        if ctx.residual_bytes != 4:
            # ChunkedLogProbFunction.backward returns grad_hidden.to(hidden.dtype): both alive at the return
            total += tokens * h * ctx.residual_bytes
        if not setup.is_lora:
            head_grad = vocab * h * 4
            tensors.append((phase, f"lm_head weight grad ({vocab}, {h}) float32", head_grad))
            total += head_grad
            if ctx.weight_bytes_per_param != 4:
                # ... and grad_weight.to(weight.dtype) beside its fp32 accumulator (FakeTensor simulation:
                # Llama-3.2-1B, bf16: the 1002 MiB fp32 and 501 MiB bf16 head gradients coexist)
                total += vocab * h * ctx.weight_bytes_per_param
    return total


def head_cast_bytes(ctx: Ctx) -> int:
    """The lm_head's bf16 cast of fp32 weights, kept from the head's forward to its backward (materialised
    logits through the model's head; a 4-bit base too: bitsandbytes leaves the head unquantised, in the
    model's dtype)."""
    setup = ctx.setup
    if (setup.dtype == "float32" and setup.logits == "materialized" and ctx.backend.model_head_logprobs
            and ctx.compute_bytes == 2):  # pure fp32: no autocast, no cast
        return ctx.spec.vocab_size * ctx.spec.hidden_size * 2
    return 0


def head_forward_bytes(ctx: Ctx) -> int:
    """The materialised bf16 logits (b, C+1, V) at the end of the forward (0 for chunked log-probs)."""
    setup = ctx.setup
    if setup.logits != "materialized":
        return 0
    return setup.per_device_train_batch_size * (setup.max_completion_length + 1) * ctx.spec.vocab_size * 2


def generate_logits_bytes(ctx: Ctx) -> int:
    """HF generate: the last position's logits upcast to fp32, plus the softmax/sampling copy, per row."""
    return ctx.setup.generation_batch_size * ctx.spec.vocab_size * 4 * 2
