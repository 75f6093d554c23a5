"""The L4 story: GRPO on one NVIDIA L4 — a "24 GB" card of which torch can use 22.03 GiB.

The first config is what people start from: gemma-3-1b-it passed to TRL by name (so it loads in float32),
fully fine-tuned, with vLLM colocated at half the card. It dies three hours in with
``torch.OutOfMemoryError``; here it fails in a second, saying which phase and which components overrun.
The second config is the fix the failure message points to: LoRA, bf16 weights, a smaller vLLM reservation.

Run on any machine (CPU is enough):  pytest examples/ --gpu-budget
"""

import pytest

from pytest_gpumem.plugin import GpuBudgetFailure

# examples/setups/gemma3-1b-l4-seed.json holds the same config, for `gpumem estimate --setup ...`
SEED = dict(model="google/gemma-3-1b-it", use_vllm=True, vllm_gpu_memory_utilization=0.5,
            per_device_train_batch_size=8, num_generations=8, max_prompt_length=512, max_completion_length=1024)

FIXED = dict(SEED, dtype="bfloat16", lora_rank=16, vllm_gpu_memory_utilization=0.3)


@pytest.mark.xfail(raises=GpuBudgetFailure, reason="the seed config overruns the L4 (shown on purpose)")
@pytest.mark.gpu_budget(gpu="L4", setup=SEED)  # only gpu=: the budget is that card's memory
def test_seed_config_overruns_the_l4():
    ...


@pytest.mark.gpu_budget(gpu="L4", setup=FIXED)
def test_fixed_config_fits_the_l4():
    ...


@pytest.mark.gpu_budget(gpu="L4", setup="setups/gemma3-1b-l4-fixed.json")  # the same, from a setup file
def test_fixed_config_from_a_setup_file():
    ...


# The README's example: a 4-bit base with LoRA must fit a 17 GB budget (judged as a 17 GB card, so vLLM
# reserves 0.5 × 17 GB — the report's assumptions say so).
@pytest.mark.gpu_budget(gb=17, setup=dict(model="google/gemma-3-1b-it", load_in_4bit=True, lora_rank=16,
                                          use_vllm=True, vllm_gpu_memory_utilization=0.5,
                                          per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                          num_generations=2, max_completion_length=256))
def test_qlora_fits_17gb():
    ...
