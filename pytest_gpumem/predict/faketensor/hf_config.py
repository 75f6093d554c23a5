"""The transformers config a simulation builds its model from: the ModelSpec's shapes, with what the
architecture's row in ``architectures.py`` says transformers' config class for the type needs."""

from __future__ import annotations

from typing import Any

from ...architectures import transformers_architecture
from ...models import ModelSpec
from .scope import SimulationError


def hf_config_for(spec: ModelSpec, seq_len: int):
    """A transformers config with the spec's shapes (random weights are built from it; no download).

    Built from the :class:`ModelSpec` — the same shapes the estimate uses — rather than from a raw
    ``config.json``, because registry records store a normalised summary. Architecture details that change
    memory follow transformers' own class for ``model_type`` (Gemma's four norms, Qwen2's q/k/v biases,
    Qwen3/Gemma3 q/k norms, Phi-3's fused projections)."""
    from transformers import AutoConfig

    arch = transformers_architecture(spec.model_type)
    model_type = arch.model_type
    kwargs: dict[str, Any] = {
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim, "tie_word_embeddings": spec.tie_word_embeddings,
        "max_position_embeddings": max(seq_len + 1, 4096), "use_cache": False,
        "attention_dropout": 0.0,
    }
    if arch.config_takes_attention_bias:
        kwargs["attention_bias"] = bool(spec.qkv_bias or spec.o_proj_bias)
    if arch.config_takes_mlp_bias:
        kwargs["mlp_bias"] = spec.mlp_bias
    if arch.sliding_window == "layer_types" and spec.num_sliding_layers and spec.sliding_window:
        sliding = sliding_pattern(spec)
        kwargs["sliding_window"] = spec.sliding_window
        kwargs["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    elif arch.sliding_window == "every_layer":
        kwargs["sliding_window"] = spec.sliding_window
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except (KeyError, ValueError) as exc:
        raise SimulationError("model", f"transformers {__import__('transformers').__version__} has no architecture "
                              f"for model_type {spec.model_type!r} ({exc})",
                              fix="use `gpumem estimate`, or give an inline config with a transformers model_type "
                                  "such as 'llama', 'qwen2', 'gemma3_text'") from None



def sliding_pattern(spec: ModelSpec) -> list[bool]:
    """Which layers use the sliding window: Gemma's every-6th-layer-is-global pattern, trimmed so the count
    matches the spec (reduced-layer configs keep their own count)."""
    pattern = [((i + 1) % 6) != 0 for i in range(spec.num_hidden_layers)]
    if sum(pattern) != spec.num_sliding_layers:
        pattern = [i < spec.num_sliding_layers for i in range(spec.num_hidden_layers)]
    return pattern

