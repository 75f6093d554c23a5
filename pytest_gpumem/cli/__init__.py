"""The ``gpumem`` command line. Each subcommand lives in the module that does the work; this file only
dispatches. Exit codes: 0 fits / ok, 1 does not fit / check failed, 2 usage error."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import GpuMemError
from ..versions import PACKAGE_VERSION

# name -> (module, help). The module provides add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "estimate": ("pytest_gpumem.cli.estimate", "predict the GPU memory of a GRPO setup, phase by phase"),
    "models": ("pytest_gpumem.cli.models", "list the built-in model registry"),
    "simulate": ("pytest_gpumem.cli.simulate", "trace the real architecture's GRPO step on CPU (FakeTensorMode), phase by phase"),
    "run": ("pytest_gpumem.cli.run", "measure a setup for real: N GRPO steps in a fresh process (GPU or CPU)"),
    "validate": ("pytest_gpumem.compare.validation", "measure a matrix of setups on this GPU and write validation/<gpu>-<date>.json"),
    "explain": ("pytest_gpumem.cli.explain", "explain a CUDA OOM / vLLM refusal: figures, phase, tensor, ranked levers"),
    "fit": ("pytest_gpumem.cli.fit", "find the best setup that fits a GPU, keeping completions per optimizer step"),
    "table": ("pytest_gpumem.cli.table", "quick-reference table of recommended setups by GPU size (Markdown)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpumem", description="GPU memory of GRPO training: estimate, "
                                     "simulate, measure, explain.")
    parser.add_argument("--version", action="version", version=f"pytest-gpumem {PACKAGE_VERSION}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except GpuMemError as exc:
        print(f"gpumem {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `gpumem models | head`
        return 0

