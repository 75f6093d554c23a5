"""Models and tokenizers for measurement runs, built locally: no download, random weights.

GPU memory of a training step depends on the architecture's shapes, the dtypes and the batch — not on the
weights' values — so the runner builds the architecture with ``AutoModelForCausalLM.from_config`` (random
weights) and a tokenizer made on the spot (see ``docs/cpu-simulation.md``: the same recipe runs a
real TRL ``GRPOTrainer`` on CPU, offline).

The tokenizer is a **word-level** vocabulary ``<pad> <eos> <unk> w3 w4 … w{V-1}`` of exactly the model's
``vocab_size`` entries (a ByteLevel BPE trained on synthetic text, as in docs/cpu-simulation.md, stops far short
of a real vocabulary). Two properties follow that a measurement needs:

* every token id the model can sample decodes (a real-sized model samples from its whole vocabulary), and
* a prompt of ``n`` words is exactly ``n`` tokens, so prompts are exactly ``max_prompt_length`` long — the
  worst case is what gets measured (TRL ≥ 0.28 no longer truncates prompts).

Heavy imports (torch, transformers, tokenizers) happen inside the functions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Mapping

from ...architectures import architecture
from ...errors import GpuMemError
from ...models import ModelSpec, registry_record, resolve_model

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<unk>"
#: ids of the special tokens in the word-level vocabulary; words start after them
NUM_SPECIAL_TOKENS = 3
#: A minimal chat template: TRL applies it only to conversational prompts; vLLM and Unsloth read it.
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}{% endif %}")

#: A tiny Qwen2-architecture config: runs a real GRPOTrainer step on CPU in well under a second.
TINY_QWEN2_CONFIG: dict[str, Any] = {
    "model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 1024, "tie_word_embeddings": True,
}

# Keys of the registry's normalised configs (data/models.json) that are not transformers config fields.
_REGISTRY_ONLY_KEYS = {"head_dim_in_config", "tie_word_embeddings_in_config", "qkv_bias", "o_proj_bias", "qk_norm",
                       "text_model_type", "vision_config", "mm_tokens_per_image", "name", "_name_or_path"}

WEIGHT_FILE_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.safetensors.index.json")


# -- which model, from where ------------------------------------------------------------------------
def model_source(model: Any) -> dict[str, Any]:
    """Where the run's model comes from: ``{"kind": "local-weights"|"config", "path"?, "config"?, "spec"}``.

    A local directory with weight files is loaded as it is (the user's checkpoint, its tokenizer if it has
    one). Anything else — a registry name, an inline dict of config fields, a ``config.json`` path, a name
    in the local HF cache — is built from its config with random weights.
    """
    spec = resolve_model(model)
    if isinstance(model, str):
        path = Path(model).expanduser()
        if path.is_dir() and has_weights(path):
            return {"kind": "local-weights", "path": str(path), "spec": spec.name}
        if path.exists():
            config_path = path / "config.json" if path.is_dir() else path
            return {"kind": "config", "config": json.loads(config_path.read_text(encoding="utf-8")),
                    "spec": spec.name}
        if spec.source == "registry":
            return {"kind": "config", "config": hf_config_from_registry(registry_record(spec.name)["config"]),
                    "spec": spec.name}
        if spec.source.startswith("hf-cache:"):
            config_path = Path(spec.source.split(":", 1)[1])
            if has_weights(config_path.parent):
                return {"kind": "local-weights", "path": str(config_path.parent), "spec": spec.name}
            return {"kind": "config", "config": json.loads(config_path.read_text(encoding="utf-8")),
                    "spec": spec.name}
    if isinstance(model, Mapping):
        return {"kind": "config", "config": hf_config_from_registry(dict(model)), "spec": spec.name}
    if isinstance(model, ModelSpec):
        return {"kind": "config", "config": hf_config_from_spec(model), "spec": spec.name}
    raise GpuMemError("model", f"cannot build a model from {model!r}",
                      fix="give a registry name, a local path or a dict of config fields")


def has_weights(directory: Path) -> bool:
    return any(any(directory.glob(pattern)) for pattern in WEIGHT_FILE_PATTERNS)


def hf_config_from_registry(config: Mapping[str, Any]) -> dict[str, Any]:
    """A transformers config dict from a registry record's normalised ``config`` (or an inline dict).

    The registry stores summaries next to the real fields (``layer_types`` as a count, ``qkv_bias``, …);
    those are turned back into what transformers reads, and ``None`` values are dropped so transformers'
    own defaults apply.
    """
    data = {key: value for key, value in config.items() if value is not None and key not in _REGISTRY_ONLY_KEYS}
    model_type = data.get("model_type")
    arch = architecture(model_type)
    if arch.text_model_type:  # a multimodal record: its language model (no vision tower on GRPO's text path)
        data["model_type"], data["architectures"] = arch.text_model_type, [arch.text_architecture]
    layer_types = data.get("layer_types")
    if isinstance(layer_types, Mapping):  # registry summary -> the per-layer list transformers expects
        full = set(layer_types.get("full_attention_layers") or [])
        data["layer_types"] = ["full_attention" if i in full else "sliding_attention"
                               for i in range(int(data["num_hidden_layers"]))]
    if "torch_dtype" in data:
        data.setdefault("dtype", data.pop("torch_dtype"))
    return data


def hf_config_from_spec(spec: ModelSpec) -> dict[str, Any]:
    data = {"model_type": spec.model_type, "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_hidden_layers,
            "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_key_value_heads,
            "head_dim": spec.head_dim, "tie_word_embeddings": spec.tie_word_embeddings}
    if spec.sliding_window:
        data["sliding_window"] = spec.sliding_window
    return data


def build_config(config: Mapping[str, Any]):
    """A transformers ``PretrainedConfig`` from a config dict (no hub access)."""
    from transformers import AutoConfig

    data = dict(config)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise GpuMemError("model", "the config has no 'model_type'", fix="add e.g. model_type='qwen2'")
    data.pop("dtype", None)  # the run decides the dtype; the checkpoint dtype is not a build argument
    try:
        return AutoConfig.for_model(model_type, **data)
    except (KeyError, ValueError) as exc:
        raise GpuMemError("model", f"transformers cannot build a {model_type!r} config: {exc}",
                          fix="use an architecture this transformers version knows") from None


# -- tokenizer ---------------------------------------------------------------------------------------
def build_tokenizer(vocab_size: int):
    """A word-level ``PreTrainedTokenizerFast`` of exactly ``vocab_size`` tokens (see module docstring).

    pad/eos/unk are ids 0/1/2, padding is on the left (TRL generates from left-padded prompts), and a chat
    template is set because TRL, vLLM and Unsloth read it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= NUM_SPECIAL_TOKENS + 1:
        raise GpuMemError("vocab_size", f"{vocab_size} is too small for a tokenizer", fix="use vocab_size ≥ 8")
    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1, UNK_TOKEN: 2}
    vocab.update({f"w{i}": i for i in range(NUM_SPECIAL_TOKENS, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                        unk_token=UNK_TOKEN, padding_side="left", truncation_side="left")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_prompts(num_prompts: int, num_tokens: int, vocab_size: int, seed: int = 0) -> list[str]:
    """``num_prompts`` prompts of exactly ``num_tokens`` tokens for :func:`build_tokenizer`'s vocabulary."""
    rng = random.Random(seed)
    high = vocab_size - 1
    return [" ".join(f"w{rng.randint(NUM_SPECIAL_TOKENS, high)}" for _ in range(num_tokens))
            for _ in range(num_prompts)]


def exact_length_ids(ids: list[int], length: int, filler_id: int) -> list[int]:
    """``ids`` cut or extended to exactly ``length`` tokens (for a user's tokenizer, whose words are not
    one token each). Keeps the end of the prompt, as left truncation does; extends by repeating the
    prompt, or ``filler_id`` for an empty one."""
    ids = list(ids)
    if len(ids) >= length:
        return ids[len(ids) - length:]
    if not ids:
        return [filler_id] * length
    repeated = ids * (length // len(ids) + 1)
    return repeated[len(repeated) - length:]


# -- model ---------------------------------------------------------------------------------------------
def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_model(config, *, dtype: str = "float32", device: str = "cpu", attn_implementation: str | None = None):
    """``AutoModelForCausalLM.from_config`` with random weights, created directly on ``device`` in ``dtype``
    (building on the GPU avoids a host copy of a multi-GB model)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model


def count_parameter_bytes(model) -> tuple[int, int]:
    """``(num_params, bytes)`` of a model's parameters and buffers as stored (NF4 packs 2 params/byte)."""
    num_params = 0
    num_bytes = 0
    seen: set[int] = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = tensor.data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key in seen:  # tied embeddings are one tensor
            continue
        seen.add(key)
        num_params += tensor.numel()
        num_bytes += tensor.numel() * tensor.element_size()
    return num_params, num_bytes


def save_model_dir(model, tokenizer, directory: str | Path) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` where vLLM, Unsloth, bitsandbytes loading and TRL's
    reference-model reload can find them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
