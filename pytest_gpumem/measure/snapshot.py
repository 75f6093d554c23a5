"""A self-measuring snapshot of GPU and host memory, in the spirit of vLLM's ``vllm/utils/mem_utils.py``.

:class:`MemorySnapshot` measures itself on construction: torch's allocator counters (allocated / reserved,
current and peak), the device's total and free memory (``cudaMemGetInfo`` via ``torch.cuda.mem_get_info``),
non-torch memory with vLLM's definition ``(total − free) − torch.cuda.memory_reserved()``, NVML's view of the
device (the v2 API when the driver has it) and of this process, and the host's RSS. Every field that could not
be measured is ``None`` and :attr:`MemorySnapshot.missing` says why ("no CUDA device", "NVML library not found
(no NVIDIA driver)", …).

Nothing here imports torch unless it is already imported (or asked for): reading CUDA state from a process
that has not initialised CUDA would create a context there (≈ 0.3–0.6 GiB, docs/memory-model.md §6).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .nvml import nvml, nvml_handle, nvml_memory, nvml_process_used

NO_CUDA = "no CUDA device"
TORCH_NOT_IMPORTED = "torch is not imported in this process (reading CUDA state would create a CUDA context)"
CUDA_NOT_INITIALISED = "CUDA is not initialised in this process (reading it would create a CUDA context)"


# -- host memory ---------------------------------------------------------------------------------------
def host_rss_bytes() -> tuple[int | None, str | None]:
    """Current resident set size of this process (``/proc/self/statm``)."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            resident_pages = int(handle.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE"), None
    except (OSError, ValueError, IndexError, AttributeError):
        return None, "no /proc/self/statm on this platform"


