"""Full fine-tuning of Qwen2.5-14B with GRPO on 8 × H100 under DeepSpeed ZeRO-3, budgeted per GPU.

On one H100 the model states alone (16 bytes per parameter) are ~220 GiB. Sharded by ZeRO-3 over 8 ranks they
are ~28 GiB per GPU; the peak is TRL's HF-generate step, which gathers the whole 16-bit model on every rank
(``ds3_gather_for_generation``). The budget is per GPU and judged on the worst rank; the report section lists
rank 0, the other ranks and which is worst.

Run on any machine (CPU is enough):  pytest examples/ --gpu-budget
"""

from pathlib import Path

import pytest

from pytest_gpumem import GRPOSetup

ZERO3_YAML = Path(__file__).parent / "setups" / "zero3.yaml"  # trl 1.16's trl/accelerate_configs/zero3.yaml
SETUP = dict(model="Qwen/Qwen2.5-14B", dtype="bfloat16", per_device_train_batch_size=8, num_generations=8)


@pytest.mark.gpu_budget(gpu="H100", setup=dict(SETUP, world_size=8, distributed="zero3"))
def test_14b_zero3_fits_each_of_8_h100():
    ...


@pytest.mark.gpu_budget(gpu="H100", setup=GRPOSetup.from_file(ZERO3_YAML, **SETUP))  # the file you launch with
def test_14b_launched_with_trls_zero3_yaml():
    ...
