"""FSDP2 as a GRPO job applies it, for one rank under a fake process group: accelerate's own wrap of the policy,
TRL's own root-only wrap of the reference model, and TRL's own weight-sync loop to vLLM.

The library functions are called, not re-implemented, so the simulation follows the installed versions:

* the policy: ``accelerate.utils.fsdp_utils.fsdp2_prepare_model`` (accelerate 1.16): trainable parameters
  upcast to an fp32 master when mixed precision is on, ``fully_shard`` on every decoder layer
  (TRANSFORMER_BASED_WRAP from ``_no_split_modules``), the input embedding as its own unit (untied), the
  final norm + lm_head (+ the tied embedding) as one unit that is *not* resharded after forward, then the root
  (``reshard_after_forward=None``: torch resolves it to False for the root). The mixed-precision policy is
  ``FullyShardedDataParallelPlugin.set_mixed_precision``'s: ``param_dtype`` = ``reduce_dtype`` = bf16
  (``dataclasses.py``: ``dtype_args = {"param_dtype": dtype, "reduce_dtype": dtype}``), so gradients are
  reduce-scattered in bf16 and cast to the fp32 shard.
* the reference model: ``trl.models.utils.prepare_fsdp`` (trl 1.16): one ``fully_shard`` on the root only, so
  a reference forward all-gathers the whole model at once.
* the weight sync: ``trl.generation.vllm_generation.VLLMGeneration._iter_fsdp2_params``: every parameter's
  ``full_tensor()`` in turn — the full fp32 master of one parameter at a time on every rank.

Called with a stand-in for the ``Accelerator`` that carries what these functions read (the plugin, the mesh,
the mixed-precision mode, ``is_main_process``). This module imports torch, accelerate and trl; the replay
imports it only for a sharded plan.
"""

from __future__ import annotations

import contextlib
import types

import torch

from .ranks import ALL_GATHER_REGION, REDUCE_SCATTER_REGION, ShardingPlan
from .scope import SimulationError

#: the mesh dimension accelerate names the FSDP axis (``ParallelismConfig.fsdp_dim_names`` → "dp_shard")
MESH_DIM = "dp_shard"


@contextlib.contextmanager
def fake_process_group(plan: ShardingPlan):
    """``init_process_group("fake", rank, world_size)`` and a 1-D device mesh over it; torn down on exit. The
    fake backend (``torch/testing/_internal/distributed/fake_pg.py``) completes every collective at once and
    leaves the output buffers as they were: a rank allocates exactly what the real collective would."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise SimulationError("world_size", "a process group is already initialised in this process: a sharded "
                              "simulation needs its own fake one", fix="simulate from a process that is not "
                                                                       "itself a distributed job")
    dist.init_process_group("fake", store=FakeStore(), rank=plan.rank, world_size=plan.world_size)
    try:
        yield init_device_mesh(plan.device, (plan.world_size,), mesh_dim_names=(MESH_DIM,))
    finally:
        dist.destroy_process_group()


def accelerator_stand_in(plan: ShardingPlan, mesh, mixed_precision: str):
    """What ``fsdp2_prepare_model`` and ``prepare_fsdp`` read from an ``Accelerator``: the FSDP plugin as
    accelerate builds it from TRL's ``fsdp2.yaml`` (version 2, transformer-based wrap, the reshard knob) with
    the mixed-precision policy accelerate sets, the device mesh, and the process's role."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=plan.reshard_after_forward,
        auto_wrap_policy="transformer_based_wrap" if plan.fsdp_wrap == "transformer_layer" else "no_wrap")
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    return types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=plugin), mixed_precision=mixed_precision,
        is_main_process=plan.rank == 0, torch_device_mesh=mesh, device=torch.device(plan.device),
        parallelism_config=types.SimpleNamespace(fsdp_dim_names=(MESH_DIM,)))


def mixed_precision_of(setup) -> str:
    """accelerate's mixed-precision mode, as ``step.autocast`` reads the setup: TRL's default bf16=True, fp16
    for float16 weights or fp16=True, and none for pure fp32 (bf16=False on fp32 weights)."""
    if setup.dtype == "float16" or getattr(setup, "fp16", None):
        return "fp16"
    if setup.dtype == "float32" and getattr(setup, "bf16", None) is False:
        return "no"
    return "bf16"


