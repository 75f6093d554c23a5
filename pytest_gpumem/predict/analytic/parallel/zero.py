"""DeepSpeed ZeRO stages 1, 2 and 3 (bf16 compute, fp32 master partitions), per rank.

Read at microsoft/DeepSpeed 38327e0 (``deepspeed/runtime/zero/stage_1_and_2.py``, ``stage3.py``, ``engine.py``)
and TRL 1.16 (``trl/models/utils.py``, ``trl/generation/vllm_generation.py``, ``grpo_trainer.py``). N = world
size, Ψ = parameters, T = trained parameters (Ψ, or the LoRA adapters), ⌈x/N⌉ = a padded flat partition.

- Every stage: the engine casts the module to bf16 (``bfloat16_enabled`` → ``module.bfloat16()``), so compute
  weights are 2 B; the optimizer steps on an fp32 copy of this rank's ⌈T/N⌉ (``single_partition_of_fp32_groups``,
  ``fp32_partitioned_groups_flat``) with its states; gradients accumulate in bf16 (``engine.get_data_types``:
  ``grad_accum_dtype = model_dtype`` under ZeRO).
- Stage 1: ``partition_gradients`` is False and no hooks run without ``overlap_comm``: the whole bf16 ``.grad``
  lives until ``reduce_gradients`` at the step. Stage 2: gradients go through the IPG bucket as they are produced
  and only this rank's bf16 partition stays (``averaged_gradients``). Both allocate the IPG bucket in
  ``backward()`` (``reduce_bucket_size`` elements of the model dtype, a second one with ``overlap_comm``: "Use
  double buffers to avoid data access conflict when overlap_comm is enabled") and release it in ``step()``.
  At the step, the fp32 gradient of the partition (4⌈T/N⌉) exists beside the bf16 one.
- Stage 3: parameters are partitioned too (2⌈Ψ/N⌉); those under ``stage3_param_persistence_threshold`` (1e5
  elements) are also kept whole on every rank (``ds_persist``), beside their partition; ``grad_partitions_flat_buffer``
  (bf16, ⌈T/N⌉, ``torch.zeros`` at init) and the IPG bucket (``ipg_buckets[dtype].buffer``, one per
  communication dtype, once whatever ``overlap_comm``) live for the whole run. Measured with a real engine
  (DeepSpeed 0.19.8, CPU, rank 0 of a fake group: tests/test_deepspeed_engine.py): each of these to the byte. A module's
  parameters are all-gathered while it runs, plus up to ``stage3_prefetch_bucket_size`` elements prefetched.
  The step makes the fp32 gradient one sub-group at a time (``sub_group_size`` 1e9 elements).
- Offload: ``offload_optimizer`` puts the fp32 partition, its states and gradients in pinned host memory (stage 3:
  ``grad_partitions_flat_buffer`` too, ``pin_memory`` when offloading); ``offload_params`` (stage 3) the bf16
  parameter partitions.
- TRL: HF generate under ZeRO-3 gathers the whole 16-bit model on every rank (``ds3_gather_for_generation=True``,
  ``deepspeed.zero.GatheredParameters(model.parameters())``); the reference model under ZeRO-1/2 is a full
  replica per rank (``prepare_deepspeed`` sets stage 0), under ZeRO-3 it is partitioned; the weight sync to vLLM
  gathers one parameter at a time under ZeRO-3, the whole model with PEFT (``gather_params(all)`` +
  ``merge_adapter``), nothing under ZeRO-1/2 (the weights are whole).
"""

from __future__ import annotations

from ..constants import C
from ..context import Ctx
from ..params import trainable_params
from . import shapes
from .base import Shares, Strategy, foreach_temp, optimizer_state_bytes_per_element, shares_of

BF16 = 2
FP32 = 4
#: DeepSpeed's ``sub_group_size`` default: 1e9 elements (deepspeed/runtime/zero/config.py)
SUB_GROUP_ELEMENTS = 1_000_000_000


def _shares(stage: int):
    def shares(ctx: Ctx, rank: int) -> Shares:
        n, spec = ctx.setup.world_size, ctx.spec
        params = spec.num_params
        if stage == 3:  # every parameter's partition, plus the small ones whole
            params = shapes.flat_shard(spec.num_params, n) + shapes.persistent_params(spec)
        return shares_of(ctx, rank, params, shapes.flat_shard(trainable_params(ctx), n))
    return shares


def _persistent(stage: int):
    def persistent(ctx: Ctx, sh: Shares) -> dict:
        setup = ctx.setup
        parts = {C.WEIGHTS: sh.params * BF16}
        if setup.offload_params:  # stage 3 only (the setup refuses it elsewhere): the whole-kept ones stay
            parts[C.WEIGHTS] = shapes.persistent_params(ctx.spec) * BF16
        if setup.is_lora:
            parts[C.LORA] = (sh.trainable if stage == 3 else sh.trainable_total) * BF16
        if not setup.offload_optimizer:
            parts[C.MASTER_WEIGHTS] = sh.trainable * FP32
            parts[C.OPTIMIZER_STATES] = sh.trainable * optimizer_state_bytes_per_element(ctx)
            if stage == 3:
                parts[C.GRADIENTS] = sh.trainable * BF16  # grad_partitions_flat_buffer
        if stage == 3:
            parts[C.REDUCE_BUCKETS] = setup.reduce_bucket_size * BF16
        if setup.beta != 0 and not setup.is_lora:
            parts[C.REFERENCE] = reference_bytes(ctx, stage)
        return parts
    return persistent


