"""Every ``--gpu-budget*`` option and ini key of the plugin, and reading them with errors that name the key.

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

from .. import launch_config
from ..compare.baseline import DEFAULT_BASELINE_PATH, DEFAULT_TOLERANCE
from ..errors import GpuMemError
from ..gpus import resolve_gpu
from ..record import Defaults
from ..report import WRITERS
from ..units import budget_text
from .marker import parse_size_string

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


def read_defaults(config: pytest.Config) -> Defaults:
    """The session-wide budget and card (``--gpu-budget-default``/``-gpu`` or their ini keys); a bad value is a
    usage error naming the option."""
    size = config.getoption("gpu_budget_default", None) or ini_value(config, "gpu_budget_default")
    gpu = config.getoption("gpu_budget_gpu", None) or ini_value(config, "gpu_budget_gpu")
    budget_bytes = text = gpu_spec = None
    try:
        if size:
            budget_bytes, unit = parse_size_string(size, "gpu_budget_default")
            text = budget_text(budget_bytes, unit)
        if gpu:
            gpu_spec = resolve_gpu(gpu, field="gpu_budget_gpu")
    except GpuMemError as exc:
        raise pytest.UsageError(f"pytest-gpumem: {exc}") from None
    return Defaults(budget_bytes=budget_bytes, budget_text=text, gpu=gpu_spec, setup_keys=_suite_setup_keys(config))


def _suite_setup_keys(config: pytest.Config) -> tuple:
    """The multi-GPU setup keys of the whole suite, from the ini (a bad file or value names the key)."""
    keys: dict[str, Any] = {}
    path = str(ini_value(config, "gpu_budget_accelerate_config") or "").strip()
    try:
        if path:
            keys.update(launch_config.read(resolve_path(path, Path(config.rootpath))))
    except GpuMemError as exc:
        raise pytest.UsageError(f"pytest-gpumem: ini option gpu_budget_accelerate_config: {exc}") from None
    world_size = str(ini_value(config, "gpu_budget_world_size") or "").strip()
    if world_size:
        if not world_size.isascii() or not world_size.isdigit() or int(world_size) < 1:
            raise pytest.UsageError(f"pytest-gpumem: ini option gpu_budget_world_size: {world_size!r} is not a "
                                    "positive whole number (use e.g. gpu_budget_world_size = 8)")
        keys["world_size"] = int(world_size)
    distributed = str(ini_value(config, "gpu_budget_distributed") or "").strip()
    if distributed:
        keys["distributed"] = distributed
    return tuple(sorted(keys.items()))


def resolve_path(path: str, base: Path) -> Path:
    """A path option: ``~`` expanded, a relative path taken from ``base``."""
    target = Path(path).expanduser()
    return target if target.is_absolute() else base / target


def report_paths(config: pytest.Config) -> dict[str, Path]:
    """The report files asked for: format name → path (relative paths from the invocation directory)."""
    invocation_dir = Path(config.invocation_params.dir)
    return {name: resolve_path(config.getoption(f"gpu_budget_{name}"), invocation_dir)
            for name in WRITERS if config.getoption(f"gpu_budget_{name}", None)}
