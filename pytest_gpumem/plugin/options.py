"""Every ``--gpu-budget*`` option and ini key of the plugin, and reading them with errors that name the key; the
marker's name and its ``pytest --markers`` line. Light: the inert plugin (no ``--gpu-budget``) imports this and
not the modules that read the values (defaults.py, marker.py, manager.py).

The report options (``--gpu-budget-json``, ``-md``, ``-html``) are generated from
:data:`pytest_gpumem.report.WRITERS`. Boolean keys are declared ``type="bool"`` (so TOML's native
``[tool.pytest]`` table may give real bools) and read through :func:`ini_bool`: pytest-memray's boolean ini
keys were silently ignored, and pytest's own parsing words a bad value differently across versions (pytest
9.2: a bare "invalid truth value 'maybe'" usage error that names no key) — every such error is re-raised
naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ..compare import DEFAULT_BASELINE_PATH, DEFAULT_TOLERANCE
from ..report import WRITERS

MARKER = "gpu_budget"
#: the marker's line in ``pytest --markers`` (its grammar is marker.py's)
MARKER_HELP = (f"{MARKER}(gb=|gib=|mb=|mib=|size='17 GiB', setup=None, tolerance=0.10, gpu=None): the test's "
               "GPU memory peak (predicted, simulated or measured; see --gpu-budget) must stay under the "
               "budget (with only gpu= given: that card's memory). setup: a GRPOSetup, dict or path to a "
               ".json/.toml setup file; tolerance: allowed prediction-vs-measurement gap (0.10 or '10%'); "
               "gpu: card to judge against ('L4', '24GiB'); "
               "baseline_tolerance: allowed growth over the saved baseline ('5%+256MiB'); "
               "vllm_gb=|vllm_gib=|vllm_size=...: the budget of each vLLM server GPU (setup with vllm_mode='server'; "
               "default: vllm_server_gpu's memory, else the training GPUs' budget).")
#: the marker's per-test baseline tolerance keyword
BASELINE_TOLERANCE_KEYWORD = "baseline_tolerance"


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("gpumem", "GPU memory budgets of GRPO training (pytest-gpumem)")
    group.addoption("--gpu-budget", dest="gpu_budget", nargs="?", const="", default=None, metavar="MODE",
                    help="judge tests marked gpu_budget: auto (default: measure on a CUDA machine, estimate "
                         "elsewhere), estimate, simulate, measure; 'off' disables an ini 'gpu_budget = true'")
    group.addoption("--gpu-budget-default", dest="gpu_budget_default", default=None, metavar="SIZE",
                    help="budget of marked tests that give none, e.g. '24 GiB' (ini gpu_budget_default)")
    group.addoption("--gpu-budget-gpu", dest="gpu_budget_gpu", default=None, metavar="GPU",
                    help="card to judge against when no GPU is present: a name (L4, A100-80GB) or a size "
                         "(24GiB); default: the budget is the card size (ini gpu_budget_gpu)")
    parser.addini("gpu_budget", type="bool", default=False,
                  help="pytest-gpumem: judge gpu_budget tests in every run (like --gpu-budget)")
    parser.addini("gpu_budget_mode", default="auto", help="pytest-gpumem: auto, estimate, simulate or measure")
    parser.addini("gpu_budget_default", default="", help="pytest-gpumem: default budget, e.g. '24 GiB'")
    parser.addini("gpu_budget_gpu", default="", help="pytest-gpumem: card to judge against, e.g. 'L4' or '24GiB'")
    for fmt in WRITERS.values():
        group.addoption(f"--gpu-budget-{fmt.name}", dest=f"gpu_budget_{fmt.name}", default=None, metavar="PATH",
                        help=fmt.help)
    group.addoption("--gpu-budget-baseline", dest="gpu_budget_baseline", default=None, metavar="PATH",
                    help=f"baseline file to compare with and save to (default {DEFAULT_BASELINE_PATH} under the "
                         "rootdir; ini gpu_budget_baseline)")
    group.addoption("--gpu-budget-save", dest="gpu_budget_save", action="store_true", default=False,
                    help="record (create or update) each budgeted test's baseline; growth is reported, not failed")
    group.addoption("--gpu-budget-strict", dest="gpu_budget_strict", action="store_true", default=None,
                    help="fail budgeted tests that have no baseline for this hardware (ini gpu_budget_strict)")
    group.addoption("--gpu-budget-baseline-tolerance", dest="gpu_budget_baseline_tolerance", default=None,
                    metavar="TOL", help=f"allowed growth over the baseline, percent and/or size, e.g. "
                                        f"'{DEFAULT_TOLERANCE}' (the default; ini gpu_budget_baseline_tolerance; per "
                                        f"test: gpu_budget(..., {BASELINE_TOLERANCE_KEYWORD}='10%'))")
    parser.addini("gpu_budget_baseline", default="",
                  help=f"pytest-gpumem: baseline file (default {DEFAULT_BASELINE_PATH})")
    parser.addini("gpu_budget_baseline_tolerance", default="",
                  help=f"pytest-gpumem: allowed growth over the baseline (default '{DEFAULT_TOLERANCE}')")
    parser.addini("gpu_budget_strict", type="bool", default=False,
                  help="pytest-gpumem: fail budgeted tests without a baseline")
    parser.addini("gpu_budget_accelerate_config", default="",
                  help="pytest-gpumem: the accelerate YAML (or DeepSpeed JSON) every setup is launched with: its "
                       "world size and sharding strategy apply to each marker's setup (budgets stay per GPU)")
    parser.addini("gpu_budget_world_size", default="",
                  help="pytest-gpumem: training processes (GPUs) of every setup, e.g. 8 (with "
                       "gpu_budget_distributed, e.g. zero3)")
    parser.addini("gpu_budget_distributed", default="",
                  help="pytest-gpumem: the sharding strategy of every setup: ddp, zero1, zero2, zero3, fsdp1, fsdp2")


TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0", "")


def ini_value(config: pytest.Config, name: str) -> Any:
    """``config.getini`` with a usage error that names the key (pytest raises a bare ValueError/TypeError)."""
    try:
        return config.getini(name)
    except (ValueError, TypeError, pytest.UsageError) as exc:
        raise pytest.UsageError(f"pytest-gpumem: ini option {name}: {exc}") from None


def ini_bool(config: pytest.Config, name: str) -> bool:
    value = ini_value(config, name)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise pytest.UsageError(f"pytest-gpumem: ini option {name}: {value!r} is not a boolean "
                            f"(use {name} = true or {name} = false)")


def resolve_path(path: str, base: Path) -> Path:
    """A path option: ``~`` expanded, a relative path taken from ``base``."""
    target = Path(path).expanduser()
    return target if target.is_absolute() else base / target


def report_paths(config: pytest.Config) -> dict[str, Path]:
    """The report files asked for: format name → path (relative paths from the invocation directory)."""
    invocation_dir = Path(config.invocation_params.dir)
    return {name: resolve_path(config.getoption(f"gpu_budget_{name}"), invocation_dir)
            for name in WRITERS if config.getoption(f"gpu_budget_{name}", None)}