def shard_policy(model, accelerator):
    """accelerate's FSDP2 wrap of the policy (see the module docstring)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(accelerator, model)


def shard_reference(model, accelerator):
    """TRL's FSDP2 wrap of the reference model: ``fully_shard`` on the root only."""
    from trl.models.utils import prepare_fsdp

    return prepare_fsdp(model, accelerator)


def sync_weights(model, accelerator) -> int:
    """TRL's FSDP2 → vLLM weight sync on this rank (``VLLMGeneration._iter_named_params``: with PEFT,
    ``merge_adapter()`` first, then each parameter gathered in full by ``_iter_fsdp2_params``), every
    parameter dropped once handed on, as ``load_weights`` copies it into vLLM's own weights. Returns the number
    of parameters synced."""
    try:
        from trl.generation.vllm_generation import VLLMGeneration

        methods = {name: getattr(VLLMGeneration, name)
                   for name in ("_iter_named_params", "_iter_fsdp_params", "_iter_fsdp2_params")}
    except (ImportError, AttributeError):
        raise SimulationError("use_vllm", "this trl has no VLLMGeneration._iter_named_params / _iter_fsdp2_params "
                              "(trl 1.16's FSDP2 weight sync)", fix="install trl 1.16, or simulate use_vllm=false"
                              ) from None
    # what those methods read from the generation object: the model, its distributed mode, the name fix-up
    stand_in = types.SimpleNamespace(
        model=model, accelerator=accelerator,
        _dist=types.SimpleNamespace(is_fsdp=True, fsdp_version=2,
                                    gather_params=lambda params: contextlib.nullcontext()),  # a no-op under FSDP
        _fix_param_name_to_vllm=lambda name, extra_prefixes=None: name)
    for name, method in methods.items():
        setattr(stand_in, name, types.MethodType(method, stand_in))
    count = 0
    for _name, full in stand_in._iter_named_params():
        del full
        count += 1
    return count


@contextlib.contextmanager
def forward_through_root(root, forward):
    """Run ``forward`` as ``root``'s forward for one call, so FSDP2's root hooks (lazy init, the root unit's
    all-gather) fire as they do for TRL's patched ``model(..., fused_lm_head=True)``."""
    saved = root.__dict__.get("forward")
    root.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del root.forward
        else:
            root.forward = saved


@contextlib.contextmanager
def region_hooks(state):
    """Label FSDP2's allocations while the step runs: a unit's all-gather (``FSDPParamGroup.unshard`` — also
    when it is the prefetch of the next unit — and ``wait_for_unshard``'s copy-out into the unsharded
    parameters) and its reduce-scatter (``post_backward``). At ``post_backward``'s entry the unit's unsharded
    gradients are still on the unsharded parameters: their allocations are noted in
    ``state.unsharded_grad_ids`` (they were made by backward ops, so only their identity says what they are)."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    tracker = state.tracker
    saved = {name: getattr(FSDPParamGroup, name) for name in ("unshard", "wait_for_unshard", "post_backward")}

    def labelled(name, region):
        original = saved[name]

        def method(group, *args, **kwargs):
            if name == "post_backward":
                _note_unsharded_grads(state, group)
            previous = tracker.region
            tracker.region = region
            try:
                return original(group, *args, **kwargs)
            finally:
                tracker.region = previous

        return method

    FSDPParamGroup.unshard = labelled("unshard", ALL_GATHER_REGION)
    FSDPParamGroup.wait_for_unshard = labelled("wait_for_unshard", ALL_GATHER_REGION)
    FSDPParamGroup.post_backward = labelled("post_backward", REDUCE_SCATTER_REGION)
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(FSDPParamGroup, name, original)


def _note_unsharded_grads(state, group) -> None:
    for fsdp_param in group.fsdp_params:
        if not hasattr(fsdp_param, "_unsharded_param"):
            continue
        for grad in (fsdp_param.unsharded_accumulated_grad, fsdp_param.unsharded_param.grad):
            if grad is not None:
                alloc_id = state.tracker.alloc_id(grad)
                if alloc_id is not None:
                    state.unsharded_grad_ids.add(alloc_id)
