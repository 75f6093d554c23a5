"""The estimate-vs-simulation cross-check matrix: one row per setup the estimate is held to the simulation on
(tests/test_accuracy_matrix.py in CI, benchmarks/bench_simulate.py at full size; docs/accuracy.md)."""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import GpuMemError
from ...models import ModelSpec, resolve_model

#: (name, registry model, CI layers, CI (b, P, C), full-size (b, P, C), other setup keys). Covers Llama-,
#: Qwen2-, Qwen3- and Gemma3-style blocks, full fine-tuning / LoRA (q,v and all-linear) / QLoRA, checkpointing
#: on and off, fp32 and bf16 weights, materialised and chunked log-probs, sdpa / eager / FlashAttention,
#: fused / foreach / 8-bit AdamW, gradient accumulation and the scoring passes (beta, misaligned GA).
MATRIX: tuple = (
    ("llama full bf16 mat ckpt", "meta-llama/Llama-3.2-1B", 3, (8, 128, 256), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "materialized"}),
    ("llama full fp32 mat ckpt", "meta-llama/Llama-3.2-1B", 3, (2, 64, 512), (4, 256, 768),
     {"dtype": "float32", "logits": "materialized"}),
    ("llama full bf16 chunk nockpt", "meta-llama/Llama-3.2-1B", 3, (8, 256, 256), (4, 512, 512),
     {"dtype": "bfloat16", "logits": "chunked", "gradient_checkpointing": False}),
    ("llama-8b full bf16 chunk nockpt", "meta-llama/Llama-3.1-8B", 2, (2, 128, 256), (2, 256, 256),
     {"dtype": "bfloat16", "logits": "chunked", "gradient_checkpointing": False}),
    ("llama full fp32 chunk nockpt", "meta-llama/Llama-3.2-1B", 3, (4, 128, 128), (4, 256, 256),
     {"dtype": "float32", "logits": "chunked", "gradient_checkpointing": False}),
    ("llama lora-all bf16 mat ckpt", "meta-llama/Llama-3.2-1B", 3, (4, 128, 128), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "materialized", "lora_rank": 16, "lora_target_modules": "all-linear"}),
    ("llama lora-qv fp32 chunk ckpt", "meta-llama/Llama-3.2-1B", 3, (8, 64, 512), (8, 512, 1024),
     {"dtype": "float32", "logits": "chunked", "lora_rank": 16}),
    ("llama-8b lora-all bf16 chunk ckpt", "meta-llama/Llama-3.1-8B", 2, (4, 128, 256), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "chunked", "lora_rank": 32, "lora_target_modules": "all-linear"}),
    ("qwen2 full bf16 mat ckpt", "Qwen/Qwen2.5-0.5B", 3, (8, 64, 512), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "materialized"}),
    ("qwen2 full fp32 chunk ckpt", "Qwen/Qwen2.5-0.5B", 3, (4, 128, 128), (8, 512, 512),
     {"dtype": "float32", "logits": "chunked"}),
    ("qwen2 lora-qv bf16 chunk nockpt", "Qwen/Qwen2.5-0.5B", 3, (8, 128, 256), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "chunked", "lora_rank": 8, "gradient_checkpointing": False}),
    ("qwen2 lora-all fp32 mat foreach", "Qwen/Qwen2.5-0.5B", 3, (4, 128, 128), (8, 512, 512),
     {"dtype": "float32", "logits": "materialized", "lora_rank": 16, "lora_target_modules": "all-linear",
      "optim": "adamw_torch"}),
    ("qwen2 full bf16 eager nockpt", "Qwen/Qwen2.5-0.5B", 3, (4, 256, 256), (4, 512, 512),
     {"dtype": "bfloat16", "logits": "materialized", "attn_implementation": "eager",
      "gradient_checkpointing": False}),
    ("qwen2 full bf16 flash-attn chunk", "Qwen/Qwen2.5-0.5B", 3, (4, 128, 128), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "chunked", "attn_implementation": "flash_attention_2"}),
    ("qwen2-7b qlora-all bf16 chunk", "Qwen/Qwen2.5-7B", 2, (4, 128, 128), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "chunked", "lora_rank": 16, "lora_target_modules": "all-linear",
      "load_in_4bit": True}),
    ("qwen2-7b full bf16 mat GA2", "Qwen/Qwen2.5-7B", 2, (2, 128, 128), (2, 256, 256),
     {"dtype": "bfloat16", "logits": "materialized", "gradient_accumulation_steps": 2}),
    ("gemma3 full bf16 mat ckpt", "google/gemma-3-1b-it", 3, (4, 128, 256), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "materialized"}),
    ("gemma3 lora-all bf16 chunk ckpt", "google/gemma-3-1b-it", 3, (8, 128, 128), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "chunked", "lora_rank": 16, "lora_target_modules": "all-linear"}),
    ("gemma3 full bf16 mat nockpt", "google/gemma-3-1b-it", 3, (2, 128, 128), (2, 512, 512),
     {"dtype": "bfloat16", "logits": "materialized", "gradient_checkpointing": False}),
    ("gemma3 lora-qv fp32 mat nockpt", "google/gemma-3-1b-it", 3, (4, 128, 128), (4, 512, 512),
     {"dtype": "float32", "logits": "materialized", "lora_rank": 16, "gradient_checkpointing": False}),
    ("llama-8b full fp32 mat ckpt", "meta-llama/Llama-3.1-8B", 2, (2, 128, 128), (2, 256, 256),
     {"dtype": "float32", "logits": "materialized"}),
    ("qwen3 full bf16 mat beta", "Qwen/Qwen3-0.6B", 3, (4, 128, 128), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "materialized", "beta": 0.04}),
    ("qwen3 qlora-qv bf16 chunk beta", "Qwen/Qwen3-0.6B", 3, (4, 128, 128), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "chunked", "lora_rank": 16, "beta": 0.04, "load_in_4bit": True}),
    ("llama full bf16 8bit-adam chunk", "meta-llama/Llama-3.2-1B", 3, (4, 128, 128), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "chunked", "optim": "adamw_8bit"}),
    ("llama full pure-fp32 chunk nockpt", "meta-llama/Llama-3.2-1B", 3, (4, 128, 128), (4, 256, 256),
     {"dtype": "float32", "bf16": False, "logits": "chunked", "gradient_checkpointing": False}),
    ("qwen3 lora-all pure-fp32 mat ckpt", "Qwen/Qwen3-0.6B", 3, (4, 128, 128), (8, 256, 256),
     {"dtype": "float32", "bf16": False, "logits": "materialized", "lora_rank": 16,
      "lora_target_modules": "all-linear"}),
    ("qwen3 lora-qv bf16 mat GA3 spg2", "Qwen/Qwen3-0.6B", 3, (4, 128, 128), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "materialized", "lora_rank": 16, "gradient_accumulation_steps": 3,
      "steps_per_generation": 2}),
)


