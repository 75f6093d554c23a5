"""``gpumem estimate``: the analytic prediction of a setup, as a table or JSON."""

from __future__ import annotations

import argparse

from ..predict.analytic import estimate
from ..units import format_gib
from ..vllm_layout import server_gpus
from ._setup_args import GPU_HELP, add_setup_arguments, print_result, setup_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setup_arguments(parser)
    parser.add_argument("--gpu", help=GPU_HELP + "; default: none (no verdict, exit 0)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    setup = setup_from_args(args)
    result = estimate(setup, gpu=args.gpu)
    spec = result.model
    header = (f"{spec.name}: {spec.num_params / 1e9:.2f}B params ({spec.model_type}), backend {setup.backend}, "
              f"b={setup.per_device_train_batch_size} G={setup.num_generations} "
              f"GA={setup.gradient_accumulation_steps} P={setup.max_prompt_length} C={setup.max_completion_length}")
    if setup.is_distributed:
        offload = [name for name in ("offload_optimizer", "offload_params") if getattr(setup, name)]
        header += (f", {setup.distributed} on {setup.world_size} GPU(s)"
                   + (f" ({', '.join(offload)})" if offload else "") + " — per GPU, the worst rank shown")
    if setup.use_vllm and setup.vllm_mode == "server":
        header += (f"; vLLM server T={setup.vllm_server_tensor_parallel_size} D={setup.vllm_server_data_parallel_size}"
                   f" on {server_gpus(setup)} more GPU(s)")
    elif setup.use_vllm and setup.vllm_tensor_parallel_size > 1:
        header += f"; colocated vLLM T={setup.vllm_tensor_parallel_size}"
    details = [f"largest single allocation: {result.largest_allocation_name} = "
               f"{format_gib(result.largest_allocation_bytes)}"]
    return print_result(result, args.json, header, details, verdict_note=" as torch reports it")
