"""The GPU at hand, found without importing torch: is there one, what is it, and what else is on the machine.

``cuda_available`` and ``device_gpu`` read torch only when the process already imported it, NVML otherwise
(reading CUDA state from a process that never touched the GPU would create a CUDA context there, ≈ 0.3–0.6
GiB, docs/memory-model.md §6).
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from typing import Any

from ..gpus import GPU
from ..versions import installed_versions
from .nvml import nvml, nvml_device_count, nvml_handle, nvml_memory

#: packages whose versions change GPU memory, reported without importing them (importlib.metadata)
REPORTED_PACKAGES = ("pytest-gpumem", "pytest", "torch", "transformers", "trl", "peft", "accelerate", "vllm",
                     "unsloth", "bitsandbytes", "liger-kernel", "nvidia-ml-py")


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
    count, _ = nvml_device_count()
    return bool(count)


def device_gpu(device_index: int = 0):
    """The :class:`~pytest_gpumem.gpus.GPU` of the CUDA device (name and the total torch reports), or None."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                props = torch.cuda.get_device_properties(device_index)
                return GPU(props.name, int(props.total_memory), "torch")
        except Exception:
            pass
    handle, _, _ = nvml_handle(device_index)
    if handle is None:
        return None
    info, _ = nvml_memory(handle)
    if info is None:
        return None
    module, _ = nvml()
    try:
        name = module.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        name = f"CUDA device {device_index}"
    return GPU(name, int(info["total"]), "nvidia-smi")


def visible_gpus() -> tuple[list[dict[str, Any]], str | None]:
    """The devices NVML sees (name, total), or ``([], why not)`` — never imports torch."""
    count, reason = nvml_device_count()
    if not count:
        return [], reason or "NVML sees no device"
    module, _ = nvml()
    gpus = []
    for index in range(count):
        try:
            handle = module.nvmlDeviceGetHandleByIndex(index)
            name = module.nvmlDeviceGetName(handle)
            info, _ = nvml_memory(handle)
        except Exception as exc:  # one unreadable device must not lose the report
            gpus.append({"index": index, "name": None, "total_bytes": None, "error": str(exc)})
            continue
        gpus.append({"index": index, "name": name.decode() if isinstance(name, bytes) else str(name),
                     "total_bytes": info["total"] if info else None})
    return gpus, None


def environment() -> dict[str, Any]:
    """The machine a session ran on, for its JSON report: Python, platform, host, package versions, GPUs."""
    gpus, reason = visible_gpus()
    return {"python": sys.version.split()[0], "platform": platform.platform(), "hostname": socket.gethostname(),
            "packages": installed_versions(REPORTED_PACKAGES), "gpus": gpus, "gpus_reason": reason}
