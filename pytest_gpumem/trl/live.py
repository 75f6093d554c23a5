"""The setup of a live trainer, and the card it is on.

:meth:`~pytest_gpumem.spec.GRPOSetup.from_trl` reads a ``GRPOConfig``; a running trainer knows more than its
config, and :func:`setup_from_trainer` fills that in from the live objects:

- the model's real dtype and attention implementation (a model object passed to ``GRPOTrainer`` ignores
  ``model_init_kwargs``), and whether it is 4-bit (bitsandbytes sets ``is_loaded_in_4bit``);
- the LoRA config PEFT attached (``model.peft_config[active adapter]``), also when the user wrapped the model
  with ``get_peft_model`` before passing it;
- the prompt length: trl ≥ 0.28 has no ``max_prompt_length`` and does not truncate prompts, so the longest
  prompt of the training set is what the worst step sees (:func:`longest_prompt_tokens`);
- the optimizer actually built (``optimizers=(...)`` overrides ``args.optim``);
- the number of processes (the estimate is of one GPU: it is noted, see :func:`setup_from_trainer`).

torch is read from ``sys.modules`` / imported inside functions: a training script has imported it already.
"""

from __future__ import annotations

import math
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

from .. import launch_config
from ..errors import GpuMemError, SetupError
from ..gpus import GPU, resolve_gpu
from ..predict.analytic.constants import CUDA_CONTEXT_BYTES
from ..spec import GRPOSetup

#: rows of the training set tokenized to find the longest prompt (all of a smaller set); evenly spaced
PROMPT_SAMPLE_ROWS = 2048


def unwrap(model: Any) -> Any:
    """The model under DDP / accelerate wrappers (``.module``)."""
    while hasattr(model, "module") and not hasattr(model, "peft_config"):
        model = model.module
    return model


def peft_config_of(model: Any) -> Any:
    """The active adapter's ``LoraConfig`` of a PEFT model, or None."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping) or not configs:
        return None
    active = getattr(model, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        active = active[0] if active else None
    return configs.get(active) if active in configs else next(iter(configs.values()))


def model_facts(model: Any) -> dict[str, Any]:
    """dtype, attention implementation and 4-bit-ness of a live model, as setup fields."""
    facts: dict[str, Any] = {}
    base = getattr(model, "get_base_model", lambda: model)()
    embeddings = getattr(base, "get_input_embeddings", lambda: None)()
    weight = getattr(embeddings, "weight", None)
    if weight is not None:  # embeddings stay in the compute dtype in a 4-bit model (bitsandbytes skips them)
        facts["dtype"] = str(weight.dtype).replace("torch.", "")
    config = getattr(base, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    if isinstance(attn, str):
        facts["attn_implementation"] = attn
    quant = getattr(config, "quantization_config", None)
    load_in_4bit = getattr(base, "is_loaded_in_4bit", False) or (
        quant.get("load_in_4bit", False) if isinstance(quant, Mapping) else getattr(quant, "load_in_4bit", False))
    if load_in_4bit:
        facts["load_in_4bit"] = True
    return facts


def optimizer_name(optimizer: Any) -> str | None:
    """The setup's ``optim`` for a built optimizer (accelerate wraps it in ``.optimizer``), None if unknown."""
    inner = getattr(optimizer, "optimizer", optimizer)
    name = type(inner).__name__
    defaults = getattr(inner, "defaults", {}) or {}
    if name == "AdamW":
        if "bitsandbytes" in type(inner).__module__:
            return "paged_adamw_8bit" if defaults.get("is_paged") else "adamw_8bit"
        return "adamw_torch_fused" if defaults.get("fused") else "adamw_torch"
    return {"AdamW8bit": "adamw_8bit", "PagedAdamW8bit": "paged_adamw_8bit", "PagedAdamW32bit": "paged_adamw_32bit",
            "SGD": "sgd", "Adafactor": "adafactor"}.get(name)


def longest_prompt_tokens(dataset: Any, tokenizer: Any, max_rows: int = PROMPT_SAMPLE_ROWS) -> tuple[int | None, str]:
    """``(tokens of the longest prompt, how it was found)`` over the training set (evenly spaced rows of a larger
    one), or ``(None, why not)``. Conversational prompts go through the chat template as TRL applies it."""
    if dataset is None or tokenizer is None:
        return None, "no training set or tokenizer on the trainer"
    try:
        rows = len(dataset)
        column = dataset["prompt"] if hasattr(dataset, "column_names") else None
    except (TypeError, KeyError, ValueError):  # datasets raises ValueError for a missing column
        return None, "the training set has no 'prompt' column"
    if column is None or rows == 0:
        return None, "the training set has no 'prompt' column"
    picks = range(rows) if rows <= max_rows else [int(i * rows / max_rows) for i in range(max_rows)]
    prompts = [column[i] for i in picks]
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    try:
        if prompts and not isinstance(prompts[0], str):
            lengths = [len(_ids(tokenizer.apply_chat_template(p, tokenize=True, add_generation_prompt=True)))
                       for p in prompts]
        else:
            lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    except Exception as exc:  # a tokenizer we cannot drive: fall back to the default, said in the block
        return None, f"the prompts could not be tokenized ({type(exc).__name__}: {exc})"
    where = f"all {rows} prompts" if rows <= max_rows else f"{max_rows} evenly spaced of {rows} prompts"
    return max(lengths), f"longest of {where}"


