"""``gpumem simulate``: the FakeTensor simulation of a setup, as a table or JSON.

With ``--gpu`` the verdict (and the exit status) is the whole step's, as in ``--gpu-budget=simulate``: the
simulated torch tensors plus the estimate's CUDA context, allocator slack, vLLM and generation
(``predict/analytic/whole_step.py``) — a card is never judged on the torch tensors alone.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..predict.analytic import estimate
from ..predict.analytic.whole_step import origin_note, whole_step
from ..predict.faketensor import run_simulation
from ..report.text import breakdown_table
from ..units import format_gib
from ._setup_args import GPU_HELP, add_setup_arguments, print_result, setup_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setup_arguments(parser)
    parser.add_argument("--gpu", help=GPU_HELP + ": judge the whole step against it (exit 1 if it does not fit); "
                                      "default: none (no verdict)")
    parser.add_argument("--json", action="store_true", help="print JSON (the estimate's keys + largest_tensors, "
                                                            "and whole_step with --gpu)")
    parser.add_argument("--top", type=int, default=10,
                        help="how many of the largest live tensors to list per phase (default: 10)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    setup = setup_from_args(args)

    def progress(line: str) -> None:
        print(f"gpumem simulate: {line}", file=sys.stderr, flush=True)

    result = run_simulation(setup, gpu=args.gpu, top_tensors=args.top, progress=None if args.quiet else progress)
    whole, fits = None, True  # no card: no verdict, exit 0
    if result.gpu is not None:
        estimated = estimate(setup, gpu=result.gpu)
        whole = whole_step(result.breakdown, estimated.breakdown)
        fits = _fits(whole, estimated)
    if args.json:
        data = result.to_dict()
        if whole is not None:
            data["whole_step"] = {**whole.to_dict(), "fits": fits, "note":
                                  origin_note(whole, result.breakdown)}
            data["fits"] = fits
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0 if fits else 1
    spec = result.model
    header = (f"{spec.name}: {spec.num_params / 1e9:.2f}B params ({spec.model_type}), simulated on CPU "
              f"(FakeTensorMode) in {result.elapsed_seconds:.1f} s, b={setup.per_device_train_batch_size} "
              f"P={setup.max_prompt_length} C={setup.max_completion_length} logits={setup.logits}"
              + (f", {result.sharding.describe()} under a fake process group" if result.sharding else ""))
    details = ["", f"largest tensors alive at the peak ({result.peak_phase}):"]
    details += [f"  {format_gib(tensor['bytes']):>12}  {tensor['component']:<22} {tensor['name']}: "
                f"{tensor['op']} {tuple(tensor['shape'])} {tensor['dtype']}" for tensor in result.peak_tensors()]
    if whole is not None:
        details += ["", "whole step on the card (simulated torch tensors + the estimate's parts, see origin):",
                    breakdown_table(whole, total_bytes=result.gpu.total_bytes), origin_note(whole, result.breakdown),
                    f"{'FITS' if fits else 'DOES NOT FIT'} on {result.gpu.name} ({format_gib(result.gpu.total_bytes)})"]
    print_result(result, False, header, details, show_verdict=False)
    return 0 if fits else 1


def _fits(whole, estimated) -> bool:
    """The whole step's peak under the card, and vLLM able to start (the estimate's warning)."""
    refuses = any(w.startswith("vLLM would refuse") for w in estimated.warnings)
    return not refuses and whole.peak_bytes <= estimated.gpu.total_bytes
