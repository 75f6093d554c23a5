"""The multi-GPU setup keys: defaults as accelerate + DeepSpeed apply them, TRL's divisibility rule across
processes, and reading the accelerate YAML / DeepSpeed JSON a job is launched with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_gpumem import GRPOSetup
from pytest_gpumem.errors import SetupError

CONFIGS = Path(__file__).parent / "fixtures" / "accelerate_configs"
MODEL = "Qwen/Qwen2.5-0.5B"


def setup(**keys):
    return GRPOSetup.from_dict({"model": MODEL, **keys})


def test_single_gpu_defaults_and_json_unchanged():
    one = setup()
    assert (one.world_size, one.num_machines, one.distributed) == (1, 1, "none")
    assert not one.is_distributed
    # a single-GPU setup's JSON carries none of the multi-GPU keys (consumers of the old JSON keep working)
    assert not {"world_size", "distributed", "reduce_bucket_size"} & set(one.to_dict())


def test_multi_gpu_defaults_follow_deepspeed():
    zero3 = setup(world_size=8, distributed="zero3")
    # deepspeed/runtime/zero/config.py: 5e8 / 5e8 / 5e7 elements, overlap_comm on for stage 3 only
    assert (zero3.reduce_bucket_size, zero3.allgather_bucket_size, zero3.stage3_prefetch_bucket_size) == (
        500_000_000, 500_000_000, 50_000_000)
    assert zero3.overlap_comm is True
    assert setup(world_size=8, distributed="zero2").overlap_comm is False
    assert setup(num_processes=4).distributed == "ddp"  # accelerate's MULTI_GPU when nothing else is said
    assert setup(world_size=8, distributed="zero3").to_dict()["world_size"] == 8


def test_auto_bucket_follows_accelerate_hidden_size_rule():
    zero3 = setup(world_size=2, distributed="zero3", reduce_bucket_size="auto", stage3_prefetch_bucket_size="auto")
    hidden = zero3.model_spec.hidden_size
    assert zero3.reduce_bucket_size == hidden * hidden
    assert zero3.stage3_prefetch_bucket_size == int(0.9 * hidden * hidden)
    assert setup(world_size=2, distributed="zero2", reduce_bucket_size=5e7).reduce_bucket_size == 50_000_000


@pytest.mark.parametrize("keys,field", [
    ({"world_size": 0}, "world_size"),
    ({"world_size": "8"}, "world_size"),
    ({"world_size": 8, "num_machines": 3}, "num_machines"),
    ({"world_size": 2, "distributed": "zero4"}, "distributed"),
    ({"world_size": 2, "distributed": "none"}, "distributed"),
    ({"world_size": 2, "distributed": "zero3", "reshard_after_forward": False}, "reshard_after_forward"),
    ({"world_size": 2, "distributed": "zero2", "offload_params": True}, "offload_params"),
    ({"world_size": 2, "distributed": "fsdp2", "offload_optimizer": True}, "offload_optimizer"),
    ({"world_size": 2, "distributed": "zero3", "overlap_comm": "yes"}, "overlap_comm"),
    ({"world_size": 2, "distributed": "fsdp2", "fsdp_wrap": "size_based"}, "fsdp_wrap"),
    ({"world_size": 2, "distributed": "zero3", "reduce_bucket_size": -1}, "reduce_bucket_size"),
    ({"world_size": 2, "distributed": "zero3", "allgather_bucket_size": "auto"}, "allgather_bucket_size"),
    ({"world_size": 2, "backend": "unsloth"}, "world_size"),
    ({"world_size": 2, "distributed": "fsdp2", "load_in_4bit": True, "lora_rank": 16}, "load_in_4bit"),
])
def test_bad_multi_gpu_keys_name_the_field(keys, field):
    with pytest.raises(SetupError) as info:
        setup(**keys)
    assert info.value.field == field and info.value.fix


def test_trl_divisibility_rule_counts_processes():
    # b=2, G=4 fails on one process (2 % 4) but holds on two: 2 × 2 × 1 = 4 (trl 1.16 GRPOConfig.__post_init__)
    with pytest.raises(SetupError, match=r"generation_batch_size \(2\) must be divisible by num_generations \(4\)"):
        setup(per_device_train_batch_size=2, num_generations=4)
    assert setup(per_device_train_batch_size=2, num_generations=4, world_size=2).world_size == 2
    with pytest.raises(SetupError, match=r"generation_batch_size \(6\) must be divisible by num_generations \(4\)"
                                         r".*2 × 3 × 1"):
        setup(per_device_train_batch_size=2, num_generations=4, world_size=3)


@pytest.mark.parametrize("name,expected", [
    ("zero2.yaml", {"world_size": 8, "distributed": "zero2", "overlap_comm": False}),
    ("zero3.yaml", {"world_size": 8, "distributed": "zero3", "overlap_comm": True, "offload_params": False}),
    ("fsdp2.yaml", {"world_size": 8, "distributed": "fsdp2", "reshard_after_forward": True,
                    "fsdp_wrap": "transformer_layer"}),
    ("multi_gpu.yaml", {"world_size": 8, "distributed": "ddp"}),
    ("ds_zero3_file.yaml", {"world_size": 2, "distributed": "zero3", "reduce_bucket_size": 100_000,
                            "stage3_prefetch_bucket_size": 100_000}),
    ("ds_zero3_smallbuckets.json", {"world_size": 1, "distributed": "zero3", "allgather_bucket_size": 100_000}),
])
def test_from_file_reads_trl_accelerate_configs(name, expected):
    loaded = GRPOSetup.from_file(CONFIGS / name, model=MODEL)
    assert {key: getattr(loaded, key) for key in expected} == expected


def test_from_file_launch_config_needs_a_model_and_overrides_win():
    with pytest.raises(SetupError, match="launch config") as info:
        GRPOSetup.from_file(CONFIGS / "zero3.yaml")
    assert info.value.field == "model"
    assert GRPOSetup.from_file(CONFIGS / "zero3.yaml", model=MODEL, world_size=4).world_size == 4


@pytest.mark.parametrize("text,field", [
    ("distributed_type: DEEPSPEED\nmixed_precision: 'no'\ndeepspeed_config: {zero_stage: 3}\n", "mixed_precision"),
    ("distributed_type: XLA\n", "distributed_type"),
    ("distributed_type: DEEPSPEED\nmixed_precision: bf16\ndeepspeed_config: {zero_stage: 3, "
     "offload_param_device: nvme}\n", "offload_param_device"),
    ("distributed_type: FSDP\nmixed_precision: bf16\nfsdp_config: {fsdp_version: 2, "
     "fsdp_auto_wrap_policy: SIZE_BASED_WRAP}\n", "fsdp_auto_wrap_policy"),
    ("use_cpu: true\n", "use_cpu"),
    ("distributed_type: [\n", "accelerate_config"),
])
def test_unmodelled_accelerate_settings_are_errors(tmp_path, text, field):
    path = tmp_path / "launch.yaml"
    path.write_text(text)
    with pytest.raises(SetupError) as info:
        GRPOSetup.from_file(path, model=MODEL)
    assert info.value.field == field


def test_fsdp_without_wrap_policy_is_root_only(tmp_path):
    # accelerate's FullyShardedDataParallelPlugin: no fsdp_auto_wrap_policy -> NO_WRAP (the root unit only)
    path = tmp_path / "fsdp.yaml"
    path.write_text("distributed_type: FSDP\nmixed_precision: bf16\nnum_processes: 4\n"
                    "fsdp_config: {fsdp_version: 2}\n")
    assert GRPOSetup.from_file(path, model=MODEL).fsdp_wrap == "none"


def test_cli_accelerate_config_flag():
    out = subprocess.run([sys.executable, "-m", "pytest_gpumem.cli", "estimate", "--json", "--model", MODEL,
                          "--accelerate-config", str(CONFIGS / "zero3.yaml"), "--world-size", "4"],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out)["setup"]
    assert (data["world_size"], data["distributed"]) == (4, "zero3")
