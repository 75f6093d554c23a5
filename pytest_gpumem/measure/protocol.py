"""The parent ⇄ child wire of a measured run: what the runner writes, what the child answers.

The runner (``measure/runner.py``) writes a request (JSON) and starts ``python -m pytest_gpumem.measure.child
REQUEST.json RESULT.json``; the child (``measure/child/``) streams progress lines prefixed with
:data:`PROGRESS_PREFIX` and writes one result (:data:`RESULT_SCHEMA`). Both import this module and nothing of
each other, as pytest-xdist's worker imports nothing of its controller.

Request: ``{"setup": GRPOSetup.to_dict(), "steps", "device": "auto"|"cuda"|"cpu", "backend": run label,
"work_dir", "fault": one of FAULTS | None, "fault_message"}``.

Result: ``{"schema", "status": one of STATUSES, "reason", "steps_requested", "steps_completed", "backend",
"setup", "device", "timings_s", "host_memory", "gpu": {measured fields, "reasons": {field: why missing}, ...},
"phases": {phase: PhaseStats}, "breakdown": Breakdown.to_dict() | None, "oom", "tokens", "notes", "versions"}``,
read back as a :class:`RunResult`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..breakdown import Breakdown, Component, Phase
from ..units import format_gib

RESULT_SCHEMA = "pytest-gpumem/run/1"
STATUSES = ("ok", "oom", "crashed", "timeout", "skipped")
DEVICES = ("auto", "cuda", "cpu")
PROGRESS_PREFIX = "GPUMEM-PROGRESS "
#: Faults a request can ask for, to test the parent's handling of children that fail (tests/test_runner.py).
FAULTS = ("exit-early", "segv-early", "hang-early", "raise-early", "oom-in-generation")
#: the measured fields every result carries, each a value or a reason
MEASURED_FIELDS = ("peak_reserved_bytes", "peak_allocated_bytes", "nvml_peak_bytes", "non_torch_bytes")


def rank_result_name(rank: int) -> str:
    """The file rank ``rank`` of a launched run (``launch.run_ranks``) writes its result to, beside the request's
    ``result.json``: the child writes it, the launcher reads it."""
    return f"result.rank{rank}.json"


def progress_line(seconds: float, message: str, stage: str) -> str:
    """One progress line as the child prints it."""
    return PROGRESS_PREFIX + json.dumps({"t": round(seconds, 2), "message": message, "stage": stage})


def format_progress(line: str) -> str:
    """A progress line's payload (after :data:`PROGRESS_PREFIX`) as the parent shows it."""
    try:
        record = json.loads(line)
        return f"[gpumem {record.get('t', 0):7.1f}s] {record.get('message', '')}"
    except (ValueError, AttributeError):
        return f"[gpumem] {line}"


@dataclass
class RunResult:
    """The outcome of one measured run. ``data`` is the child's JSON (see :mod:`pytest_gpumem.measure.protocol`)."""

    status: str
    reason: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    # -- measured values -----------------------------------------------------------------------------
    @property
    def gpu(self) -> dict[str, Any]:
        return self.data.get("gpu") or {}

    def _measured(self, name: str) -> int | None:
        value = self.gpu.get(name)
        return int(value) if value is not None else None

    @property
    def peak_reserved_bytes(self) -> int | None:
        return self._measured("peak_reserved_bytes")

    @property
    def peak_allocated_bytes(self) -> int | None:
        return self._measured("peak_allocated_bytes")

    @property
    def nvml_peak_bytes(self) -> int | None:
        return self._measured("nvml_peak_bytes")

    @property
    def non_torch_bytes(self) -> int | None:
        return self._measured("non_torch_bytes")

    @property
    def reasons(self) -> dict[str, str]:
        """Why each measured field that is None is None."""
        reasons = dict(self.gpu.get("reasons") or {})
        for name in MEASURED_FIELDS + ("breakdown",):
            missing = self.breakdown is None if name == "breakdown" else getattr(self, name) is None
            if missing and name not in reasons:
                reasons[name] = self.reason or f"not measured (status {self.status})"
        return {name: reason for name, reason in reasons.items()
                if name not in MEASURED_FIELDS or getattr(self, name) is None}

    def reason_for(self, name: str) -> str | None:
        return self.reasons.get(name)

    @property
    def breakdown(self) -> Breakdown | None:
        data = self.data.get("breakdown")
        return Breakdown.from_dict(data) if data else None

    @property
    def peak_total_bytes(self) -> int | None:
        """Peak reserved + non-torch memory of the worst phase (what an OOM message calls 'in use')."""
        breakdown = self.breakdown
        return breakdown.peak_bytes if breakdown is not None else None

    @property
    def oom(self) -> dict[str, Any] | None:
        return self.data.get("oom")

    @property
    def steps_completed(self) -> int:
        return int(self.data.get("steps_completed") or 0)

    @property
    def device_type(self) -> str | None:
        return (self.data.get("device") or {}).get("type")

    @property
    def phases(self) -> dict[str, dict[str, Any]]:
        return self.data.get("phases") or {}

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    # -- serialising ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dict(self.data)
        data.update(status=self.status, reason=self.reason, reasons=self.reasons,
                    peak_total_bytes=self.peak_total_bytes)
        for name in MEASURED_FIELDS:
            data[name] = getattr(self, name)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunResult":
        return cls(status=data["status"], reason=data.get("reason"), data=dict(data))

    def summary(self) -> str:
        """One line: status, peak and where."""
        if self.status != "ok":
            return f"{self.status}: {self.reason}"
        steps = f"{self.steps_completed} step{'s' if self.steps_completed != 1 else ''}"
        if self.peak_reserved_bytes is not None:
            breakdown = self.breakdown
            where = f" in the {breakdown.peak_phase} phase" if breakdown is not None else ""
            return (f"ok: {steps}, peak reserved {format_gib(self.peak_reserved_bytes)}"
                    f" (+ non-torch {format_gib(self.non_torch_bytes or 0)}){where}")
        rss = (self.data.get("host_memory") or {}).get("peak_rss_bytes")
        return f"ok: {steps} on {self.device_type}, host peak RSS {format_gib(rss or 0)} (GPU not measured)"


