"""FSDP2 (``fully_shard``) and FSDP1 under accelerate 1.16, per rank.

Sources: accelerate 1.16 ``utils/fsdp_utils.py`` ``fsdp2_prepare_model`` ("Upcast to fp32 master weights;
MixedPrecisionPolicy.param_dtype handles compute cast": every trained parameter becomes fp32 and is sharded;
frozen ones keep their loaded dtype), ``utils/dataclasses.py`` (``mixed_precision: bf16`` →
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16)``); TRL 1.16 ``trl/models/utils.py``
``prepare_fsdp`` (the reference model: FSDP2 ``fully_shard`` on the root only, FSDP1 with the plugin's wrap
policy) and ``trl/generation/vllm_generation.py`` (the weight sync: FSDP2 ``param.full_tensor()`` per
``state_dict()`` entry — the full parameter in its stored dtype; FSDP1 ``summon_full_params(recurse=False)``,
one unit at a time). Measured on CPU with a fake process group (docs/distributed.md §5, 200M-param toy, N = 2
and 8): sharded parameters exactly 4Ψ/N, optimizer states exactly 8Ψ/N; mid-backward, independent of N, the
current block unsharded + the prefetched next block's all-gather + the block's reduce-scatter input + the root
(not resharded after forward) = 8·Ψ_block + 2·Ψ_root with an fp32 reduce dtype — accelerate reduces in bf16, so
the reduce-scatter input here is 2·Ψ_block; a root-only reference forward gathered 890.6 MiB for the 381 MiB
bf16 model (≈ 2 × the bf16 model: the all-gather output and the unsharded parameters).
"""

from __future__ import annotations

from ..constants import CHUNKED_VOCAB_TILE, DTYPE_BYTES, C
from ..context import Ctx
from ..params import trainable_params
from . import shapes
from .base import Shares, Strategy, foreach_temp, optimizer_state_bytes_per_element, shares_of

BF16 = 2
FP32 = 4


def _shares(version: int):
    def shares(ctx: Ctx, rank: int) -> Shares:
        n, spec = ctx.setup.world_size, ctx.spec
        # FSDP2 chunks each parameter on dim 0; FSDP1 pads one FlatParameter per unit
        params = (shapes.fsdp_shard_params(spec, n, rank) if version == 2 else shapes.flat_shard(spec.num_params, n))
        lora = shapes.flat_shard(trainable_params(ctx), n) if ctx.setup.is_lora else None
        return shares_of(ctx, rank, params, params if lora is None else lora)
    return shares


def _loaded_bytes(ctx: Ctx) -> int:
    """Frozen parameters keep the dtype they were loaded in (the setup's)."""
    return DTYPE_BYTES[ctx.loaded_dtype]


def _states(ctx: Ctx, sh: Shares) -> dict:
    """Sharded parameters, LoRA adapters and optimizer states of this rank (GPU, or host when offloaded)."""
    setup = ctx.setup
    parts = {C.WEIGHTS: sh.params * (_loaded_bytes(ctx) if setup.is_lora else FP32),
             C.OPTIMIZER_STATES: sh.trainable * optimizer_state_bytes_per_element(ctx)}
    if setup.is_lora:
        parts[C.LORA] = sh.trainable * FP32
    if setup.beta != 0 and not setup.is_lora:
        parts[C.REFERENCE] = shapes.flat_shard(ctx.spec.num_params, sh.world_size) * _loaded_bytes(ctx)
    return parts


def _persistent(ctx: Ctx, sh: Shares) -> dict:
    if ctx.setup.offload_params:  # CPUOffloadPolicy: parameters, gradients and the optimizer step on the host
        return {C.REFERENCE: _states(ctx, sh).get(C.REFERENCE, 0)}
    return _states(ctx, sh)