def reference_bytes(ctx: Ctx, stage: int) -> int:
    """The reference model per rank (trl 1.16 ``prepare_deepspeed``): stage 0 — a bf16 replica — under ZeRO-1/2;
    under ZeRO-3 partitioned, with ``stage3_param_persistence_threshold = 10 * hidden_size``."""
    spec = ctx.spec
    if stage != 3:
        return spec.num_params * BF16
    whole = shapes.persistent_params(spec, threshold=10 * spec.hidden_size)
    return (shapes.flat_shard(spec.num_params, ctx.setup.world_size) + whole) * BF16


def layer_gather_bytes(ctx: Ctx) -> int:
    """ZeRO-3's gathered parameters while a module runs: the module's own + the prefetch bucket."""
    spec = ctx.spec
    prefetch = min(ctx.setup.stage3_prefetch_bucket_size, spec.num_params)
    return (shapes.largest_module_params(spec) + prefetch) * BF16


def _generation(stage: int):
    def generation(ctx: Ctx, sh: Shares, one_gpu: dict) -> dict:
        setup, spec = ctx.setup, ctx.spec
        parts: dict = {}
        if stage == 3 and not setup.use_vllm:
            parts[C.GATHERED_PARAMS] = spec.num_params * BF16  # ds3_gather_for_generation: the whole model
        if setup.use_vllm and stage == 3:
            whole = setup.is_lora  # PEFT: gather_params(all) + merge_adapter; else one parameter at a time
            parts[C.WEIGHT_SYNC] = (spec.num_params if whole else shapes.largest_param(spec)) * BF16
        return parts
    return generation


def _scoring(stage: int):
    def scoring(ctx: Ctx, sh: Shares, one_gpu: dict) -> dict:
        return {C.GATHERED_PARAMS: layer_gather_bytes(ctx)} if stage == 3 else {}
    return scoring


def _bucket(ctx: Ctx) -> int:
    """The IPG bucket(s) of ZeRO-1/2's backward."""
    setup = ctx.setup
    return setup.reduce_bucket_size * BF16 * (2 if setup.overlap_comm else 1)


def _training(stage: int):
    def training(ctx: Ctx, sh: Shares, one_gpu: dict, moment: str | None) -> dict:
        setup = ctx.setup
        if stage == 1:  # the whole bf16 .grad, as on one GPU (the compute is bf16)
            return {C.GRADIENTS: one_gpu.get(C.GRADIENTS, 0), C.REDUCE_BUCKETS: _bucket(ctx)}
        if stage == 2:
            grads = 0 if setup.offload_optimizer else sh.trainable * BF16
            return {C.GRADIENTS: grads, C.REDUCE_BUCKETS: _bucket(ctx)}
        grads = 0 if setup.offload_optimizer else sh.trainable * BF16
        return {C.GRADIENTS: grads, C.GATHERED_PARAMS: layer_gather_bytes(ctx)}
    return training


def _optimizer_step(stage: int):
    def optimizer_step(ctx: Ctx, sh: Shares, one_gpu: dict) -> dict:
        if ctx.setup.offload_optimizer:  # the step runs on the host (DeepSpeedCPUAdam)
            return {C.GRADIENTS: 0, C.OPTIMIZER_TEMP: 0}
        fp32_grad = min(sh.trainable, SUB_GROUP_ELEMENTS) if stage == 3 else sh.trainable
        return {C.GRADIENTS: sh.trainable * BF16 + fp32_grad * FP32,
                C.OPTIMIZER_TEMP: foreach_temp(ctx, fp32_grad)}
    return optimizer_step


def _host(stage: int):
    def host(ctx: Ctx, sh: Shares) -> dict:
        setup, parts = ctx.setup, {}
        if setup.offload_optimizer:
            parts[C.MASTER_WEIGHTS] = sh.trainable * FP32
            parts[C.OPTIMIZER_STATES] = sh.trainable * optimizer_state_bytes_per_element(ctx)
            parts[C.GRADIENTS] = sh.trainable * (FP32 + (BF16 if stage == 3 else 0))
        if setup.offload_params:
            parts[C.WEIGHTS] = shapes.flat_shard(ctx.spec.num_params, sh.world_size) * BF16
        return parts
    return host


STRATEGIES = {
    f"zero{stage}": Strategy(name=f"zero{stage}", label=f"DeepSpeed ZeRO-{stage}", shares=_shares(stage),
                             persistent=_persistent(stage), generation=_generation(stage), scoring=_scoring(stage),
                             training=_training(stage), optimizer_step=_optimizer_step(stage), host=_host(stage))
    for stage in (1, 2, 3)
}
