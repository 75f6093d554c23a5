"""A measurement child that is one rank of ``accelerate launch`` (``measure.launch``): which rank it is, where it
writes its result, its GPU, and the CPU-only FSDP fix.

* Each rank writes ``result.rank<RANK>.json`` beside the request's result path (``protocol.rank_result_name``).
* On GPUs, each rank sees only its own device (``CUDA_VISIBLE_DEVICES`` = its entry, ``LOCAL_RANK`` = 0): the
  child's measurements (allocator, NVML, snapshots) all read device 0, which is then that rank's GPU.
* accelerate 1.16's ``AcceleratorState`` turns FSDP on only for GPU-type process groups (``state.py``: the
  ``DistributedType.MULTI_GPU, MULTI_MLU, …`` list has no ``MULTI_CPU``), so a CPU/gloo launch of an FSDP
  config silently trains DDP. :func:`promote_cpu_fsdp` promotes ``MULTI_CPU`` to ``FSDP`` with the launch's
  plugin (docs/distributed-simulation.md §4: with it the params are DTensors, half per rank).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..nvml import nvml_device_count, visible_device_entries
from ..protocol import rank_result_name


def rank_of(request: dict[str, Any]) -> int | None:
    """This process's rank when it is one of several launched ranks, else None."""
    if "world_size" not in request or "RANK" not in os.environ:  # a single-process request has no world_size
        return None
    return int(os.environ["RANK"])


def result_path_for(request: dict[str, Any], result_path: Path) -> Path:
    rank = rank_of(request)
    return result_path if rank is None else result_path.parent / rank_result_name(rank)


def isolate_gpu(request: dict[str, Any]) -> None:
    """Before torch is imported: show this rank only its own GPU (see the module docstring)."""
    if rank_of(request) is None or request.get("device") == "cpu" or "LOCAL_RANK" not in os.environ:
        return
    entries = visible_device_entries(dict(os.environ))
    if entries is None:
        count, _reason = nvml_device_count()
        entries = [str(i) for i in range(count or 0)]
    local = int(os.environ["LOCAL_RANK"])
    if local < len(entries):
        os.environ["CUDA_VISIBLE_DEVICES"] = entries[local]
        os.environ["LOCAL_RANK"] = "0"


def promote_cpu_fsdp() -> None:
    """Make accelerate honour an FSDP launch on CPU/gloo (see the module docstring)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    original = AcceleratorState.__init__
    if getattr(original, "_gpumem_cpu_fsdp", False):
        return

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        wanted = fsdp_plugin is not None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if wanted and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin or FullyShardedDataParallelPlugin()

    init._gpumem_cpu_fsdp = True
    AcceleratorState.__init__ = init


def describe_rank(trainer) -> dict[str, Any]:
    """What this rank trained: its place in the job and how its model was sharded."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    accelerator = trainer.accelerator
    model = trainer.model

    def local(param):
        return param.to_local() if hasattr(param, "to_local") else param

    return {"rank": accelerator.process_index, "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type).split(".")[-1],
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "wrapped": type(trainer.model_wrapped).__name__,
            "fsdp_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
            "local_params": int(sum(local(p).numel() for p in model.parameters())),
            "global_params": int(sum(p.numel() for p in model.parameters()))}


def join_fake_group(world_size: int, device_type: str) -> dict[str, str]:
    """Make this single process rank 0 of a ``world_size``-process FSDP2 job: a *fake* process group
    (``torch.testing._internal.distributed.fake_pg``: collectives complete at once and move no data; every
    buffer they need is still allocated on this device) and the environment ``accelerate launch`` gives a rank
    of TRL's ``fsdp2.yaml`` job, so accelerate adopts the group (``PartialState`` keeps an initialised one) and
    wraps the model with FSDP2. Returns the environment it set (recorded in the result)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    env = {"RANK": "0", "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": str(world_size),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599",
           # accelerate launch's FSDP environment for TRL's accelerate_configs/fsdp2.yaml
           "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
           "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
           "FSDP_CPU_RAM_EFFICIENT_LOADING": "false", "FSDP_OFFLOAD_PARAMS": "false"}
    os.environ.update(env)
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    if device_type == "cpu":
        promote_cpu_fsdp()
    return env
