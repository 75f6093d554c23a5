"""``gpumem explain``: an OOM message, its phase, and with ``--setup`` the predicted tensor and the ranked levers."""

from __future__ import annotations

import argparse
import json
import sys

from ..diagnose.explain import Diagnosis, diagnose
from ..errors import GpuMemError
from ._setup_args import load_setup_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", default="-", help="the error text or log (default: stdin)")
    parser.add_argument("--setup", help="the GRPO setup that failed (.json / .toml file or inline JSON)")
    parser.add_argument("--gpu", help="card name or size to judge levers against (default: the message's total)")
    parser.add_argument("--levers", type=int, default=None, metavar="N", help="show only the top N levers")
    parser.add_argument("--json", action="store_true", help="print JSON")


#: what `gpumem explain` says when it waits on a terminal (a pipe or a file gets no prompt)
PROMPT = "gpumem explain: paste the error or log, then press Ctrl-D (Ctrl-Z Enter on Windows); Ctrl-C to quit"
#: the levers need the setup: said once when none is given
SETUP_HINT = ("(add --setup grpo.json — the setup that failed — for the predicted tensor that failed and the ranked "
              "levers that fix it)")


def run(args: argparse.Namespace) -> int:
    if args.file == "-":
        if sys.stdin.isatty():
            print(PROMPT, file=sys.stderr, flush=True)
        try:
            text = sys.stdin.read()
        except KeyboardInterrupt:  # Ctrl-C at the prompt: quit quietly, as a shell does
            print(file=sys.stderr)
            return 130
    else:
        try:
            with open(args.file, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError as exc:
            raise GpuMemError("file", f"cannot read {args.file}: {exc.strerror or exc}",
                              fix="give the path of a file holding the error text, or pipe it on stdin") from None
    setup = load_setup_arg(args.setup) if args.setup else None
    result = diagnose(text, setup, args.gpu)
    if args.levers is not None:
        result = Diagnosis(result.message, result.phase, result.estimate, result.predicted_phase, result.tensor,
                           result.levers[:args.levers], result.notes)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(result.render())
        if setup is None:
            print(SETUP_HINT)
    return 0
