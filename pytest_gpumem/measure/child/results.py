"""What the child writes: the figures at the end of a run, the OOM or crash record, the software versions, and
the exact bytes of what lives for the whole run."""

from __future__ import annotations

import platform
import sys
import traceback
from typing import TYPE_CHECKING

from ...versions import PACKAGE_VERSION, installed_versions
from ..nvml import nvml
from ..oom_message import parse_oom
from ..protocol import measured_breakdown
from ..sampler import PhaseTracker
from ..snapshot import MemorySnapshot

if TYPE_CHECKING:
    from .process import Child


class Skip(Exception):
    """The run cannot happen here (no CUDA device, backend not installed): a skip with its reason."""


def is_oom(exc: BaseException, torch_module) -> bool:
    """torch's OutOfMemoryError, an "out of memory" text, or one of vLLM's start-up refusals."""
    if torch_module is not None:
        types = tuple(t for t in (getattr(torch_module, "OutOfMemoryError", None),
                                  getattr(getattr(torch_module, "cuda", None), "OutOfMemoryError", None)) if t)
        if types and isinstance(exc, types):
            return True
    text = str(exc)
    if "out of memory" in text.lower():
        return True
    try:  # vLLM's start-up refusals ("Free memory on device ...", "... KV cache ...") are OOMs too
        return parse_oom(text) is not None
    except Exception:  # noqa: BLE001 - a parser problem must not hide the run's own failure
        return False


def parse_oom_text(text: str) -> tuple[dict | None, str | None]:
    """The OOM message parsed (:func:`~pytest_gpumem.measure.oom_message.parse_oom`), else the reason why not."""
    try:
        parsed = parse_oom(text)
    except Exception as exc:  # noqa: BLE001
        return None, f"the OOM parser failed: {type(exc).__name__}: {exc}"
    if parsed is None:
        return None, "the OOM parser found no OOM message in the text"
    return (parsed.to_dict() if hasattr(parsed, "to_dict") else dict(vars(parsed))), None


def versions() -> dict[str, str | None]:
    """The software the run used (package metadata, the torch build's CUDA, the NVIDIA driver)."""
    result: dict[str, str | None] = {"python": platform.python_version(), "pytest_gpumem": PACKAGE_VERSION}
    result.update(installed_versions(("torch", "transformers", "trl", "peft", "accelerate", "datasets", "vllm",
                                      "unsloth", "bitsandbytes", "tokenizers", "nvidia-ml-py")))
    torch = sys.modules.get("torch")
    if torch is not None:
        result["torch_cuda"] = getattr(torch.version, "cuda", None)
    module, _ = nvml()
    if module is not None:
        try:
            driver = module.nvmlSystemGetDriverVersion()
            result["nvidia_driver"] = driver.decode() if isinstance(driver, bytes) else str(driver)
        except module.NVMLError:
            result["nvidia_driver"] = None
    return result


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (a storage shared by several counts once; meta tensors hold none)."""
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if tensor is None or not hasattr(tensor, "data_ptr"):
            continue
        key = tensor.data_ptr()
        if key in seen or tensor.device.type == "meta":
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (AdamW exp_avg/exp_avg_sq, bnb 8-bit states)."""
    if optimizer is None:
        return 0
    tensors = []
    for state in getattr(optimizer, "state", {}).values():
        if isinstance(state, dict):
            tensors.extend(v for v in state.values() if hasattr(v, "data_ptr") and v.dim() > 0)
    return tensor_bytes(tensors)


def gradient_bytes(model) -> int:
    return tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)



def failed_phase(child: Child) -> str:
    if child.tracker is not None and child.tracker.failed_phase is not None:
        phase = child.tracker.failed_phase
        return "between_phases" if phase == PhaseTracker.OUTSIDE else phase
    return "setup"


def record_oom(child: Child, exc: BaseException) -> None:
    message = str(exc)
    parsed, parse_reason = parse_oom_text(message)
    oom = {"phase": failed_phase(child), "stage": child.result["stage"], "type": type(exc).__name__,
           "message": message[-4000:], "parsed": parsed, "parse_reason": parse_reason}
    if child.cuda:
        snapshot = child.snapshot()  # before anything is freed: what was held at the failure
        oom["snapshot"] = snapshot.to_dict()
    child.result["status"], child.result["oom"] = "oom", oom
    child.result["reason"] = f"out of memory in the {oom['phase']} phase: {message.splitlines()[0][:300]}"
    child.progress(child.result["reason"])
    exc.__traceback__ = None  # frames hold tensors (docs/anchors.md: clear them after an OOM)


