"""The plugin's fixtures: ``gpu_memory`` (measure your own GPU code) and ``grpo_step`` (run a GRPO setup in the
session's mode).

Both work with or without ``--gpu-budget``: without it nothing is judged, ``grpo_step`` returns the estimate
and ``gpu_memory`` still measures. Neither imports torch on its own: ``gpu_memory`` reads torch only when the
test has imported it (reading CUDA state from a process that never touched the GPU would create a CUDA context
there, ≈ 0.3–0.6 GiB — memory-model.md §6) and asks NVML whether a device exists at all.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

NO_CUDA = "not measured: no CUDA device"
MEASURED_FIELDS = ("peak_reserved_bytes", "peak_allocated_bytes", "nvml_peak_bytes")


# -- is there a GPU? -------------------------------------------------------------------------------------------
def cuda_available() -> bool:
    """Whether this process can use a CUDA device — without importing torch.

    ``torch.cuda.is_available()`` when torch is already imported; otherwise NVML's device count (NVML ignores
    ``CUDA_VISIBLE_DEVICES``, so an empty/``-1`` value is honoured here first)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and (not visible.strip() or visible.strip().startswith("-")):
        return False
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            return bool(torch.cuda.is_available())
        except Exception:  # a broken CUDA install reads as "no GPU", never as a crash of the test session
            return False
    from ..measure.snapshot import nvml_device_count

    count, _ = nvml_device_count()
    return bool(count)


def device_gpu(device_index: int = 0):
    """The :class:`~pytest_gpumem.gpus.GPU` of the CUDA device (name and the total torch reports), or None."""
    from ..gpus import GPU

    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                props = torch.cuda.get_device_properties(device_index)
                return GPU(props.name, int(props.total_memory), "torch")
        except Exception:
            pass
    from ..measure.snapshot import nvml_handle, nvml_memory

    handle, _, _ = nvml_handle(device_index)
    if handle is None:
        return None
    info, _ = nvml_memory(handle)
    if info is None:
        return None
    from ..measure.snapshot import nvml

    module, _ = nvml()
    try:
        name = module.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        name = f"CUDA device {device_index}"
    return GPU(name, int(info["total"]), "nvidia-smi")


# -- gpu_memory ------------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    """Peaks of one or more ``track()`` blocks (the largest of each), with why a field is missing."""

    peak_reserved_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    nvml_peak_bytes: int | None = None
    reasons: dict = field(default_factory=dict)
    blocks: int = 0

    def to_dict(self) -> dict:
        """The record's ``measured`` entry."""
        return {"breakdown": None, "peak_reserved_bytes": self.peak_reserved_bytes,
                "peak_allocated_bytes": self.peak_allocated_bytes, "nvml_peak_bytes": self.nvml_peak_bytes,
                "reasons": dict(self.reasons)}

    @property
    def measured(self) -> bool:
        return any(getattr(self, name) is not None for name in MEASURED_FIELDS)

    def merge(self, peak_reserved: int | None, peak_allocated: int | None, nvml_peak: int | None,
              reasons: dict) -> None:
        self.blocks += 1
        for name, value in zip(MEASURED_FIELDS, (peak_reserved, peak_allocated, nvml_peak)):
            if value is not None:
                current = getattr(self, name)
                setattr(self, name, value if current is None else max(current, value))
                self.reasons.pop(name, None)
            elif getattr(self, name) is None and name in reasons:
                self.reasons[name] = reasons[name]


