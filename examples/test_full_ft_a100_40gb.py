"""Full fine-tuning of Qwen2.5-3B-Instruct on an A100-40GB.

Passed to TRL by name, the model loads in float32: weights 4 + gradients 4 + AdamW states 8 = 16 bytes per
parameter before a single activation — about 46 GiB for 3.1B parameters. It cannot fit 40 GB, and the test
says so (an expected failure, so the output shows the message). Loaded in bf16 it fits.

Run on any machine (CPU is enough):  pytest examples/ --gpu-budget
"""

import pytest

from pytest_gpumem.plugin import GpuBudgetFailure

FULL_FT = dict(model="Qwen/Qwen2.5-3B-Instruct", per_device_train_batch_size=8, num_generations=8,
               max_prompt_length=512, max_completion_length=1024)


@pytest.mark.xfail(raises=GpuBudgetFailure, reason="fp32 full fine-tuning of 3B cannot fit 40 GB (shown on purpose)")
@pytest.mark.gpu_budget(gpu="A100-40GB", setup=FULL_FT)
def test_fp32_full_fine_tune_cannot_fit_a100_40gb():
    ...


@pytest.mark.gpu_budget(gpu="A100-40GB", setup=dict(FULL_FT, dtype="bfloat16"))
def test_bf16_full_fine_tune_fits_a100_40gb():
    ...