def head_outside_units(ctx: Ctx) -> bool:
    """FSDP2 + LoRA + an untied head + TRL's fused log-prob head: the lm_head is a unit that is never all-gathered.

    accelerate 1.16 ``utils/fsdp_utils.py`` ``_find_final_norm`` (l. 729-730) looks the backbone up as
    ``getattr(model, model.base_model_prefix)``; on a PeftModel both names fall through ``PeftModel.__getattr__``
    / ``LoraModel.__getattr__`` to the CausalLM, so ``getattr(peft_model, "model")`` is the ``LlamaForCausalLM``
    itself, whose direct children (``model``, ``lm_head``) hold no norm: ``final_norm`` is None and the carved
    tail (l. 894-898) is ``fully_shard([lm_head], reshard_after_forward=False)`` alone, the final norm going to
    the root (l. 904). FSDP2 unshards a group in the pre-forward hook of its modules, but TRL 1.16's fused head
    (``trl/trainer/utils.py`` ``add_fused_lm_head._fused_forward``) never calls ``lm_head.forward``: it reads
    ``lm_head.weight``, still the sharded DTensor, and ``weight = weight.full_tensor()`` (l. 1637) all-gathers it
    outside FSDP — in its storage dtype (the frozen base keeps its loaded dtype: accelerate upcasts only
    ``requires_grad`` parameters, l. 804; ``MixedPrecisionPolicy.param_dtype`` applies to FSDP's own unshard
    only). Full fine-tuning finds the norm (``getattr(LlamaForCausalLM, "model")`` is the backbone), whose forward
    unshards the tail in bf16; the materialised path calls ``lm_head.forward``. Read in the rank simulation's
    trace (rank 0 under a fake group, which runs accelerate's and TRL's code): the PeftModel's lm_head in no unit
    that gathers, ``logits`` 2521.5 MiB = 2004 fp32 + 2 × 256 bf16 chunk casts (Llama-3.1-8B, N = 8)."""
    setup = ctx.setup
    return (setup.distributed == "fsdp2" and setup.is_lora and not ctx.spec.tie_word_embeddings
            and setup.fsdp_wrap != "none" and setup.logits == "chunked" and not setup.use_liger_kernel)


def full_tensor_head_bytes(ctx: Ctx, when: str) -> int:
    """:func:`head_outside_units`: the lm_head ``full_tensor()`` in its loaded dtype, alive from the fused head's
    forward through its backward (``_ChunkedLogProbFunction`` saves it), and the ``weight[start:end].to(compute
    dtype)`` vocabulary-chunk casts of that weight (one in forward, up to two alive in the backward loop: see
    ``logits.logits_bytes``, which counts them for the compute-dtype weight of the one-GPU parts: none)."""
    if not head_outside_units(ctx):
        return 0
    spec, stored = ctx.spec, _loaded_bytes(ctx)
    compute = 4 if ctx.setup.cast_lm_head_to_fp32 else BF16
    chunk_cast = min(spec.vocab_size, CHUNKED_VOCAB_TILE) * spec.hidden_size * compute if stored != compute else 0
    # the backward's previous chunk copy lives until the next is assigned: two only with a second vocabulary chunk
    # (Mistral's 32000 rows are one chunk: the simulated head moment stays under the forward's 1249 MiB gathered)
    copies = 2 if when == "backward" and spec.vocab_size > CHUNKED_VOCAB_TILE else 1
    return spec.vocab_size * spec.hidden_size * stored + copies * chunk_cast


def forward_gather_bytes(ctx: Ctx, tail_gathered: bool = False) -> int:
    """The most unsharded bf16 parameters alive while a forward runs (``param_dtype`` bf16).

    Per decoder-layer units, the forward peaks inside a unit's copy-out: torch 2.13
    ``FSDPParamGroup.wait_for_unshard`` defers freeing the previous unit's all-gather output in forward
    ("to overlap the current copy-out with the next all-gather") and drops it through a local
    (``if prev_all_gather_state := self.comm_ctx.all_gather_state``) that lives until the method returns, so
    during unit k's copy-out the previous unit's all-gather output, unit k's all-gather output and unit k's
    unsharded parameters are alive together, with every unit not resharded after forward (the tail). In the
    forward's order (:func:`outer_units`) — tied: tail (embedding first), blocks; untied: embedding, blocks,
    tail — that is 2 × (tail + block) at the first block (tied), embedding + 2 × block at the first block and
    block + 2 × tail at the tail (untied), 3 × block (+ the tied tail) between blocks. Simulated (rank 0 under a
    fake group): Qwen2.5-0.5B tied, 2 layers, N = 8, LoRA: 576.4 MiB = 2 × (259.7 + 28.5); Llama-3.1-8B
    untied, 2 layers: 2420 MiB = 416 + 2 × 1002. One root unit (``fsdp_wrap='none'``) or no resharding after
    forward: the whole model.

    ``tail_gathered``: an earlier no-grad forward of the policy in this step left the tail unsharded (a unit
    not resharded after forward is resharded only in its post-backward, which a no-grad forward never
    registers: torch 2.13 ``FSDPParamGroup.reshard`` returns early in forward, ``_register_post_backward_hook``
    without grad), so this forward does not all-gather it: no tail all-gather output, the tail counted once.
    Simulated, Qwen2.5-0.5B tied, 2 layers, N = 4, LoRA, vLLM's "old" scoring pass first: training gathered
    345.3 MiB = 259.7 + 3 × 28.5."""
    setup, spec = ctx.setup, ctx.spec
    if setup.fsdp_wrap == "none" or not setup.reshard_after_forward:
        return spec.num_params * BF16
    blk = shapes.block_params(spec)
    embed_unit, tail = outer_units(spec)
    if head_outside_units(ctx):  # the tail unit is never gathered (the fused head's full_tensor is logits)
        tail = 0
    between_blocks = [3 * blk] if spec.num_hidden_layers >= 2 else []
    if spec.tie_word_embeddings and tail_gathered:
        peaks = [tail + 2 * blk] + [tail + b for b in between_blocks]
    elif spec.tie_word_embeddings:  # the tail is gathered first and kept
        peaks = [2 * tail, 2 * tail + 2 * blk] + [tail + b for b in between_blocks]
    elif tail_gathered:
        peaks = [tail + 2 * embed_unit, tail + embed_unit + 2 * blk] + [tail + b for b in between_blocks]
    else:  # the embedding unit is resharded after its forward; the tail is gathered last
        peaks = [2 * embed_unit, embed_unit + 2 * blk, blk + 2 * tail] + between_blocks
    return max(peaks) * BF16


