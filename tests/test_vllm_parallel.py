"""Generation across GPUs (predict/analytic/vllm_parallel.py, vllm_layout.py): one vLLM tensor-parallel rank, the
`trl vllm-serve` server as a role, colocated TP, the weight sync on both sides — each against the formula's
source (vLLM's linear / vocab-parallel layers, packed_tensor.py, custom_all_reduce.py, TRL 1.16) and, at T = 1,
against the one-GPU model and public vLLM start-up logs."""

from __future__ import annotations

import math

import pytest

from pytest_gpumem import estimate
from pytest_gpumem.errors import GpuMemError
from pytest_gpumem.gpus import resolve_gpu
from pytest_gpumem.predict.analytic import vllm, vllm_parallel
from pytest_gpumem.predict.analytic.constants import VLLM_CUDA_GRAPH_BYTES, VLLM_NON_TORCH_BYTES
from pytest_gpumem.predict.analytic.context import Ctx
from pytest_gpumem.predict.analytic.parallel.base import nccl_bytes
from pytest_gpumem.predict.analytic.parallel.shapes import largest_param
from pytest_gpumem.spec import GRPOSetup
from pytest_gpumem.units import GIB, MIB

QWEN3_8B = "Qwen/Qwen3-8B"  # 32 heads, 8 KV heads, untied, qk-norm
QWEN_15B = "Qwen/Qwen2.5-1.5B"  # 12 heads, 2 KV heads, tied, qkv bias
H100 = resolve_gpu("H100")


def setup(model=QWEN3_8B, **keys):
    return GRPOSetup.from_dict({"model": model, "dtype": "bfloat16", "per_device_train_batch_size": 8,
                                "num_generations": 8, "use_vllm": True, **keys})


def ctx(model=QWEN3_8B, gpu=None, **keys):
    return Ctx.of(setup(model, **keys), resolve_gpu(gpu))


def server(model=QWEN3_8B, tp=1, dp=1, **keys):
    return setup(model, vllm_mode="server", vllm_server_tensor_parallel_size=tp, vllm_server_data_parallel_size=dp,
                 **keys)


# -- T = 1 is the one-GPU model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model,keys", [
    (QWEN3_8B, {}), (QWEN_15B, {}), ("Qwen/Qwen3-30B-A3B", {}), ("google/gemma-3-1b-it", {}),
    ("openai/gpt-oss-20b", {}), (QWEN_15B, {"load_in_4bit": True, "lora_rank": 16}),
])
def test_tp1_is_the_one_gpu_vllm_model(model, keys):
    c = ctx(model, gpu="L4", **keys)
    assert vllm_parallel.rank_weight_bytes(c, 1) == vllm.weight_bytes(c)
    assert sum(vllm_parallel.rank_elements(c.spec, 1)) == c.spec.num_params
    rows, tokens = c.setup.vllm_max_num_seqs, c.setup.vllm_max_num_batched_tokens
    assert vllm_parallel.activation_peak(c, 1, rows, tokens) == vllm.activation_peak(c)
    budget = vllm.budget_bytes(c, c.gpu.total_bytes)
    assert vllm_parallel.rank_reservation(c, 1, rows, tokens, budget) == vllm.reservation(c)
    assert vllm_parallel.rank_kv_bytes(c.spec, 1, 1024) == c.spec.kv_cache_bytes(1024)


#: TRL colocate start-ups (vLLM V1 0.10.2, T = 1) in the HF cookbook, grpo_vllm_online_training.ipynb:
#: https://github.com/huggingface/cookbook/blob/5926c1364682274279d286313aadf7f5c875f31c/notebooks/en/grpo_vllm_online_training.ipynb
#: "Desired GPU memory utilization is (0.3, 23.8 GiB). Actual usage is 7.55 GiB for weight, 0.71 GiB for peak
#: activation, 0.0 GiB for non-torch memory, and 0.29 GiB for CUDAGraph memory. ... Available KV cache memory:
#: 15.54 GiB" (Qwen3-4B); and (faa973d0…, Qwen2-0.5B-Instruct) "(0.3, 23.8 GiB) ... 0.93 GiB for weight, 0.7 GiB
#: for peak activation, 0.02 GiB for non-torch memory, and 0.23 GiB for CUDAGraph memory ... 22.15 GiB"
COOKBOOK_LOGS = (
    {"model": "Qwen/Qwen3-4B", "budget": 23.8, "weights": 7.55, "activations": 0.71, "non_torch": 0.0, "kv": 15.54},
    {"model": None, "budget": 23.8, "weights": 0.93, "activations": 0.7, "non_torch": 0.02, "kv": 22.15},
)


