"""Reading the files a multi-GPU job is launched with: an accelerate YAML and a DeepSpeed JSON config.

``read(path)`` returns the setup keys they decide (``world_size``, ``distributed``, offload, buckets, FSDP
resharding and wrapping, and the batch keys a DeepSpeed JSON fixes). Every mapping follows accelerate 1.16's
own reading of the same keys (``accelerate/commands/config/config_args.py``, ``utils/dataclasses.py``
``DeepSpeedPlugin`` / ``FullyShardedDataParallelPlugin``); anything the estimate does not model is an error
naming the key, never a silent guess. TRL ships examples of both: ``trl/accelerate_configs/*.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from .errors import SetupError

#: accelerate's distributed_type → the setup's ``distributed`` (DEEPSPEED and FSDP are refined by their configs)
_DISTRIBUTED_TYPES = {"NO": "none", "MULTI_GPU": "ddp", "DEEPSPEED": "deepspeed", "FSDP": "fsdp"}
#: accelerate's FSDP1 sharding strategies (fsdp_reshard_after_forward for fsdp_version 1) → reshard_after_forward
_FSDP1_RESHARD = {"FULL_SHARD": True, "SHARD_GRAD_OP": False, "1": True, "2": False}
_WRAPS = {"TRANSFORMER_BASED_WRAP": "transformer_layer", "NO_WRAP": "none"}


def is_deepspeed_json(data: Any) -> bool:
    """A DeepSpeed config (rather than a pytest-gpumem setup): it has ``zero_optimization`` or DeepSpeed's
    batch keys and no ``model``."""
    return isinstance(data, Mapping) and "model" not in data and any(
        key in data for key in ("zero_optimization", "train_micro_batch_size_per_gpu", "train_batch_size"))


def read(path: str | Path) -> dict[str, Any]:
    """The setup keys decided by an accelerate YAML (``.yaml``/``.yml``) or a DeepSpeed JSON (``.json``)."""
    path = Path(path)
    text = _read_text(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return from_accelerate(_load_yaml(text, path), path)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SetupError("accelerate_config", f"{path} is not valid JSON: {exc}",
                         fix="give an accelerate YAML or a DeepSpeed JSON config") from None
    if not is_deepspeed_json(data):
        raise SetupError("accelerate_config", f"{path} is neither an accelerate YAML nor a DeepSpeed JSON "
                         "(no zero_optimization)", fix="give the --config_file you pass to accelerate launch, "
                                                       "or its deepspeed_config_file")
    return from_deepspeed(data, path)


def from_accelerate(config: Any, path: Path) -> dict[str, Any]:
    """An accelerate config (the YAML ``accelerate config`` writes)."""
    if not isinstance(config, Mapping):
        raise SetupError("accelerate_config", f"{path} holds no accelerate settings",
                         fix="give the YAML written by `accelerate config` (e.g. trl/accelerate_configs/zero3.yaml)")
    if config.get("use_cpu") is True:
        raise SetupError("use_cpu", f"{path} trains on CPU (use_cpu: true): there is no GPU memory to predict",
                         fix="set use_cpu: false for a GPU job")
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind not in _DISTRIBUTED_TYPES:
        raise SetupError("distributed_type", f"{kind} is not modelled",
                         fix=f"use one of {', '.join(_DISTRIBUTED_TYPES)} (accelerate's distributed_type)")
    mixed = str(config.get("mixed_precision", "no")).lower()
    settings: dict[str, Any] = {}
    processes = config.get("num_processes", 1)
    # TRL's single_gpu.yaml says distributed_type "NO" with num_processes 8: accelerate then starts one process
    settings["world_size"] = 1 if kind == "NO" else processes
    settings["num_machines"] = config.get("num_machines", 1)
    if kind == "DEEPSPEED":
        ds = config.get("deepspeed_config") or {}
        if ds.get("deepspeed_config_file"):
            file = Path(ds["deepspeed_config_file"])
            file = file if file.is_absolute() else path.parent / file
            return {**settings, **read(file)}
        settings["distributed"] = f"zero{_zero_stage(ds.get('zero_stage', 2), 'zero_stage')}"
        _set_offload(settings, ds.get("offload_optimizer_device"), ds.get("offload_param_device"),
                     ("offload_optimizer_device", "offload_param_device"))
        _require_half_precision(mixed, "mixed_precision")
    elif kind == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        version = int(fsdp.get("fsdp_version", 1))
        if version not in (1, 2):
            raise SetupError("fsdp_version", f"{version} is not 1 or 2", fix="set fsdp_version: 2")
        settings["distributed"] = f"fsdp{version}"
        settings["offload_params"] = _bool(fsdp.get("fsdp_offload_params", False), "fsdp_offload_params")
        reshard = fsdp.get("fsdp_reshard_after_forward", True)
        if isinstance(reshard, str) and reshard.upper() in _FSDP1_RESHARD:
            reshard = _FSDP1_RESHARD[reshard.upper()]
        elif isinstance(reshard, str) and reshard.upper() in ("NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"):
            raise SetupError("fsdp_reshard_after_forward", f"{reshard} is not modelled",
                             fix="use FULL_SHARD (true) or SHARD_GRAD_OP (false)")
        settings["reshard_after_forward"] = _bool(reshard, "fsdp_reshard_after_forward")
        # accelerate's default when the config names no policy is NO_WRAP (FullyShardedDataParallelPlugin)
        wrap = str(fsdp.get("fsdp_auto_wrap_policy", "NO_WRAP")).upper()
        if wrap not in _WRAPS:
            raise SetupError("fsdp_auto_wrap_policy", f"{wrap} is not modelled",
                             fix="use TRANSFORMER_BASED_WRAP (one unit per decoder layer) or NO_WRAP")
        settings["fsdp_wrap"] = _WRAPS[wrap]
        if fsdp.get("fsdp_activation_checkpointing") is True:
            settings["gradient_checkpointing"] = True
        _require_half_precision(mixed, "mixed_precision")
    else:
        settings["distributed"] = _DISTRIBUTED_TYPES[kind]
    return settings


def from_deepspeed(config: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """A DeepSpeed JSON config. ``"auto"`` values are left to the trainer (batch keys) or to accelerate's
    hidden-size rule (buckets: the setup resolves them against the model)."""
    zero = config.get("zero_optimization") or {}
    settings: dict[str, Any] = {"distributed": f"zero{_zero_stage(zero.get('stage', 0), 'zero_optimization.stage')}"}
    _set_offload(settings, (zero.get("offload_optimizer") or {}).get("device"),
                 (zero.get("offload_param") or {}).get("device"),
                 ("zero_optimization.offload_optimizer.device", "zero_optimization.offload_param.device"))
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size", "overlap_comm"):
        if key in zero:
            settings[key] = zero[key]
    for key, name in (("train_micro_batch_size_per_gpu", "per_device_train_batch_size"),
                      ("gradient_accumulation_steps", "gradient_accumulation_steps")):
        if config.get(key, "auto") != "auto":
            settings[name] = config[key]
    half = any(_enabled(config.get(kind)) for kind in ("bf16", "fp16"))
    _require_half_precision("bf16" if half else "no", f"{path.name}: bf16.enabled")
    return settings


def _enabled(section: Any) -> bool:
    # "auto" follows the trainer's bf16/fp16 flag; TRL's GRPOConfig trains in bf16 by default (bf16=True)
    return isinstance(section, Mapping) and section.get("enabled", False) in (True, "auto")


def _zero_stage(stage: Any, key: str) -> int:
    if stage in (1, 2, 3, "1", "2", "3"):
        return int(stage)
    raise SetupError(key, f"ZeRO stage {stage!r} is not modelled", fix="use stage 1, 2 or 3")


def _set_offload(settings: dict, optimizer_device: Any, param_device: Any, keys: tuple[str, str]) -> None:
    """Only an offload that is on becomes a setup key: "none" is every strategy's default, and a key that is
    on for a stage that cannot offload it (parameters below ZeRO-3) is the setup's error to report."""
    if optimizer_device is not None and _offload(optimizer_device, keys[0]):
        settings["offload_optimizer"] = True
    if param_device is not None and _offload(param_device, keys[1]):
        settings["offload_params"] = True