def _reduce_scatter_bytes(ctx: Ctx) -> int:
    """One unit's unsharded gradients, the reduce-scatter input, in ``reduce_dtype`` (bf16 under accelerate)."""
    setup, spec = ctx.setup, ctx.spec
    unit = spec.num_params if setup.fsdp_wrap == "none" else shapes.block_params(spec)
    if setup.is_lora:
        unit = ctx.lora_params if setup.fsdp_wrap == "none" else ctx.lora_params // max(spec.num_hidden_layers, 1)
    return unit * BF16


def _generation(version: int):
    def generation(ctx: Ctx, sh: Shares, one_gpu: dict) -> dict:
        setup, spec = ctx.setup, ctx.spec
        if not setup.use_vllm:
            return {C.GATHERED_PARAMS: forward_gather_bytes(ctx)}  # HF generate runs the sharded forward
        stored = _loaded_bytes(ctx) if setup.is_lora else FP32
        if version == 2:
            return {C.WEIGHT_SYNC: shapes.largest_param(spec) * stored}
        largest_unit = max(shapes.block_params(spec), *outer_units(spec))
        return {C.WEIGHT_SYNC: largest_unit * stored}
    return generation


def _scoring(version: int):
    def scoring(ctx: Ctx, sh: Shares, one_gpu: dict) -> dict:
        setup, spec = ctx.setup, ctx.spec
        gathered = forward_gather_bytes(ctx)
        head = full_tensor_head_bytes(ctx, "forward")
        if head and shapes.block_params(spec) * BF16 + head > gathered:
            # the fused head's moment: the full_tensor()-ed lm_head, and the last block's all-gather output (no
            # later unit's wait_for_unshard frees it); the forward's copy-out peak is earlier, not beside it.
            # Simulated (Llama-3.1-8B, 2 layers, N = 8, LoRA, vLLM's "old" pass): gathered 416.4 MiB, logits
            # 2264.5 MiB = 2004 fp32 + a 256 MiB chunk cast + the tile
            return {C.GATHERED_PARAMS: shapes.block_params(spec) * BF16, C.LOGITS: head}
        if "ref" in setup.scoring_passes and not setup.is_lora:
            # the reference pass: FSDP2's root-only wrap gathers the whole model (2 × bf16, measured); FSDP1
            # wraps the reference like the policy
            reference = 2 * spec.num_params * BF16 if version == 2 else forward_gather_bytes(ctx)
            gathered = max(gathered, reference)
        return {C.GATHERED_PARAMS: gathered}
    return scoring


def outer_units(spec) -> tuple[int, int]:
    """(the embedding's own unit, the tail unit) in parameters, as accelerate 1.16 carves them
    (``fsdp2_prepare_model``: "Carve embed + tail=[final_norm, lm_head] into their own units. Tail gets
    ``False``" — not resharded after forward): untied, the embedding is a unit of its own and the tail holds the
    final norm and the lm_head; tied, the one shared weight goes with the tail and there is no embedding unit."""
    vh, h = spec.vocab_size * spec.hidden_size, spec.hidden_size
    if spec.tie_word_embeddings:
        return 0, vh + h
    return vh, vh + h


