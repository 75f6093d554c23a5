"""The per-rank estimate of a multi-GPU job: each strategy's model states and transients against hand
calculations from the cited sources (pytest_gpumem/predict/analytic/parallel/), the roles, and the JSON."""

from __future__ import annotations

import math

from pytest_gpumem import GRPOSetup, estimate
from pytest_gpumem.breakdown import Breakdown
from pytest_gpumem.predict.analytic.context import Ctx
from pytest_gpumem.predict.analytic.parallel import STRATEGIES, shapes
from pytest_gpumem.predict.analytic.parallel.roles import compute_ctx
from pytest_gpumem.units import MIB

QWEN_7B = "Qwen/Qwen2.5-7B"
QWEN_05B = "Qwen/Qwen2.5-0.5B"


def est(model=QWEN_7B, **keys):
    return estimate({"model": model, "dtype": "bfloat16", "per_device_train_batch_size": 8, **keys})


def rank0(e, phase):
    return e.breakdown.role("rank0").components(phase)


def test_one_gpu_estimate_has_no_roles_and_the_same_json():
    one = est()
    assert one.breakdown.roles == {} and one.breakdown.worst_role is None
    data = one.to_dict()
    assert "roles" not in data and "worst_role" not in data
    assert est(world_size=1, distributed="none").to_dict() == data


def test_zero3_model_states_per_rank():
    e = est(world_size=8, distributed="zero3")
    spec = e.model
    p, n = spec.num_params, 8
    persistent = shapes.persistent_params(spec)
    parts = rank0(e, "persistent")
    # stage3.py: bf16 partitions of every parameter + the small ones whole (ds_persist), fp32 master, AdamW states,
    # the bf16 grad buffer (each measured to the byte on a real engine: tests/test_deepspeed_engine.py)
    assert parts["weights"] == 2 * (math.ceil(p / n) + persistent)
    assert parts["master_weights"] == 4 * math.ceil(p / n)
    assert parts["optimizer_states"] == 8 * math.ceil(p / n)
    assert parts["gradients"] == 2 * math.ceil(p / n)
    # the IPG bucket once (5e8 bf16 elements = 953.7 MiB), overlap_comm (on by default for stage 3) or not
    assert parts["reduce_buckets"] == 500_000_000 * 2
    assert round(parts["reduce_buckets"] / MIB, 1) == 953.7
    # HF generate gathers the whole 16-bit model on every rank (TRL ds3_gather_for_generation)
    assert rank0(e, "generation")["gathered_params"] == 2 * p
    # a module's parameters + the 5e7-element prefetch bucket while it runs
    assert rank0(e, "training")["gathered_params"] == 2 * (shapes.largest_module_params(spec) + 50_000_000)


def test_zero2_bucket_is_allocated_in_backward_and_doubled_by_overlap_comm():
    plain, overlap = est(world_size=8, distributed="zero2"), est(world_size=8, distributed="zero2", overlap_comm=True)
    assert rank0(plain, "training")["reduce_buckets"] == 2 * 500_000_000
    assert rank0(overlap, "training")["reduce_buckets"] == 2 * 2 * 500_000_000
    assert "reduce_buckets" not in rank0(plain, "optimizer_step")  # released in step()
    smaller = est(world_size=8, distributed="zero2", reduce_bucket_size=5e7)
    assert rank0(smaller, "training")["reduce_buckets"] == 2 * 50_000_000
    p = plain.model.num_params
    # stage 2 keeps the bf16 partition of the gradients; stage 1 the whole bf16 .grad
    assert rank0(plain, "training")["gradients"] == 2 * math.ceil(p / 8)
    zero1 = est(world_size=8, distributed="zero1")
    assert rank0(zero1, "training")["gradients"] > 2 * p * 0.8
    # the step: bf16 partition + its fp32 copy
    assert rank0(plain, "optimizer_step")["gradients"] == 6 * math.ceil(p / 8)
    assert rank0(plain, "persistent")["weights"] == 2 * p  # parameters are not partitioned below stage 3


def fsdp_moment(moment, **keys):
    """The FSDP strategy's training parts at one moment of the micro-step, with the shares of rank 0."""
    setup = GRPOSetup.from_dict({"model": QWEN_7B, "dtype": "bfloat16", "per_device_train_batch_size": 8,
                                 "world_size": 8, "distributed": "fsdp2", **keys})
    ctx = compute_ctx(Ctx.of(setup, None))
    strategy = STRATEGIES["fsdp2"]
    return strategy.training(ctx, strategy.shares(ctx, 0), {}, moment), ctx.spec


