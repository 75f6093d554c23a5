"""Measuring a block of the user's own GPU code (the ``gpu_memory`` fixture's engine): :class:`GpuMemory` and
the :class:`Measurement` it records for the test's budget.

Recorded: torch's peak reserved and allocated bytes and NVML's device-level peak; without a CUDA device every
field is None with the reason. Neither torch nor NVML is imported here on its own (``measure.device``,
``measure.profiling``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from . import device, profiling

NO_CUDA = "not measured: no CUDA device"
MEASURED_FIELDS = ("peak_reserved_bytes", "peak_allocated_bytes", "nvml_peak_bytes")


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
        if not device.cuda_available():
            self.measurement.merge(None, None, None, {name: NO_CUDA for name in MEASURED_FIELDS})
            yield self.measurement
            return
        with profiling.memory_profiling(self.device_index, use_torch=None) as profile:
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