def _offload(device: Any, key: str) -> bool:
    device = str(device).lower()
    if device in ("none", "null", ""):
        return False
    if device == "cpu":
        return True
    raise SetupError(key, f"offload to {device!r} is not modelled", fix="use 'cpu' or 'none'")


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, bool):
        return value
    raise SetupError(key, f"must be true or false, got {value!r}", fix=f"set {key} to true or false")


def _require_half_precision(mixed: str, key: str) -> None:
    # the model states of DeepSpeed/FSDP are modelled for 16-bit compute with fp32 master weights, which is what
    # every TRL accelerate config launches (mixed_precision: bf16)
    if mixed not in ("bf16", "fp16"):
        raise SetupError(key, f"mixed precision {mixed!r} is not modelled for sharded training",
                         fix="use mixed_precision: bf16 (as TRL's accelerate configs do)")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SetupError("accelerate_config", f"cannot read {path}: {exc.strerror or exc}",
                         fix="give the path of the accelerate YAML (or DeepSpeed JSON) you launch with") from None


def _load_yaml(text: str, path: Path) -> Any:
    try:
        import yaml  # accelerate's own dependency: present wherever an accelerate config is used
    except ImportError:
        raise SetupError("accelerate_config", "reading an accelerate YAML needs PyYAML",
                         fix="pip install pyyaml (accelerate installs it)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SetupError("accelerate_config", f"{path} is not valid YAML: {exc}",
                         fix="fix the syntax (accelerate config writes a valid file)") from None