class GpuMemory:
    """``with gpu_memory.track(): ...`` measures the block's GPU peaks for the test's budget.

    Recorded: torch's peak reserved and allocated bytes (``torch.cuda.max_memory_reserved/allocated`` after a
    reset on entry) and NVML's device-level peak (``used`` sampled every ~10 ms on a thread: everything on
    the device, the CUDA context and non-torch memory included). Without a CUDA device every field is
    ``None`` with the reason "not measured: no CUDA device", and the budget falls back to the setup's
    estimate when the marker gives one.
    """

    def __init__(self, device_index: int = 0):
        self.device_index = device_index
        self.measurement = Measurement()

    @contextmanager
    def track(self) -> Iterator[Measurement]:
        if not cuda_available():
            self.measurement.merge(None, None, None, {name: NO_CUDA for name in MEASURED_FIELDS})
            yield self.measurement
            return
        from ..measure.snapshot import memory_profiling

        with memory_profiling(self.device_index, use_torch=None) as profile:
            yield self.measurement
        after, before = profile.after, profile.before
        reasons = {}
        reserved = after.torch_peak_reserved_bytes
        allocated = after.torch_peak_allocated_bytes
        if reserved is None:
            reasons["peak_reserved_bytes"] = f"not measured: {after.reason('torch_peak_reserved_bytes')}"
        if allocated is None:
            reasons["peak_allocated_bytes"] = f"not measured: {after.reason('torch_peak_allocated_bytes')}"
        nvml_peak = None
        if "nvml_peak_increase" in profile.components and before.nvml_used_bytes is not None:
            nvml_peak = before.nvml_used_bytes + profile.components["nvml_peak_increase"]
        else:
            reasons["nvml_peak_bytes"] = f"not measured: {profile.missing.get('nvml_peak_increase', 'no NVML')}"
        self.measurement.merge(reserved, allocated, nvml_peak, reasons)

    # the numbers, for the test's own assertions
    @property
    def peak_reserved_bytes(self) -> int | None:
        return self.measurement.peak_reserved_bytes

    @property
    def peak_allocated_bytes(self) -> int | None:
        return self.measurement.peak_allocated_bytes

    @property
    def nvml_peak_bytes(self) -> int | None:
        return self.measurement.nvml_peak_bytes


@pytest.fixture
def gpu_memory(request: pytest.FixtureRequest) -> GpuMemory:
    """Measure your own GPU code for the test's ``gpu_budget``: ``with gpu_memory.track(): train_step()``."""
    tracker = GpuMemory()
    from . import STATE_KEY

    state = request.node.stash.get(STATE_KEY, None)
    if state is not None:
        state.trackers.append(tracker)
    return tracker


# -- grpo_step -------------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    """One ``grpo_step(setup)``: the setup, the prediction and (measure mode) the run.

    ``estimate`` is the analytic :class:`~pytest_gpumem.estimate.Estimate` (always there); ``predicted`` the
    record's prediction (the estimate, or the simulation in simulate mode); ``measured`` the record's
    measurement (measure mode) and ``run`` the runner's RunResult."""

    mode: str
    setup: Any
    estimate: Any
    predicted: dict | None
    measured: dict | None = None
    run: Any = None

    @property
    def peak_bytes(self) -> int | None:
        """The peak the budget is judged on: measured when measured, else predicted."""
        from .marker import judged_peak

        return judged_peak({"predicted": self.predicted, "measured": self.measured})[0]


@pytest.fixture
def grpo_step(request: pytest.FixtureRequest):
    """``grpo_step(setup)`` runs one GRPO setup (a GRPOSetup, dict of GRPOConfig names or setup-file path) in
    the session's mode — estimate, simulate, or measure (real steps on the GPU) — and records it for the
    test's ``gpu_budget``. ``grpo_step()`` with no argument uses the marker's ``setup=``. Returns a
    :class:`StepResult`. Without ``--gpu-budget`` it returns the estimate and judges nothing."""
    from .marker import MarkerError, parse_setup
    from . import MANAGER_KEY
    from . import STATE_KEY

    manager = request.config.stash.get(MANAGER_KEY, None)
    state = request.node.stash.get(STATE_KEY, None)
    base_dirs = (Path(request.node.path).parent,) if getattr(request.node, "path", None) else ()

    def step(setup: Any = None) -> StepResult:
        __tracebackhide__ = True
        if setup is None:
            if state is None or state.spec is None or state.spec.setup is None:
                raise MarkerError("setup", "grpo_step() was called without a setup and the test's gpu_budget "
                                  "marker gives none", fix="call grpo_step(SETUP) or add setup= to the marker")
            resolved = state.spec.setup
        else:
            resolved = parse_setup(setup, base_dirs)
        if manager is not None:  # --gpu-budget is on: the session's mode, judged when the test is budgeted
            result = manager.run_step(resolved, state.spec if state is not None else None)
            if state is not None:
                state.steps.append(result)
            return result
        from ..predict.analytic import estimate
        from . import predicted_dict

        result_estimate = estimate(resolved)
        return StepResult("estimate", resolved, result_estimate, predicted_dict(result_estimate, None))

    return step