@pytest.mark.parametrize("log", COOKBOOK_LOGS)
def test_tp1_against_vllm_startup_logs(log):
    """T = 1 still matches what vLLM printed: the KV-pool rule per rank reproduces the logged pool from the
    logged parts (graphs outside the budget in 0.10.2), and the rank-1 weights match the logged weights."""
    kv = vllm.kv_cache_bytes(int(log["budget"] * GIB), int(log["weights"] * GIB), int(log["activations"] * GIB),
                             int(log["non_torch"] * GIB))
    assert kv / GIB == pytest.approx(log["kv"], abs=0.011)
    if log["model"]:
        weights = vllm_parallel.rank_weight_bytes(ctx(log["model"]), 1)
        assert weights / GIB == pytest.approx(log["weights"], rel=0.01)  # 7.49 predicted vs 7.55 logged


# -- T = 2, 4, 8: the split against vLLM's layers ---------------------------------------------------------------
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_rank_weights_split_linears_and_vocabulary(tp):
    spec = ctx().spec
    h, hd, layers = spec.hidden_size, spec.head_dim, spec.num_hidden_layers
    linear, rest = vllm_parallel.rank_elements(spec, tp)
    # Column/RowParallelLinear and QKVParallelLinear with 8 KV heads: every decoder linear splits exactly
    assert linear * tp == spec.linear_params()
    # replicated whole: the two RMSNorms per layer, q/k-norm, the final norm; vocab-parallel embedding + lm_head
    norms = layers * (2 * h + 2 * hd) + h
    assert rest == norms + 2 * math.ceil(spec.vocab_size / tp) * h
    assert vllm_parallel.rank_weight_bytes(ctx(), tp) == (linear + rest) * 2


