"""``gpumem table``: the quick-reference Markdown table of recommended setups by GPU size, made by ``fit``."""

from __future__ import annotations

import argparse

from ..diagnose.fit import DEFAULT_KEEP
from ..diagnose.table import TABLE_SIZES_GIB, table
from ..errors import GpuMemError
from ._setup_args import add_setup_arguments, setup_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setup_arguments(parser)  # --model NAME [--backend trl|unsloth] and every other setup key
    parser.add_argument("--sizes", default=",".join(f"{s:g}" for s in TABLE_SIZES_GIB),
                        help="GPU sizes in GiB, comma-separated (default: %(default)s)")
    parser.add_argument("--headroom", type=float, default=0.1,
                        help="fraction of each GPU kept free, 0 to 1 (default: 0.1)")


def _sizes(text: str) -> list[float]:
    sizes = []
    for piece in text.split(","):
        try:
            value = float(piece.strip().lower().removesuffix("gib"))
        except ValueError:
            raise GpuMemError("--sizes", f"cannot read {piece!r} as a size in GiB",
                              fix="e.g. --sizes 8,16,24,80") from None
        if value <= 0:
            raise GpuMemError("--sizes", f"sizes must be positive, got {piece!r}", fix="e.g. --sizes 8,16,24,80")
        sizes.append(value)
    return sizes


def run(args: argparse.Namespace) -> int:
    setup = setup_from_args(args)
    print(table(setup, _sizes(args.sizes), headroom=args.headroom, keep=DEFAULT_KEEP))
    return 0
