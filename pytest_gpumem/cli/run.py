"""``gpumem run``: measure a setup for real (N optimizer steps in a fresh process), print or emit JSON.
``--nproc N`` runs it as N processes under ``accelerate launch`` (``measure.launch``: FSDP2 or DDP; on a machine
without CUDA the ranks use CPU and gloo) and reports every rank, a failed one by its rank.

Exit codes: 0 the run completed; 1 it did not (OOM, crash, timeout, or skipped: no CUDA device / backend);
2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..measure.launch import LAUNCHED_STRATEGIES, run_rank0, run_ranks
from ..measure.protocol import DEVICES
from ..measure.runner import DEFAULT_TIMEOUT_S
from ..measure.runner import run as run_setup
from ..predict.analytic import estimate
from ..report.text import format_result
from ..spec import GRPOSetup
from ..units import format_gib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--setup", required=True, metavar="FILE", help="a JSON or TOML setup file")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps to run (default 2)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="cuda, cpu, or auto: CUDA when the child's torch sees a device (default)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help=f"kill the run after this long (default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="run N processes under accelerate launch (one per GPU; CPU + gloo without CUDA)")
    parser.add_argument("--rank0-of", type=int, default=None, metavar="N",
                        help="measure rank 0 of an N-GPU FSDP2 job on this one device (a fake process group)")
    parser.add_argument("--strategy", choices=LAUNCHED_STRATEGIES, default=None,
                        help="with --nproc: the sharding (default: the setup's 'distributed', else fsdp2)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    setup = GRPOSetup.from_file(args.setup)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.nproc < 1:
        print(f"gpumem run: --nproc must be ≥ 1, got {args.nproc}", file=sys.stderr)
        return 2
    if args.rank0_of is not None:
        if args.nproc != 1:
            print("gpumem run: --rank0-of measures one process; drop --nproc", file=sys.stderr)
            return 2
        result = run_rank0(setup, args.rank0_of, steps=args.steps, device=args.device, timeout_s=args.timeout,
                           progress=None if args.quiet else progress)
    elif args.nproc > 1 or args.strategy is not None:
        result = run_ranks(setup, args.nproc, steps=args.steps, device=args.device, timeout_s=args.timeout,
                           progress=None if args.quiet else progress, strategy=args.strategy)
    else:
        result = run_setup(setup, steps=args.steps, device=args.device, timeout_s=args.timeout,
                           progress=None if args.quiet else progress)
    predicted = None
    if result.breakdown is not None and "ranks" not in result.data:  # the estimate is per GPU of one process
        try:
            predicted = estimate(setup).breakdown
        except Exception as exc:  # noqa: BLE001 - the measurement stands on its own
            print(f"gpumem run: no estimate to compare with ({type(exc).__name__}: {exc})", file=sys.stderr)
    if args.json:
        data = result.to_dict()
        if predicted is not None:
            data["estimate_breakdown"] = predicted.to_dict()
        print(json.dumps(data, indent=1, default=str))
    else:
        print(format_result(result, predicted))
        for rank in result.data.get("ranks", []):
            info = rank.get("rank_info") or {}
            rss = (rank.get("host_memory") or {}).get("peak_rss_bytes")
            reserved = (rank.get("gpu") or {}).get("peak_reserved_bytes")
            peak = f"GPU peak reserved {format_gib(reserved)}" if reserved else (
                f"host RSS peak {format_gib(rss)}" if rss else "no peak measured")
            sharding = (f", {info['distributed_type']} {info['local_params']:,} of {info['global_params']:,} params"
                        if "local_params" in info else "")
            print(f"rank {rank['rank']}: {rank.get('status')}{sharding}, {peak}"
                  + (f" — {rank['reason']}" if rank.get("reason") else ""))
    return 0 if result.ok else 1
