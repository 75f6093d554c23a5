"""Measure a GRPO setup for real: N optimizer steps of TRL's ``GRPOTrainer`` in a fresh, isolated process.

:func:`run` writes a request, starts ``python -m pytest_gpumem.measure.child`` (a new process: a new CUDA
context, nothing left by earlier tests, and an OOM or a segfault there never takes the pytest session down),
streams its progress lines, enforces a timeout, and reads back one JSON result as a
:class:`~pytest_gpumem.measure.protocol.RunResult`:

``status``  ``"ok"`` | ``"oom"`` | ``"crashed"`` | ``"timeout"`` | ``"skipped"``, with ``reason``
``breakdown``  a :class:`~pytest_gpumem.breakdown.Breakdown` (``source="measure"``), phase by phase, comparable
    with the estimate's (CUDA only; ``None`` with a reason on CPU)
``peak_reserved_bytes`` / ``peak_allocated_bytes`` / ``nvml_peak_bytes``  None with a reason when not measured
``oom``  the parsed OOM message (:func:`pytest_gpumem.measure.oom_message.parse_oom`) and the phase it happened in

The wire between the two processes is :mod:`pytest_gpumem.measure.protocol`; the child never imports this
module. Under pytest-xdist, worker ``gwN`` runs its children on GPU ``N mod count`` (count from
``CUDA_VISIBLE_DEVICES`` or NVML — torch is never imported here).
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
from pathlib import Path
from typing import Any, Callable, Mapping

from ..backends import run_label
from ..errors import GpuMemError
from ..spec import GRPOSetup
from .nvml import nvml_device_count, visible_device_entries
from .protocol import DEVICES, FAULTS, PROGRESS_PREFIX, STATUSES, RunResult, format_progress

DEFAULT_TIMEOUT_S = 1800.0
OUTPUT_TAIL_LINES = 80

ProgressCallback = Callable[[str], None]


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



def skip_reason(setup: GRPOSetup, device: str) -> str | None:
    """Why this setup cannot run here, known without starting a child (importability only, no imports)."""
    backend = setup.backend_profile
    if backend.package and importlib.util.find_spec(backend.package) is None:
        return f"{backend.package} not installed"
    if setup.use_vllm:
        if setup.vllm_mode == "server":
            return "vllm_mode='server' runs vLLM on other GPUs; a run measures one process"
        if importlib.util.find_spec("vllm") is None:
            return "vllm not installed"
        if device == "cpu":
            return "vLLM colocate needs a CUDA device (device='cpu' was asked for)"
    if device == "cpu" and setup.load_in_4bit:
        return "load_in_4bit needs a CUDA device (bitsandbytes)"
    if device == "cpu" and backend.needs_cuda:
        return f"{backend.label} needs a CUDA device (device='cpu' was asked for)"
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



def run(setup: GRPOSetup | Mapping | str | Path, steps: int = 2, device: str = "auto",
        timeout_s: float = DEFAULT_TIMEOUT_S, progress: ProgressCallback | None = None, *,
        fault: str | None = None, fault_message: str | None = None, env: Mapping[str, str] | None = None,
        keep_work_dir: bool = False, fake_world_size: int | None = None) -> RunResult:
    """Run ``steps`` optimizer steps of ``setup`` in a fresh subprocess and measure it.

    ``device``: ``"auto"`` (CUDA when the child's torch sees one, else CPU), ``"cuda"`` (a skip when there is
    none) or ``"cpu"``. ``progress`` receives human-readable lines while it runs. ``fault`` injects a failure
    into the child (one of ``protocol.FAULTS``; for testing failure handling). ``fake_world_size`` N measures
    the process as rank 0 of an N-process FSDP2 job under a fake process group (``launch.run_rank0``). Never
    raises for what happens in the child: an OOM, a crash, a hang (``timeout_s``) or a missing backend are
    results.
    """
    setup = GRPOSetup.coerce(setup)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise GpuMemError("steps", f"must be a whole number ≥ 1, got {steps!r}", fix="e.g. steps=2")
    if device not in DEVICES:
        raise GpuMemError("device", f"{device!r} is not one of {', '.join(DEVICES)}", fix="use 'auto', 'cuda' or 'cpu'")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise GpuMemError("timeout_s", f"must be a positive number of seconds, got {timeout_s!r}", fix="e.g. 1800")
    if fault is not None:
        if fault not in FAULTS:
            raise GpuMemError("fault", f"unknown fault {fault!r}", fix=f"use one of {', '.join(FAULTS)}")
    base = {"setup": setup.to_dict(), "backend": run_label(setup), "steps_requested": steps,
            "steps_completed": 0, "device": {"requested": device}}
    reason = skip_reason(setup, device)
    if reason is not None:
        return RunResult("skipped", reason, {**base, "status": "skipped", "reason": reason})

    extra_env, device_note = assign_cuda_device() if device != "cpu" else ({}, None)
    if env:
        extra_env = {**extra_env, **env}
    work_dir = Path(tempfile.mkdtemp(prefix="gpumem-run-"))
    try:
        request = {"setup": setup.to_dict(), "steps": steps, "device": device, "backend": run_label(setup),
                   "work_dir": str(work_dir), "fault": fault, "fault_message": fault_message}
        if fake_world_size:
            request["fake_world_size"] = int(fake_world_size)
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
               progress: ProgressCallback | None, command: list[str] | None = None) -> dict[str, Any]:
    """Start ``command`` (default: one measurement child; ``launch.run_ranks``: accelerate launching N of
    them) in its own session, stream its progress lines, enforce the timeout, read ``result_path``."""
    if command is None:
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
                text = format_progress(line[len(PROGRESS_PREFIX):])
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