def _ids(encoded: Any) -> Any:
    """The token ids of ``apply_chat_template(tokenize=True)`` (transformers 5 returns a BatchEncoding)."""
    return encoded["input_ids"] if isinstance(encoded, Mapping) else encoded


def setup_from_trainer(trainer: Any = None, *, args: Any = None, model: Any = None, optimizer: Any = None,
                       overrides: Mapping[str, Any] | None = None) -> tuple[GRPOSetup, list[str]]:
    """``(setup, notes)``: :meth:`GRPOSetup.from_trl` of the trainer's args, completed from the live objects (module
    docstring); ``overrides`` win over everything. ``notes`` say what was read from where."""
    args = args if args is not None else getattr(trainer, "args", None)
    model = unwrap(model if model is not None else getattr(trainer, "model", None))
    if args is None or model is None:
        raise GpuMemError("trainer", "no training arguments or model to build the setup from",
                          fix="pass GpuMemCallback(setup=...) or bind it: GpuMemCallback().bind(trainer)")
    overrides = dict(overrides or {})
    notes: list[str] = []
    data: dict[str, Any] = model_facts(model)
    if type(trainer).__name__.startswith("Unsloth") or "unsloth" in type(model).__module__:
        data["backend"] = "unsloth"
    optimizer = optimizer if optimizer is not None else getattr(trainer, "optimizer", None)
    optim = optimizer_name(optimizer) if optimizer is not None else None
    if optim is not None:
        data["optim"] = optim
    elif optimizer is not None:
        notes.append(f"optimizer {type(getattr(optimizer, 'optimizer', optimizer)).__name__} is not modelled: "
                     f"estimated as args.optim={getattr(getattr(args, 'optim', None), 'value', None)}")
    if getattr(args, "max_prompt_length", None) is None and "max_prompt_length" not in overrides:
        tokens, how = longest_prompt_tokens(getattr(trainer, "train_dataset", None),
                                            getattr(trainer, "processing_class", None))
        if tokens:
            data["max_prompt_length"] = tokens
            notes.append(f"prompt length {tokens} tokens: {how} (trl ≥ 0.28 does not truncate prompts)")
        else:
            notes.append(f"prompt length not measured: {how}")
    data.update(overrides)
    peft_config = peft_config_of(model)
    world = int(getattr(args, "world_size", 1) or 1)
    if world > 1:
        launch, launch_note = launch_of(trainer)
        data = {**launch, **data}  # the trainer's own facts and the overrides win
        if launch_note:
            notes.append(launch_note)
    try:
        setup = GRPOSetup.from_trl(args, model=model, peft_config=peft_config, **_world(data, world))
    except SetupError as exc:
        setup = _per_process_setup(args, model, peft_config, data, world, exc)
        notes.append(f"{world} processes: TRL's divisibility rule is over all of them; num_generations "
                     f"{args.num_generations} → {setup.num_generations} for the estimate of one GPU (the memory "
                     "of a GPU does not depend on the group size)")
    if world > 1 and getattr(setup, "world_size", 1) == world:
        notes.append(f"{world} processes: each GPU is estimated as a rank of a {setup.distributed} job "
                     "(the worst rank judged)")
    if world > 1 and "world_size" not in _setup_fields():
        notes.append(f"{world} processes: each GPU is estimated as one process with its own batch "
                     "(DeepSpeed/FSDP sharding is not modelled)")
    if peft_config is not None:
        notes.append(f"LoRA r={setup.lora_rank} on {', '.join(setup.resolve_target_modules())} (model.peft_config)")
    return setup, notes