def host_peak_rss_bytes() -> tuple[int | None, str | None]:
    """Peak RSS of this process over its lifetime (``getrusage``; kB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:
        return None, "the resource module is not available on this platform"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * 1024), None


# -- torch ---------------------------------------------------------------------------------------------
def no_cuda_reason(torch_module) -> str:
    """Why ``torch.cuda.is_available()`` is False, in words."""
    version = getattr(torch_module, "__version__", "?")
    if getattr(getattr(torch_module, "version", None), "cuda", None) is None:
        return f"{NO_CUDA} (torch {version} is a CPU-only build)"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return f"{NO_CUDA} (CUDA_VISIBLE_DEVICES is empty)"
    return f"{NO_CUDA} (torch.cuda.is_available() is False with torch {version})"


def torch_module(use_torch: bool | None):
    """The torch module to read, or ``(None, reason)``; imports it only when ``use_torch`` is True."""
    if use_torch is False:
        return None, "torch reading disabled"
    module = sys.modules.get("torch")
    if module is None and use_torch:
        import torch as module  # noqa: F811 - asked for explicitly
    if module is None:
        return None, TORCH_NOT_IMPORTED
    return module, None


def torch_device_uuid(torch_module, index: int = 0) -> str | None:
    """The NVML-style UUID (``GPU-…``) of CUDA device ``index`` as torch sees it (torch ≥ 2.1 exposes
    ``get_device_properties().uuid``), or None. Matching by UUID is immune to device ordering."""
    uuid = getattr(torch_module.cuda.get_device_properties(index), "uuid", None)
    if uuid is None:
        return None
    text = str(uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


# -- the snapshot ----------------------------------------------------------------------------------------
_TORCH_FIELDS = ("torch_allocated_bytes", "torch_reserved_bytes", "torch_peak_allocated_bytes",
                 "torch_peak_reserved_bytes")
_CUDA_FIELDS = ("cuda_total_bytes", "cuda_free_bytes", "cuda_used_bytes", "non_torch_bytes")
_NVML_FIELDS = ("nvml_total_bytes", "nvml_used_bytes", "nvml_reserved_bytes")


@dataclass
class MemorySnapshot:
    """GPU and host memory of this process at one moment; measures itself on construction.

    ``device_index`` is CUDA's index in this process. ``use_torch``: ``None`` reads torch only if it is
    already imported (and CUDA only if it is already initialised), ``True`` imports torch and initialises
    CUDA, ``False`` never touches torch. ``baseline_nvml_used_bytes`` is the device's NVML ``used`` before
    this process touched the GPU: the fallback for this process's own usage when NVML cannot see its PID.
    """

    device_index: int = 0
    use_torch: bool | None = None
    baseline_nvml_used_bytes: int | None = None
    auto_measure: bool = True

    timestamp_s: float = 0.0
    device_name: str | None = None
    torch_allocated_bytes: int | None = None
    torch_reserved_bytes: int | None = None
    torch_peak_allocated_bytes: int | None = None
    torch_peak_reserved_bytes: int | None = None
    cuda_total_bytes: int | None = None
    cuda_free_bytes: int | None = None
    cuda_used_bytes: int | None = None  # total − free: every process and context on the device
    non_torch_bytes: int | None = None  # vLLM's definition: (total − free) − torch reserved
    nvml_total_bytes: int | None = None
    nvml_used_bytes: int | None = None
    nvml_reserved_bytes: int | None = None
    nvml_api: str | None = None
    nvml_device_match: str | None = None
    process_used_bytes: int | None = None
    process_used_source: str | None = None  # "nvml-pid" or "device-delta-from-baseline"
    host_rss_bytes: int | None = None
    host_peak_rss_bytes: int | None = None
    #: field name -> why it is None
    missing: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.auto_measure:
            self.measure()

    def _miss(self, names, reason: str) -> None:
        for name in names:
            setattr(self, name, None)
            self.missing[name] = reason

    def measure(self) -> "MemorySnapshot":
        self.missing = {}
        self.timestamp_s = time.time()
        uuid = self._measure_torch()
        self._measure_nvml(uuid)
        self._measure_host()
        return self

    def _measure_torch(self) -> str | None:
        torch, reason = torch_module(self.use_torch)
        if torch is None:
            self._miss(_TORCH_FIELDS + _CUDA_FIELDS, reason)
            return None
        if not torch.cuda.is_available():
            self._miss(_TORCH_FIELDS + _CUDA_FIELDS, no_cuda_reason(torch))
            return None
        if not torch.cuda.is_initialized():
            if not self.use_torch:
                # torch has allocated nothing on a device it never initialised; the device totals need a context
                for name in _TORCH_FIELDS:
                    setattr(self, name, 0)
                self._miss(_CUDA_FIELDS, CUDA_NOT_INITIALISED)
                return None
            torch.cuda.init()
        index = self.device_index
        self.torch_allocated_bytes = int(torch.cuda.memory_allocated(index))
        self.torch_reserved_bytes = int(torch.cuda.memory_reserved(index))
        self.torch_peak_allocated_bytes = int(torch.cuda.max_memory_allocated(index))
        self.torch_peak_reserved_bytes = int(torch.cuda.max_memory_reserved(index))
        free, total = torch.cuda.mem_get_info(index)
        self.cuda_free_bytes, self.cuda_total_bytes = int(free), int(total)
        self.cuda_used_bytes = self.cuda_total_bytes - self.cuda_free_bytes
        self.non_torch_bytes = self.cuda_used_bytes - self.torch_reserved_bytes
        self.device_name = torch.cuda.get_device_properties(index).name
        return torch_device_uuid(torch, index)

    def _measure_nvml(self, uuid: str | None) -> None:
        handle, how, reason = nvml_handle(self.device_index, uuid=uuid)
        if handle is None and uuid is not None:  # e.g. a MIG uuid this driver cannot look up
            handle, how, reason = nvml_handle(self.device_index)
        if handle is None:
            self._miss(_NVML_FIELDS + ("nvml_api", "process_used_bytes"), reason)
            return
        self.nvml_device_match = how
        info, reason = nvml_memory(handle)
        if info is None:
            self._miss(_NVML_FIELDS + ("nvml_api", "process_used_bytes"), reason)
            return
        self.nvml_total_bytes, self.nvml_used_bytes = info["total"], info["used"]
        self.nvml_api = info["api"]
        if "reserved" in info:
            self.nvml_reserved_bytes = info["reserved"]
        else:
            self.missing["nvml_reserved_bytes"] = "NVML v1 API: driver-reserved memory is inside 'used'"
        if self.device_name is None:
            module, _ = nvml()
            try:
                name = module.nvmlDeviceGetName(handle)
                self.device_name = name.decode() if isinstance(name, bytes) else str(name)
            except module.NVMLError:
                pass
        used, reason = nvml_process_used(handle)
        if used is not None:
            self.process_used_bytes, self.process_used_source = used, "nvml-pid"
        elif self.baseline_nvml_used_bytes is not None:
            self.process_used_bytes = max(0, self.nvml_used_bytes - self.baseline_nvml_used_bytes)
            self.process_used_source = "device-delta-from-baseline"
        else:
            self._miss(("process_used_bytes",), f"{reason}, and no baseline was taken before the run")

    def _measure_host(self) -> None:
        self.host_rss_bytes, reason = host_rss_bytes()
        if reason:
            self.missing["host_rss_bytes"] = reason
        self.host_peak_rss_bytes, reason = host_peak_rss_bytes()
        if reason:
            self.missing["host_peak_rss_bytes"] = reason

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("auto_measure")
        data.pop("use_torch")
        return data

    def reason(self, name: str) -> str | None:
        """Why ``name`` is None (None when it was measured)."""
        return self.missing.get(name)