# -- the measured breakdown ---------------------------------------------------------------------------
def measured_breakdown(result: Mapping[str, Any]) -> tuple[Breakdown | None, list[str]]:
    """Build the per-phase :class:`Breakdown` (``source="measure"``) from a child's raw figures.

    For each phase, from the occurrence with the highest reserved peak: the persistent tensors known to be
    live (weights, LoRA adapters, reference model, vLLM's torch allocations when it does not sleep,
    optimizer states once they exist, gradients in the optimizer step), ``other`` = the rest of torch's
    allocated peak, ``allocator_slack`` = reserved peak − allocated peak, and ``cuda_context`` = non-torch
    memory (vLLM's definition, minus what other processes held before the run). So each phase's total is
    exactly reserved peak + non-torch, comparable with the estimate's phase total.
    Returns ``(None, [reason])`` without CUDA figures.
    """
    gpu = result.get("gpu") or {}
    phases = result.get("phases") or {}
    notes: list[str] = []
    if (result.get("device") or {}).get("type") != "cuda":
        return None, ["no CUDA figures: breakdown not measured"]
    parts = gpu.get("persistent_tensors") or {}
    vllm = gpu.get("vllm_init") or {}
    vllm_bytes = int(vllm.get("allocated_delta_bytes") or 0) if vllm and not vllm.get("sleep_mode") else 0
    other_processes = int(gpu.get("other_processes_bytes_at_start") or 0)
    fixed = {Component.WEIGHTS.value: int(parts.get("weights_bytes") or 0),
             Component.LORA.value: int(parts.get("lora_bytes") or 0),
             Component.REFERENCE.value: int(parts.get("reference_bytes") or 0),
             "vllm_total": vllm_bytes}

    def components(phase: str, allocated: int, reserved: int, non_torch: int | None,
                   context: Mapping[str, Any]) -> dict[str, int]:
        parts_live = dict(fixed)
        if context.get("optimizer_state_bytes"):
            parts_live[Component.OPTIMIZER_STATES.value] = int(context["optimizer_state_bytes"])
        if phase == Phase.OPTIMIZER.value and context.get("gradient_bytes"):
            parts_live[Component.GRADIENTS.value] = int(context["gradient_bytes"])
        rest = allocated - sum(parts_live.values())
        if rest < 0:
            notes.append(f"{phase}: known persistent tensors exceed the allocated peak by {format_gib(-rest)} "
                         "(shared or offloaded storage); 'other' set to 0")
            rest = 0
        parts_live[Component.OTHER.value] = rest
        parts_live[Component.ALLOCATOR_SLACK.value] = max(0, reserved - allocated)
        if non_torch is not None:
            parts_live[Component.CUDA_CONTEXT.value] = max(0, int(non_torch) - other_processes)
        return parts_live

    built: dict[str, dict[str, int]] = {}
    for phase in (Phase.GENERATION.value, Phase.SCORING.value, Phase.TRAINING.value, Phase.OPTIMIZER.value):
        stats = phases.get(phase)
        if not stats or stats.get("peak_reserved_bytes") is None:
            continue
        built[phase] = components(phase, int(stats["peak_allocated_bytes"]), int(stats["peak_reserved_bytes"]),
                                  stats.get("non_torch_bytes"), stats.get("context_at_peak") or {})
    sample = gpu.get("persistent_sample")
    if sample:
        built[Phase.PERSISTENT.value] = components(Phase.PERSISTENT.value, int(sample["allocated_bytes"]),
                                                   int(sample["reserved_bytes"]), sample.get("non_torch_bytes"),
                                                   sample.get("context") or {})
    if not built:
        return None, ["no phase completed on the GPU: breakdown not measured"]
    if other_processes:
        notes.append(f"{format_gib(other_processes)} held by other processes before the run is not counted")
    return Breakdown(phases=built, source="measure"), notes
