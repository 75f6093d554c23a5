"""The fixtures: ``grpo_step`` runs a setup in the session's mode (estimate on CPU, real steps with
``--gpu-budget=measure`` on a GPU), ``gpu_memory`` measures your own GPU code.

Run on any machine (CPU is enough):  pytest examples/ --gpu-budget
"""

import pytest

SETUP = dict(model="google/gemma-3-1b-it", load_in_4bit=True, lora_rank=16, use_vllm=True,
             vllm_gpu_memory_utilization=0.5, per_device_train_batch_size=2,
             gradient_accumulation_steps=2, num_generations=2, max_completion_length=256)


@pytest.mark.gpu_budget(gib=20)
def test_my_config(grpo_step):
    result = grpo_step(SETUP)  # a dict, a GRPOSetup or a path to a .json/.toml setup
    assert result.estimate.peak_phase == "training"


@pytest.mark.gpu_budget(gib=20, setup=SETUP)
def test_my_training_code(gpu_memory):
    with gpu_memory.track():  # your own GPU code goes here; on a CPU machine nothing is measured
        pass
    # without a CUDA device the record says "not measured: no CUDA device" and the budget is judged on the
    # marker's setup instead
