"""Simulating one rank of a multi-GPU FSDP2 job: the tracker's FSDP2 fixes, the ground truth (the same step on
real CPU tensors under the fake process group, read from the CPU allocator's own event stream), the per-rank
shapes of the breakdown, and the strategies the simulation refuses."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the simulation needs torch (pip install 'pytest-gpumem[trl]')")
pytest.importorskip("transformers", reason="the simulation needs transformers")
pytest.importorskip("accelerate", reason="the FSDP2 wrap is accelerate's")
pytest.importorskip("trl", reason="the simulation needs trl")

from pytest_gpumem.measure.profiling import cpu_allocator_peak_bytes  # noqa: E402
from pytest_gpumem.predict.faketensor import (  # noqa: E402
    GATHERED_PARAMS,
    UNSHARDED_GRADIENTS,
    WEIGHT_SYNC,
    SimulationError,
    reduced_config,
    run_simulation,
    simulate_rank,
)
from pytest_gpumem.predict.faketensor.ranks import ShardingPlan  # noqa: E402
from pytest_gpumem.predict.faketensor.tracker import LiveStorageTracker  # noqa: E402
from pytest_gpumem.spec import GRPOSetup  # noqa: E402

QWEN = reduced_config("Qwen/Qwen2.5-0.5B", 2)
SMALL = {"model": QWEN, "per_device_train_batch_size": 2, "num_generations": 2, "max_prompt_length": 32,
         "max_completion_length": 32}

#: The simulation against the CPU allocator (tests below): equal to the byte except FakeTensorMode's lifted
#: scalar constants (``lift_fresh``, 8 B each, e.g. the loss's 1.0 / epsilon), which the real run creates
#: outside the dispatcher; measured 0–16 B at N = 1 / 2 / 4 / 8. 1 KiB leaves room for a few more such
#: scalars and is 7 orders of magnitude below the peaks compared (≈ 1.5–3 GB).
GROUND_TRUTH_BOUND_BYTES = 1024


def _fsdp_linear(world_size: int):
    """A 1000×64 fp32 linear sharded by fully_shard over a fake group (the caller destroys the group)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,))
    module = torch.nn.Linear(64, 1000, bias=False)
    fully_shard(module, mesh=mesh)
    return module


def test_tracker_counts_a_dtensor_as_its_local_shard_and_sees_fsdp2_resize():
    import torch.distributed as dist

    try:
        module = _fsdp_linear(4)
        tracker = LiveStorageTracker(round_bytes=False)
        with tracker:
            tracker.register(module.weight, "weights", "weight")
            assert tracker.current_bytes == 250 * 64 * 4  # the local shard, not the global 1000×64
            out = module(torch.zeros(3, 64))  # all-gather → unsharded weight (resize_ up), reshard (resize_ 0)
            del out
            module.reshard()
        # without the resize_ hook the freed unsharded storage would still count
        assert tracker.current_bytes == 250 * 64 * 4
        assert tracker.max_bytes >= 250 * 64 * 4 + 1000 * 64 * 4  # the gathered weight was counted while live
        tracker.close()
    finally:
        dist.destroy_process_group()


def test_tracker_resize_releases_and_reallocates():
    tracker = LiveStorageTracker(round_bytes=False)
    with tracker:
        tensor = torch.empty(1000)
        storage = tensor.untyped_storage()
        storage.resize_(0)
        assert tracker.current_bytes == 0
        storage.resize_(4000)
        assert tracker.current_bytes == 4000
        grown = torch.empty(0).untyped_storage()
        grown.resize_(100)  # a storage never seen, grown from nothing
        assert tracker.current_bytes == 4100
    assert torch.UntypedStorage.resize_ is not None and "tracker" not in repr(torch.UntypedStorage.resize_)
    tracker.close()


@pytest.mark.parametrize("world_size, changes", [
    (8, {}),
    (2, {"beta": 0.04, "use_vllm": True}),  # the root-only reference model and the weight sync
], ids=["N8", "N2-reference-vllm-sync"])
def test_simulation_equals_the_cpu_allocator_running_the_same_step(world_size, changes):
    """Fake tensors + the tracker against real (uninitialised) CPU tensors + the allocator's own events, same
    step, same fake process group: the FSDP2 per-rank accounting is the allocator's."""
    from pytest_gpumem.predict.faketensor import replay

    setup = GRPOSetup.coerce({**SMALL, **changes})
    simulated_peak, real_tracker_peak, allocator_peak = replay.against_allocator(
        setup, ShardingPlan(world_size=world_size), cpu_allocator_peak_bytes)
    assert abs(simulated_peak - allocator_peak) <= GROUND_TRUTH_BOUND_BYTES, (simulated_peak, allocator_peak)
    assert real_tracker_peak == allocator_peak  # on real tensors the tracker sees every byte


