"""Activations: what autograd saves per block, the block recomputed in backward, the 4-D masks, autocast's
weight copies, and the no-grad transients of scoring and HF generate's prefill.

The only architecture-specific arithmetic of the estimate. Saved activations are derived op by op from what
autograd keeps in transformers 5's Llama/Qwen2/Qwen3/Gemma3 blocks under bf16 autocast (sdpa), and checked
per layer against the FakeTensor simulation (``predict/faketensor``): within 3% for those four families ×
{bf16, fp32} × {full, LoRA q/v, LoRA all-linear, QLoRA} × {sdpa, eager} (docs/accuracy.md). A block with new
activations (a new norm, attention or MLP shape) is a change here; a new architecture with known blocks is a
row in ``architectures.py``.
"""

from __future__ import annotations

from ...architectures import architecture
from .context import Ctx


def active_intermediate(ctx: Ctx) -> int:
    """The MLP width one token goes through: the intermediate size, or the active experts' (MoE)."""
    spec = ctx.spec
    if spec.is_moe:
        return spec.num_experts_per_tok * (spec.moe_intermediate_size or spec.intermediate_size)
    return spec.intermediate_size


def linear_inputs_saved(ctx: Ctx, x_bytes: int, consumers: tuple, features: int) -> int:
    """Bytes per token kept for an input of ``features`` that feeds the Linears ``consumers``: a trained
    Linear keeps its bf16 input (shared when the input already is bf16, else its own autocast copy); a
    frozen base keeps nothing; a LoRA adapter keeps its own bf16 copy (PEFT casts the input to the
    adapter's fp32 dtype, autocast back to bf16) unless adapter and input are both bf16 (QLoRA)."""
    trained = not ctx.setup.is_lora
    c = ctx.compute_bytes
    # pure fp32: adapters, inputs and compute are all fp32, so the adapter shares the input too
    adapter_shares = (ctx.adapters_bf16 and x_bytes == 2) or c == 4
    targets = ctx.lora_targets
    shared, private = False, 0
    for name in consumers:
        if trained:
            if x_bytes == c:
                shared = True
            else:
                private += c * features
        if name in targets:
            if adapter_shares:
                shared = True
            else:
                private += c * features
    return (c * features if shared else 0) + private


def norm_saved(ctx: Ctx, x_bytes: int, features: int, consumers: tuple = ()) -> int:
    """An RMSNorm over ``features``: the fp32 upcast (a copy, or an fp32 input itself) is kept; a trained
    weight also keeps the normalised tensor (input dtype; Gemma's ``x * (1 + w)`` in fp32); then what the
    consuming Linears keep of its output."""
    saved = 4 * features
    if not ctx.setup.is_lora:
        saved += (4 if architecture(ctx.spec.model_type).gemma_norms else x_bytes) * features
    if consumers:
        saved += linear_inputs_saved(ctx, x_bytes, consumers, features)
    return saved


def layer_activation_bytes_per_token(ctx: Ctx) -> int:
    """Saved activations of one block without checkpointing, bytes per token, excluding the per-layer mask
    copy (:func:`mask_copy_bytes`) and weight casts (:func:`autocast_weight_copies`): norms, q/k norms,
    rotated q, k and v (repeated copies for GQA when kv heads > 1: transformers' ``repeat_kv``), the
    attention output, sdpa's fp32 log-sum-exp (eager: fp32 softmax + bf16 probabilities, 6·heads·L), the
    MLP's gate, activation and up (and their product when down_proj keeps its input)."""
    setup, spec = ctx.setup, ctx.spec
    h, q, kv, heads = spec.hidden_size, spec.q_out, spec.kv_out, spec.num_attention_heads
    inter = active_intermediate(ctx)
    r = ctx.residual_bytes
    trained = not setup.is_lora
    gemma = architecture(spec.model_type).gemma_norms
    c = ctx.compute_bytes
    # autocast Linears emit bf16 (pure fp32: fp32); bitsandbytes' Linear4bit casts its output to the input's dtype
    out_bytes = r if setup.load_in_4bit else c
    per_token = norm_saved(ctx, r, h, ("q_proj", "k_proj", "v_proj"))
    if spec.qk_norm:
        for features in (q, kv):
            per_token += 4 * features
            if trained:
                per_token += (4 if gemma else out_bytes) * features
    repeats = spec.num_attention_heads // max(spec.num_key_value_heads, 1)
    kv_saved = 2 * q if (repeats > 1 and spec.num_key_value_heads > 1) else 2 * kv
    attn = setup.attn_implementation
    if attn.startswith("flash"):
        # varlen: unpadded q/k/v copies, output, fp32 LSE; the padded output copy feeds o_proj
        per_token += c * q + 2 * c * kv + c * q + 4 * heads + c * q
    else:
        per_token += c * q + c * kv_saved + c * q
        per_token += (4 + c) * heads * setup.seq_len if attn == "eager" else 4 * heads
    if "o_proj" in ctx.lora_targets and not ctx.adapters_bf16 and c == 2:
        per_token += 2 * q
    if gemma:  # post-attention norm on o_proj's output
        per_token += norm_saved(ctx, out_bytes, h)
    per_token += norm_saved(ctx, r, h, ("gate_proj", "up_proj"))
    per_token += 3 * out_bytes * inter
    per_token += linear_inputs_saved(ctx, out_bytes, ("down_proj",), inter)
    if gemma:  # post-feedforward norm
        per_token += norm_saved(ctx, out_bytes, h)
    return per_token


