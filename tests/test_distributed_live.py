"""The training callback's live reader takes the sharding strategy from the trainer's accelerator, so a ZeRO or
FSDP run is estimated per rank as it runs, not as DDP."""

from __future__ import annotations

from enum import Enum
from types import SimpleNamespace

import pytest

pytest.importorskip("trl", reason="trl is in the test extra")
pytest.importorskip("torch")

from pytest_gpumem.measure.child import tiny  # noqa: E402
from pytest_gpumem.trl import live  # noqa: E402


class DistributedType(str, Enum):  # accelerate.utils.DistributedType's values
    DEEPSPEED = "DEEPSPEED"
    FSDP = "FSDP"
    MULTI_GPU = "MULTI_GPU"


ARGS = SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=1, steps_per_generation=1,
                       num_generations=8, max_prompt_length=64, max_completion_length=32, world_size=4)


def trainer(state):
    return SimpleNamespace(args=ARGS, model=tiny.build_model(tiny.build_config(tiny.TINY_QWEN2_CONFIG)),
                           accelerator=SimpleNamespace(state=state), optimizer=None, train_dataset=None)


def test_deepspeed_config_of_the_accelerator():
    config = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": 10**6}}
    state = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                            deepspeed_plugin=SimpleNamespace(deepspeed_config=config))
    setup, notes = live.setup_from_trainer(trainer(state), overrides={"max_prompt_length": 64})
    assert (setup.world_size, setup.distributed, setup.offload_optimizer, setup.reduce_bucket_size) == (
        4, "zero3", True, 10**6)
    assert any("zero3 (read from the accelerator's DeepSpeed config)" in note for note in notes)


def test_fsdp_plugin_of_the_accelerator():
    CPUOffloadPolicy = type("CPUOffloadPolicy", (), {})  # torch.distributed.fsdp's offload policy, by name
    plugin = SimpleNamespace(fsdp_version=2, reshard_after_forward=False, cpu_offload=CPUOffloadPolicy(),
                             auto_wrap_policy=lambda module: False)
    state = SimpleNamespace(distributed_type=DistributedType.FSDP, fsdp_plugin=plugin)
    setup, _ = live.setup_from_trainer(trainer(state), overrides={"max_prompt_length": 64})
    assert (setup.distributed, setup.reshard_after_forward, setup.offload_params, setup.fsdp_wrap) == (
        "fsdp2", False, True, "transformer_layer")
    ddp, _ = live.setup_from_trainer(trainer(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)),
                                     overrides={"max_prompt_length": 64})
    assert ddp.distributed == "ddp"
