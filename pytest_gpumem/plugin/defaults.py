"""The session-wide defaults — ``--gpu-budget-default``/``-gpu`` and the multi-GPU ini keys — read into a
:class:`~pytest_gpumem.record.Defaults`, with usage errors that name the option. Read once, when
``--gpu-budget`` is on (options.py declares the options and stays light for the inert plugin)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .. import launch_config
from ..errors import GpuMemError
from ..gpus import resolve_gpu
from ..record import Defaults
from ..units import budget_text
from .marker import parse_size_string
from .options import ini_value, resolve_path


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