def saved_activations(ctx: Ctx) -> int:
    """What the forward keeps for backward (docs/memory-model.md §5): with checkpointing exactly one layer input
    per layer (h × residual bytes per token) plus ≈ 2h × residual bytes after the final norm; Unsloth's
    offloaded checkpointing keeps ~2 layer-input buffers on the GPU; without checkpointing every block's
    (:func:`layer_activation_bytes_per_token`; mask copies and weight casts are separate components)."""
    setup, spec = ctx.setup, ctx.spec
    tokens = ctx.tokens
    h = spec.hidden_size
    if setup.gradient_checkpointing == "unsloth":
        return tokens * h * 2 * 2 + tokens * 2 * h * ctx.residual_bytes
    if setup.gradient_checkpointing:
        return tokens * h * ctx.residual_bytes * (spec.num_hidden_layers + 2)
    return tokens * (layer_activation_bytes_per_token(ctx) * spec.num_hidden_layers + 2 * h * ctx.residual_bytes)


def recompute_temporaries_per_token(ctx: Ctx) -> int:
    """Backward temporaries of one block at its worst moment (the MLP's backward), bytes per token, fitted
    to the FakeTensor simulation (±3h over Llama/Qwen2/Qwen3/Gemma3): trained MLP — the gradients of the
    product, the activation and up (3 × 2I) minus the product already released, plus the incoming hidden
    gradient; LoRA on down_proj — PEFT's fp32 copy of its input (4I) is alive too."""
    inter, h = active_intermediate(ctx), ctx.spec.hidden_size
    scale = ctx.compute_bytes // 2  # pure fp32: every one of these temporaries is fp32
    if not ctx.setup.is_lora:
        return (4 * inter + 2 * h) * scale
    if "down_proj" in ctx.lora_targets and not ctx.adapters_bf16:
        return (6 * inter + 10 * h) * scale
    return (4 * inter + 9 * h) * scale


def recomputed_layer(ctx: Ctx) -> int:
    """The block being processed in backward, at its worst moment: under checkpointing its recomputed
    activations, per-layer mask copy and weight casts plus the backward temporaries; without, only the
    temporaries (its saved activations are counted with the others)."""
    tokens = ctx.pass_tokens  # Unsloth's mini-batch passes recompute one pass at a time
    temporaries = tokens * recompute_temporaries_per_token(ctx)
    if not ctx.setup.gradient_checkpointing:
        return temporaries
    return (tokens * layer_activation_bytes_per_token(ctx) + temporaries + mask_copy_bytes(ctx)
            + autocast_weight_copies(ctx))


def mask_bytes(ctx: Ctx) -> int:
    """The 4-D mask transformers builds once per forward for a padded batch: bool b·L² for sdpa (one per
    attention kind: Gemma's sliding and full layers get one each when the window is shorter than L),
    in the model's dtype for eager; FlashAttention none (docs/memory-model.md §2)."""
    setup, spec = ctx.setup, ctx.spec
    b, length = setup.per_device_train_batch_size, setup.seq_len
    if setup.attn_implementation.startswith("flash") or not ctx.backend.builds_4d_mask:
        return 0
    kinds = 2 if (spec.num_sliding_layers and spec.num_full_attention_layers and spec.sliding_window
                  and spec.sliding_window < length) else 1
    if setup.attn_implementation == "eager":
        return b * length * length * ctx.residual_bytes * kinds
    return b * length * length * kinds


def mask_copy_bytes(ctx: Ctx) -> int:
    """torch's ``scaled_dot_product_attention`` converts the bool mask to the query dtype on every call
    (``convert_boolean_attn_mask``) and the kernel keeps it for backward: b·L² × 2 bytes per layer
    (seen in the FakeTensor simulation as ``where`` outputs, one per layer)."""
    setup = ctx.setup
    if setup.attn_implementation != "sdpa" or not ctx.backend.builds_4d_mask:
        return 0
    return setup.per_device_train_batch_size * setup.seq_len ** 2 * ctx.compute_bytes


def autocast_weight_copies(ctx: Ctx) -> int:
    """fp32 weights under bf16 autocast: the bf16 copies of ONE block's Linear weights (trained weights are
    cached by autocast, frozen ones re-cast per use; both kept for backward). Without checkpointing every
    block keeps its own (× n_layers in the training phase); with it, only the block being recomputed."""
    spec, setup = ctx.spec, ctx.setup
    if setup.dtype != "float32" or setup.load_in_4bit or ctx.compute_bytes == 4:  # pure fp32: no autocast
        return 0
    return spec.linear_params() // max(spec.num_hidden_layers, 1) * 2


def scoring_layer_peak_bytes(ctx: Ctx) -> int:
    """Inside a block of the no-grad scoring forward: the MLP's gate, up and product live together (3 × I in
    bf16) beside the norm's output, plus the per-linear bf16 cast of an fp32 norm output."""
    h, r, c = ctx.spec.hidden_size, ctx.residual_bytes, ctx.compute_bytes
    return ctx.tokens * (3 * c * active_intermediate(ctx) + r * h + (4 * h if r == 4 and c == 2 else 0))


def generate_prefill_bytes(ctx: Ctx) -> int:
    """HF generate's prefill runs the prompt through one layer at a time under no_grad: the MLP's gate/up/act
    (3·I) and four h-sized tensors, bf16, for every row of the generation batch."""
    setup, spec = ctx.setup, ctx.spec
    return setup.generation_batch_size * setup.max_prompt_length * (3 * spec.intermediate_size
                                                                    + 4 * spec.hidden_size) * ctx.compute_bytes
