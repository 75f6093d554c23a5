"""Per-architecture facts: one row per transformers ``model_type``, the only place that names model types.

A config's numbers (hidden size, layers, heads, ...) are read generically by
:meth:`pytest_gpumem.models.ModelSpec.from_hf_config`; what a config does *not* say — that transformers
hard-codes Qwen2's q/k/v biases, that Gemma blocks carry four norms, which Linears PEFT adapts by default —
is here, with where it comes from. Every consumer asks :func:`architecture`: the model registry
(``models.py``), the estimate's activations (``predict/analytic/activations.py``), the simulation's
transformers config (``predict/faketensor/hf_config.py``), the measurement's model build
(``measure/child/tiny.py``) and the LoRA targets (``spec.py``).

Adding an architecture is one :class:`Architecture` row in :data:`ARCHITECTURES` (plus its records in
``data/models.json``, and a row in ``predict/faketensor/matrix.py`` to hold the estimate to the simulation
for it). A model type without a row reads its config generically with every trait off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

#: PEFT's default LoRA targets when its mapping has no entry for the model type
#: (peft ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``: q_proj and v_proj for Llama-style blocks)
PEFT_DEFAULT_TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class Architecture:
    """What one ``model_type`` implies beyond its config's numbers (every trait off by default)."""

    model_type: str
    # -- reading config.json (models.ModelSpec.from_hf_config) ---------------------------------------
    #: transformers hard-codes q/k/v biases (and no o_proj bias) for the type: its config has no attention_bias
    qkv_bias_hardcoded: bool = False
    #: per-head RMSNorm on q and k, when the config has no ``qk_norm`` key
    qk_norm: bool = False
    #: RMSNorms per decoder layer (Gemma 2/3: pre/post attention and pre/post feed-forward)
    norms_per_layer: int = 2
    #: ``tie_word_embeddings`` when the config does not say
    tied_embeddings: bool = False
    #: q/k/v fused into ``qkv_proj`` and gate/up into ``gate_up_proj`` (same parameter count)
    fused_projections: bool = False
    #: per-head attention sinks (one parameter per head), when the config has no ``attention_sinks`` key
    attention_sinks: bool = False
    #: expert projections and the router carry biases
    expert_bias: bool = False
    #: how a config's ``sliding_window`` applies when no ``layer_types`` / ``sliding_window_pattern`` says:
    #: ``"every_layer"`` (Mistral), ``"layer_types"`` (Gemma: per-layer types, and the pattern is built that
    #: way), or ``""`` (the window key is ignored: Qwen2/3 configs carry one with use_sliding_window false)
    sliding_window: str = ""
    #: a multimodal config's minimal ``text_config`` is completed with these (transformers' text-config defaults)
    text_config_defaults: Mapping[str, Any] = field(default_factory=dict)
    # -- the estimate's saved activations (predict/analytic/activations.py) ----------------------------
    #: Gemma's RMSNorm: ``x · (1 + w)`` computed in fp32, and the norms on o_proj's and down_proj's outputs
    gemma_norms: bool = False
    # -- building the model with transformers (simulation and measurement) -----------------------------
    #: the text-only model type transformers builds for a multimodal type, and its causal-LM class
    text_model_type: str | None = None
    text_architecture: str | None = None
    #: transformers' config class takes ``attention_bias`` / ``mlp_bias`` (others hard-code them)
    config_takes_attention_bias: bool = False
    config_takes_mlp_bias: bool = False
    # -- LoRA ----------------------------------------------------------------------------------------
    #: the Linears PEFT adapts when ``target_modules`` is not given
    peft_default_targets: tuple[str, ...] = PEFT_DEFAULT_TARGETS


#: Gemma 3's published config.json gives a minimal text_config; the rest are transformers' ``Gemma3TextConfig``
#: defaults (see data/models.json notes for gemma-3-4b-it)
_GEMMA3_TEXT_DEFAULTS = {"vocab_size": 262208, "head_dim": 256, "num_attention_heads": 8, "num_key_value_heads": 4,
                         "sliding_window_pattern": 6, "tie_word_embeddings": True, "model_type": "gemma3_text"}

#: Sources: transformers 5 ``models/<type>/configuration_<type>.py`` and ``modeling_<type>.py`` (biases, norms,
#: q/k norms, tied embeddings, fused projections, sinks); peft ``utils/constants.py`` (default LoRA targets).
ARCHITECTURES: dict[str, Architecture] = {row.model_type: row for row in (
    Architecture("llama", config_takes_attention_bias=True, config_takes_mlp_bias=True),
    Architecture("mistral", sliding_window="every_layer", config_takes_attention_bias=True),
    Architecture("qwen2", qkv_bias_hardcoded=True),
    Architecture("qwen2_moe", qkv_bias_hardcoded=True),
    Architecture("qwen3", qk_norm=True, config_takes_attention_bias=True),
    Architecture("qwen3_moe", qk_norm=True),
    # Gemma 1 keeps two norms per layer; the estimate's Gemma norm rule covers the whole family as it always has
    Architecture("gemma", tied_embeddings=True, gemma_norms=True, sliding_window="layer_types",
                 config_takes_attention_bias=True),
    Architecture("gemma2", norms_per_layer=4, tied_embeddings=True, gemma_norms=True, sliding_window="layer_types",
                 config_takes_attention_bias=True),
    Architecture("gemma3_text", qk_norm=True, norms_per_layer=4, tied_embeddings=True, gemma_norms=True,
                 sliding_window="layer_types", config_takes_attention_bias=True),
    Architecture("gemma3", qk_norm=True, norms_per_layer=4, tied_embeddings=True, gemma_norms=True,
                 sliding_window="layer_types", text_config_defaults=_GEMMA3_TEXT_DEFAULTS,
                 text_model_type="gemma3_text", text_architecture="Gemma3ForCausalLM"),
    Architecture("olmo2", qk_norm=True, config_takes_attention_bias=True),
    Architecture("olmoe", qk_norm=True),
    Architecture("phi3", fused_projections=True, peft_default_targets=("qkv_proj",)),
    Architecture("gpt_oss", attention_sinks=True, expert_bias=True, peft_default_targets=("q_proj", "v_proj")),
)}


def architecture(model_type: str | None) -> Architecture:
    """The row of ``model_type``; a type without one gets every trait off (its config is read generically)."""
    row = ARCHITECTURES.get(model_type or "")
    return row if row is not None else Architecture(str(model_type))


def transformers_architecture(model_type: str | None) -> Architecture:
    """The row transformers builds for ``model_type``: a multimodal type's text model (gemma3 → gemma3_text)."""
    row = architecture(model_type)
    return architecture(row.text_model_type) if row.text_model_type else row