@pytest.mark.parametrize("tp,heads_per_rank", [(1, 2), (2, 1), (4, 1)])
def test_kv_heads_replicate_once_tp_exceeds_them(tp, heads_per_rank):
    spec = ctx(QWEN_15B).spec  # 2 KV heads
    assert vllm_parallel.kv_heads_per_rank(spec, tp) == heads_per_rank == max(1, 2 // tp)
    assert vllm_parallel.rank_kv_bytes(spec, tp, 1000) == spec.kv_cache_bytes(1000) * heads_per_rank // 2
    linear, _ = vllm_parallel.rank_elements(spec, tp)
    h, hd = spec.hidden_size, spec.head_dim
    q_out = spec.q_out // tp
    attention = h * q_out + 2 * h * heads_per_rank * hd + q_out * h  # k/v projections of the replicated head
    assert linear == spec.num_hidden_layers * (attention + 3 * h * spec.intermediate_size // tp)


def test_custom_all_reduce_and_nccl_per_group():
    assert vllm_parallel.group_non_torch_bytes(1) == 0
    assert vllm_parallel.group_non_torch_bytes(2) == 24 * MIB + 544 * 10**6  # CustomAllreduce + a 2-GPU communicator
    assert vllm_parallel.group_non_torch_bytes(4, 2) == 24 * MIB + 688 * 10**6 + 544 * 10**6  # + the DP group
    assert vllm_parallel.group_non_torch_bytes(3) == 688 * 10**6  # no custom all-reduce for 3 ranks


# -- the server role --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (2, 2)])
def test_server_gpu_is_one_rank_budgeting_on_its_own(tp, dp):
    s = server(tp=tp, dp=dp, world_size=2, distributed="zero3")
    e = estimate(s, gpu=H100)
    gpu_parts = e.breakdown.role("vllm_server").components("persistent")
    c = Ctx.of(s, H100)
    weights = vllm_parallel.rank_weight_bytes(c, tp)
    # vllm serve on an H100 (≥ 70 GiB, not an A100): max_num_seqs 1024, max_num_batched_tokens 8192
    activations = vllm_parallel.activation_peak(c, tp, 1024, 8192)
    non_torch = VLLM_NON_TORCH_BYTES + (24 * MIB if tp > 1 else 0) + nccl_bytes(tp) + nccl_bytes(dp)
    budget = int(0.9 * H100.total_bytes)  # trl vllm-serve's default utilisation
    assert gpu_parts["vllm_weights"] == weights
    assert gpu_parts["vllm_non_torch"] == non_torch
    graphs = VLLM_CUDA_GRAPH_BYTES if vllm.graphs_in_budget(s.vllm_version) else 0  # inside from vLLM 0.20
    assert gpu_parts["vllm_kv_cache"] == budget - weights - activations - non_torch - graphs
    assert gpu_parts["nccl_buffers"] == nccl_bytes(tp * dp + 1)  # the weight-transfer group: workers + trainer
    assert "allocator_slack" not in gpu_parts  # vLLM's pool, not torch's caching allocator
    assert e.breakdown.worst_role in ("rank0", "rank1+")  # the server is judged on its own


def test_server_generation_batch_per_replica_and_the_preemption_warning():
    # b × world × spg = 8 × 2 × 1 = 16 completions of 16k tokens; a small pool cannot run them all
    keys = dict(world_size=2, distributed="zero3", max_prompt_length=1024, max_completion_length=15360,
                vllm_server_gpu_memory_utilization=0.3)
    one = estimate(server(**keys), gpu=H100)
    assert any("preempt" in w and "not an OOM" in w for w in one.warnings)
    c = Ctx.of(server(dp=2, **keys), H100)
    assert vllm_parallel.server_rows(c) == 8  # generation_batch_size / D
    two = estimate(server(tp=2, dp=2, **keys), gpu=H100)  # 8 rows each, half the KV heads per rank
    assert not any("preempt" in w for w in two.warnings)


def test_dense_data_parallel_is_warned_as_trl_says():
    e = estimate(server(dp=2), gpu=H100)
    assert any("PR #30739" in w for w in e.warnings)
    assert not any("PR #30739" in w for w in estimate(server("Qwen/Qwen3-30B-A3B", dp=2), gpu=H100).warnings)


# -- the weight sync on both sides ------------------------------------------------------------------------------
def _chunk(spec, per_element):
    return min(spec.num_params * per_element, 2**30 + largest_param(spec) * per_element)


@pytest.mark.parametrize("distributed,lora,copies,per_element", [
    ("none", False, False, 2), ("ddp", False, False, 2), ("zero2", False, False, 2), ("zero3", False, True, 2),
    ("zero3", True, False, 2), ("fsdp2", False, True, 4),
])
def test_weight_sync_transient_per_strategy(distributed, lora, copies, per_element):
    keys = {"lora_rank": 16} if lora else {}
    world = 1 if distributed == "none" else 4
    s = server(world_size=world, distributed=distributed, **keys)
    e = estimate(s, gpu=H100)
    spec = e.model
    chunk = _chunk(spec, per_element)
    rank0 = e.breakdown.role("rank0").components("generation")
    if copies:  # the packed list holds gathered copies: previous chunk in flight + the list + its torch.cat
        assert rank0["weight_sync_gather"] == 3 * chunk
    else:
        whole = spec.num_params * 2 if lora and distributed == "zero3" else 0  # PEFT: gather_params(all) + merge
        assert rank0["weight_sync_gather"] == whole + 2 * chunk
    if world > 1:  # other ranks take part in the gathers only (one parameter, or PEFT's whole model): no packing
        other = e.breakdown.role("rank1+").components("generation").get("weight_sync_gather", 0)
        gathered = spec.num_params * 2 if lora else (largest_param(spec) * per_element if copies else 0)
        assert other == gathered
    # every server worker receives every chunk whole (two buffers) before load_weights keeps its slice
    served = e.breakdown.role("vllm_server").components("generation")
    assert served.get("vllm_weight_sync", 2 * _chunk(spec, per_element)) == 2 * _chunk(spec, per_element)


def test_one_training_gpu_with_a_server():
    e = estimate(server(), gpu=H100)
    assert set(e.breakdown.roles) == {"rank0", "vllm_server"} and e.breakdown.worst_role == "rank0"
    rank0 = e.breakdown.role("rank0").components("persistent")
    assert not any(name.startswith("vllm_") for name in rank0)  # none of vLLM's reservation on the trainer
    assert rank0["batch_buffers"] == 8 * (512 + 512) * 24  # the completions: ids, masks, log-probs, advantages
    assert rank0["nccl_buffers"] == 544 * 10**6  # the weight-transfer group (1 worker + the trainer)
    assert estimate(setup(), gpu=H100).breakdown.roles == {}  # colocate on one GPU: unchanged


# -- colocated tensor parallel ----------------------------------------------------------------------------------
def test_colocated_tensor_parallel_rank():
    s = setup(world_size=4, distributed="zero3", vllm_tensor_parallel_size=2)
    e = estimate(s, gpu=H100)
    c = Ctx.of(s, H100)
    parts = e.breakdown.role("rank0").components("generation")
    rows = 8 * 2  # TRL: max_num_seqs = b × vllm_tensor_parallel_size × steps_per_generation
    assert parts["vllm_weights"] == vllm_parallel.rank_weight_bytes(c, 2)
    assert parts["vllm_activations"] == vllm_parallel.activation_peak(c, 2, rows, 4096)
    assert parts["vllm_non_torch"] == VLLM_NON_TORCH_BYTES + 24 * MIB + 544 * 10**6
    one = estimate(setup(world_size=4, distributed="zero3"), gpu=H100).breakdown.role("rank0")
    assert parts["vllm_weights"] < one.components("generation")["vllm_weights"]


# -- bad values: clean errors naming the key --------------------------------------------------------------------
@pytest.mark.parametrize("keys,field,words", [
    ({"vllm_mode": "server", "vllm_server_tensor_parallel_size": 3}, "vllm_server_tensor_parallel_size",
     "must be divisible by tensor parallel size"),
    ({"vllm_mode": "server", "vllm_server_tensor_parallel_size": 64}, "vllm_server_tensor_parallel_size",
     "more than the model's 32 attention heads"),
    ({"vllm_mode": "server", "vllm_server_data_parallel_size": -2}, "vllm_server_data_parallel_size", "≥ 1"),
    ({"vllm_mode": "server", "vllm_server_tensor_parallel_size": 0}, "vllm_server_tensor_parallel_size", "≥ 1"),
    ({"vllm_tensor_parallel_size": 3, "world_size": 4, "distributed": "ddp"}, "vllm_tensor_parallel_size",
     "must divide world size (4) evenly"),
    ({"vllm_tensor_parallel_size": -1}, "vllm_tensor_parallel_size", "≥ 1"),
    ({"vllm_server_tensor_parallel_size": 2}, "vllm_server_tensor_parallel_size", "vllm_mode is 'colocate'"),
    ({"vllm_mode": "server", "vllm_tensor_parallel_size": 2}, "vllm_tensor_parallel_size", "colocate mode only"),
    ({"vllm_mode": "server", "vllm_server_gpu_memory_utilization": 1.5}, "vllm_server_gpu_memory_utilization",
     "(0, 1]"),
    ({"vllm_mode": "server", "vllm_server_gpu": "H1000"}, "vllm_server_gpu", "unknown GPU"),
])
def test_bad_layout_values_are_errors_naming_the_key(keys, field, words):
    with pytest.raises(GpuMemError) as info:
        setup(**keys)
    assert info.value.field == field and words in str(info.value)


def test_kv_heads_that_neither_split_nor_replicate():
    with pytest.raises(GpuMemError, match="neither split nor replicated"):
        setup(QWEN_15B, vllm_mode="server", vllm_server_tensor_parallel_size=3)  # 12 heads, 2 KV heads


def test_layout_keys_stay_out_of_a_single_gpu_json():
    data = setup().to_dict()
    assert not any(key.startswith("vllm_server") or key == "vllm_tensor_parallel_size" for key in data)
    assert server(tp=2).to_dict()["vllm_server_tensor_parallel_size"] == 2


def test_a_colocated_tp_rank_needs_its_share_of_one_sequence_to_start():
    """vLLM's one-sequence check on a rank of T = 2 is against the rank's half of the KV heads."""
    keys = dict(world_size=2, distributed="zero3", max_prompt_length=1024, max_completion_length=31744,
                vllm_tensor_parallel_size=2)
    c = ctx(gpu="H100", **keys)
    one = c.spec.kv_cache_bytes(c.setup.seq_len)
    fixed = sum(v for k, v in vllm_parallel.rank_reservation(c, 2, 16, 4096, 0).items() if k != "vllm_kv_cache")
    util = math.ceil((fixed + 0.75 * one) / c.gpu.total_bytes * 100) / 100  # a pool of ~¾ of one sequence
    e = estimate(setup(**keys, vllm_gpu_memory_utilization=util), gpu="H100")
    pool = e.breakdown.role("rank0").components("generation")["vllm_kv_cache"]
    assert one // 2 <= pool < one  # enough for the rank's half, not for a whole sequence
    assert not any("cannot hold one sequence" in w for w in e.warnings)
