"""Measure a GRPO setup for real: N optimizer steps of TRL's ``GRPOTrainer`` in a fresh, isolated process.

:func:`run` writes a request, starts ``python -m pytest_gpumem._child`` (a new process: a new CUDA context,
nothing left by earlier tests, and an OOM or a segfault there never takes the pytest session down), streams
its progress lines, enforces a timeout, and reads back one JSON result as a :class:`RunResult`:

``status``  ``"ok"`` | ``"oom"`` | ``"crashed"`` | ``"timeout"`` | ``"skipped"``, with ``reason``
``breakdown``  a :class:`~pytest_gpumem.breakdown.Breakdown` (``source="measure"``), phase by phase, comparable
    with the estimate's (CUDA only; ``None`` with a reason on CPU)
``peak_reserved_bytes`` / ``peak_allocated_bytes`` / ``nvml_peak_bytes``  None with a reason when not measured
``oom``  the parsed OOM message (``pytest_gpumem.explain.parse_oom``) and the phase it happened in

What the child does is documented in :mod:`pytest_gpumem._child`. Under pytest-xdist, worker ``gwN`` runs its
children on GPU ``N mod count`` (count from ``CUDA_VISIBLE_DEVICES`` or NVML — torch is never imported here).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..breakdown import Breakdown, Component, Phase
from ..errors import GpuMemError
from .snapshot import nvml_device_count, visible_device_entries
from ..spec import GRPOSetup
from ..units import format_gib

STATUSES = ("ok", "oom", "crashed", "timeout", "skipped")
DEVICES = ("auto", "cuda", "cpu")
DEFAULT_TIMEOUT_S = 1800.0
PROGRESS_PREFIX = "GPUMEM-PROGRESS "  # same as _child.PROGRESS_PREFIX (not imported: keeps this module light)
OUTPUT_TAIL_LINES = 80
#: the measured fields every result carries, each a value or a reason
MEASURED_FIELDS = ("peak_reserved_bytes", "peak_allocated_bytes", "nvml_peak_bytes", "non_torch_bytes")

ProgressCallback = Callable[[str], None]


@dataclass
class RunResult:
    """The outcome of one measured run. ``data`` is the child's JSON (see :mod:`pytest_gpumem._child`)."""

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


