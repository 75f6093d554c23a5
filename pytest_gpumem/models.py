"""Model architectures: :class:`ModelSpec` and where it comes from.

Sources, in order: an inline dict of Hugging Face config fields, a local path (a model directory or its
``config.json``), the built-in registry (``data/models.json``: exact public configs of popular models,
every record with its sources), and finally the local Hugging Face cache — read as plain files
(``$HF_HUB_CACHE/models--org--name/snapshots/*/config.json``), never a download, never an import of
transformers or torch.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from .architectures import architecture
from .errors import GpuMemError, UnknownModelError

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class ModelSpec:
    """The shapes that decide memory. Field names follow transformers' config names."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norms_per_layer: int = 2
    attention_sinks: bool = False
    # attention pattern: layers with a sliding window keep only `sliding_window` tokens of KV cache
    num_sliding_layers: int = 0
    sliding_window: int | None = None
    # Mixture of experts (every layer MoE when num_experts is set, as in all registry MoE models)
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    expert_bias: bool = False  # gpt-oss: expert projections and router carry biases
    checkpoint_dtype: str = "bfloat16"  # torch_dtype of the checkpoint: what vLLM loads
    fused_projections: bool = False
    published_num_params: int | None = None
    source: str = "inline"  # "registry", "path:<...>", "hf-cache:<...>", "inline"

    # -- derived shapes -----------------------------------------------------------------------
    @property
    def q_out(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_out(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def num_full_attention_layers(self) -> int:
        return self.num_hidden_layers - self.num_sliding_layers

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    # -- parameter counts (the formula of data/README.md, reproduced to the parameter) -----------
    def attention_params(self) -> int:
        h = self.hidden_size
        params = h * self.q_out + 2 * h * self.kv_out + self.q_out * h
        if self.qkv_bias:
            params += self.q_out + 2 * self.kv_out
        if self.o_proj_bias:
            params += h
        if self.qk_norm:
            params += 2 * self.head_dim
        if self.attention_sinks:
            params += self.num_attention_heads
        return params

    def expert_params(self) -> int:
        """One expert's gated MLP (gate, up, down), with gpt-oss's biases when present."""
        h, i = self.hidden_size, self.moe_intermediate_size or self.intermediate_size
        params = 3 * h * i
        if self.expert_bias:
            params += 2 * i + h
        return params

    def mlp_params(self) -> int:
        h = self.hidden_size
        if self.is_moe:
            router = h * self.num_experts + (self.num_experts if self.expert_bias else 0)
            return self.num_experts * self.expert_params() + router
        params = 3 * h * self.intermediate_size
        if self.mlp_bias:
            params += 2 * self.intermediate_size + h
        return params

    def layer_params(self) -> int:
        return self.attention_params() + self.mlp_params() + self.norms_per_layer * self.hidden_size

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        """The output projection's own parameters (0 when tied to the embedding)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        return (self.embedding_params() + self.num_hidden_layers * self.layer_params()
                + self.hidden_size + self.lm_head_params())

    def linear_params(self) -> int:
        """Parameters inside decoder ``nn.Linear`` layers (what bitsandbytes quantises): weights only."""
        h = self.hidden_size
        attention = h * self.q_out + 2 * h * self.kv_out + self.q_out * h
        if self.is_moe:
            mlp = self.num_experts * 3 * h * (self.moe_intermediate_size or self.intermediate_size)
            mlp += h * self.num_experts
        else:
            mlp = 3 * h * self.intermediate_size
        return self.num_hidden_layers * (attention + mlp)

    def active_params_per_token(self) -> int:
        if not self.is_moe:
            return self.num_params
        inactive = (self.num_experts - self.num_experts_per_tok) * self.expert_params()
        return self.num_params - self.num_hidden_layers * inactive

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV cache bytes per token over all layers: ``2 · n_layers · kv_heads · head_dim · bytes``."""
        return 2 * self.num_hidden_layers * self.kv_out * dtype_bytes

    def kv_cache_bytes(self, tokens: int, dtype_bytes: int = 2) -> int:
        """KV cache of one sequence of ``tokens``: ``Σ_layers 2 · kv_heads · head_dim · bytes · tokens``, a
        sliding-window layer keeping at most ``sliding_window`` tokens (docs/memory-model.md §3). HF generate's
        cache, vLLM's pool and vLLM's one-sequence start-up check all use this one formula."""
        sliding_tokens = min(tokens, self.sliding_window or tokens)
        return 2 * self.kv_out * dtype_bytes * (self.num_full_attention_layers * tokens
                                                 + self.num_sliding_layers * sliding_tokens)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``{module: (in_features, out_features)}`` of one decoder layer's dense projections (LoRA targets)."""
        h, i = self.hidden_size, self.intermediate_size
        shapes = {"q_proj": (h, self.q_out), "k_proj": (h, self.kv_out), "v_proj": (h, self.kv_out),
                  "o_proj": (self.q_out, h)}
        if not self.is_moe:
            shapes.update({"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)})
        if self.fused_projections:  # Phi-3 names
            shapes = {"qkv_proj": (h, self.q_out + 2 * self.kv_out), "o_proj": (self.q_out, h),
                      "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        return shapes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["num_params"] = self.num_params
        return data

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], *, name: str | None = None, source: str = "inline",
                       published_num_params: int | None = None) -> "ModelSpec":
        """Build from a transformers ``config.json`` dict (multimodal configs: their ``text_config``)."""
        if "text_config" in config and isinstance(config["text_config"], Mapping):
            outer = config
            config = {**architecture(outer.get("model_type")).text_config_defaults, **config["text_config"]}
            config.setdefault("model_type", outer.get("model_type"))
        model_type = config.get("model_type")
        if not model_type:
            raise GpuMemError("model", "the config has no 'model_type'",
                              fix="add the model_type of the architecture, e.g. 'llama', 'qwen2', 'gemma3_text'")
        missing = [key for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
                   if config.get(key) in (None, "")]
        if missing:
            raise GpuMemError("model", f"the config lacks {', '.join(missing)}",
                              fix="give the full config.json fields of the architecture")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        head_dim = config.get("head_dim") or hidden // heads
        attention_bias = config.get("attention_bias")
        arch = architecture(model_type)
        if "qkv_bias" in config:
            qkv_bias, o_bias = bool(config["qkv_bias"]), bool(config.get("o_proj_bias"))
        elif arch.qkv_bias_hardcoded:
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(attention_bias)
        num_experts = config.get("num_experts") or config.get("num_local_experts")
        num_layers = int(config["num_hidden_layers"])
        num_sliding, window = _sliding_layers(config, model_type, num_layers)
        intermediate = config.get("intermediate_size") or config.get("moe_intermediate_size") or 4 * hidden
        return cls(
            name=name or config.get("_name_or_path") or model_type,
            model_type=str(model_type),
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(intermediate),
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", arch.tied_embeddings)),
            qkv_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=bool(config.get("mlp_bias", False)) and not num_experts,
            qk_norm=bool(config.get("qk_norm", arch.qk_norm)),
            norms_per_layer=arch.norms_per_layer,
            attention_sinks=bool(config.get("attention_sinks", arch.attention_sinks)),
            num_sliding_layers=num_sliding,
            sliding_window=window,
            num_experts=int(num_experts) if num_experts else None,
            num_experts_per_tok=int(config.get("num_experts_per_tok") or config.get("experts_per_token") or 0)
            or None,
            moe_intermediate_size=int(config["moe_intermediate_size"]) if config.get("moe_intermediate_size")
            else None,
            expert_bias=arch.expert_bias,
            checkpoint_dtype=str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"),
            fused_projections=arch.fused_projections,
            published_num_params=published_num_params,
            source=source,
        )


def _sliding_layers(config: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[int, int | None]:
    """How many layers use a sliding window, and its size."""
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list):
        return sum(1 for t in layer_types if t == "sliding_attention"), window
    if isinstance(layer_types, Mapping) and "num_sliding" in layer_types:  # registry summary
        return int(layer_types["num_sliding"]), window
    pattern = config.get("sliding_window_pattern")
    if pattern and window and int(pattern) > 0:
        # layer i is full attention iff (i + 1) % pattern == 0: num_layers // pattern of them
        return num_layers - num_layers // int(pattern), window
    if architecture(model_type).sliding_window == "every_layer" and window:
        return num_layers, window
    return 0, None  # a window no layer uses (Qwen2/3 configs carry one with use_sliding_window false)


# -- the registry -----------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _registry_records() -> list[dict[str, Any]]:
    with open(DATA_DIR / "models.json", encoding="utf-8") as handle:
        return json.load(handle)


@lru_cache(maxsize=1)
def registry() -> dict[str, ModelSpec]:
    """Canonical registry name -> spec."""
    specs = {}
    for record in _registry_records():
        specs[record["name"]] = ModelSpec.from_hf_config(
            record["config"], name=record["name"], source="registry",
            published_num_params=record.get("published_total_params"))
    return specs


@lru_cache(maxsize=1)
def _registry_index() -> dict[str, str]:
    """lower-cased name / alias / bare repo name -> canonical name."""
    index: dict[str, str] = {}
    for record in _registry_records():
        for key in [record["name"], *record.get("aliases", [])]:
            index.setdefault(key.lower(), record["name"])
            index.setdefault(key.split("/")[-1].lower(), record["name"])
    return index


def registry_record(name: str) -> dict[str, Any]:
    for record in _registry_records():
        if record["name"] == name:
            return record
    raise KeyError(name)


def _hf_cache_config(name: str) -> Path | None:
    """``config.json`` of ``org/name`` in the local HF hub cache, if present. Files only: no network."""
    if "/" not in name:
        return None
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    roots.append(hf_home / "hub")
    folder = "models--" + name.replace("/", "--")
    for root in roots:
        snapshots = root / folder / "snapshots"
        if snapshots.is_dir():
            for config in sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True):
                return config
    return None


def close_matches(name: str, n: int = 5) -> list[str]:
    index = _registry_index()
    matches = difflib.get_close_matches(name.lower(), list(index), n=n * 2, cutoff=0.5)
    seen: dict[str, None] = {}
    for match in matches:
        seen.setdefault(index[match], None)
    # also suggest models whose name contains what was typed ("qwen3" -> all Qwen3 sizes)
    for key, canonical in index.items():
        if len(name) >= 3 and name.lower() in key:
            seen.setdefault(canonical, None)
    return list(seen)[:n]


def resolve_model(model: str | Mapping[str, Any] | ModelSpec) -> ModelSpec:
    """Turn the setup's ``model`` value into a :class:`ModelSpec` (see module docstring for the order)."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, Mapping):
        return ModelSpec.from_hf_config(model, name=str(model.get("name") or model.get("_name_or_path")
                                                         or f"inline {model.get('model_type', '?')}"))
    if not isinstance(model, str) or not model.strip():
        raise UnknownModelError("model", f"expected a model name, path or config dict, got {model!r}",
                                fix="e.g. model='Qwen/Qwen2.5-7B' (see `gpumem models`)")
    return _resolve_named(model.strip())


@lru_cache(maxsize=256)
def _resolve_named(name: str) -> ModelSpec:
    path = Path(name).expanduser()
    if path.exists():
        config_path = path / "config.json" if path.is_dir() else path
        if not config_path.is_file():
            raise UnknownModelError("model", f"{name!r} is a directory without config.json",
                                    fix="point at a model directory saved with save_pretrained, or its config.json")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UnknownModelError("model", f"cannot read {config_path}: {exc}",
                                    fix="give a valid config.json") from None
        return ModelSpec.from_hf_config(config, name=name, source=f"path:{config_path}")
    canonical = _registry_index().get(name.lower())
    if canonical:
        return registry()[canonical]
    cached = _hf_cache_config(name)
    if cached is not None:
        config = json.loads(cached.read_text(encoding="utf-8"))
        return ModelSpec.from_hf_config(config, name=name, source=f"hf-cache:{cached}")
    suggestions = close_matches(name)
    hint = f"did you mean {', '.join(repr(s) for s in suggestions)}? " if suggestions else ""
    raise UnknownModelError(
        "model", f"unknown model {name!r}: not a local path, not in the registry, not in the local HF cache",
        fix=f"{hint}see `gpumem models` for the registry, or pass a local config.json path or an inline dict "
            "of config fields with model_type")
