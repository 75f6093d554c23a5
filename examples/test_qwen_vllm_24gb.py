"""Qwen2.5-1.5B-Instruct, LoRA on all linear layers, vLLM colocated in the same process, on a 24 GiB card
(RTX 3090/4090, A10G class). How long may completions get before the step no longer fits?

Run on any machine (CPU is enough):  pytest examples/ --gpu-budget
"""

import pytest

QWEN_LORA_VLLM = dict(model="Qwen/Qwen2.5-1.5B-Instruct", dtype="bfloat16", lora_rank=16,
                      lora_target_modules="all-linear", use_vllm=True, vllm_mode="colocate",
                      vllm_gpu_memory_utilization=0.35, per_device_train_batch_size=8,
                      gradient_accumulation_steps=2, num_generations=8, max_prompt_length=512)


@pytest.mark.gpu_budget(gib=24)
@pytest.mark.parametrize("max_completion_length", [512, 1024, 2048])
def test_completion_length_fits_24gib(grpo_step, max_completion_length):
    result = grpo_step(dict(QWEN_LORA_VLLM, max_completion_length=max_completion_length))
    # the result is there for your own assertions too: vLLM's pool is reserved up front, so it is in every phase
    assert "vllm_kv_cache" in result.predicted["phases"]["training"]


@pytest.mark.gpu_budget(gib=24, setup="setups/qwen-lora-vllm.json")
def test_setup_file_fits_24gib():
    ...
