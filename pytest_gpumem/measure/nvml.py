"""NVML, read without torch: the device count, a device's memory and this process's share of it.

``nvml()`` initialises NVML once per process; the no-driver case is ``pynvml.NVMLError_LibraryNotFound``
(docs/cpu-simulation.md). NVML is read through ``nvidia-ml-py`` (module ``pynvml``), imported when first
asked for. NVML ignores ``CUDA_VISIBLE_DEVICES`` and numbers devices in PCI order; :func:`nvml_handle` maps
CUDA's index in this process to NVML's device. Per-process figures: ``nvmlDeviceGetComputeRunningProcesses``
reports host PIDs, so inside a container ``os.getpid()`` never matches (the snapshot then falls back to a
device-level delta from a baseline).
"""

from __future__ import annotations

import os
import threading
from typing import Any

_nvml_lock = threading.Lock()
_nvml_state: dict[str, Any] = {}


def nvml() -> tuple[Any, str | None]:
    """``(pynvml, None)`` once NVML is initialised, else ``(None, reason)``. Initialises once per process."""
    with _nvml_lock:
        if "module" in _nvml_state:
            return _nvml_state["module"], _nvml_state["reason"]
        module, reason = None, None
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
        else:
            try:
                pynvml.nvmlInit()
                module = pynvml
            except pynvml.NVMLError_LibraryNotFound:
                reason = "NVML library not found (no NVIDIA driver on this machine)"
            except pynvml.NVMLError_DriverNotLoaded:
                reason = "NVML: the NVIDIA driver is not loaded"
            except pynvml.NVMLError as exc:
                reason = f"NVML could not initialise: {exc}"
            except OSError as exc:  # a broken libnvidia-ml.so
                reason = f"NVML could not be loaded: {exc}"
        _nvml_state.update(module=module, reason=reason)
        return module, reason


def _reset_nvml_cache_for_tests() -> None:
    with _nvml_lock:
        _nvml_state.clear()


def visible_device_entries(environ: dict | None = None) -> list[str] | None:
    """The entries of ``CUDA_VISIBLE_DEVICES`` (``None`` when unset: every device is visible)."""
    environ = os.environ if environ is None else environ
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    entries = [entry.strip() for entry in value.split(",")]
    # CUDA stops at the first invalid entry ("-1" hides everything after it)
    visible = []
    for entry in entries:
        if not entry or entry.startswith("-"):
            break
        visible.append(entry)
    return visible


def nvml_handle(cuda_index: int = 0, uuid: str | None = None) -> tuple[Any, str | None, str | None]:
    """NVML handle of the device that CUDA calls ``cuda_index`` in this process.

    NVML ignores ``CUDA_VISIBLE_DEVICES`` and numbers devices in PCI order, CUDA renumbers the visible ones
    (fastest first by default). The match is made, best first, by the device UUID torch reports, by the
    UUID or index written in ``CUDA_VISIBLE_DEVICES``, or by the bare index. Returns
    ``(handle, how_matched, None)`` or ``(None, None, reason)``.
    """
    module, reason = nvml()
    if module is None:
        return None, None, reason
    try:
        if uuid:
            return module.nvmlDeviceGetHandleByUUID(uuid), "uuid", None
        entries = visible_device_entries()
        if entries is not None:
            if cuda_index >= len(entries):
                return None, None, (f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} has no "
                                    f"device {cuda_index}")
            entry = entries[cuda_index]
            if entry.isascii() and entry.isdigit():
                return module.nvmlDeviceGetHandleByIndex(int(entry)), "CUDA_VISIBLE_DEVICES index", None
            return module.nvmlDeviceGetHandleByUUID(entry), "CUDA_VISIBLE_DEVICES uuid", None
        return module.nvmlDeviceGetHandleByIndex(cuda_index), "index", None
    except module.NVMLError as exc:
        return None, None, f"NVML has no handle for CUDA device {cuda_index}: {exc}"


def nvml_device_count() -> tuple[int | None, str | None]:
    module, reason = nvml()
    if module is None:
        return None, reason
    try:
        return int(module.nvmlDeviceGetCount()), None
    except module.NVMLError as exc:
        return None, f"NVML device count failed: {exc}"


def nvml_memory(handle) -> tuple[dict[str, int] | None, str | None]:
    """``{"total", "free", "used", "reserved"?, "api"}`` of a device, with the v2 API when the driver has it.

    v2 (``nvmlDeviceGetMemoryInfo_v2``, drivers ≥ 510) reports ``reserved`` (driver/firmware memory) apart
    from ``used``; v1's ``used`` includes it. ``api`` says which one answered.
    """
    module, reason = nvml()
    if module is None:
        return None, reason
    version = getattr(module, "nvmlMemory_v2", None)
    if version is not None:
        try:
            info = module.nvmlDeviceGetMemoryInfo(handle, version=version)
            return {"total": int(info.total), "free": int(info.free), "used": int(info.used),
                    "reserved": int(info.reserved), "api": "v2"}, None
        except module.NVMLError:
            pass  # an old driver without the v2 entry point: fall back to v1
        except TypeError:  # an nvidia-ml-py without the version argument
            pass
    try:
        info = module.nvmlDeviceGetMemoryInfo(handle)
    except module.NVMLError as exc:
        return None, f"NVML memory query failed: {exc}"
    return {"total": int(info.total), "free": int(info.free), "used": int(info.used), "api": "v1"}, None


def nvml_process_used(handle, pid: int | None = None) -> tuple[int | None, str | None]:
    """GPU memory NVML attributes to ``pid`` (default: this process), or ``(None, reason)``."""
    module, reason = nvml()
    if module is None:
        return None, reason
    pid = os.getpid() if pid is None else pid
    try:
        processes = module.nvmlDeviceGetComputeRunningProcesses(handle)
    except module.NVMLError as exc:
        return None, f"NVML process list failed: {exc}"
    for process in processes:
        if int(process.pid) == pid:
            used = process.usedGpuMemory
            if used is None:  # NVML_VALUE_NOT_AVAILABLE (e.g. Windows WDDM)
                return None, "NVML lists this process but not its memory (value not available)"
            return int(used), None
    return None, (f"this process (PID {pid}) is not among NVML's compute processes on the device "
                  "(in a container NVML reports host PIDs)")
