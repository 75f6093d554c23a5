"""An 8-GPU GRPO job, budgeted per role: 4 training ranks under DeepSpeed ZeRO-3 and a `trl vllm-serve` server
with tensor parallel 2 × data parallel 2 on the other 4 GPUs (all H100 80GB).

    trl vllm-serve --model Qwen/Qwen3-30B-A3B --tensor-parallel-size 2 --data-parallel-size 2   # GPUs 4-7
    accelerate launch --config_file zero3.yaml --num_processes 4 train.py                        # GPUs 0-3

``gb=`` budgets each training GPU (judged on the worst rank), ``vllm_gb=`` each server GPU; the report section
has one row per role with its own headroom. Qwen3-30B-A3B is a mixture of experts: trl 1.16 says a server data
parallel size above 1 is for MoE models (``trl/scripts/vllm_serve.py``). With LoRA under ZeRO-3 the weight sync
gathers the whole 16-bit model on every rank to merge the adapters (trl#4100): ``offload_params`` keeps the
parameter shards in host memory so that the gather fits beside them.

Run on any machine (CPU is enough):  pytest examples/test_grpo_8gpu_vllm_server.py --gpu-budget -rA
"""

import pytest

SETUP = dict(model="Qwen/Qwen3-30B-A3B", dtype="bfloat16", lora_rank=16, per_device_train_batch_size=8,
             num_generations=8, world_size=4, distributed="zero3", offload_optimizer=True, offload_params=True,
             use_vllm=True, vllm_mode="server", vllm_server_tensor_parallel_size=2, vllm_server_data_parallel_size=2,
             vllm_server_gpu="H100")


@pytest.mark.gpu_budget(gb=80, vllm_gb=80, setup=SETUP)
def test_4_zero3_ranks_and_a_tp2_dp2_vllm_server():
    ...