def compare_table(predicted: Breakdown, measured: Breakdown, phases: list[str] | None = None) -> str:
    """Predicted vs measured, per phase and component, as aligned text (for failure messages and the CLI)."""
    phases = phases or [p for p in measured.phase_names() if p in predicted.phases] or measured.phase_names()
    rows = [("phase", "component", "predicted", "measured", "measured − predicted")]
    for phase in phases:
        mine, theirs = predicted.components(phase), measured.components(phase)
        names = sorted(set(mine) | set(theirs), key=lambda n: (-max(mine.get(n, 0), theirs.get(n, 0)), n))
        for name in names:
            p, m = mine.get(name), theirs.get(name)
            rows.append((phase, name, format_gib(p) if p is not None else "—", format_gib(m) if m is not None else "—",
                         _signed(m - p) if p is not None and m is not None else ""))
        p_total, m_total = predicted.total(phase), measured.total(phase)
        rows.append((phase, "TOTAL", format_gib(p_total), format_gib(m_total), _signed(m_total - p_total)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _signed(num_bytes: int) -> str:
    return ("+" if num_bytes >= 0 else "−") + format_gib(abs(num_bytes))


# -- running the child -----------------------------------------------------------------------------------
def assign_cuda_device(environ: Mapping[str, str] | None = None,
                       worker: str | None = None) -> tuple[dict[str, str], str | None]:
    """Under pytest-xdist, the GPU for worker ``gwN``: ``N mod count``. Returns environment updates for the
    child (``CUDA_VISIBLE_DEVICES``) and a note. The count comes from ``CUDA_VISIBLE_DEVICES`` when set (its
    entries are kept as written, UUIDs included), else from NVML; torch is not imported."""
    environ = os.environ if environ is None else environ
    worker = worker if worker is not None else environ.get("PYTEST_XDIST_WORKER")
    match = re.fullmatch(r"gw(\d+)", worker or "")
    if not match:
        return {}, None
    number = int(match.group(1))
    entries = visible_device_entries(dict(environ))
    if entries is not None:
        if not entries:
            return {}, "CUDA_VISIBLE_DEVICES hides every device"
        chosen = entries[number % len(entries)]
        return {"CUDA_VISIBLE_DEVICES": chosen}, (f"xdist worker {worker} → CUDA_VISIBLE_DEVICES={chosen} "
                                                  f"({number} mod {len(entries)} visible devices)")
    count, reason = nvml_device_count()
    if not count:
        return {}, reason or "no GPU found by NVML"
    chosen = str(number % count)
    return {"CUDA_VISIBLE_DEVICES": chosen}, f"xdist worker {worker} → GPU {chosen} ({number} mod {count} GPUs)"


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "no exit code"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (killed: often the kernel's out-of-memory killer, for host memory)" if name == "SIGKILL" else ""
        return f"{name}{hint}"
    if returncode > 128:
        try:
            name = signal.Signals(returncode - 128).name
        except ValueError:
            return f"exit code {returncode}"
        hint = ", often the kernel's out-of-memory killer for host memory" if name == "SIGKILL" else ""
        return f"exit code {returncode} (128 + {name}{hint})"
    return f"exit code {returncode}"


def backend_name(setup: GRPOSetup) -> str:
    if setup.backend == "unsloth":
        return "unsloth-vllm" if setup.use_vllm else "unsloth"
    if setup.use_vllm:
        return f"trl-vllm-{setup.vllm_mode}" + ("-sleep" if setup.vllm_enable_sleep_mode else "")
    return "trl-hf-generate"


def skip_reason(setup: GRPOSetup, device: str) -> str | None:
    """Why this setup cannot run here, known without starting a child (importability only, no imports)."""
    if setup.backend == "unsloth" and importlib.util.find_spec("unsloth") is None:
        return "unsloth not installed"
    if setup.use_vllm:
        if setup.vllm_mode == "server":
            return "vllm_mode='server' runs vLLM on other GPUs; a run measures one process"
        if importlib.util.find_spec("vllm") is None:
            return "vllm not installed"
        if device == "cpu":
            return "vLLM colocate needs a CUDA device (device='cpu' was asked for)"
    if device == "cpu" and setup.load_in_4bit:
        return "load_in_4bit needs a CUDA device (bitsandbytes)"
    if device == "cpu" and setup.backend == "unsloth":
        return "Unsloth needs a CUDA device (device='cpu' was asked for)"
    for module in ("torch", "transformers", "trl", "datasets"):
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed (pip install 'pytest-gpumem[trl]')"
    if setup.is_lora and importlib.util.find_spec("peft") is None:
        return "peft not installed (needed for LoRA)"
    return None


def _child_environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # never reach for the hub: models are built locally (preamble rule), datasets are in memory
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    package_root = str(Path(__file__).resolve().parents[2])  # a fresh clone runs without being installed
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if extra:
        env.update(extra)
    return env


def _format_progress(line: str) -> str:
    try:
        record = json.loads(line)
        return f"[gpumem {record.get('t', 0):7.1f}s] {record.get('message', '')}"
    except (ValueError, AttributeError):
        return f"[gpumem] {line}"


def run(setup: GRPOSetup | Mapping | str | Path, steps: int = 2, device: str = "auto",
        timeout_s: float = DEFAULT_TIMEOUT_S, progress: ProgressCallback | None = None, *,
        fault: str | None = None, fault_message: str | None = None, env: Mapping[str, str] | None = None,
        keep_work_dir: bool = False) -> RunResult:
    """Run ``steps`` optimizer steps of ``setup`` in a fresh subprocess and measure it.

    ``device``: ``"auto"`` (CUDA when the child's torch sees one, else CPU), ``"cuda"`` (a skip when there is
    none) or ``"cpu"``. ``progress`` receives human-readable lines while it runs. ``fault`` injects a failure
    into the child (one of ``_child.FAULTS``; for testing failure handling). Never raises for what happens in
    the child: an OOM, a crash, a hang (``timeout_s``) or a missing backend are results.
    """
    setup = GRPOSetup.coerce(setup)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise GpuMemError("steps", f"must be a whole number ≥ 1, got {steps!r}", fix="e.g. steps=2")
    if device not in DEVICES:
        raise GpuMemError("device", f"{device!r} is not one of {', '.join(DEVICES)}", fix="use 'auto', 'cuda' or 'cpu'")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise GpuMemError("timeout_s", f"must be a positive number of seconds, got {timeout_s!r}", fix="e.g. 1800")
    if fault is not None:
        from .child.__main__ import FAULTS

        if fault not in FAULTS:
            raise GpuMemError("fault", f"unknown fault {fault!r}", fix=f"use one of {', '.join(FAULTS)}")
    base = {"setup": setup.to_dict(), "backend": backend_name(setup), "steps_requested": steps,
            "steps_completed": 0, "device": {"requested": device}}
    reason = skip_reason(setup, device)
    if reason is not None:
        return RunResult("skipped", reason, {**base, "status": "skipped", "reason": reason})

    extra_env, device_note = assign_cuda_device() if device != "cpu" else ({}, None)
    if env:
        extra_env = {**extra_env, **env}
    work_dir = Path(tempfile.mkdtemp(prefix="gpumem-run-"))
    try:
        request = {"setup": setup.to_dict(), "steps": steps, "device": device, "backend": backend_name(setup),
                   "work_dir": str(work_dir), "fault": fault, "fault_message": fault_message}
        request_path, result_path = work_dir / "request.json", work_dir / "result.json"
        request_path.write_text(json.dumps(request, default=str), encoding="utf-8")
        outcome = _run_child(request_path, result_path, work_dir, _child_environment(extra_env), timeout_s, progress)
    finally:
        if not keep_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    data = outcome.pop("data", None)
    if data is None:
        data = {**base, **outcome}
    else:
        data.update(outcome)
    if device_note and extra_env.get("CUDA_VISIBLE_DEVICES") is not None:
        data.setdefault("device", {})["assignment"] = device_note
    if keep_work_dir:
        data["work_dir"] = str(work_dir)
    status = data.get("status") if data.get("status") in STATUSES else "crashed"
    return RunResult(status, data.get("reason"), data)


def _run_child(request_path: Path, result_path: Path, work_dir: Path, env: dict[str, str], timeout_s: float,
               progress: ProgressCallback | None) -> dict[str, Any]:
    command = [sys.executable, "-m", "pytest_gpumem.measure.child", str(request_path), str(result_path)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=env, cwd=str(work_dir), start_new_session=True, text=True, errors="replace",
                               bufsize=1)
    tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
    progress_lines: list[str] = []

    def read_output() -> None:
        for raw in process.stdout:
            line = raw.rstrip("\n")
            if line.startswith(PROGRESS_PREFIX):
                text = _format_progress(line[len(PROGRESS_PREFIX):])
                progress_lines.append(text)
                if progress is not None:
                    try:
                        progress(text)
                    except Exception:  # noqa: BLE001 - a broken terminal writer must not stop the run
                        pass
            else:
                tail.append(line)

    reader = threading.Thread(target=read_output, name="gpumem-child-output", daemon=True)
    reader.start()
    timed_out = False
    try:
        returncode = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_process_group(process)
        returncode = process.returncode
    except BaseException:  # Ctrl-C in the parent: do not leave a GPU process behind
        _kill_process_group(process)
        raise
    reader.join(timeout=5)
    elapsed = round(time.perf_counter() - started, 3)
    last = progress_lines[-1] if progress_lines else "(no progress line)"
    outcome: dict[str, Any] = {"exit_code": returncode, "wall_s": elapsed, "progress": progress_lines[-50:],
                               "output_tail": "\n".join(tail)}
    if timed_out:
        outcome.update(status="timeout", reason=f"no result after {timeout_s:g} s (the child was killed); "
                                                f"last progress: {last}")
        return outcome
    if result_path.exists():
        try:
            outcome["data"] = json.loads(result_path.read_text(encoding="utf-8"))
            return outcome
        except ValueError as exc:
            outcome.update(status="crashed", reason=f"the child wrote an unreadable result ({exc})")
            return outcome
    outcome.update(status="crashed", reason=f"the child died with {describe_exit(returncode)} before writing a "
                                            f"result; last progress: {last}")
    return outcome


def _kill_process_group(process: subprocess.Popen) -> None:
    """SIGTERM then SIGKILL the child's own process group (it was started in a new session: vLLM helpers
    it spawned go with it; nothing else is touched)."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


# -- text output -------------------------------------------------------------------------------------------
def format_result(result: RunResult, predicted: Breakdown | None = None) -> str:
    """A human-readable report: status, the per-phase table, peaks, and predicted vs measured when given."""
    lines = [result.summary()]
    data = result.data
    tokens = data.get("tokens") or {}
    if tokens.get("prompt_max") is not None:
        lines.append(f"tokens: prompts {tokens.get('prompt_min')}–{tokens.get('prompt_max')}, completions "
                     f"{tokens.get('completion_min')}–{tokens.get('completion_max')}")
    phases = result.phases
    if phases:
        header = ("phase", "times", "seconds", "peak allocated", "peak reserved", "non-torch", "NVML peak",
                  "host RSS peak")
        rows = [header]
        for phase in [p for p in (*[ph.value for ph in Phase], "outside_phases") if p in phases]:
            stats = phases[phase]
            rows.append((phase, str(stats.get("occurrences", 0)), f"{stats.get('seconds', 0):.2f}",
                         *(format_gib(stats[k]) if stats.get(k) is not None else "—"
                           for k in ("peak_allocated_bytes", "peak_reserved_bytes", "non_torch_bytes",
                                     "nvml_peak_bytes", "peak_rss_bytes"))))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for index, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                                   for i, cell in enumerate(row)))
            if index == 0:
                lines.append("  ".join("-" * w for w in widths))
    for name, reason in sorted(result.reasons.items()):
        lines.append(f"{name}: {reason}")
    if result.oom:
        oom = result.oom
        lines.append(f"OOM in the {oom.get('phase')} phase ({oom.get('type')}): {oom.get('message', '')[:400]}")
    measured = result.breakdown
    if predicted is not None and measured is not None:
        lines.append("")
        lines.append("predicted vs measured:")
        lines.append(compare_table(predicted, measured))
    timings = data.get("timings_s") or {}
    if timings:
        parts = [f"{k} {v:.1f}s" for k, v in timings.items() if isinstance(v, (int, float))]
        if timings.get("steps"):
            parts.append("steps " + ", ".join(f"{s:.1f}s" for s in timings["steps"]))
        lines.append("timings: " + ", ".join(parts))
    for note in data.get("notes") or ():
        lines.append(f"note: {note}")
    return "\n".join(lines)
