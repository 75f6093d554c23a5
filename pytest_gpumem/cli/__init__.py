"""The ``gpumem`` command line (entry point ``pytest_gpumem.cli:main``): one module per subcommand, this file
only dispatches. The only folder that imports argparse; nothing imports it. Exit codes: 0 fits / ok, 1 does
not fit / check failed, 2 usage error."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from ..errors import GpuMemError
from ..versions import PACKAGE_VERSION
from . import estimate, explain, fit, gpus, models, run, simulate, table, validate

#: name -> (module, help). Each module provides add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "estimate": (estimate, "predict the GPU memory of a GRPO setup, phase by phase"),
    "models": (models, "list the built-in model registry"),
    "gpus": (gpus, "list the GPU names --gpu / gpu= accept, with each card's memory"),
    "simulate": (simulate, "trace the real architecture's GRPO step on CPU (FakeTensorMode), phase by phase"),
    "run": (run, "measure a setup for real: N GRPO steps in a fresh process (GPU or CPU)"),
    "validate": (validate, "measure a matrix of setups on this GPU and write validation/<gpu>-<date>.json"),
    "explain": (explain, "explain a CUDA OOM / vLLM refusal: figures, phase, tensor, ranked levers"),
    "fit": (fit, "find the best setup that fits a GPU, keeping completions per optimizer step"),
    "table": (table, "quick-reference table of recommended setups by GPU size (Markdown)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpumem", description="GPU memory of GRPO training: estimate, "
                                     "simulate, measure, explain.")
    parser.add_argument("--version", action="version", version=f"pytest-gpumem {PACKAGE_VERSION}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def underscores_to_dashes(argv: list[str]) -> list[str]:
    """``--lora_rank 16`` → ``--lora-rank 16``: a setup file's key names work as flags too."""
    result = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.partition("=")[0]:
            head, sep, tail = arg.partition("=")
            arg = head.replace("_", "-") + sep + tail
        result.append(arg)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(underscores_to_dashes(sys.argv[1:] if argv is None else list(argv)))
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
    except KeyboardInterrupt:  # Ctrl-C: quit quietly (no traceback), with the shell's code for SIGINT
        print(file=sys.stderr)
        return 130

