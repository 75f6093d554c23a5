"""``gpumem validate``: measure the validation matrix on the GPU at hand and commit the truth (the library half
is ``compare/validation.py``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..compare.plan import order, plan_text
from ..compare.validation import (
    CANDIDATES,
    DEFAULT_STEPS,
    MIN_SETUPS,
    SMOKE,
    build_matrix,
    check_file,
    gpu_at_hand,
    markdown_table,
    output_path,
    run_matrix,
)
from ..errors import GpuMemError
from ..gpus import resolve_gpu
from ..measure.nvml import nvml_handle
from ..units import GIB, format_gib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="validation", metavar="DIR", help="output folder (default validation/)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps per setup (default 2)")
    parser.add_argument("--only", metavar="NAMES", help="comma-separated setup names (see --list)")
    parser.add_argument("--smoke", action="store_true",
                        help="run only a tiny setup (any device, CPU included): checks the pipeline in seconds")
    parser.add_argument("--device", choices=("cuda", "cpu", "auto"), default=None,
                        help="where the runs happen (default: cuda; auto for --smoke)")
    parser.add_argument("--gpu", metavar="SIZE_OR_NAME",
                        help="size the matrix for this GPU instead of the one at hand (e.g. 24GiB, L4)")
    parser.add_argument("--list", action="store_true", help="print the matrix with predicted peaks and exit")
    parser.add_argument("--plan", action="store_true",
                        help="print the runs in the order they will run (one per component family first), each "
                             "one's predicted peak and expected run time, and the total; then exit")
    parser.add_argument("--fresh", action="store_true", help="rerun entries already measured today")
    parser.add_argument("--max-minutes", type=float, metavar="MINUTES",
                        help="start no new setup after this long (rerun to resume)")
    parser.add_argument("--timeout", type=float, default=900, metavar="SECONDS", help="per-setup timeout")


def run(args: argparse.Namespace) -> int:
    device = args.device or ("auto" if args.smoke else "cuda")
    if args.gpu:
        card = resolve_gpu(args.gpu, field="--gpu")
        gpu = {"name": card.name, "total_bytes": card.total_bytes, "source": card.source}
    elif device == "cpu" or (args.smoke and device == "auto" and nvml_handle(0)[0] is None):
        gpu = {"name": "cpu", "total_bytes": 80 * GIB, "source": "nominal (CPU run)"}
    else:
        gpu = gpu_at_hand()
    only = [SMOKE[0]] if args.smoke else ([n.strip() for n in args.only.split(",") if n.strip()] if args.only else None)
    entries = build_matrix(gpu["total_bytes"], only=only)
    if only:
        known = {name for name, _, _ in CANDIDATES + [SMOKE]}
        unknown = [name for name in only if name not in known]
        if unknown:
            raise GpuMemError("--only", f"unknown setup name(s): {', '.join(unknown)}",
                              fix="see `gpumem validate --list`")
    entries = order(entries, args.steps)
    if args.plan:
        print(plan_text(entries, gpu["name"], gpu["total_bytes"], args.steps))
        return 0
    if args.list:
        print(f"matrix for {gpu['name']} ({format_gib(gpu['total_bytes'])}), {len(entries)} setups:")
        for entry in entries:
            print(f"  {entry.name:40s} {entry.why}")
        return 0
    if len(entries) < MIN_SETUPS and not only:
        print(f"gpumem validate: only {len(entries)} setups fit {gpu['name']} (want ≥ {MIN_SETUPS})", file=sys.stderr)
    path = output_path(Path(args.out), gpu["name"])

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    document = run_matrix(entries, path, gpu, device=device, steps=args.steps, timeout_s=args.timeout,
                          resume=not args.fresh, max_seconds=args.max_minutes * 60 if args.max_minutes else None,
                          progress=progress)
    print(markdown_table(document))
    print(f"written: {path} and {path.with_suffix('.md')}")
    checks = check_file(document)
    failed = [c for c in checks if c.checked and not c.ok]
    for check in checks:
        print(f"{'FAIL' if check.checked and not check.ok else 'ok  '} {check.name}: {check.message}")
    return 1 if failed else 0
