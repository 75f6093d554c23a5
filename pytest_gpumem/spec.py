"""What is trained: :class:`GRPOSetup`, with TRL's ``GRPOConfig`` names so users can paste their config.

Defaults are the backend's own (TRL's ``GRPOConfig`` for ``"trl"``, Unsloth's for ``"unsloth"``) and are
written once, on each :class:`~pytest_gpumem.backends.Backend` profile. A setup always holds concrete values
after construction; ``explicit_fields`` remembers which ones the user gave, so the estimate can say what it
assumed.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from . import distributed as dist
from . import launch_config
from . import vllm_layout as layout
from .architectures import architecture
from .backends import (
    BACKENDS,
    FIRST_CHUNKED_TRL,
    NEWEST_MODELLED_TRL,
    NEWEST_MODELLED_UNSLOTH,
    NEWEST_MODELLED_VLLM,
    Backend,
)
from .errors import SetupError
from .models import ModelSpec, resolve_model
from .versions import installed_version_once, parse_version

LOGITS_MODES = ("materialized", "chunked")
DTYPES = ("float32", "bfloat16", "float16")
VLLM_MODES = ("colocate", "server")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
#: Optimizers whose memory is modelled: name -> (state bytes per trainable param, step temp bytes per param)
OPTIMIZERS = {
    "adamw_torch_fused": (8, 0),  # fused: no step-time temporaries
    "adamw_torch": (8, 4),  # foreach: one state-sized fp32 buffer inside step()
    "adamw_hf": (8, 4),
    "adamw_8bit": (2, 0),  # bitsandbytes blockwise 8-bit m and v
    "paged_adamw_8bit": (2, 0),
    "adamw_bnb_8bit": (2, 0),
    "paged_adamw_32bit": (8, 0),
    "sgd": (0, 0),
    "adafactor": (0, 0),  # factored second moment: O(rows + cols), modelled as negligible
}

#: Keys accepted as other spellings of a field.
ALIASES = {"gpu_memory_utilization": "vllm_gpu_memory_utilization", "torch_dtype": "dtype",
           "r": "lora_rank", "target_modules": "lora_target_modules", "fast_inference": "use_vllm",
           # vLLM's engine-argument names (Unsloth's load_vllm passes them through)
           "max_num_seqs": "vllm_max_num_seqs", "max_num_batched_tokens": "vllm_max_num_batched_tokens",
           "num_processes": "world_size"}

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class GRPOSetup:
    """A GRPO training setup on one GPU. Only ``model`` is required; see :data:`pytest_gpumem.backends.BACKENDS`."""

    model: Any
    backend: str = "trl"
    trl_version: str | None = None
    logits: str | None = None
    dtype: str | None = None
    load_in_4bit: bool | None = None
    lora_rank: int | None = None
    lora_target_modules: Any = None
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    steps_per_generation: int | None = None
    num_iterations: int | None = None
    num_generations: int | None = None
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    max_seq_length: int | None = None
    gradient_checkpointing: Any = None
    optim: str | None = None
    beta: float | None = None
    use_vllm: bool | None = None
    vllm_mode: str | None = None
    vllm_gpu_memory_utilization: float | None = None
    vllm_enable_sleep_mode: bool | None = None
    vllm_importance_sampling_correction: bool | None = None
    attn_implementation: str | None = None
    use_liger_kernel: bool | None = None
    cast_lm_head_to_fp32: bool | None = None
    # -- precision (TrainingArguments' mixed-precision flags): bf16=False with fp32 weights is pure fp32
    bf16: bool | None = None
    fp16: bool | None = None
    # -- the vLLM engine (see pytest_gpumem/predict/analytic/vllm.py for what each version changes)
    vllm_version: str | None = None
    vllm_max_num_seqs: int | None = None
    vllm_max_num_batched_tokens: int | None = None
    # -- Unsloth's own names (FastLanguageModel.from_pretrained / UNSLOTH_VLLM_STANDBY)
    unsloth_version: str | None = None
    unsloth_vllm_standby: bool | None = None
    max_lora_rank: int | None = None
    offload_embedding: bool | None = None
    load_in_fp8: bool | None = None
    unsloth_grpo_mini_batch: int | None = None
    # -- multi-GPU (pytest_gpumem.distributed: defaults as accelerate + DeepSpeed apply them) --------------
    #: training processes in all (accelerate's num_processes); every per-device key is per process
    world_size: int | None = None
    num_machines: int | None = None
    #: "none" | "ddp" | "zero1" | "zero2" | "zero3" | "fsdp1" | "fsdp2"
    distributed: str | None = None
    offload_optimizer: bool | None = None
    offload_params: bool | None = None
    reshard_after_forward: bool | None = None
    #: "transformer_layer" (one FSDP unit per decoder layer, accelerate's TRANSFORMER_BASED_WRAP) or "none"
    fsdp_wrap: str | None = None
    #: DeepSpeed bucket sizes, in elements ("auto": accelerate's hidden-size rule)
    reduce_bucket_size: Any = None
    allgather_bucket_size: Any = None
    stage3_prefetch_bucket_size: Any = None
    overlap_comm: bool | None = None
    # -- generation across GPUs (pytest_gpumem.vllm_layout) ------------------------------------------------
    #: colocate mode: training ranks per vLLM tensor-parallel group (TRL's GRPOConfig name)
    vllm_tensor_parallel_size: int | None = None
    #: server mode (trl vllm-serve on its own GPUs): --tensor-parallel-size, --data-parallel-size, the card,
    #: --gpu-memory-utilization (0.9), --max-num-seqs / --max-num-batched-tokens (vLLM's defaults by card)
    vllm_server_tensor_parallel_size: int | None = None
    vllm_server_data_parallel_size: int | None = None
    vllm_server_gpu: Any = None
    vllm_server_gpu_memory_utilization: float | None = None
    vllm_server_max_num_seqs: int | None = None
    vllm_server_max_num_batched_tokens: int | None = None
    #: names of the fields the user gave (the rest are backend defaults); filled automatically
    explicit_fields: frozenset = field(default=frozenset(), compare=False)
    #: notes made while resolving defaults (e.g. Unsloth's batch-size reset); read by the estimate
    resolution_notes: tuple = field(default=(), compare=False)

    def __post_init__(self) -> None:
        _resolve_and_validate(self)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GRPOSetup":
        """Build from a dict with the JSON/TOML key names. Unknown keys are errors with a "did you mean"."""
        if isinstance(data, GRPOSetup):
            return data
        if not isinstance(data, Mapping):
            raise SetupError("setup", f"expected a dict of GRPO settings, got {type(data).__name__}",
                             fix="e.g. {'model': 'Qwen/Qwen2.5-0.5B', 'per_device_train_batch_size': 8}")
        known = {f.name for f in fields(cls)} - {"explicit_fields", "resolution_notes"}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            name = ALIASES.get(key, key)
            if name not in known:
                suggestion = difflib.get_close_matches(str(key), sorted(known | set(ALIASES)), n=1, cutoff=0.6)
                hint = f"did you mean {suggestion[0]!r}?" if suggestion else f"known keys: {', '.join(sorted(known))}"
                raise SetupError(str(key), f"unknown setup key {key!r}", fix=hint)
            if name in kwargs:
                raise SetupError(str(key), f"given twice (as {name!r} and an alias)", fix="keep one of them")
            kwargs[name] = value
        if "model" not in kwargs or kwargs["model"] in (None, ""):
            raise SetupError("model", "the setup has no model",
                             fix="add model='Qwen/Qwen2.5-0.5B' (a registry name, a local path or a config dict)")
        kwargs["explicit_fields"] = frozenset(k for k in kwargs)
        return cls(**kwargs)

    @classmethod
    def coerce(cls, setup: "GRPOSetup | Mapping[str, Any] | str | Path") -> "GRPOSetup":
        """Accept what users pass around: a GRPOSetup, a dict of settings, or a JSON/TOML file path."""
        if isinstance(setup, GRPOSetup):
            return setup
        if isinstance(setup, Mapping):
            return cls.from_dict(setup)
        if isinstance(setup, (str, Path)):
            return cls.from_file(setup)
        raise SetupError("setup", f"expected a GRPOSetup, dict or file path, got {type(setup).__name__}",
                         fix="pass GRPOSetup.from_dict({...}) or a path to a JSON/TOML setup")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "GRPOSetup":
        """Load a setup from a ``.json`` or ``.toml`` file (TOML: top level, or a ``[grpo]`` table), or take the
        multi-GPU keys from the file a job is launched with — an accelerate YAML (TRL's
        ``accelerate_configs/*.yaml``) or a DeepSpeed JSON — with ``overrides`` giving the rest (at least
        ``model``). ``overrides`` win over the file."""
        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            return cls._from_launch_file(path, overrides)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SetupError("setup", f"cannot read {path}: {exc.strerror or exc}",
                             fix="give the path of a JSON or TOML setup file") from None
        if not text.strip():  # json's "Expecting value: line 1 column 1" says nothing of the cause
            raise SetupError("setup", f"{path} is an empty file",
                             fix='write the setup into it, e.g. {"model": "Qwen/Qwen2.5-0.5B"}; see examples/setups/')
        try:
            if path.suffix.lower() == ".toml":
                try:
                    import tomllib
                except ImportError:  # Python 3.10
                    import tomli as tomllib  # type: ignore[no-redef]
                data = tomllib.loads(text)
                data = data.get("grpo", data)
            else:
                data = json.loads(text)
        except ValueError as exc:
            raise SetupError("setup", f"{path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {exc}",
                             fix="fix the syntax; see examples/setups/ for valid files") from None
        if launch_config.is_deepspeed_json(data):  # already parsed: not read a second time
            return cls._from_launch_file(path, overrides, lambda: launch_config.from_deepspeed(data, path))
        if isinstance(data, Mapping) and isinstance(data.get("model"), str):
            model_path = (path.parent / data["model"])
            if data["model"].startswith((".", "/")) and model_path.exists():
                data = {**data, "model": str(model_path)}
        return cls.from_dict({**data, **overrides} if overrides and isinstance(data, Mapping) else data)

    @classmethod
    def _from_launch_file(cls, path: Path, overrides: Mapping[str, Any],
                          settings: Callable[[], dict[str, Any]] | None = None) -> "GRPOSetup":
        if not overrides.get("model"):
            raise SetupError("model", f"{path.name} is a launch config: it says how the job is sharded, not "
                             "what is trained", fix=f"pass the model too, e.g. GRPOSetup.from_file({str(path)!r}, "
                                                    "model='Qwen/Qwen2.5-7B') or --model with --accelerate-config")
        return cls.from_dict({**(settings() if settings is not None else launch_config.read(path)), **overrides})

    @classmethod
    def from_trl(cls, grpo_config: Any, model: Any = None, peft_config: Any = None, **overrides: Any) -> "GRPOSetup":
        """Build from a real ``trl.GRPOConfig`` (and a model name / path / ``PreTrainedModel`` and a
        ``peft.LoraConfig``). trl and peft are not imported here: attributes are read by name."""
        data: dict[str, Any] = {}
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
                     "num_iterations", "num_generations", "max_prompt_length", "max_completion_length",
                     "gradient_checkpointing", "beta", "use_vllm", "vllm_mode", "vllm_gpu_memory_utilization",
                     "vllm_enable_sleep_mode", "vllm_importance_sampling_correction", "use_liger_kernel",
                     "cast_lm_head_to_fp32", "bf16", "fp16"):
            value = getattr(grpo_config, name, None)
            if value is not None:
                data[name] = value
        if "gradient_checkpointing" not in data and getattr(grpo_config, "activation_checkpointing", None) is not None:
            data["gradient_checkpointing"] = bool(grpo_config.activation_checkpointing)  # transformers ≥ 5.2x name
        optim = getattr(grpo_config, "optim", None)
        if optim is not None:
            data["optim"] = getattr(optim, "value", optim)
        init_kwargs = getattr(grpo_config, "model_init_kwargs", None) or {}
        dtype = init_kwargs.get("dtype") or init_kwargs.get("torch_dtype")
        if dtype is not None and dtype != "auto":
            data["dtype"] = str(dtype).replace("torch.", "")
        if init_kwargs.get("attn_implementation"):
            data["attn_implementation"] = init_kwargs["attn_implementation"]
        quant = init_kwargs.get("quantization_config")
        if quant is not None and getattr(quant, "load_in_4bit", False):
            data["load_in_4bit"] = True
        if model is not None:
            data["model"] = _model_from_object(model)
        if peft_config is not None:
            data["lora_rank"] = getattr(peft_config, "r", None)
            targets = getattr(peft_config, "target_modules", None)
            if targets is not None:
                data["lora_target_modules"] = targets if isinstance(targets, str) else sorted(targets)
        data.update(overrides)
        return cls.from_dict(data)

    # -- derived values -------------------------------------------------------------------------
    @property
    def model_spec(self) -> ModelSpec:
        return resolve_model(self.model)

    @property
    def generation_batch_size(self) -> int:
        """Rows generated at once on this GPU: ``b × steps_per_generation`` (one process)."""
        return self.per_device_train_batch_size * self.steps_per_generation

    @property
    def completions_per_optimizer_step(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def seq_len(self) -> int:
        return self.max_prompt_length + self.max_completion_length

    @property
    def scoring_passes(self) -> tuple[str, ...]:
        """The no-grad log-prob passes TRL runs after generation (trl 1.16 ``_generate_and_score_completions``,
        docs/memory-model.md §2): ``"old"`` log-probs when ``GA % (steps_per_generation × num_iterations) != 0`` or
        vLLM with importance-sampling correction; ``"ref"`` (reference) log-probs when ``beta != 0``."""
        passes = []
        if (self.gradient_accumulation_steps % (self.steps_per_generation * self.num_iterations) != 0
                or (self.use_vllm and self.vllm_importance_sampling_correction)):
            passes.append("old")
        if self.beta != 0:
            passes.append("ref")
        return tuple(passes)

    @property
    def backend_profile(self) -> Backend:
        """The :class:`~pytest_gpumem.backends.Backend` whose defaults and traits apply."""
        return BACKENDS[self.backend]

    @property
    def is_lora(self) -> bool:
        return self.lora_rank is not None

    def resolve_target_modules(self) -> tuple[str, ...]:
        """The adapted Linear names: explicit list, ``"all-linear"``, or PEFT's default for the type."""
        spec = self.model_spec
        available = spec.linear_shapes()
        targets = self.lora_target_modules
        if targets is None:
            targets = architecture(spec.model_type).peft_default_targets
        if targets == "all-linear":
            return tuple(available)
        return tuple(t for t in targets if t in available)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("explicit_fields", "resolution_notes")}
        if isinstance(self.model, ModelSpec):
            data["model"] = self.model.name
        if isinstance(data["lora_target_modules"], tuple):
            data["lora_target_modules"] = list(data["lora_target_modules"])
        if not self.is_distributed:  # one GPU: the JSON of a single-GPU setup is what it always was
            for name in dist.FIELDS:
                data.pop(name)
        if not layout.uses_layout(self):  # one colocated vLLM per GPU: likewise
            for name in layout.FIELDS:
                data.pop(name)
        return data

    def with_strategy(self, distributed: str, **changes: Any) -> "GRPOSetup":
        """A copy on another sharding strategy: the old strategy's own knobs (buckets, offload, resharding) are
        dropped, so they return to the new strategy's defaults unless ``changes`` sets them."""
        data = {name: getattr(self, name) for name in self.explicit_fields if name not in dist.STRATEGY_FIELDS}
        data.update(model=self.model, distributed=distributed, **changes)
        if "max_completion_length" in data:
            data.pop("max_seq_length", None)  # the explicit length wins over the derived one
        return GRPOSetup.from_dict(data)

    @property
    def is_distributed(self) -> bool:
        """More than one process, or a sharding strategy (ZeRO on one GPU still shards nothing but keeps its
        buffers): the estimate then reports per rank."""
        return self.world_size > 1 or self.distributed != "none"

    def replace(self, **changes: Any) -> "GRPOSetup":
        """A copy with ``changes`` applied, revalidated (explicit fields are kept explicit)."""
        data = {name: getattr(self, name) for name in self.explicit_fields}
        data["model"] = self.model
        data.update(changes)
        if "max_completion_length" in changes or "max_prompt_length" in changes:
            data.pop("max_seq_length", None)  # the explicit length wins over the derived one
        return GRPOSetup.from_dict(data)


def _model_from_object(model: Any) -> Any:
    if isinstance(model, (str, Mapping, ModelSpec)):
        return model
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return config.to_dict()
    raise SetupError("model", f"cannot read an architecture from {type(model).__name__}",
                     fix="pass a model name, a local path, or a transformers PreTrainedModel")


def _set(setup: GRPOSetup, name: str, value: Any) -> None:
    object.__setattr__(setup, name, value)


def _require_int(setup: GRPOSetup, name: str, minimum: int, fix: str) -> None:
    value = getattr(setup, name)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            _set(setup, name, int(value))
            value = int(value)
        else:
            raise SetupError(name, f"must be a whole number, got {value!r}", fix=fix)
    if value < minimum:
        raise SetupError(name, f"must be ≥ {minimum}, got {value}", fix=fix)


#: what a user means by a value close to several choices (difflib would pick the legacy "adamw_hf" for "adamw")
MEANT = {("optim", "adamw"): "adamw_torch"}


def _require_choice(setup: GRPOSetup, name: str, choices: tuple) -> None:
    value = getattr(setup, name)
    if value not in choices:
        suggestion = ([MEANT[name, value]] if isinstance(value, str) and (name, value) in MEANT
                      else difflib.get_close_matches(str(value), [str(c) for c in choices], n=1))
        hint = f"did you mean {suggestion[0]!r}? " if suggestion else ""
        raise SetupError(name, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}",
                         fix=f"{hint}use one of {', '.join(repr(c) for c in choices)}")


def _require_bool(setup: GRPOSetup, name: str) -> None:
    value = getattr(setup, name)
    if not isinstance(value, bool):
        raise SetupError(name, f"must be true or false, got {value!r}", fix=f"set {name} to true or false")


def _resolve_and_validate(setup: GRPOSetup) -> None:  # noqa: C901 - one linear list of TRL's rules
    notes: list[str] = list(setup.resolution_notes)
    _require_choice(setup, "backend", tuple(BACKENDS))
    if setup.model is None or setup.model == "":
        raise SetupError("model", "the setup has no model", fix="add model='Qwen/Qwen2.5-0.5B'")
    if not setup.explicit_fields:
        _set(setup, "explicit_fields", frozenset(f.name for f in fields(setup)
                                                 if f.name not in ("explicit_fields", "resolution_notes")
                                                 and getattr(setup, f.name) is not None))
    backend = BACKENDS[setup.backend]
    defaults = backend.defaults
    for name, default in defaults.items():
        # an explicit null means "the default", except for lora_rank where null means full fine-tuning
        if getattr(setup, name) is None and not (name == "lora_rank" and name in setup.explicit_fields):
            _set(setup, name, default)
    if isinstance(setup.lora_target_modules, list):
        _set(setup, "lora_target_modules", tuple(setup.lora_target_modules))

    # trl version and logits mode
    if setup.trl_version is None:
        _set(setup, "trl_version", installed_version_once("trl") or NEWEST_MODELLED_TRL)
    if not isinstance(setup.trl_version, str) or parse_version(setup.trl_version) == (0,):
        raise SetupError("trl_version", f"cannot read {setup.trl_version!r} as a version", fix="e.g. '1.16.0'")
    if setup.logits is None:
        chunked = backend.logits_follow_trl_version and parse_version(setup.trl_version)[:2] >= FIRST_CHUNKED_TRL
        _set(setup, "logits", "chunked" if chunked else "materialized")
    _require_choice(setup, "logits", LOGITS_MODES)
    if isinstance(setup.dtype, str):
        _set(setup, "dtype", {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16",
                              "torch.bfloat16": "bfloat16", "torch.float32": "float32",
                              "torch.float16": "float16", "half": "float16", "float": "float32"}
             .get(setup.dtype.lower(), setup.dtype.lower()))
    _require_choice(setup, "dtype", DTYPES)
    for name in ("load_in_4bit", "use_vllm", "vllm_enable_sleep_mode", "use_liger_kernel",
                 "cast_lm_head_to_fp32", "vllm_importance_sampling_correction"):
        _require_bool(setup, name)

    # LoRA
    if setup.lora_rank is not None:
        _require_int(setup, "lora_rank", 1, "use a positive LoRA rank such as 16, or null for full fine-tuning")
    if setup.load_in_4bit and setup.lora_rank is None:
        raise SetupError("load_in_4bit", "a 4-bit base cannot be fully fine-tuned (PEFT refuses purely "
                         "quantized models)", fix="set lora_rank (e.g. 16) or load_in_4bit=false")
    targets = setup.lora_target_modules
    if targets is not None and targets != "all-linear":
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) \
                or not all(isinstance(t, str) for t in targets):
            raise SetupError("lora_target_modules", f"expected a list of module names or 'all-linear', got {targets!r}",
                             fix="e.g. ['q_proj', 'v_proj'] or 'all-linear'")

    # batch shape (TRL GRPOConfig.__post_init__ rules, one process)
    _require_int(setup, "per_device_train_batch_size", 1, "use a positive batch size")
    _require_int(setup, "gradient_accumulation_steps", 1, "use gradient_accumulation_steps ≥ 1")
    _require_int(setup, "num_iterations", 1, "use num_iterations ≥ 1")
    if setup.steps_per_generation is None:
        _set(setup, "steps_per_generation", setup.gradient_accumulation_steps)
    _require_int(setup, "steps_per_generation", 1,
                 "use steps_per_generation ≥ 1 (default: gradient_accumulation_steps)")
    _require_int(setup, "num_generations", 2, "GRPO needs at least 2 completions per prompt to compute "
                                              "advantages: set num_generations ≥ 2")
    if backend.resets_indivisible_batch:
        b, g, ga = setup.per_device_train_batch_size, setup.num_generations, setup.gradient_accumulation_steps
        if (ga * b) % g != 0:
            # Unsloth silently resets the batch instead of raising (docs/memory-model.md §2)
            _set(setup, "per_device_train_batch_size", g)
            notes.append(f"unsloth: (gradient_accumulation_steps × per_device_train_batch_size) = {ga}×{b} is not "
                         f"divisible by num_generations={g}, so Unsloth resets per_device_train_batch_size to {g}")
            if "steps_per_generation" not in setup.explicit_fields:
                _set(setup, "steps_per_generation", ga)
    # TRL's GRPOConfig.__post_init__ (trl 1.16): generation_batch_size = b × num_processes × steps_per_generation,
    # "must be divisible by num_generations" — the groups span processes, so the world size counts
    if setup.world_size is None:
        _set(setup, "world_size", 1)
    _require_int(setup, "world_size", 1, "world_size is the number of training processes (accelerate's "
                                         "num_processes), e.g. 8")
    world_size = setup.world_size
    generation_batch = setup.per_device_train_batch_size * world_size * setup.steps_per_generation
    if generation_batch % setup.num_generations != 0:
        b, spg, g = setup.per_device_train_batch_size, setup.steps_per_generation, setup.num_generations
        # the group sizes people use: bounded, so an absurd batch cannot turn the message into a long loop
        divisors = [d for d in range(2, min(generation_batch, 64) + 1) if generation_batch % d == 0]
        shape = (f"per_device_train_batch_size × steps_per_generation = {b} × {spg}" if world_size == 1 else
                 f"per_device_train_batch_size × world_size × steps_per_generation = {b} × {world_size} × {spg}")
        factor = "per_device_train_batch_size" + (" × world_size" if world_size > 1 else "")
        raise SetupError(
            "per_device_train_batch_size",
            f"generation_batch_size ({generation_batch}) must be divisible by num_generations ({g}) "
            f"(TRL's GRPOConfig rule; {shape})",
            fix=f"make {factor} a multiple of {g}, or set num_generations to a divisor of {generation_batch} "
                f"({', '.join(map(str, divisors)) or 'none ≥ 2'})")

    # lengths (the prompt length first: a completion length may be derived from it)
    _require_int(setup, "max_prompt_length", 1, "use a positive max_prompt_length (prompt tokens)")
    if setup.max_seq_length is not None:
        _require_int(setup, "max_seq_length", 2, "use a positive max_seq_length")
        if "max_completion_length" not in setup.explicit_fields:
            completion = setup.max_seq_length - setup.max_prompt_length
            if completion < 1:
                raise SetupError("max_seq_length", f"max_seq_length {setup.max_seq_length} leaves no room for a "
                                 f"completion after max_prompt_length {setup.max_prompt_length}",
                                 fix="raise max_seq_length or lower max_prompt_length")
            _set(setup, "max_completion_length", completion)
    _require_int(setup, "max_completion_length", 1, "use a positive max_completion_length (completion tokens)")

    # checkpointing, optimizer, beta, attention
    if setup.gradient_checkpointing not in (True, False, "unsloth"):
        raise SetupError("gradient_checkpointing", f"{setup.gradient_checkpointing!r} is not true, false or 'unsloth'",
                         fix="use true, false or 'unsloth' (offloaded checkpoints)")
    if isinstance(setup.optim, str):
        _set(setup, "optim", setup.optim.lower())
    _require_choice(setup, "optim", tuple(OPTIMIZERS))
    if isinstance(setup.beta, bool) or not isinstance(setup.beta, (int, float)) or setup.beta < 0:
        raise SetupError("beta", f"must be a number ≥ 0, got {setup.beta!r}", fix="e.g. beta=0.0 (no reference model)")
    _require_choice(setup, "attn_implementation", ATTN_IMPLEMENTATIONS)

    # vLLM
    _require_choice(setup, "vllm_mode", VLLM_MODES)
    util = setup.vllm_gpu_memory_utilization
    if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1:
        raise SetupError("vllm_gpu_memory_utilization", f"must be a fraction in (0, 1], got {util!r}",
                         fix="e.g. 0.3 (TRL's default for colocate mode)")
    if setup.use_vllm and setup.vllm_mode == "server" and not backend.vllm.server_mode:
        raise SetupError("vllm_mode", "Unsloth runs vLLM in-process (fast_inference); server mode is TRL's",
                         fix="use vllm_mode='colocate' with backend='unsloth'")

    _resolve_engine_keys(setup, backend)

    # the model must resolve (unknown names are errors with close matches)
    spec = resolve_model(setup.model)
    dist.resolve(setup, _set, spec.hidden_size)
    layout.resolve(setup, _set, spec)
    if setup.is_distributed and not backend.multi_gpu:
        raise SetupError("world_size", f"{backend.label}'s GRPO is modelled on one GPU only",
                         fix="use world_size=1 and distributed='none', or backend='trl'")
    if setup.load_in_4bit and setup.distributed in ("zero3",) + dist.FSDP_STRATEGIES:
        raise SetupError("load_in_4bit", f"a 4-bit base sharded by {setup.distributed} is not modelled",
                         fix="use distributed='zero2' or 'ddp' (the 4-bit base replicated), or load_in_4bit=false")
    _set(setup, "resolution_notes", tuple(notes))


def _resolve_engine_keys(setup: GRPOSetup, backend: Backend) -> None:
    """Precision, the vLLM engine and Unsloth's own keys (issue 12): versions default to the installed
    packages (as ``trl_version`` does), else the newest modelled release."""
    for name in ("bf16", "fp16"):
        if getattr(setup, name) is not None:
            _require_bool(setup, name)
    if setup.bf16 and setup.fp16:
        raise SetupError("fp16", "bf16 and fp16 are both true (TrainingArguments refuses that)", fix="keep one")
    for name, package, newest in (("vllm_version", "vllm", NEWEST_MODELLED_VLLM),
                                  ("unsloth_version", "unsloth", NEWEST_MODELLED_UNSLOTH)):
        if getattr(setup, name) is None:
            _set(setup, name, installed_version_once(package) or newest)
        value = getattr(setup, name)
        if not isinstance(value, str) or parse_version(value) == (0,):
            raise SetupError(name, f"cannot read {value!r} as a version", fix=f"e.g. {newest!r}")
    for name in ("unsloth_vllm_standby", "offload_embedding", "load_in_fp8"):
        if getattr(setup, name) is None:
            _set(setup, name, False)
        _require_bool(setup, name)
    if setup.unsloth_vllm_standby and setup.backend != "unsloth":
        raise SetupError("unsloth_vllm_standby", "standby is Unsloth's (UNSLOTH_VLLM_STANDBY=1)",
                         fix="use backend='unsloth', or vllm_enable_sleep_mode=true for TRL's sleep mode")
    if setup.load_in_fp8 and not (setup.backend == "unsloth" and setup.use_vllm):
        raise SetupError("load_in_fp8", "FP8 weights are modelled for Unsloth's fast_inference (vLLM's FP8 "
                         "checkpoint, shared with training) only", fix="use backend='unsloth' with use_vllm=true")
    if setup.load_in_fp8 and setup.load_in_4bit:
        raise SetupError("load_in_fp8", "load_in_fp8 and load_in_4bit are both true", fix="keep one")
    if setup.vllm_max_num_seqs is None:
        _set(setup, "vllm_max_num_seqs", backend.vllm.default_max_num_seqs or setup.generation_batch_size)
    _require_int(setup, "vllm_max_num_seqs", 1, "use a positive max_num_seqs (sequences vLLM schedules at once)")
    if setup.vllm_max_num_batched_tokens is None:
        _set(setup, "vllm_max_num_batched_tokens", backend.vllm.default_max_num_batched_tokens or setup.seq_len)
    _require_int(setup, "vllm_max_num_batched_tokens", 1, "use a positive max_num_batched_tokens")
    if setup.unsloth_grpo_mini_batch is not None:
        if not backend.mini_batch_passes:
            raise SetupError("unsloth_grpo_mini_batch", "the mini-batch passes are Unsloth's GRPO loss",
                             fix="use backend='unsloth', or drop unsloth_grpo_mini_batch")
        _require_int(setup, "unsloth_grpo_mini_batch", 1, "use the number of passes the rows are split into (≥ 1)")
        if setup.unsloth_grpo_mini_batch > setup.generation_batch_size:
            raise SetupError("unsloth_grpo_mini_batch", f"{setup.unsloth_grpo_mini_batch} passes exceed the "
                             f"generation batch of {setup.generation_batch_size} rows (Unsloth refuses it)",
                             fix=f"use at most {setup.generation_batch_size}")
    if setup.max_lora_rank is None and setup.lora_rank is not None:
        _set(setup, "max_lora_rank", setup.lora_rank)
    if setup.max_lora_rank is not None:
        _require_int(setup, "max_lora_rank", 1, "use a positive max_lora_rank (vLLM's LoRA slot rank)")
