"""The multi-GPU keys of a setup: how many processes, which sharding strategy and its knobs.

Every default is the value the job gets when it is launched with ``accelerate launch --config_file`` one of
TRL's ``accelerate_configs/*.yaml`` (trl 1.16): accelerate 1.16 then generates the DeepSpeed config from its
plugin (``accelerate/utils/dataclasses.py`` ``DeepSpeedPlugin.__post_init__``: ``stage``, ``offload_optimizer``,
``offload_param`` and nothing else) so DeepSpeed applies its own defaults (``deepspeed/runtime/zero/config.py``,
read at microsoft/DeepSpeed 38327e0):

- ``reduce_bucket_size: int = Field(pp_int(5e8), ge=0)`` and ``allgather_bucket_size`` likewise (5e8 elements);
- ``prefetch_bucket_size: int = Field(pp_int(5e7), ge=0, alias="stage3_prefetch_bucket_size")``;
- ``overlap_comm: Optional[bool] = None`` then ``overlap_comm_valid``: ``self.overlap_comm = self.stage ==
  ZeroStageEnum.weights`` — on for ZeRO-3 only.

A DeepSpeed JSON that says ``"auto"`` for a bucket gets accelerate's hidden-size rule (``accelerator.py``
``_prepare_deepspeed``: ``reduce_bucket_size = hidden_size * hidden_size``, ``stage3_prefetch_bucket_size =
int(0.9 * hidden_size * hidden_size)``). FSDP: TRL's ``fsdp1.yaml`` / ``fsdp2.yaml`` wrap each decoder layer
(``fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP``) and reshard after forward (``FULL_SHARD`` / ``true``).
"""

from __future__ import annotations

from typing import Any

from .errors import SetupError

STRATEGIES = ("none", "ddp", "zero1", "zero2", "zero3", "fsdp1", "fsdp2")
ZERO_STRATEGIES = ("zero1", "zero2", "zero3")
FSDP_STRATEGIES = ("fsdp1", "fsdp2")
#: FSDP wrap policies modelled: accelerate's TRANSFORMER_BASED_WRAP (one unit per decoder layer + the root)
#: or NO_WRAP (the root only — accelerate's default when a config names no policy, ``dataclasses.py``:
#: ``os.environ.get(env_prefix + "AUTO_WRAP_POLICY", "NO_WRAP")``)
FSDP_WRAPS = ("transformer_layer", "none")

#: DeepSpeed's defaults (deepspeed/runtime/zero/config.py, see the module docstring), in elements
DEFAULT_REDUCE_BUCKET_ELEMENTS = 500_000_000
DEFAULT_ALLGATHER_BUCKET_ELEMENTS = 500_000_000
DEFAULT_PREFETCH_BUCKET_ELEMENTS = 50_000_000

#: the setup's multi-GPU fields and the strategies each one means something for
FIELDS = {
    "world_size": STRATEGIES, "num_machines": STRATEGIES, "distributed": STRATEGIES,
    "offload_optimizer": ZERO_STRATEGIES, "offload_params": ("zero3",) + FSDP_STRATEGIES,
    "reshard_after_forward": FSDP_STRATEGIES, "fsdp_wrap": FSDP_STRATEGIES,
    "reduce_bucket_size": ZERO_STRATEGIES, "allgather_bucket_size": ZERO_STRATEGIES,
    "stage3_prefetch_bucket_size": ("zero3",), "overlap_comm": ZERO_STRATEGIES,
}
#: the fields that belong to one strategy (dropped when a lever switches strategy)
STRATEGY_FIELDS = tuple(name for name, where in FIELDS.items() if where != STRATEGIES)


def defaults(distributed: str) -> dict[str, Any]:
    """What a job launched with TRL's accelerate config for ``distributed`` gets for every knob."""
    return {"offload_optimizer": False, "offload_params": False, "reshard_after_forward": True,
            "fsdp_wrap": "transformer_layer", "reduce_bucket_size": DEFAULT_REDUCE_BUCKET_ELEMENTS,
            "allgather_bucket_size": DEFAULT_ALLGATHER_BUCKET_ELEMENTS,
            "stage3_prefetch_bucket_size": DEFAULT_PREFETCH_BUCKET_ELEMENTS,
            "overlap_comm": distributed == "zero3"}


