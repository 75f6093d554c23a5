"""``gpumem validate``: measure a matrix of real setups on the GPU at hand and commit the truth.

The matrix (:func:`build_matrix`) spans 0.5B–8B architectures of the registry, full fine-tuning (fp32 as TRL
loads a model by name, and bf16), LoRA and — when bitsandbytes is installed — QLoRA, gradient checkpointing
on and off, a reference model (``beta > 0``), foreach vs fused AdamW, longer sequences, gradient
accumulation, HF ``generate`` and — when vLLM is installed — vLLM colocate with sleep mode on and off. It is
sized to the GPU: a setup is kept when the estimate says it fits in :data:`FIT_FRACTION` of the card (else a
smaller-shape variant is tried), so a run measures a peak rather than an OOM.

Each setup runs through :func:`pytest_gpumem.measure.runner.run` (a fresh process each) and the results are written
*as they come* to ``validation/<gpu>-<date>.json`` (setup, the estimate at the time, the measurement per
phase, versions) with a Markdown table next to it; a rerun on the same day resumes where it stopped. The
test ``tests/test_validation_files.py`` checks the current estimator against every committed file
(:func:`check_file`), so GPU truth accumulates in the repository.

What is compared: the estimate's peak (its worst phase's total) against the measured worst phase's
reserved peak + non-torch memory. Non-torch is included because that is where vLLM's sleep-mode pool, NCCL
and cuBLAS live, and because an OOM is about the total; the reserved-only figures are in the table too.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import GpuMemError
from ..measure.child.tiny import TINY_QWEN2_CONFIG
from ..measure.nvml import nvml, nvml_handle, nvml_memory
from ..measure.runner import run as run_setup
from ..predict.analytic import estimate
from ..spec import GRPOSetup
from ..units import format_gib
from .plan import expected_seconds

SCHEMA = "pytest-gpumem/validation/1"
#: |predicted − measured| / measured allowed for a committed measurement (the CI gate)
DEFAULT_TOLERANCE = 0.15
#: a setup is run when its estimate fits in this fraction of the GPU (leaves room for the estimate's error)
FIT_FRACTION = 0.85
MIN_SETUPS = 12
DEFAULT_STEPS = 2

# the common shape: 8 completions of 256 + 256 tokens per micro-batch (TRL's b = G = 8)
_BASE = {"per_device_train_batch_size": 8, "num_generations": 8, "max_prompt_length": 256,
         "max_completion_length": 256}
# the fallback shape for a card too small for the common one
_SMALL = {"per_device_train_batch_size": 4, "num_generations": 4, "max_prompt_length": 128,
          "max_completion_length": 128}
_LORA = {"lora_rank": 16, "lora_target_modules": "all-linear"}
_BF16 = {"dtype": "bfloat16"}

#: (name, setup fields, requirement): requirement None, "bitsandbytes" or "vllm"
CANDIDATES: list[tuple[str, dict[str, Any], str | None]] = [
    ("qwen2.5-0.5b-full-bf16-gc", {"model": "Qwen/Qwen2.5-0.5B", **_BF16}, None),
    ("qwen2.5-0.5b-full-bf16-nogc", {"model": "Qwen/Qwen2.5-0.5B", **_BF16, "gradient_checkpointing": False}, None),
    ("qwen2.5-0.5b-full-fp32-gc", {"model": "Qwen/Qwen2.5-0.5B", "dtype": "float32"}, None),
    ("qwen2.5-0.5b-lora16-bf16-gc", {"model": "Qwen/Qwen2.5-0.5B", **_BF16, **_LORA}, None),
    ("qwen2.5-0.5b-full-bf16-gc-long", {"model": "Qwen/Qwen2.5-0.5B", **_BF16, "max_prompt_length": 512,
                                        "max_completion_length": 1024}, None),
    ("qwen2.5-0.5b-full-bf16-gc-ga2", {"model": "Qwen/Qwen2.5-0.5B", **_BF16, "gradient_accumulation_steps": 2},
     None),
    ("qwen3-0.6b-full-bf16-gc-beta", {"model": "Qwen/Qwen3-0.6B", **_BF16, "beta": 0.04}, None),
    ("llama-3.2-1b-lora16-bf16-gc", {"model": "meta-llama/Llama-3.2-1B", **_BF16, **_LORA}, None),
    ("llama-3.2-1b-full-bf16-nogc", {"model": "meta-llama/Llama-3.2-1B", **_BF16, "gradient_checkpointing": False},
     None),
    ("gemma-3-1b-lora16-bf16-gc", {"model": "google/gemma-3-1b-it", **_BF16, **_LORA}, None),
    ("qwen2.5-1.5b-full-bf16-gc-foreach", {"model": "Qwen/Qwen2.5-1.5B", **_BF16, "optim": "adamw_torch"}, None),
    ("qwen2.5-1.5b-qlora16-gc", {"model": "Qwen/Qwen2.5-1.5B", **_BF16, **_LORA, "load_in_4bit": True},
     "bitsandbytes"),
    ("qwen3-1.7b-lora16-bf16-gc", {"model": "Qwen/Qwen3-1.7B", **_BF16, **_LORA}, None),
    ("llama-3.2-3b-lora16-bf16-gc", {"model": "meta-llama/Llama-3.2-3B", **_BF16, **_LORA}, None),
    ("qwen2.5-3b-full-bf16-gc", {"model": "Qwen/Qwen2.5-3B", **_BF16}, None),
    ("qwen3-4b-lora16-bf16-nogc", {"model": "Qwen/Qwen3-4B", **_BF16, **_LORA, "gradient_checkpointing": False},
     None),
    ("qwen2.5-7b-lora16-bf16-gc", {"model": "Qwen/Qwen2.5-7B", **_BF16, **_LORA}, None),
    ("llama-3.1-8b-qlora16-gc", {"model": "meta-llama/Llama-3.1-8B", **_BF16, **_LORA, "load_in_4bit": True},
     "bitsandbytes"),
    ("llama-3.1-8b-lora16-bf16-gc", {"model": "meta-llama/Llama-3.1-8B", **_BF16, **_LORA}, None),
    ("qwen2.5-0.5b-vllm-lora16", {"model": "Qwen/Qwen2.5-0.5B", **_BF16, **_LORA, "use_vllm": True}, "vllm"),
    ("llama-3.2-1b-vllm-full-bf16", {"model": "meta-llama/Llama-3.2-1B", **_BF16, "use_vllm": True}, "vllm"),
    ("qwen2.5-1.5b-vllm-sleep-full-bf16", {"model": "Qwen/Qwen2.5-1.5B", **_BF16, "use_vllm": True,
                                           "vllm_enable_sleep_mode": True}, "vllm"),
]
#: the pipeline check: runs anywhere (CPU included) in seconds
SMOKE = ("tiny-qwen2-smoke", {"model": dict(TINY_QWEN2_CONFIG), "per_device_train_batch_size": 4,
                              "num_generations": 4, "max_prompt_length": 32, "max_completion_length": 16,
                              "dtype": "float32"}, None)


@dataclass(frozen=True)
class MatrixEntry:
    name: str
    setup: GRPOSetup
    requires: str | None
    predicted_peak_bytes: int | None
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "setup": self.setup.to_dict(), "requires": self.requires,
                "predicted_peak_bytes": self.predicted_peak_bytes, "why": self.why}


def available_extras() -> dict[str, bool]:
    import importlib.util

    return {"vllm": importlib.util.find_spec("vllm") is not None,
            "bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None}


def _predicted_peak(setup: GRPOSetup, total_bytes: int) -> tuple[int, bool]:
    result = estimate(setup, gpu=total_bytes)
    refused = any(w.startswith("vLLM would refuse") for w in result.warnings)
    return result.peak_bytes, refused


def build_matrix(total_bytes: int, extras: Mapping[str, bool] | None = None,
                 fit_fraction: float = FIT_FRACTION, only: Iterable[str] | None = None) -> list[MatrixEntry]:
    """The setups to measure on a GPU of ``total_bytes`` (torch's total), with what is installed."""
    extras = available_extras() if extras is None else extras
    wanted = set(only) if only else None
    entries: list[MatrixEntry] = []
    for name, fields, requires in CANDIDATES + [SMOKE]:
        if wanted is not None and name not in wanted:
            continue
        if wanted is None and name == SMOKE[0]:
            continue  # the smoke entry runs only when asked for
        if requires is not None and not extras.get(requires, False):
            continue
        for shape, label in ((_BASE, "common shape"), (_SMALL, "smaller shape: the common one does not fit")):
            data = {**shape, **fields} if name != SMOKE[0] else dict(fields)
            setup = GRPOSetup.from_dict(data)
            peak, refused = _predicted_peak(setup, total_bytes)
            if not refused and peak <= fit_fraction * total_bytes:
                entries.append(MatrixEntry(name if label == "common shape" else f"{name}-small", setup, requires,
                                           peak, f"{label}; predicted {format_gib(peak)} of {format_gib(total_bytes)}"))
                break
            if name == SMOKE[0]:
                break
    return entries


# -- the GPU at hand ---------------------------------------------------------------------------------------
def gpu_at_hand() -> dict[str, Any]:
    """Name and usable total of CUDA device 0 from NVML (torch is not imported in this process)."""
    handle, _how, reason = nvml_handle(0)
    if handle is None:
        raise GpuMemError("gpu", f"no GPU to validate on: {reason}",
                          fix="run on a machine with an NVIDIA GPU, or name the card to plan for it here: "
                              "--gpu H200 --plan (or --list)")
    module, _ = nvml()
    name = module.nvmlDeviceGetName(handle)
    name = name.decode() if isinstance(name, bytes) else str(name)
    info, reason = nvml_memory(handle)
    if info is None:
        raise GpuMemError("gpu", f"cannot read the GPU's memory: {reason}", fix="check the NVIDIA driver")
    # cudaMemGetInfo's total (what torch calls total capacity) is NVML's total minus driver-reserved memory
    usable = info["total"] - info.get("reserved", 0)
    return {"name": name, "total_bytes": usable, "nvml_total_bytes": info["total"], "source": f"nvml {info['api']}"}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def output_path(out_dir: Path, gpu_name: str, date: _dt.date | None = None) -> Path:
    date = date or _dt.date.today()
    return Path(out_dir) / f"{slug(gpu_name)}-{date.isoformat()}.json"


# -- running and writing ---------------------------------------------------------------------------------
def _measured_record(result) -> dict[str, Any]:
    data = result.to_dict()
    phases = {phase: {k: v for k, v in stats.items() if k != "context_at_peak"}
              for phase, stats in (data.get("phases") or {}).items()}
    return {
        "status": result.status, "reason": result.reason, "steps_completed": result.steps_completed,
        "peak_reserved_bytes": result.peak_reserved_bytes, "peak_allocated_bytes": result.peak_allocated_bytes,
        "non_torch_bytes": result.non_torch_bytes, "nvml_peak_bytes": result.nvml_peak_bytes,
        "peak_total_bytes": result.peak_total_bytes, "breakdown": data.get("breakdown"), "phases": phases,
        "oom": data.get("oom"), "reasons": result.reasons, "device": data.get("device"),
        "backend": data.get("backend"), "tokens": data.get("tokens"), "timings_s": data.get("timings_s"),
        "notes": data.get("notes"), "gpu_extra": {k: v for k, v in (data.get("gpu") or {}).items()
                                                  if k in ("vllm_init", "persistent_tensors", "cuda_context_bytes",
                                                           "cuda_context_source", "other_processes_bytes_at_start")},
    }


def _estimate_record(setup: GRPOSetup, total_bytes: int | None) -> dict[str, Any]:
    try:
        return estimate(setup, gpu=total_bytes).to_dict()
    except Exception as exc:  # noqa: BLE001 - the measurement is worth keeping without an estimate
        return {"error": f"{type(exc).__name__}: {exc}"}


def new_document(gpu: Mapping[str, Any], steps: int, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    return {"schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "gpu": dict(gpu), "steps": steps, "tolerance": tolerance, "versions": {},
            "platform": {"system": platform.system(), "machine": platform.machine(),
                         "python": platform.python_version()},
            "entries": []}


def run_matrix(entries: list[MatrixEntry], path: Path, gpu: Mapping[str, Any], *, device: str = "cuda",
               steps: int = DEFAULT_STEPS, timeout_s: float = 900, resume: bool = True,
               max_seconds: float | None = None, progress: Callable[[str], None] | None = None,
               runner: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Measure ``entries`` one by one, rewriting ``path`` (and its ``.md``) after each.

    ``resume``: entries already in the file with status ok/oom are kept and not rerun. ``max_seconds``: the
    session's budget — a run is not started when its expected time (:func:`~.plan.expected_seconds`) no longer
    fits what is left, and a started run's timeout is cut to what is left, so the budget holds; every finished
    run is already written. The next call resumes. Returns the document.
    """
    runner = runner or run_setup
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = load_validation(path) if resume and path.exists() else new_document(gpu, steps)
    done = {entry["name"] for entry in document["entries"] if entry["status"] in ("ok", "oom")}
    started = time.monotonic()
    for index, entry in enumerate(entries, 1):
        if entry.name in done:
            continue
        run_timeout_s = timeout_s
        if max_seconds is not None:
            left = max_seconds - (time.monotonic() - started)
            expected = expected_seconds(entry.setup, steps)
            if expected > left:
                if progress:
                    progress(f"time budget: {entry.name} is expected to take {expected:.0f}s, {max(left, 0):.0f}s "
                             "left: skipped (rerun to resume)")
                continue
            run_timeout_s = min(timeout_s, left)
        if progress:
            progress(f"[{index}/{len(entries)}] {entry.name}: {entry.why}")
        result = runner(entry.setup, steps=steps, device=device, timeout_s=run_timeout_s, progress=progress)
        total = (result.data.get("device") or {}).get("total_bytes") or gpu.get("total_bytes")
        if (result.data.get("device") or {}).get("total_bytes"):
            document["gpu"]["torch_total_bytes"] = result.data["device"]["total_bytes"]
            document["gpu"]["name"] = result.data["device"].get("name") or document["gpu"].get("name")
        record = {"name": entry.name, "why": entry.why, "setup": entry.setup.to_dict(),
                  "estimate": _estimate_record(entry.setup, total), "status": result.status,
                  "measured": _measured_record(result)}
        if result.data.get("versions"):
            document["versions"] = result.data["versions"]
        document["entries"] = [e for e in document["entries"] if e["name"] != entry.name] + [record]
        write_validation(path, document)
        if progress:
            progress(f"[{index}/{len(entries)}] {entry.name}: {result.summary()}")
    write_validation(path, document)
    return document


def write_validation(path: Path, document: Mapping[str, Any]) -> None:
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    path.with_suffix(".md").write_text(markdown_table(document), encoding="utf-8")


# -- reading and checking ---------------------------------------------------------------------------------
_REQUIRED_TOP = {"schema": str, "created": str, "gpu": dict, "steps": int, "tolerance": (int, float),
                 "versions": dict, "entries": list}
_REQUIRED_ENTRY = {"name": str, "setup": dict, "estimate": dict, "status": str, "measured": dict}
_REQUIRED_MEASURED = ("status", "steps_completed", "peak_reserved_bytes", "peak_total_bytes", "breakdown",
                      "phases", "reasons")


def schema_problems(document: Any) -> list[str]:
    """Everything wrong with a validation document's shape (empty list: valid)."""
    problems: list[str] = []
    if not isinstance(document, Mapping):
        return [f"the document is a {type(document).__name__}, not an object"]
    for key, kind in _REQUIRED_TOP.items():
        if key not in document:
            problems.append(f"missing top-level key {key!r}")
        elif not isinstance(document[key], kind):
            problems.append(f"{key!r} has type {type(document[key]).__name__}")
    if document.get("schema") not in (None, SCHEMA) and isinstance(document.get("schema"), str):
        problems.append(f"unknown schema {document['schema']!r} (expected {SCHEMA!r})")
    gpu = document.get("gpu")
    if isinstance(gpu, Mapping):
        if not isinstance(gpu.get("name"), str):
            problems.append("gpu.name missing")
        if not isinstance(gpu.get("total_bytes"), int) or gpu.get("total_bytes", 0) <= 0:
            problems.append("gpu.total_bytes missing or not a positive integer")
    names = set()
    for index, entry in enumerate(document.get("entries") or []):
        where = f"entries[{index}]"
        if not isinstance(entry, Mapping):
            problems.append(f"{where} is not an object")
            continue
        for key, kind in _REQUIRED_ENTRY.items():
            if key not in entry:
                problems.append(f"{where}: missing {key!r}")
            elif not isinstance(entry[key], kind):
                problems.append(f"{where}.{key} has type {type(entry[key]).__name__}")
        if entry.get("name") in names:
            problems.append(f"{where}: duplicate name {entry.get('name')!r}")
        names.add(entry.get("name"))
        if entry.get("status") not in ("ok", "oom", "crashed", "timeout", "skipped"):
            problems.append(f"{where}: unknown status {entry.get('status')!r}")
        measured = entry.get("measured")
        if isinstance(measured, Mapping):
            problems.extend(f"{where}.measured: missing {key!r}" for key in _REQUIRED_MEASURED if key not in measured)
            if entry.get("status") == "ok" and (measured.get("device") or {}).get("type") == "cuda":
                if not isinstance(measured.get("peak_total_bytes"), int):
                    problems.append(f"{where}: an ok CUDA run without peak_total_bytes")
        if isinstance(entry.get("setup"), Mapping):
            try:
                GRPOSetup.from_dict(entry["setup"])
            except GpuMemError as exc:
                problems.append(f"{where}.setup is not a valid setup: {exc}")
    return problems


def load_validation(path: Path) -> dict[str, Any]:
    """Read and schema-check a validation file; ``ValueError`` lists every problem."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from None
    problems = schema_problems(document)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return document


@dataclass(frozen=True)
class EntryCheck:
    name: str
    status: str
    checked: bool
    ok: bool
    predicted_bytes: int | None
    measured_bytes: int | None
    relative_error: float | None
    message: str


def check_entry(entry: Mapping[str, Any], gpu_total_bytes: int, tolerance: float) -> EntryCheck:
    """The current estimator against one committed measurement."""
    name, status = entry["name"], entry["status"]
    measured = entry["measured"]
    device_type = (measured.get("device") or {}).get("type")
    if status not in ("ok", "oom"):
        return EntryCheck(name, status, False, True, None, None, None, f"not checked: the run ended {status}")
    if device_type != "cuda":
        return EntryCheck(name, status, False, True, None, None, None,
                          f"not checked: measured on {device_type or 'no device'}, no GPU peak")
    setup = GRPOSetup.from_dict(entry["setup"])
    predicted = estimate(setup, gpu=gpu_total_bytes)
    if status == "oom":
        ok = predicted.peak_bytes >= (1 - tolerance) * gpu_total_bytes
        message = (f"OOM measured; predicted peak {format_gib(predicted.peak_bytes)} of "
                   f"{format_gib(gpu_total_bytes)}" + ("" if ok else " — the estimate says it fits comfortably"))
        return EntryCheck(name, status, True, ok, predicted.peak_bytes, None, None, message)
    measured_bytes = measured.get("peak_total_bytes")
    if not measured_bytes:
        return EntryCheck(name, status, False, True, predicted.peak_bytes, None, None,
                          "not checked: no measured peak")
    error = (predicted.peak_bytes - measured_bytes) / measured_bytes
    ok = abs(error) <= tolerance
    message = (f"predicted {format_gib(predicted.peak_bytes)} ({predicted.peak_phase}) vs measured "
               f"{format_gib(measured_bytes)} ({(measured.get('breakdown') or {}).get('peak_phase')}): "
               f"{error:+.1%} (tolerance ±{tolerance:.0%})")
    return EntryCheck(name, status, True, ok, predicted.peak_bytes, measured_bytes, error, message)


def check_file(document: Mapping[str, Any], tolerance: float | None = None) -> list[EntryCheck]:
    gpu = document["gpu"]
    total = int(gpu.get("torch_total_bytes") or gpu["total_bytes"])
    tolerance = float(document.get("tolerance", DEFAULT_TOLERANCE)) if tolerance is None else tolerance
    return [check_entry(entry, total, tolerance) for entry in document["entries"]]


def markdown_table(document: Mapping[str, Any]) -> str:
    gpu = document["gpu"]
    total = gpu.get("torch_total_bytes") or gpu.get("total_bytes")
    versions = document.get("versions") or {}
    lines = [f"# Validation on {gpu.get('name')} ({format_gib(total) if total else '?'})", "",
             f"Created {document.get('created')}; {document.get('steps')} optimizer steps per setup; "
             + ", ".join(f"{k} {v}" for k, v in versions.items() if v and k in
                         ("torch", "transformers", "trl", "peft", "vllm", "bitsandbytes", "nvidia_driver")),
             "", "Measured = worst phase's peak reserved + non-torch; predicted = the estimate at the time.", "",
             "| setup | status | predicted peak | measured peak (reserved + non-torch) | peak reserved | NVML peak "
             "| error | measured peak phase |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in document.get("entries", []):
        measured = entry.get("measured") or {}
        predicted = (entry.get("estimate") or {}).get("peak_bytes")
        total_measured = measured.get("peak_total_bytes")
        error = (f"{(predicted - total_measured) / total_measured:+.1%}" if predicted and total_measured else "")
        status = entry.get("status")
        if status != "ok":
            status = f"{status}: {(measured.get('reason') or '')[:80]}"
        cells = [entry.get("name"), status, _gib_or_dash(predicted), _gib_or_dash(total_measured),
                 _gib_or_dash(measured.get("peak_reserved_bytes")), _gib_or_dash(measured.get("nvml_peak_bytes")),
                 error, str((measured.get("breakdown") or {}).get("peak_phase") or "")]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _gib_or_dash(value) -> str:
    return format_gib(value) if value else "—"
