"""DeepSpeed's own model-states estimators, re-implemented from their source (not imported: deepspeed is not a
dependency), for the parity tests and the docs table of where and why the estimate differs from them.

Source: microsoft/DeepSpeed 38327e0, ``deepspeed/runtime/zero/stage_1_and_2.py``
``estimate_zero2_model_states_mem_needs`` and ``deepspeed/runtime/zero/stage3.py``
``estimate_zero3_model_states_mem_needs`` (the same formulas as DeepSpeed 0.19.8, docs/distributed.md §1).
Both return ``(cpu_bytes, gpu_bytes)`` — ZeRO-3 also the largest layer's bytes — with DeepSpeed's own
``int()`` truncations and its 1.5 ``additional_buffer_factor`` on host memory.
"""

from __future__ import annotations


def estimate_zero2_model_states_mem_needs(total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                                          cpu_offload: bool = True,
                                          additional_buffer_factor: float = 1.5) -> tuple[int, int]:
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu_mem = 2 * total_params
        cpu_mem = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
    else:
        # "2 = params_16bit, 18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit + 8_optimizer_states_32bit"
        gpu_mem = 2 * total_params + int(18 * total_params / total_gpus)
        cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem)


def estimate_zero3_model_states_mem_needs(total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1,
                                          num_nodes: int = 1, cpu_offload: bool = True,
                                          cpu_offload_params: bool = True, zero_init: bool = True,
                                          additional_buffer_factor: float = 1.5) -> tuple[int, int, int]:
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        if cpu_offload_params:
            gpu_mem = largest_layer_memory
            if zero_init:
                cpu_mem = total_params * 18 * gpus_factor * additional_buffer_factor
            else:
                cpu_mem = total_params * max(4 * num_gpus_per_node, 18 * gpus_factor) * additional_buffer_factor
        else:
            gpu_mem = largest_layer_memory + int(2 * total_params / total_gpus)
            if zero_init:
                cpu_mem = total_params * 16 * gpus_factor * additional_buffer_factor
            else:
                cpu_mem = total_params * max(4 * num_gpus_per_node, 16 * gpus_factor) * additional_buffer_factor
    else:
        gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
        if zero_init:
            cpu_mem = largest_layer_params * 4 * num_gpus_per_node * additional_buffer_factor
        else:
            cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem), largest_layer_memory


#: the components DeepSpeed's estimators call "model states"
MODEL_STATE_COMPONENTS = ("weights", "lora_params", "master_weights", "optimizer_states", "gradients")


def our_model_states(breakdown) -> tuple[int, int]:
    """(GPU, host) bytes of the estimate's model states in DeepSpeed's sense, at the optimizer step (the moment
    every state exists): rank 0's weights, LoRA, fp32 master, optimizer states and gradients, and one machine's
    offloaded memory (0 when nothing is offloaded)."""
    rank0 = breakdown.role("rank0").components("optimizer_step")
    gpu = sum(rank0.get(name, 0) for name in MODEL_STATE_COMPONENTS)
    host = breakdown.role("host").total("persistent") if "host" in breakdown.roles else 0
    return gpu, host