def record_crash(child: Child, exc: BaseException) -> None:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    child.result["status"] = "crashed"
    child.result["reason"] = f"{type(exc).__name__} in stage {child.result['stage']}: {str(exc)[:500]}"
    child.result["exception"] = {"type": type(exc).__name__, "message": str(exc)[:4000],
                                "phase": failed_phase(child) if child.tracker else None,
                                "traceback_tail": "".join(lines)[-6000:]}
    child.progress(child.result["reason"])


def finish_measurements(child: Child) -> None:
    """Close the samplers and the tracker and write every measured figure (or why it is missing) into the
    result, with the measured breakdown (``protocol.measured_breakdown``)."""
    gpu = child.result["gpu"]
    tracker = child.tracker
    if tracker is not None:
        for sampler in tracker.samplers:
            sampler.stop()
        tracker.finish()
        child.result["phases"] = tracker.to_dict()
        for sampler in tracker.samplers:
            key = "nvml_sampler" if sampler.name == "nvml" else "rss_sampler"
            (gpu if sampler.name == "nvml" else child.result["host_memory"])[key] = sampler.to_dict(max_points=200)
    # getrusage's high-water mark is updated lazily by Linux: the sampler can have seen more
    peaks = [MemorySnapshot(use_torch=False).host_peak_rss_bytes]
    if tracker is not None:
        peaks += [s.peak_bytes for s in tracker.samplers if s.name == "rss"]
    child.result["host_memory"]["peak_rss_bytes"] = max((p for p in peaks if p is not None), default=None)
    if child.snapshots:
        gpu["snapshots"] = child.snapshots
    if not child.cuda:
        reason = child.gpu_reason or "not measured: the run did not reach the device check"
        for name in ("peak_reserved_bytes", "peak_allocated_bytes", "nvml_peak_bytes", "non_torch_bytes"):
            gpu[name] = None
            gpu["reasons"][name] = reason
        child.result["breakdown"] = None
        gpu["reasons"]["breakdown"] = reason
        return
    if tracker is not None:
        gpu["peak_reserved_bytes"] = tracker.overall_peak_reserved_bytes
        gpu["peak_allocated_bytes"] = tracker.overall_peak_allocated_bytes
        gpu["non_torch_bytes"] = tracker.overall_non_torch_bytes
        nvml_sampler = next((s for s in tracker.samplers if s.name == "nvml"), None)
        gpu["nvml_peak_bytes"] = nvml_sampler.peak_bytes if nvml_sampler else None
        if nvml_sampler is None:
            gpu["reasons"].setdefault("nvml_peak_bytes", "NVML sampler not running")
    else:
        for name in ("peak_reserved_bytes", "peak_allocated_bytes", "nvml_peak_bytes", "non_torch_bytes"):
            gpu[name] = None
            gpu["reasons"][name] = f"not measured: the run stopped in stage {child.result['stage']}"
    if child.nvml_baseline is not None and child.nvml_baseline.get("api") == "v2":
        gpu["other_processes_bytes_at_start"] = int(child.nvml_baseline["used"])
    try:
        breakdown, notes = measured_breakdown(child.result)
    except Exception as exc:  # noqa: BLE001 - the raw figures are still worth returning
        breakdown, notes = None, [f"breakdown failed: {type(exc).__name__}: {exc}"]
    child.result["breakdown"] = breakdown.to_dict() if breakdown is not None else None
    child.result["notes"].extend(notes)


def measure_persistent_parts(child: Child, trainer) -> None:
    """Exact tensor bytes of what lives for the whole run: policy weights, LoRA adapters, reference model."""
    model = trainer.model
    lora, weights = [], []
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        (lora if "lora_" in name else weights).append(tensor)
    parts = {"weights_bytes": tensor_bytes(weights), "lora_bytes": tensor_bytes(lora)}
    ref = getattr(trainer, "ref_model", None)
    parts["reference_bytes"] = tensor_bytes(list(ref.parameters()) + list(ref.buffers())) if ref is not None else 0
    if child.cuda:
        on_device = [t for t in weights if t.device.type == "cuda"]
        parts["weights_bytes"] = tensor_bytes(on_device)
    child.result["gpu" if child.cuda else "host_memory"]["persistent_tensors"] = parts
    child.persistent_parts = parts