def test_fsdp2_shards_and_gathers():
    e = est(world_size=8, distributed="fsdp2")
    spec = e.model
    block, root = shapes.block_params(spec), shapes.root_params(spec)
    assert block * spec.num_hidden_layers + root == spec.num_params
    shard = shapes.fsdp_shard_params(spec, 8, 0)
    assert shard >= spec.num_params / 8
    parts = rank0(e, "optimizer_step")
    assert parts["weights"] == 4 * shard  # fp32 sharded (accelerate upcasts trained parameters)
    assert parts["optimizer_states"] == 8 * shard
    assert parts["gradients"] == 4 * shard


def test_fsdp2_moments_follow_accelerates_units():
    # Qwen2.5-7B is untied: accelerate makes the embedding a unit and [final norm, lm_head] the tail
    _, spec = fsdp_moment("head")
    block, vh, h = spec.layer_params(), spec.vocab_size * spec.hidden_size, spec.hidden_size
    head, _ = fsdp_moment("head")
    # the tail (kept unsharded after forward) + the last block gathered; the lm_head's bf16 gradient is the tail's
    # reduce-scatter input (moved out of the chunked log-prob's count)
    assert head["gathered_params"] == 2 * (vh + h + block)
    assert head["reduce_buckets"] == 2 * vh and head["logits"] == -2 * vh
    last, _ = fsdp_moment("last_block")
    assert last["gathered_params"] == 2 * 2 * block and last["reduce_buckets"] == 2 * block
    first, _ = fsdp_moment("first_block")
    assert first["gathered_params"] == 2 * (vh + block)  # block 0 + the embedding unit prefetched
    # the embedding unit's post_backward: resharded first, then its unsharded bf16 gradient, the reduce-scatter
    # input and the 1/N output alive together (the block's reduce-scatter reclaimed)
    embedding, _ = fsdp_moment("embedding")
    shard_rows = -(-spec.vocab_size // 8) * h
    assert embedding["gathered_params"] == 0 and embedding["reduce_buckets"] == 2 * (2 * vh + shard_rows)
    # the first block's post_backward: its unsharded gradients and its reduce-scatter input, 2 × the block's
    block_reduce, _ = fsdp_moment("block_reduce")
    assert block_reduce["reduce_buckets"] == 2 * 2 * block
    assert block_reduce["gathered_params"] == 2 * (vh + block)
    # the forward: a unit's copy-out with the previous unit's all-gather output still alive — untied, the tail's
    # (block + 2 × tail) is the largest for this vocabulary
    assert fsdp_moment("forward")[0]["gathered_params"] == 2 * (block + 2 * (vh + h))
    # reshard_after_forward=False: the whole model unsharded when the backward starts
    assert fsdp_moment("head", reshard_after_forward=False)[0]["gathered_params"] == 2 * spec.num_params
    assert fsdp_moment("embedding", reshard_after_forward=False)[0]["gathered_params"] == 0
    # one root unit (NO_WRAP): everything gathered, nothing reduced before the end
    assert fsdp_moment("last_block", fsdp_wrap="none")[0]["gathered_params"] == 2 * spec.num_params


def test_fsdp2_tied_tail_keeps_its_gradient_through_the_backward():
    setup = GRPOSetup.from_dict({"model": QWEN_05B, "dtype": "bfloat16", "per_device_train_batch_size": 4,
                                 "num_generations": 4, "world_size": 8, "distributed": "fsdp2"})
    ctx = compute_ctx(Ctx.of(setup, None))
    strategy, spec = STRATEGIES["fsdp2"], ctx.spec
    assert spec.tie_word_embeddings
    vh, h, block = spec.vocab_size * spec.hidden_size, spec.hidden_size, spec.layer_params()
    last = strategy.training(ctx, strategy.shares(ctx, 0), {}, "last_block")
    # tied: the shared weight's unit is the tail, unsharded until the embedding's backward, its bf16 grad alive
    assert last["gathered_params"] == 2 * (vh + h + 2 * block)
    assert last["gradients"] == 2 * vh


def test_fsdp2_rank0_holds_the_largest_shard():
    # 3 ranks: Qwen2.5-0.5B's 896-wide rows chunk as 299/299/298, so rank 0 ≥ rank 1 ≥ rank 2
    spec = est(QWEN_05B).model
    shares = [shapes.fsdp_shard_params(spec, 3, r) for r in range(3)]
    assert shares[0] >= shares[1] >= shares[2] and sum(shares) == spec.num_params and shares[0] > shares[2]
    e = est(QWEN_05B, world_size=4, distributed="fsdp2")
    assert e.breakdown.worst_role == "rank0"
    assert e.breakdown.role("rank0").peak_bytes >= e.breakdown.role("rank1+").peak_bytes


def test_reference_model_per_strategy():
    p = est().model.num_params
    zero2 = est(world_size=8, distributed="zero2", beta=0.04)
    assert rank0(zero2, "persistent")["reference_weights"] == 2 * p  # stage 0: a full replica per rank
    zero3 = est(world_size=8, distributed="zero3", beta=0.04)
    assert rank0(zero3, "persistent")["reference_weights"] < 2 * p / 4
    fsdp2 = est(world_size=8, distributed="fsdp2", beta=0.04)
    # TRL's root-only fully_shard: the reference forward gathers the whole model (≈ 2 × bf16, measured)
    assert rank0(fsdp2, "scoring")["gathered_params"] == 4 * p


def test_weight_sync_to_vllm():
    spec = est().model
    lora = est(world_size=8, distributed="zero3", use_vllm=True, lora_rank=16)
    assert rank0(lora, "generation")["weight_sync_gather"] == 2 * spec.num_params  # PEFT: the whole model
    full = est(world_size=8, distributed="zero3", use_vllm=True)
    assert rank0(full, "generation")["weight_sync_gather"] == 2 * shapes.largest_param(spec)  # one at a time
    fsdp2 = est(world_size=8, distributed="fsdp2", use_vllm=True)
    assert rank0(fsdp2, "generation")["weight_sync_gather"] == 4 * shapes.largest_param(spec)  # fp32 master


def test_offload_moves_states_to_the_host_role():
    e = est(world_size=8, distributed="zero3", offload_optimizer=True, offload_params=True)
    gpu = rank0(e, "persistent")
    assert "master_weights" not in gpu and "optimizer_states" not in gpu
    host = e.breakdown.role("host").components("persistent")
    p8 = math.ceil(e.model.num_params / 8)
    assert host["master_weights"] == 8 * 4 * p8 and host["optimizer_states"] == 8 * 8 * p8  # 8 ranks per machine
    data = e.to_dict()
    assert set(data["roles"]) == {"rank0", "rank1+", "host"} and data["worst_role"] == "rank0"
    assert data["phases"] == data["roles"]["rank0"]["phases"]


def test_nccl_buffers_are_per_rank_and_not_torch():
    two, eight = est(world_size=2, distributed="zero3"), est(world_size=8, distributed="zero3")
    assert rank0(two, "persistent")["nccl_buffers"] == 544 * 10**6
    assert rank0(eight, "persistent")["nccl_buffers"] == 688 * 10**6
    # non-torch memory gets no allocator slack
    without = est(world_size=8, distributed="zero3").breakdown.role("rank0").components("persistent")
    torch_bytes = sum(v for k, v in without.items() if k not in ("cuda_context", "nccl_buffers", "allocator_slack"))
    assert without["allocator_slack"] == int(torch_bytes * 0.05)


def test_vllm_server_mode_adds_a_communicator_on_rank0_only():
    e = est(world_size=8, distributed="zero3", use_vllm=True, vllm_mode="server")
    rank0_nccl = e.breakdown.role("rank0").components("persistent")["nccl_buffers"]
    other_nccl = e.breakdown.role("rank1+").components("persistent")["nccl_buffers"]
    # the weight-transfer group with the server's T × D = 1 worker + the trainer (trl VLLMClient): 2 GPUs
    assert rank0_nccl - other_nccl == 544 * 10**6
    assert e.breakdown.worst_role == "rank0"


def test_more_gpus_lower_zero3_and_fsdp2_peaks():
    for strategy in ("zero3", "fsdp2"):
        peaks = [est(world_size=n, distributed=strategy).peak_bytes for n in (2, 8, 64)]
        assert peaks[0] > peaks[1] > peaks[2]
    assert est(world_size=8, distributed="zero3").peak_bytes < est().peak_bytes


def test_breakdown_roles_round_trip_and_worst_role():
    roles = {"rank0": {"training": {"weights": 10}}, "rank1+": {"training": {"weights": 12}},
             "host": {"persistent": {"optimizer_states": 99}}}
    b = Breakdown.from_roles(roles, source="estimate")
    assert b.worst_role == "rank1+" and b.peak_bytes == 12  # the host is not a GPU: never the worst
    again = Breakdown.from_dict(b.to_dict())
    assert again.roles == b.roles and again.worst_role == "rank1+" and again.phases == b.phases
