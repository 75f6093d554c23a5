"""Model states: weights, LoRA adapters, the reference model, gradients, optimizer states and temporaries.

The multi-GPU work adds its sharding step here (ZeRO-1/2/3 divide the 12Ψ / 14Ψ / 16Ψ of
docs/memory-model.md §4 across ranks); today every state is whole on the one GPU.
"""

from __future__ import annotations

from ...spec import OPTIMIZERS
from .constants import NF4_BYTES_PER_PARAM, NF4_DOUBLE_QUANT_BYTES_PER_PARAM
from .context import Ctx


def lora_bytes_per_param(ctx: Ctx) -> int:
    """PEFT adapters are fp32 (autocast_adapter_dtype=True); TRL casts them to bf16 for a quantised base
    (trl/trainer/grpo_trainer.py: "When using QLoRA, the PEFT adapter weights are converted to bf16")."""
    return 2 if ctx.adapters_bf16 else 4


def base_weight_bytes(ctx: Ctx) -> int:
    """Policy weights: Ψ × dtype bytes, or NF4 linears + 16/32-bit embeddings, head and norms."""
    spec, setup = ctx.spec, ctx.setup
    # Unsloth's offload_embedding=True keeps the input embedding on the CPU (a tied one is the head: it stays)
    offloaded = spec.embedding_params() if setup.offload_embedding and not spec.tie_word_embeddings else 0
    if setup.load_in_4bit:
        quantised = spec.linear_params()
        per_param = NF4_DOUBLE_QUANT_BYTES_PER_PARAM if ctx.backend.nf4_double_quant else NF4_BYTES_PER_PARAM
        rest = spec.num_params - quantised - offloaded
        return int(quantised * per_param) + rest * ctx.weight_bytes_per_param
    weights = (spec.num_params - offloaded) * ctx.weight_bytes_per_param
    if setup.cast_lm_head_to_fp32 and ctx.weight_bytes_per_param == 2:
        weights += spec.vocab_size * spec.hidden_size * 2  # lm_head (or the tied embedding) in fp32
    return weights


def reference_weight_bytes(ctx: Ctx) -> int:
    """``beta != 0`` without PEFT: a full second model, loaded by the same dtype rule (docs/memory-model.md §2);
    with PEFT the reference is the policy with its adapter disabled."""
    if ctx.setup.beta != 0 and not ctx.setup.is_lora:
        return ctx.spec.num_params * ctx.weight_bytes_per_param
    return 0


def trainable_params(ctx: Ctx) -> int:
    return ctx.lora_params if ctx.setup.is_lora else ctx.spec.num_params


def trainable_bytes_per_param(ctx: Ctx) -> int:
    return lora_bytes_per_param(ctx) if ctx.setup.is_lora else ctx.weight_bytes_per_param


def optimizer_state_bytes(ctx: Ctx) -> int:
    """AdamW's exp_avg / exp_avg_sq (or bitsandbytes' 8-bit states) of every trainable parameter."""
    setup = ctx.setup
    state_bytes, _ = OPTIMIZERS[setup.optim]
    if setup.optim.startswith(("adamw_torch", "adamw_hf")):
        # torch AdamW keeps exp_avg / exp_avg_sq in the parameter's dtype: 2 × param bytes. Not
        # bitsandbytes' paged_adamw_32bit: Optimizer2State allocates fp32 state1/state2 whatever the
        # parameter dtype (bnb/optim/optimizer.py, optim_bits=32) — OPTIMIZERS' 8 B/param stands
        state_bytes = 2 * trainable_bytes_per_param(ctx)
    return int(trainable_params(ctx) * state_bytes)


def gradient_bytes(ctx: Ctx) -> int:
    """All gradients (``.grad`` of every trainable parameter)."""
    return trainable_params(ctx) * trainable_bytes_per_param(ctx)


def gradient_parts(ctx: Ctx) -> tuple[int, int, int]:
    """(gradients made by the head's backward, gradients of one block, all gradients), bytes."""
    setup, spec = ctx.setup, ctx.spec
    grad_bytes = trainable_bytes_per_param(ctx)
    total = trainable_params(ctx) * grad_bytes
    if setup.is_lora:
        return 0, ctx.lora_params // max(spec.num_hidden_layers, 1) * grad_bytes, total
    head = (spec.vocab_size * spec.hidden_size + spec.hidden_size) * grad_bytes
    return head, spec.layer_params() * grad_bytes, total


def optimizer_temp_bytes(ctx: Ctx) -> int:
    """foreach AdamW's state-sized temporary inside ``step()`` (docs/memory-model.md §2: adamw_torch allocates one
    extra buffer; fused none)."""
    _, temp_per_param = OPTIMIZERS[ctx.setup.optim]
    return trainable_params(ctx) * (trainable_bytes_per_param(ctx) if temp_per_param else 0)
