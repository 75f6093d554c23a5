"""Where a job's rollouts are generated across GPUs: the setup keys for vLLM's tensor / data parallelism.

Two layouts (TRL 1.16, ``trl/generation/vllm_generation.py`` ``_init_vllm``):

- **colocate** with ``vllm_tensor_parallel_size`` = T (TRL's ``GRPOConfig`` name): the training ranks are grouped
  ``[0..T-1], [T..2T-1], …`` (``new_subgroups_by_enumeration``) and each rank runs one vLLM shard beside its
  training state (``distributed_executor_backend="external_launcher"``). TRL refuses a T that does not divide the
  world size: "tensor_parallel_size ({T}) must divide world size ({N}) evenly."
- **server** (``vllm_mode="server"``): ``trl vllm-serve --tensor-parallel-size T --data-parallel-size D`` on its
  own T × D GPUs. In trl 1.16 ``trl vllm-serve`` is ``vllm serve`` with ``--weight-transfer-config
  '{"backend": "nccl"}'`` (``trl/scripts/vllm_serve.py`` ``build_command``), default
  ``--gpu-memory-utilization 0.9``. The server's keys are ``vllm_server_*`` so that they never mix with the
  colocate keys TRL's GRPOConfig has (``vllm_gpu_memory_utilization`` / ``vllm_tensor_parallel_size`` "only
  appl[y] when vllm_mode is set to 'colocate'", grpo_config.py):
  ``vllm_server_tensor_parallel_size``, ``vllm_server_data_parallel_size``, ``vllm_server_gpu`` (the server's
  card, default: the trainer's), ``vllm_server_gpu_memory_utilization``, ``vllm_server_max_num_seqs`` and
  ``vllm_server_max_num_batched_tokens`` (default: vLLM's own, by card — :func:`server_batch_defaults`).

vLLM's own checks on T (``vllm/config`` ``ModelConfig.verify_with_parallel_config``: "Total number of attention
heads ({heads}) must be divisible by tensor parallel size ({T})."; ``QKVParallelLinear``: the KV heads are split
when T ≤ kv_heads and replicated ``T // kv_heads`` times when T > kv_heads, so one must divide the other) are made
here, before any work, as errors naming the key.
"""

from __future__ import annotations

from typing import Any

from .distributed import whole_field
from .errors import SetupError
from .gpus import GPU, resolve_gpu

#: trl vllm-serve's default utilisation (trl/scripts/vllm_serve.py ScriptArguments.gpu_memory_utilization)
SERVER_GPU_MEMORY_UTILIZATION = 0.9
#: the colocate key, and the server keys with their defaults (None: resolved per card)
COLOCATE_FIELDS = ("vllm_tensor_parallel_size",)
SERVER_FIELDS = {"vllm_server_tensor_parallel_size": 1, "vllm_server_data_parallel_size": 1, "vllm_server_gpu": None,
                 "vllm_server_gpu_memory_utilization": SERVER_GPU_MEMORY_UTILIZATION,
                 "vllm_server_max_num_seqs": None, "vllm_server_max_num_batched_tokens": None}
FIELDS = COLOCATE_FIELDS + tuple(SERVER_FIELDS)

#: vLLM's batch defaults for ``vllm serve`` (UsageContext.OPENAI_API_SERVER), ``vllm/engine/arg_utils.py``
#: ``EngineArgs.get_batch_defaults``: ``if device_memory >= 70 * GiB_bytes and "a100" not in device_name`` →
#: max_num_batched_tokens 8192, max_num_seqs 1024; else 2048 and 256
LARGE_CARD_BYTES = 70 * 2**30
SERVER_BATCH_DEFAULTS_LARGE = (1024, 8192)
SERVER_BATCH_DEFAULTS = (256, 2048)