def is_sharded(distributed: str) -> bool:
    return distributed in ZERO_STRATEGIES + FSDP_STRATEGIES


def resolve(setup: Any, set_field: Any, hidden_size: int) -> None:
    """Fill and check the multi-GPU fields of ``setup`` (``set_field(setup, name, value)`` writes one)."""
    explicit = setup.explicit_fields
    world_size = whole_field(setup, "world_size", 1, 1, "world_size is the number of training processes (GPUs), "
                                                        "accelerate's num_processes: e.g. world_size=8")
    set_field(setup, "world_size", world_size)
    machines = whole_field(setup, "num_machines", 1, 1, "num_machines is the number of nodes, e.g. 1")
    set_field(setup, "num_machines", machines)
    if world_size % machines:
        raise SetupError("num_machines", f"world_size {world_size} is not divisible by num_machines {machines} "
                         "(accelerate's num_processes counts the processes of all machines)",
                         fix=f"set world_size to a multiple of {machines} (GPUs per node × nodes)")
    distributed = setup.distributed
    if distributed is None:
        # accelerate launches MULTI_GPU (DDP) when num_processes > 1 and nothing else is said
        distributed = "none" if world_size == 1 else "ddp"
    if isinstance(distributed, str):
        distributed = distributed.lower().replace("-", "").replace("_", "")
        distributed = {"deepspeed": "zero3", "fsdp": "fsdp2", "multigpu": "ddp", "no": "none"}.get(distributed,
                                                                                                 distributed)
    if distributed not in STRATEGIES:
        raise SetupError("distributed", f"{setup.distributed!r} is not one of {', '.join(STRATEGIES)}",
                         fix="use 'zero3' (DeepSpeed ZeRO-3), 'fsdp2', 'zero2', 'ddp', ... or 'none' (one GPU)")
    if distributed == "none" and world_size > 1:
        raise SetupError("distributed", f"distributed='none' runs one process but world_size is {world_size}",
                         fix="set distributed='ddp' (accelerate's MULTI_GPU), 'zero3', 'fsdp2', ... or world_size=1")
    set_field(setup, "distributed", distributed)
    for name, value in defaults(distributed).items():
        if name in explicit and distributed not in FIELDS[name]:
            raise SetupError(name, f"{name} applies to {', '.join(FIELDS[name])}, not to distributed="
                             f"{distributed!r}", fix=f"drop {name}, or set distributed to one of "
                                                    f"{', '.join(FIELDS[name])}")
        if getattr(setup, name) is None:
            set_field(setup, name, value)
    for name in ("offload_optimizer", "offload_params", "reshard_after_forward", "overlap_comm"):
        if not isinstance(getattr(setup, name), bool):
            raise SetupError(name, f"must be true or false, got {getattr(setup, name)!r}",
                             fix=f"set {name} to true or false")
    if setup.fsdp_wrap not in FSDP_WRAPS:
        raise SetupError("fsdp_wrap", f"{setup.fsdp_wrap!r} is not one of {', '.join(map(repr, FSDP_WRAPS))}",
                         fix="'transformer_layer' (accelerate's TRANSFORMER_BASED_WRAP: one unit per decoder layer) "
                             "or 'none' (NO_WRAP: the root only); size-based wrapping is not modelled")
    # "auto" buckets: accelerate fills them from the model's hidden size (accelerator.py _prepare_deepspeed)
    auto = {"reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size)}
    for name in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
        value = getattr(setup, name)
        if value == "auto" and name in auto:
            set_field(setup, name, auto[name])
            continue
        fix = f"{name} is a number of elements, e.g. 5e8 (DeepSpeed's default)" + (" or 'auto'" if name in auto else "")
        set_field(setup, name, whole_field(setup, name, None, 0, fix))


def whole_field(setup: Any, name: str, default: int | None, minimum: int, fix: str) -> int:
    """``setup.name`` (``default`` when None) as an int ≥ ``minimum`` (5e8 read as 5 × 10⁸), else a SetupError."""
    value = getattr(setup, name)
    if value is None:
        value = default
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 5e8 as DeepSpeed configs write it
    if isinstance(value, bool) or not isinstance(value, int):
        raise SetupError(name, f"must be a whole number, got {value!r}", fix=fix)
    if value < minimum:
        raise SetupError(name, f"must be ≥ {minimum}, got {value}", fix=fix)
    return value