def accuracy_matrix(scale: str = "ci") -> list[tuple[str, dict[str, Any]]]:
    """The estimate-vs-simulation cross-check setups (``tests/test_accuracy_matrix.py``,
    ``benchmarks/bench_simulate.py``). ``scale="ci"``: the real vocabulary, hidden size, heads and MLP width
    but 2–3 layers and short sequences (a second or less each); ``scale="full"``: the registry model with all
    its layers and full-size batches."""
    if scale not in ("ci", "full"):
        raise GpuMemError("scale", f"{scale!r} is not 'ci' or 'full'", fix="use scale='ci' or scale='full'")
    setups = []
    for name, model, layers, ci_shape, full_shape, keys in MATRIX:
        b, prompt, completion = ci_shape if scale == "ci" else full_shape
        setup = {"model": reduced_config(model, layers) if scale == "ci" else model,
                 "per_device_train_batch_size": b, "num_generations": max(b, 2),
                 "max_prompt_length": prompt, "max_completion_length": completion, **keys}
        setups.append((name, setup))
    return setups


def reduced_config(model: str | Mapping | ModelSpec, num_hidden_layers: int) -> dict[str, Any]:
    """An inline config dict with ``model``'s real vocabulary, hidden size, heads and MLP width but only
    ``num_hidden_layers`` layers: what CI simulates to keep each run to a second or two. Both
    :func:`~pytest_gpumem.predict.analytic.estimate` and :func:`~pytest_gpumem.predict.faketensor.simulate`
    accept it as ``model``."""
    spec = resolve_model(model)
    config: dict[str, Any] = {
        "name": f"{spec.name} ({num_hidden_layers} layers)", "model_type": spec.model_type,
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": num_hidden_layers, "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads, "head_dim": spec.head_dim,
        "tie_word_embeddings": spec.tie_word_embeddings, "qkv_bias": spec.qkv_bias, "o_proj_bias": spec.o_proj_bias,
        "mlp_bias": spec.mlp_bias, "qk_norm": spec.qk_norm, "torch_dtype": spec.checkpoint_dtype,
    }
    if spec.is_moe:
        config.update({"num_experts": spec.num_experts, "num_experts_per_tok": spec.num_experts_per_tok,
                       "moe_intermediate_size": spec.moe_intermediate_size})
    if spec.num_sliding_layers and spec.sliding_window:
        full_every = max(1, round(spec.num_hidden_layers / max(spec.num_full_attention_layers, 1)))
        config["sliding_window"] = spec.sliding_window
        config["layer_types"] = ["full_attention" if (i + 1) % full_every == 0 else "sliding_attention"
                                 for i in range(num_hidden_layers)]
    return config

