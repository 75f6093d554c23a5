"""The session's mode: off (the plugin inert), estimate, simulate or measure; ``auto`` decided here.

The simulation and the runner are found by module name, so a stripped installation without them is a usage
error naming the extra to install (and a test can stand in for either). ``measure`` on a machine without a
CUDA device is a usage error too: it would skip every test and exit 0. The device probe is imported only when a
mode is asked for: the inert plugin imports this module in every pytest run.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from .options import ini_bool, ini_value

MODES = ("auto", "estimate", "simulate", "measure")
OFF = "off"
SIMULATE_MODULE = "pytest_gpumem.predict.faketensor"
RUNNER_MODULE = "pytest_gpumem.measure.runner"


def resolve_mode(config: pytest.Config) -> tuple[str | None, str]:
    """The session's mode (None = inert) and why. CLI overrides ini; ``auto`` is decided here."""
    cli = config.getoption("gpu_budget", None)
    if cli is not None and cli.strip().lower() == OFF:
        return None, "--gpu-budget=off"
    if cli is None and not ini_bool(config, "gpu_budget"):
        return None, "--gpu-budget not given"
    requested = (cli or "").strip().lower() or str(ini_value(config, "gpu_budget_mode") or "auto").strip().lower()
    source = "--gpu-budget" if (cli or "").strip() else "ini gpu_budget_mode"
    from ..measure import device  # NVML and the GPU table: off the inert plugin's import

    if requested not in MODES:
        raise pytest.UsageError(f"pytest-gpumem: {source}: unknown mode {requested!r}; use one of "
                                f"{', '.join(MODES)} (or --gpu-budget=off)")
    simulate_ok = importlib.util.find_spec(SIMULATE_MODULE) is not None
    runner_ok = importlib.util.find_spec(RUNNER_MODULE) is not None
    if requested == "simulate" and not simulate_ok:
        raise pytest.UsageError("pytest-gpumem: --gpu-budget=simulate is not available in this installation "
                                f"({SIMULATE_MODULE} is missing); install pytest-gpumem[sim] or use "
                                "--gpu-budget=estimate")
    if requested == "measure" and not runner_ok:
        raise pytest.UsageError("pytest-gpumem: --gpu-budget=measure is not available in this installation "
                                f"({RUNNER_MODULE} is missing); install pytest-gpumem[trl] or use "
                                "--gpu-budget=estimate")
    if requested == "measure" and not device.cuda_available():
        # a CI job that meant to measure must not go green by measuring nothing (every test skipped)
        raise pytest.UsageError(f"pytest-gpumem: {source}=measure needs a CUDA device and this machine has none "
                                f"visible ({_no_device_reason()}); run it on a GPU machine, or judge on CPU with "
                                "--gpu-budget=estimate (or =simulate), or --gpu-budget=auto to estimate where no "
                                "GPU is present")
    if requested != "auto":
        return requested, f"{source}={requested}"
    if not device.cuda_available():
        return "estimate", "auto: no CUDA device, so estimate"
    if not runner_ok:
        return "estimate", f"auto: a CUDA device is present but {RUNNER_MODULE} is not installed, so estimate"
    return "measure", "auto: a CUDA device is present, so measure"


def _no_device_reason() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and (not visible.strip() or visible.strip().startswith("-")):
        return f"CUDA_VISIBLE_DEVICES={visible!r}"
    return "no NVIDIA device found"
