"""``gpumem run``: measure a setup for real (N optimizer steps in a fresh process), print or emit JSON.

Exit codes: 0 the run completed; 1 it did not (OOM, crash, timeout, or skipped: no CUDA device / backend);
2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..measure.protocol import DEVICES
from ..measure.runner import DEFAULT_TIMEOUT_S
from ..measure.runner import run as run_setup
from ..predict.analytic import estimate
from ..report.text import format_result
from ..spec import GRPOSetup


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--setup", required=True, metavar="FILE", help="a JSON or TOML setup file")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps to run (default 2)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="cuda, cpu, or auto: CUDA when the child's torch sees a device (default)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help=f"kill the run after this long (default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    setup = GRPOSetup.from_file(args.setup)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = run_setup(setup, steps=args.steps, device=args.device, timeout_s=args.timeout,
                       progress=None if args.quiet else progress)
    predicted = None
    if result.breakdown is not None:
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
    return 0 if result.ok else 1