def server_batch_defaults(gpu: GPU | None) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) ``vllm serve`` picks on ``gpu`` (see the constants above)."""
    if gpu is not None and gpu.total_bytes >= LARGE_CARD_BYTES and "a100" not in gpu.name.lower():
        return SERVER_BATCH_DEFAULTS_LARGE
    return SERVER_BATCH_DEFAULTS


def is_server(setup: Any) -> bool:
    return bool(setup.use_vllm and setup.vllm_mode == "server")


def uses_layout(setup: Any) -> bool:
    """Whether the setup says anything beyond one colocated vLLM per GPU (its JSON then carries these keys)."""
    return is_server(setup) or (setup.use_vllm and setup.vllm_tensor_parallel_size > 1)


def server_gpus(setup: Any) -> int:
    """GPUs the vLLM server occupies: T × D (vllm serve starts one worker per GPU)."""
    return setup.vllm_server_tensor_parallel_size * setup.vllm_server_data_parallel_size if is_server(setup) else 0


def role_gpu_counts(setup: Any) -> dict[str, int]:
    """GPUs per role (``rank0``, ``rank1+``, ``vllm_server``) of a setup or its ``to_dict()``."""
    get = setup.get if isinstance(setup, dict) else (lambda name, default=None: getattr(setup, name, default))
    world = get("world_size") or 1
    counts = {"rank0": 1}
    if world > 1:
        counts["rank1+"] = world - 1
    if get("use_vllm") and get("vllm_mode") == "server":
        counts["vllm_server"] = (get("vllm_server_tensor_parallel_size") or 1) * (get("vllm_server_data_parallel_size")
                                                                                 or 1)
    return counts


def resolve(setup: Any, set_field: Any, spec: Any) -> None:
    """Fill and check the generation-layout keys of ``setup`` against the model ``spec``."""
    explicit = setup.explicit_fields
    server = is_server(setup)
    for name in SERVER_FIELDS:
        # a server key at its default (a copy of a resolved setup carries it) says nothing: only a set one is wrong
        if name in explicit and getattr(setup, name) not in (None, SERVER_FIELDS[name]) and not server:
            raise SetupError(name, f"{name} describes a `trl vllm-serve` server, but vllm_mode is "
                             f"{setup.vllm_mode!r}" + ("" if setup.use_vllm else " and use_vllm is false"),
                             fix="set use_vllm=true and vllm_mode='server', or drop " + name)
        if getattr(setup, name) is None:
            set_field(setup, name, SERVER_FIELDS[name])
    if setup.vllm_tensor_parallel_size is None:
        set_field(setup, "vllm_tensor_parallel_size", 1)
    colocate_tp = _whole(setup, "vllm_tensor_parallel_size",
                         "vllm_tensor_parallel_size is the vLLM tensor-parallel group size in colocate mode, e.g. 2")
    if server and colocate_tp > 1 and "vllm_tensor_parallel_size" in explicit:
        raise SetupError("vllm_tensor_parallel_size", "TRL applies vllm_tensor_parallel_size in colocate mode only "
                         "(grpo_config.py: 'must be passed separately when launching the vLLM server')",
                         fix=f"use vllm_server_tensor_parallel_size={colocate_tp} (trl vllm-serve "
                             f"--tensor-parallel-size {colocate_tp})")
    if setup.use_vllm and not server and colocate_tp > 1:
        if setup.world_size % colocate_tp:
            raise SetupError("vllm_tensor_parallel_size", f"tensor_parallel_size ({colocate_tp}) must divide world "
                             f"size ({setup.world_size}) evenly (TRL's rule: each TP group is {colocate_tp} "
                             "training ranks)",
                             fix=f"set world_size to a multiple of {colocate_tp}, or vllm_tensor_parallel_size to a "
                                 f"divisor of {setup.world_size}")
        _check_heads(spec, colocate_tp, "vllm_tensor_parallel_size")
    tp = _whole(setup, "vllm_server_tensor_parallel_size", "trl vllm-serve --tensor-parallel-size, e.g. 2")
    _whole(setup, "vllm_server_data_parallel_size", "trl vllm-serve --data-parallel-size, e.g. 2")
    if server:
        _check_heads(spec, tp, "vllm_server_tensor_parallel_size")
    util = setup.vllm_server_gpu_memory_utilization
    if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1:
        raise SetupError("vllm_server_gpu_memory_utilization", f"must be a fraction in (0, 1], got {util!r}",
                         fix="e.g. 0.9 (trl vllm-serve's default)")
    if setup.vllm_server_gpu is not None:
        resolve_gpu(setup.vllm_server_gpu, field="vllm_server_gpu")  # an unknown card is this key's error
    for name in ("vllm_server_max_num_seqs", "vllm_server_max_num_batched_tokens"):
        if getattr(setup, name) is not None:
            _whole(setup, name, f"{name} is vllm serve's --{name[12:].replace('_', '-')}, e.g. 256")


def _check_heads(spec: Any, tp: int, name: str) -> None:
    heads, kv_heads = spec.num_attention_heads, spec.num_key_value_heads
    if tp > heads:
        raise SetupError(name, f"tensor parallel size {tp} is more than the model's {heads} attention heads "
                         "(vLLM splits the heads across the ranks)",
                         fix=f"use a divisor of {heads} ({', '.join(_divisors(heads))})")
    if heads % tp:
        raise SetupError(name, f"Total number of attention heads ({heads}) must be divisible by tensor parallel size "
                         f"({tp}) (vLLM's ModelConfig check)",
                         fix=f"use one of {', '.join(_divisors(heads))}")
    if kv_heads % tp and tp % kv_heads:
        raise SetupError(name, f"the model's {kv_heads} KV heads can be neither split nor replicated across {tp} "
                         "ranks (vLLM's QKVParallelLinear: one must divide the other)",
                         fix=f"use a divisor or a multiple of {kv_heads}")


def _divisors(number: int) -> list[str]:
    return [str(d) for d in range(1, min(number, 16) + 1) if number % d == 0]


def _whole(setup: Any, name: str, fix: str) -> int:
    value = whole_field(setup, name, None, 1, fix)
    object.__setattr__(setup, name, value)
    return value