def launch_of(trainer: Any) -> tuple[dict[str, Any], str | None]:
    """The sharding strategy the trainer's accelerator runs (``trainer.accelerator.state``): DeepSpeed's config as
    the engine got it (``deepspeed_plugin.deepspeed_config``, read like a DeepSpeed JSON), or FSDP's plugin
    (version, resharding, CPU offload, wrap policy). ``({}, None)`` for DDP or without an accelerator."""
    state = getattr(getattr(trainer, "accelerator", None), "state", None)
    kind = str(getattr(getattr(state, "distributed_type", None), "value", getattr(state, "distributed_type", "")))
    if kind == "DEEPSPEED":
        plugin = getattr(state, "deepspeed_plugin", None)
        config = getattr(plugin, "deepspeed_config", None) or {}
        try:
            keys = launch_config.from_deepspeed(config, Path("the accelerator's DeepSpeed config"))
        except GpuMemError as exc:
            return {}, f"DeepSpeed launch not modelled ({exc.problem}): estimated as DDP"
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            keys.pop(name, None)  # the trainer's args hold them
        return keys, f"launch: {keys['distributed']} (read from the accelerator's DeepSpeed config)"
    if kind == "FSDP":
        plugin = getattr(state, "fsdp_plugin", None)
        version = int(getattr(plugin, "fsdp_version", 1) or 1)
        reshard = getattr(plugin, "reshard_after_forward", True)
        if not isinstance(reshard, bool):  # FSDP1: a ShardingStrategy; SHARD_GRAD_OP keeps parameters unsharded
            reshard = "SHARD_GRAD_OP" not in str(reshard)
        offload = getattr(plugin, "cpu_offload", None)
        offloaded = type(offload).__name__ == "CPUOffloadPolicy" or bool(getattr(offload, "offload_params", False))
        wrap = "none" if getattr(plugin, "auto_wrap_policy", None) is None else "transformer_layer"
        keys = {"distributed": f"fsdp{version}", "reshard_after_forward": reshard, "offload_params": offloaded,
                "fsdp_wrap": wrap}
        return keys, f"launch: fsdp{version} (read from the accelerator's FSDP plugin)"
    return {}, None


def _setup_fields() -> set[str]:
    return {f.name for f in fields(GRPOSetup)}


def _world(data: dict[str, Any], world: int) -> dict[str, Any]:
    """Pass the process count where the setup models it (a ``world_size`` field), never a key it rejects."""
    if world > 1 and "world_size" in _setup_fields() and "world_size" not in data:
        return {**data, "world_size": world}
    return data


def _per_process_setup(args: Any, model: Any, peft_config: Any, data: dict[str, Any], world: int,
                       error: SetupError) -> GRPOSetup:
    """With several processes TRL requires ``b × world × steps_per_generation`` divisible by G, our one-GPU setup
    ``b × steps_per_generation``: retry with the largest G ≤ the real one that divides the per-process batch."""
    rows = args.per_device_train_batch_size * (getattr(args, "steps_per_generation", None)
                                               or args.gradient_accumulation_steps)
    divisors = [g for g in range(2, min(rows, args.num_generations) + 1) if rows % g == 0]
    if world <= 1 or not divisors or "num_generations" in data:
        raise error
    return GRPOSetup.from_trl(args, model=model, peft_config=peft_config,
                              **{**data, "num_generations": max(divisors)})


def current_gpu(device: Any = None) -> tuple[GPU | None, int | None, str | None]:
    """``(the card this process trains on, its free bytes now, why none)`` from torch (already imported by the
    training script). ``total_memory`` is what an OOM message calls "total capacity" (gpus.py)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None, None, "torch is not imported"
    try:
        if not torch.cuda.is_available():
            return None, None, "no CUDA device"
        index = _device_index(torch, device)
        props = torch.cuda.get_device_properties(index)
        free, _total = torch.cuda.mem_get_info(index)
    except Exception as exc:  # a broken CUDA install must not stop the training run
        return None, None, f"CUDA not readable ({type(exc).__name__}: {exc})"
    return GPU(f"{props.name} (cuda:{index})", int(props.total_memory), "torch"), int(free), None


def _device_index(torch: Any, device: Any) -> int:
    index = getattr(device, "index", None)
    if getattr(device, "type", "cuda") != "cuda" or index is None:
        return torch.cuda.current_device()
    return int(index)


def judged_gpu(gpu: Any, device: Any = None) -> tuple[GPU | None, dict[str, Any]]:
    """The card the start-of-run estimate is judged against, and what was seen: an explicit ``gpu`` (a name or a
    size, e.g. to ask "would this fit an L4?") wins; else the card this process is on, less what other processes
    and non-PyTorch memory beyond a CUDA context hold now."""
    seen: dict[str, Any] = {}
    if gpu is not None:
        resolved = resolve_gpu(gpu)
        seen["source"] = "the gpu= argument"
        return resolved, seen
    card, free, reason = current_gpu(device)
    if card is None:
        seen["reason"] = reason
        return None, seen
    torch = sys.modules["torch"]
    reserved = int(torch.cuda.memory_reserved(_device_index(torch, device)))
    outside = card.total_bytes - free - reserved  # this process's context + everything not ours
    seen.update(source="torch", free_bytes=free, reserved_bytes=reserved, outside_bytes=outside)
    extra = outside - CUDA_CONTEXT_BYTES  # the estimate counts one CUDA context already
    if extra > 0:
        seen["others_bytes"] = extra
        return GPU(f"{card.name} less {math.ceil(extra / 2**20)} MiB in use outside this process's PyTorch",
                   card.total_bytes - extra, "torch"), seen
    return card, seen