def _local_bytes(shape, world_size, bytes_per_element=4):
    """FSDP2's shard of a parameter: dim 0 split in ceil(dim0 / N) rows (the last ranks padded)."""
    rows = -(-shape[0] // world_size)
    rest = 1
    for size in shape[1:]:
        rest *= size
    return rows * rest * bytes_per_element


def test_rank_breakdown_shards_the_model_states_and_gathers_what_trl_gathers():
    from transformers import AutoModelForCausalLM

    from pytest_gpumem.predict.faketensor.hf_config import hf_config_for

    setup = GRPOSetup.coerce({**SMALL, "beta": 0.04, "use_vllm": True})
    simulation = run_simulation(setup, world_size=4, strategy="fsdp2")
    breakdown = simulation.breakdown
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config_for(setup.model_spec, setup.seq_len))
    shapes = [p.shape for p in model.parameters()]
    sharded = sum(-(-_local_bytes(s, 4) // 512) * 512 for s in shapes)
    buffers = sum(-(-b.numel() * b.element_size() // 512) * 512 for b in model.buffers())  # rotary, replicated
    persistent = breakdown.components("persistent")
    assert persistent["weights"] == sharded + buffers  # the fp32 master, 1/N per rank
    # AdamW's two fp32 states on the shard, and fused AdamW's per-parameter step tensor (one 512-B block each)
    assert persistent["optimizer_states"] == 2 * sharded + 512 * len(shapes)
    assert persistent["reference_weights"] == sharded + buffers  # TRL's reference: fp32, sharded too
    largest = max(p.numel() for p in model.parameters())
    assert breakdown.components("generation")[WEIGHT_SYNC] == largest * 4  # full_tensor() of one fp32 param
    total = sum(p.numel() for p in model.parameters())
    # the root-only reference forward gathers the whole model in bf16 (+ the all-gather buffer during copy-out)
    assert breakdown.components("scoring")[GATHERED_PARAMS] >= 2 * total
    assert breakdown.components("training")[UNSHARDED_GRADIENTS] > 0
    assert simulation.to_dict()["rank"] == {"rank": 0, "world_size": 4, "distributed": "fsdp2",
                                            "reshard_after_forward": True, "fsdp_wrap": "transformer_layer"}
    # more ranks: smaller shards, the same gathered units
    eight = simulate_rank(SMALL, world_size=8)
    assert eight.components("persistent")["weights"] < persistent["weights"]


def test_simulate_reads_the_setups_multi_gpu_keys():
    """``simulate(setup)`` of a setup with ``world_size`` and ``distributed`` is rank 0's breakdown."""
    from pytest_gpumem.predict.faketensor import simulate

    keyed = simulate({**SMALL, "world_size": 8, "distributed": "fsdp2"})
    overridden = simulate_rank(SMALL, world_size=8)  # the same shards (the batch differs: TRL counts ranks)
    for component in ("weights", "optimizer_states", "gathered_params"):
        assert keyed.components("training")[component] == overridden.components("training")[component]
    assert keyed.total("persistent") < simulate(SMALL).total("persistent")  # one GPU holds everything
    with pytest.raises(SimulationError) as info:
        simulate({**SMALL, "world_size": 8, "distributed": "zero3"})
    assert info.value.field == "distributed" and "gpumem estimate" in str(info.value)


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "ddp", "fsdp1"])
def test_untraced_strategies_are_refused_with_the_estimate_as_the_fix(strategy):
    with pytest.raises(SimulationError) as info:
        simulate_rank(SMALL, world_size=8, strategy=strategy)
    assert info.value.field == "distributed"
    assert "gpumem estimate" in str(info.value)


def test_lora_under_fsdp2_shards_the_frozen_base_and_syncs_vllm_merged():
    """PEFT under FSDP2: the frozen base is sharded in its loaded dtype, the adapters are trained in fp32, and
    TRL's weight sync (merge_adapter, then every base parameter's full_tensor()) gathers the largest one."""
    breakdown = simulate_rank({**SMALL, "lora_rank": 8, "use_vllm": True}, world_size=4)
    persistent = breakdown.components("persistent")
    assert persistent["lora_params"] < persistent["weights"] // 100
    assert persistent["optimizer_states"] < persistent["weights"] // 100  # AdamW only on the adapters
    spec = GRPOSetup.coerce(SMALL).model_spec
    assert breakdown.components("generation")[WEIGHT_SYNC] == spec.vocab_size * spec.hidden_size * 4  # fp32 embed
    assert "gradients" not in persistent and breakdown.components("training")[GATHERED_PARAMS] > 0


def test_cli_simulates_rank0_from_the_setup_keys(capsys):
    from pathlib import Path

    from pytest_gpumem.cli import main

    tiny = str(Path(__file__).resolve().parents[1] / "examples" / "setups" / "tiny-qwen2-cpu.json")
    assert main(["simulate", "--setup", tiny, "--world-size", "4", "--distributed", "fsdp2"]) == 0
    assert "rank 0 of 4 (fsdp2) under a fake process group" in capsys.readouterr().out
    assert main(["simulate", "--setup", tiny, "--world-size", "4", "--distributed", "zero3"]) == 2
    assert "distributed='zero3' is not simulated" in capsys.readouterr().err


def test_the_fsdp2_knobs_change_what_is_gathered():
    """``reshard_after_forward=False`` keeps every unit gathered after forward; ``fsdp_wrap='none'`` (the root
    only) gathers the whole model at once: both hold more gathered bf16 parameters in training than the
    per-layer, resharding default."""
    default = simulate_rank(SMALL, world_size=4).components("training")[GATHERED_PARAMS]
    kept = simulate_rank(SMALL, world_size=4, reshard_after_forward=False).components("training")[GATHERED_PARAMS]
    root = simulate_rank(SMALL, world_size=4, fsdp_wrap="none").components("training")[GATHERED_PARAMS]
    assert kept > default and root > default
    # pure fp32 (bf16=False): accelerate's mixed precision "no", so the units are gathered in fp32
    pure = simulate_rank({**SMALL, "bf16": False}, world_size=4).components("training")[GATHERED_PARAMS]
    assert abs(pure - 2 * default) <= 512 * 4  # twice the bytes, up to the 512-B rounding of a few buffers
    with pytest.raises(SimulationError) as info:
        simulate_rank(SMALL, world_size=4, fsdp_wrap="size_based")
    assert info.value.field == "fsdp_wrap"