def _training(ctx: Ctx, sh: Shares, one_gpu: dict, moment: str | None) -> dict:
    """The micro-step's moments (``phases.MOMENTS``) under FSDP with per-layer units resharded after forward.
    The tail unit (see :func:`outer_units`) stays unsharded from the forward's end until its post-backward:
    untied, right after the lm_head's backward; tied, only after the embedding's backward at the very end, so the
    shared weight's unsharded bf16 gradient lives through the whole backward. Each block is all-gathered with the
    next one prefetched and its bf16 gradients are its reduce-scatter input; the lm_head weight's gradient cast
    to bf16 is already in the log-prob backward (``logits``). Cross-checked against the FakeTensor simulation of
    rank 0 under a fake group (docs/distributed.md §5)."""
    setup, spec = ctx.setup, ctx.spec
    blk, vh = shapes.block_params(spec), spec.vocab_size * spec.hidden_size
    embed_unit, tail = outer_units(spec)
    tied = spec.tie_word_embeddings
    head_gathered_outside = head_outside_units(ctx)
    if head_gathered_outside:  # no tail unit gathers: the lm_head is full_tensor()-ed in the fused head
        tail = 0
    accumulating = setup.gradient_accumulation_steps > 1
    n = sh.world_size
    if setup.offload_params:
        sharded_all = sharded_blocks = sharded_head = 0
    elif setup.is_lora:
        sharded_all = sharded_blocks = sh.trainable * FP32
        sharded_head = 0
    else:
        sharded_all = sh.trainable * FP32
        sharded_blocks = shapes.fsdp_shard_params(spec, n, sh.rank) - shapes.root_shard_params(spec, n, sh.rank)
        sharded_blocks *= FP32
        sharded_head = 0 if tied else -(-spec.vocab_size // n) * spec.hidden_size * FP32
    root_grad = 0 if setup.is_lora else vh * BF16  # an unsharded bf16 gradient of the (tied) embedding / head
    lora_block = ctx.lora_params // max(spec.num_hidden_layers, 1)
    block_grads = (lora_block if setup.is_lora else blk) * BF16  # one block's reduce-scatter input
    if setup.fsdp_wrap == "none":  # one root unit: nothing is reduced before the backward ends
        rs = (ctx.lora_params if setup.is_lora else spec.num_params) * BF16 if moment == "embedding" else 0
        return {C.GRADIENTS: one_gpu.get(C.GRADIENTS, 0), C.GATHERED_PARAMS: spec.num_params * BF16,
                C.REDUCE_BUCKETS: rs}
    # reshard_after_forward=False keeps every unit unsharded from its forward until its own post-backward: the
    # whole model at the backward's start, one block less after each block's backward
    kept = spec.num_params * BF16 if not setup.reshard_after_forward else None
    before = sharded_all if accumulating else 0  # earlier micro-steps' sharded gradients
    tail_kept = tail if tied else 0  # the tied tail stays unsharded through the whole backward
    if moment == "head":  # the log-prob backward; the last block is all-gathered for its backward
        parts = {C.GRADIENTS: before, C.GATHERED_PARAMS: kept or (tail + blk) * BF16}
        if head_gathered_outside:
            parts[C.LOGITS] = full_tensor_head_bytes(ctx, "backward")
        if not tied and not setup.is_lora:
            # untied, the lm_head's bf16 gradient is the tail's reduce-scatter input right here (the chunked
            # log-prob backward's grad_weight.to(bf16) is counted in logits: moved, not added)
            parts[C.REDUCE_BUCKETS] = root_grad
            if setup.logits == "chunked":
                parts[C.LOGITS] = -root_grad
        return parts
    if moment == "last_block":
        return {C.GRADIENTS: max(before, sharded_head) + (root_grad if tied else 0),
                C.GATHERED_PARAMS: kept or (tail_kept + 2 * blk) * BF16, C.REDUCE_BUCKETS: block_grads}
    # inside / at the end of the first block's backward every later block's sharded gradient exists, not its own
    later_blocks = sharded_blocks - sharded_blocks // max(spec.num_hidden_layers, 1)
    if moment == "first_block":  # every other block reduced; the embedding unit (kept, or prefetched) is next
        return {C.GRADIENTS: max(before, later_blocks + sharded_head) + (root_grad if tied else 0),
                C.GATHERED_PARAMS: (tail_kept + embed_unit + blk) * BF16, C.REDUCE_BUCKETS: block_grads}
    if moment == "block_reduce":
        # the first block's post_backward (torch 2.13 FSDPParamGroup.post_backward → foreach_reduce): its
        # unsharded bf16 gradients and the flat reduce-scatter input they are copied into are alive together
        # (2 × the block's gradients), the block still unsharded and the embedding unit prefetched, every later
        # block's sharded gradient made, this block's not yet. Simulated: Mistral-7B (2 layers, N = 8) 832 MiB
        # = 2 × 416 reduce-scatter, 666 MiB = 416 + 250 gathered, 166.5 MiB sharded gradients.
        return {C.GRADIENTS: max(before, later_blocks + sharded_head) + (root_grad if tied else 0),
                C.GATHERED_PARAMS: (tail_kept + embed_unit + blk) * BF16, C.REDUCE_BUCKETS: 2 * block_grads}
    if moment == "embedding" and not tied and not setup.is_lora and not accumulating:
        # untied: the embedding unit's post_backward. torch 2.13 FSDPParamGroup.post_backward reshards first
        # (nothing of the unit stays gathered), then foreach_reduce copies the unsharded bf16 gradient into the
        # flat reduce-scatter input and reduce-scatters into a 1/N output, which becomes the fp32 sharded
        # gradient: the unsharded gradient, the input and the output alive together, the block's reduce-scatter
        # already reclaimed. Simulated, Llama-3.1-8B (2 layers, N = 2): reduce_buckets 2505 MiB = 1002 + 1002 +
        # 501, gathered 0, gradients 2836 MiB = every fp32 shard.
        shard_rows = -(-spec.vocab_size // n) * spec.hidden_size
        return {C.GRADIENTS: sharded_blocks + sharded_head + shard_rows * FP32, C.GATHERED_PARAMS: 0,
                C.REDUCE_BUCKETS: (2 * embed_unit + shard_rows) * BF16}
    if moment == "embedding":  # the embedding's backward and reduce-scatter; the last block's still in flight
        own_grad = 0 if tied or setup.is_lora else root_grad  # tied: both gradients are in recomputed_layer
        parts = {C.GRADIENTS: max(before, sharded_blocks + sharded_head) + own_grad,
                 C.GATHERED_PARAMS: (tail_kept + embed_unit) * BF16,
                 C.REDUCE_BUCKETS: (0 if setup.is_lora else (tail if tied else embed_unit) * BF16) + block_grads}
        if tied and not setup.is_lora and setup.logits == "chunked":
            # of the two bf16 V·h gradients, the head's is made by the chunked log-prob backward
            # (ChunkedLogProbFunction's grad_weight.to(bf16)) and parked in autograd until the embedding's is
            # added to it: the log-prob path's allocation (logits), as the simulation files it; moved, not added
            parts[C.RECOMPUTED_LAYER] = -vh * BF16
            parts[C.LOGITS] = vh * BF16
        return parts
    # the forward (its end stands for it): the largest copy-out moment, forward_gather_bytes; the tail is
    # still unsharded when a no-grad pass of the policy ran before it in this step (vLLM's "old" log-probs,
    # LoRA's reference = the policy with its adapters off). HF generate's forwards would do the same, but the
    # simulation does not run generate: not modelled here (docs/distributed.md §9)
    policy_scored = "old" in setup.scoring_passes or ("ref" in setup.scoring_passes and setup.is_lora)
    return {C.GRADIENTS: before, C.GATHERED_PARAMS: kept or forward_gather_bytes(ctx, tail_gathered=policy_scored)}


def _optimizer_step(ctx: Ctx, sh: Shares, one_gpu: dict) -> dict:
    if ctx.setup.offload_params:
        return {C.GRADIENTS: 0, C.OPTIMIZER_TEMP: 0}
    return {C.GRADIENTS: sh.trainable * FP32, C.OPTIMIZER_TEMP: foreach_temp(ctx, sh.trainable)}


def _host(ctx: Ctx, sh: Shares) -> dict:
    if not ctx.setup.offload_params:
        return {}
    parts = _states(ctx, sh)
    parts.pop(C.REFERENCE, None)
    parts[C.GRADIENTS] = sh.trainable * FP32
    parts[C.OPTIMIZER_TEMP] = foreach_temp(ctx, sh.trainable)
    return parts


STRATEGIES = {
    f"fsdp{version}": Strategy(name=f"fsdp{version}", label=f"FSDP{version}", shares=_shares(version),
                               persistent=_persistent, generation=_generation(version), scoring=_scoring(version),
                               training=_training, optimizer_step=_optimizer_step, host=_host)
    for version in (1, 2)
}
