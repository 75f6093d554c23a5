"""``gpumem simulate``: the FakeTensor simulation of a setup, as a table or JSON."""

from __future__ import annotations

import argparse

from ..predict.faketensor import run_simulation
from ..units import format_gib
from ._setup_args import add_setup_arguments, print_result, setup_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setup_arguments(parser)
    parser.add_argument("--gpu", help="card name (L4, A100-80GB, H100, ...) or size (24GiB, 80GB)")
    parser.add_argument("--json", action="store_true", help="print JSON (the estimate's keys + largest_tensors)")
    parser.add_argument("--top", type=int, default=10, help="how many of the largest live tensors to list per phase")


def run(args: argparse.Namespace) -> int:
    setup = setup_from_args(args)
    result = run_simulation(setup, gpu=args.gpu, top_tensors=args.top)
    spec = result.model
    header = (f"{spec.name}: {spec.num_params / 1e9:.2f}B params ({spec.model_type}), simulated on CPU "
              f"(FakeTensorMode) in {result.elapsed_seconds:.1f} s, b={setup.per_device_train_batch_size} "
              f"P={setup.max_prompt_length} C={setup.max_completion_length} logits={setup.logits}")
    details = ["", f"largest tensors alive at the peak ({result.peak_phase}):"]
    details += [f"  {format_gib(tensor['bytes']):>12}  {tensor['component']:<22} {tensor['name']}: "
                f"{tensor['op']} {tuple(tensor['shape'])} {tensor['dtype']}" for tensor in result.peak_tensors()]
    return print_result(result, args.json, header, details,
                        verdict_note=" — simulated torch tensors only: no CUDA context, allocator slack or vLLM")

