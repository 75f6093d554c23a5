"""Measuring GPU memory in this process: snapshots, a background NVML sampler, per-phase peaks.

Three tools, in the spirit of vLLM's ``vllm/utils/mem_utils.py`` (``MemorySnapshot``, ``memory_profiling``):

* :class:`MemorySnapshot` measures itself on construction: torch's allocator counters (allocated / reserved,
  current and peak), the device's total and free memory (``cudaMemGetInfo`` via ``torch.cuda.mem_get_info``),
  non-torch memory with vLLM's definition ``(total − free) − torch.cuda.memory_reserved()``, NVML's view of
  the device (the v2 API when the driver has it) and of this process, and the host's RSS. Every field that
  could not be measured is ``None`` and :attr:`MemorySnapshot.missing` says why ("no CUDA device", "NVML
  library not found (no NVIDIA driver)", …).
* :class:`Sampler` / :class:`NvmlSampler` / :class:`RssSampler`: a daemon thread that reads a byte counter
  every ~10 ms and keeps the peak, a timeline and a peak per named phase. NVML sees memory that torch's
  counters miss: vLLM's CuMemAllocator pool (sleep mode), cuBLAS/NCCL workspaces, the CUDA context.
* :class:`PhaseTracker` and :func:`memory_profiling`: torch peak counters are reset at every phase boundary
  (``torch.cuda.reset_peak_memory_stats``) and read at the next one, so each phase of a GRPO step gets its own
  allocated / reserved peak; :func:`memory_profiling` wraps one block and names what grew.

Nothing here imports torch unless it is already imported (or asked for): reading CUDA state from a process
that has not initialised CUDA would create a context there (≈ 0.3–0.6 GiB, memory-model.md §6). NVML is
read through ``nvidia-ml-py`` (module ``pynvml``); ``pynvml.NVMLError_LibraryNotFound`` is the no-driver case.

Per-process NVML figures: ``nvmlDeviceGetComputeRunningProcesses`` reports host PIDs, so inside a container
``os.getpid()`` never matches; the fallback is the device-level delta from a baseline taken before the run
(``process_used_source`` says which was used).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

NO_CUDA = "no CUDA device"
TORCH_NOT_IMPORTED = "torch is not imported in this process (reading CUDA state would create a CUDA context)"
CUDA_NOT_INITIALISED = "CUDA is not initialised in this process (reading it would create a CUDA context)"

#: default sampling period of the background samplers (seconds)
DEFAULT_PERIOD_S = 0.010
#: timeline points kept by a sampler before it halves its resolution (memory stays bounded on long runs)
MAX_TIMELINE_POINTS = 20_000


# -- NVML ----------------------------------------------------------------------------------------------
_nvml_lock = threading.Lock()
_nvml_state: dict[str, Any] = {}


def nvml() -> tuple[Any, str | None]:
    """``(pynvml, None)`` once NVML is initialised, else ``(None, reason)``. Initialises once per process.

    The no-driver case is ``pynvml.NVMLError_LibraryNotFound`` (shared/docs/cpu-simulation.md).
    """
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
                return None, None, f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} has no device {cuda_index}"
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


def _torch(use_torch: bool | None):
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
        torch, reason = _torch(self.use_torch)
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


# -- samplers ---------------------------------------------------------------------------------------------
class Sampler:
    """Reads ``read()`` (bytes) every ``period_s`` on a daemon thread; keeps the peak, a timeline and a peak
    per phase (:meth:`set_phase`).

    A sample is also taken synchronously at :meth:`start`, :meth:`set_phase` (attributed to the phase that
    ends) and :meth:`stop`, so even a phase shorter than the period has a value. ``read`` failures stop the
    sampler and are kept in :attr:`reason`.
    """

    def __init__(self, read: Callable[[], int], period_s: float = DEFAULT_PERIOD_S, name: str = "sampler"):
        if period_s <= 0:
            raise ValueError(f"period_s must be positive, got {period_s}")
        self.read = read
        self.period_s = period_s
        self.name = name
        self.reason: str | None = None
        self.peak_bytes: int | None = None
        self.first_bytes: int | None = None
        self.last_bytes: int | None = None
        self.phase_peaks: dict[str, int] = {}
        self.timeline: list[tuple[float, int]] = []  # (seconds since start, bytes)
        self.num_samples = 0
        self.read_seconds_total = 0.0
        self._stride = 1  # keep every n-th sample in the timeline once it is long
        self._phase: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    @property
    def available(self) -> bool:
        return self.reason is None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def sample(self) -> int | None:
        """Take one sample now (thread-safe); returns the bytes read or None after a failure."""
        if self.reason is not None:
            return None
        started = time.perf_counter()
        try:
            value = int(self.read())
        except Exception as exc:  # noqa: BLE001 - a failing counter must not kill the measured run
            self.reason = f"{self.name} read failed: {exc}"
            return None
        elapsed = time.perf_counter() - started
        with self._lock:
            self.read_seconds_total += elapsed
            self.num_samples += 1
            if self.first_bytes is None:
                self.first_bytes = value
            self.last_bytes = value
            if self.peak_bytes is None or value > self.peak_bytes:
                self.peak_bytes = value
            if self._phase is not None and value > self.phase_peaks.get(self._phase, -1):
                self.phase_peaks[self._phase] = value
            if self.num_samples % self._stride == 0:
                self.timeline.append((round(time.perf_counter() - self._t0, 6), value))
                if len(self.timeline) >= MAX_TIMELINE_POINTS:
                    self.timeline = self.timeline[::2]
                    self._stride *= 2
        return value

    def set_phase(self, phase: str | None) -> None:
        """Samples from now on count towards ``phase``'s peak (one sample closes the previous phase)."""
        if self.running or self.num_samples:
            self.sample()
        with self._lock:
            self._phase = phase

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            if self.sample() is None:
                return

    def start(self) -> "Sampler":
        if self.running or self.reason is not None:
            return self
        self._t0 = time.perf_counter()
        self._stop.clear()
        self.sample()
        self._thread = threading.Thread(target=self._loop, name=f"gpumem-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "Sampler":
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=max(1.0, 10 * self.period_s))
            self._thread = None
            self.sample()
        return self

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def mean_read_seconds(self) -> float | None:
        return self.read_seconds_total / self.num_samples if self.num_samples else None

    def to_dict(self, max_points: int = 500) -> dict[str, Any]:
        """Peaks and a timeline thinned to at most ``max_points`` points (the peak sample always kept)."""
        with self._lock:
            timeline = list(self.timeline)
        if len(timeline) > max_points:
            step = len(timeline) / max_points
            thinned = [timeline[int(i * step)] for i in range(max_points)]
            if self.peak_bytes is not None and all(v != self.peak_bytes for _, v in thinned):
                thinned.append(max(timeline, key=lambda point: point[1]))
                thinned.sort()
            timeline = thinned
        return {"name": self.name, "available": self.available, "reason": self.reason,
                "period_s": self.period_s, "num_samples": self.num_samples, "peak_bytes": self.peak_bytes,
                "first_bytes": self.first_bytes, "last_bytes": self.last_bytes,
                "phase_peaks": dict(self.phase_peaks), "mean_read_seconds": self.mean_read_seconds,
                "timeline": [[t, v] for t, v in timeline]}


class NvmlSampler(Sampler):
    """Samples NVML's device ``used`` bytes (every process on the device, the CUDA context and non-torch
    allocations included). Without NVML it does nothing and :attr:`reason` says why."""

    def __init__(self, device_index: int = 0, period_s: float = DEFAULT_PERIOD_S, uuid: str | None = None):
        handle, _how, reason = nvml_handle(device_index, uuid=uuid)
        self.handle = handle
        module, _ = nvml()

        def read() -> int:
            # v1 is one struct fill; the sampler only needs 'used'
            return module.nvmlDeviceGetMemoryInfo(handle).used

        super().__init__(read, period_s, name="nvml")
        if handle is None:
            self.reason = reason


class RssSampler(Sampler):
    """Samples this process's resident set size (host memory): the CPU runs' per-phase figure."""

    def __init__(self, period_s: float = DEFAULT_PERIOD_S):
        def read() -> int:
            value, reason = host_rss_bytes()
            if value is None:
                raise RuntimeError(reason)
            return value

        super().__init__(read, period_s, name="rss")
        _value, reason = host_rss_bytes()
        if reason:
            self.reason = reason


# -- per-phase peaks ---------------------------------------------------------------------------------------
@dataclass
class PhaseStats:
    """What one phase reached, over all its occurrences (peaks are maxima)."""

    occurrences: int = 0
    seconds: float = 0.0
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    non_torch_bytes: int | None = None  # at the end of the segment with the highest reserved peak
    nvml_peak_bytes: int | None = None
    peak_rss_bytes: int | None = None
    #: the caller's context (live persistent components) when the highest reserved peak was reached
    context_at_peak: dict[str, Any] = field(default_factory=dict)
    step_at_peak: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PhaseTracker:
    """Per-phase GPU peaks by resetting torch's peak counters at every phase boundary.

    Phases nest (TRL's ``training_step`` calls ``_generate_and_score_completions`` which calls ``_generate``):
    the time between two boundaries is a *segment* and belongs to the innermost open phase. At each boundary
    the segment's peaks (``max_memory_allocated`` / ``max_memory_reserved`` since the last reset) are folded
    into that phase and the counters are reset. Segments with no phase open go to ``OUTSIDE``; they still
    count for the run's overall peak. ``torch_module=None`` (CPU) keeps timings and the samplers' peaks only.

    ``context`` is called at each boundary and returns what the caller knows is live (e.g. optimizer state
    bytes); it is kept for the segment that set the phase's reserved peak, so a breakdown can subtract it.
    """

    OUTSIDE = "outside_phases"

    def __init__(self, torch_module=None, device_index: int = 0, samplers: tuple[Sampler, ...] = (),
                 context: Callable[[], dict[str, Any]] | None = None):
        self.torch = torch_module
        self.device_index = device_index
        self.samplers = tuple(s for s in samplers if s is not None)
        self.context = context
        self.stack: list[str] = []
        self.stats: dict[str, PhaseStats] = {}
        self.step = 0
        self.failed_phase: str | None = None
        self.overall_peak_allocated_bytes: int | None = None
        self.overall_peak_reserved_bytes: int | None = None
        self.overall_non_torch_bytes: int | None = None
        self._segment_start = time.perf_counter()
        self._started = False
        self._rss_at_segment_start = None

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else self.OUTSIDE

    def start(self) -> None:
        """Reset the peak counters: what happened before (model build) is not part of any phase."""
        if self.torch is not None:
            self.torch.cuda.reset_peak_memory_stats(self.device_index)
        for sampler in self.samplers:
            sampler.set_phase(self.current)
        self._segment_start = time.perf_counter()
        self._started = True

    def _close_segment(self) -> None:
        now = time.perf_counter()
        phase = self.current
        stats = self.stats.setdefault(phase, PhaseStats())
        stats.seconds += now - self._segment_start
        self._segment_start = now
        if self.torch is not None:
            cuda = self.torch.cuda
            index = self.device_index
            allocated = int(cuda.max_memory_allocated(index))
            reserved = int(cuda.max_memory_reserved(index))
            free, total = cuda.mem_get_info(index)
            non_torch = int(total - free) - int(cuda.memory_reserved(index))
            if stats.peak_reserved_bytes is None or reserved > stats.peak_reserved_bytes:
                stats.peak_reserved_bytes = reserved
                stats.non_torch_bytes = non_torch
                stats.step_at_peak = self.step
                if self.context is not None:
                    stats.context_at_peak = dict(self.context())
            stats.peak_allocated_bytes = max(allocated, stats.peak_allocated_bytes or 0)
            self.overall_peak_allocated_bytes = max(allocated, self.overall_peak_allocated_bytes or 0)
            self.overall_peak_reserved_bytes = max(reserved, self.overall_peak_reserved_bytes or 0)
            self.overall_non_torch_bytes = max(non_torch, self.overall_non_torch_bytes or 0)
            cuda.reset_peak_memory_stats(index)
        elif self.context is not None and not stats.context_at_peak:
            stats.context_at_peak = dict(self.context())
        for sampler in self.samplers:
            sampler.set_phase(None)  # closes the segment with one sample

    def _open(self) -> None:
        for sampler in self.samplers:
            sampler.set_phase(self.current)

    def enter(self, phase: str) -> None:
        self._close_segment()
        self.stack.append(phase)
        self.stats.setdefault(phase, PhaseStats()).occurrences += 1
        self._open()

    def exit(self, phase: str) -> None:
        self._close_segment()
        # tolerate a missing exit (an exception between enter and exit): unwind to the phase
        while self.stack:
            if self.stack.pop() == phase:
                break
        self._open()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        except BaseException:
            self.note_failure()
            raise
        finally:
            self.exit(name)

    def note_failure(self) -> None:
        """Remember the innermost open phase when an exception passes (the first call wins)."""
        if self.failed_phase is None:
            self.failed_phase = self.current

    def finish(self) -> None:
        self._close_segment()
        for sampler in self.samplers:
            for phase, peak in sampler.phase_peaks.items():
                stats = self.stats.get(phase)
                if stats is None:
                    continue
                if sampler.name == "nvml":
                    stats.nvml_peak_bytes = max(peak, stats.nvml_peak_bytes or 0)
                elif sampler.name == "rss":
                    stats.peak_rss_bytes = max(peak, stats.peak_rss_bytes or 0)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {phase: stats.to_dict() for phase, stats in self.stats.items()}


# -- memory_profiling --------------------------------------------------------------------------------------
@dataclass
class MemoryProfile:
    """What a block did to memory (vLLM's ``MemoryProfilingResult``, generalised).

    ``components`` names what grew, in bytes: ``torch_peak_increase`` (peak allocated − allocated before,
    vLLM's choice: "reserved keeps growing"), ``torch_reserved_peak_increase``, ``non_torch_increase``,
    ``nvml_peak_increase`` and ``host_rss_increase``. A component that could not be measured is absent and
    ``missing`` says why.
    """

    before: MemorySnapshot
    after: MemorySnapshot | None = None
    seconds: float = 0.0
    components: dict[str, int] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    nvml_sampler: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "components": dict(self.components), "missing": dict(self.missing),
                "before": self.before.to_dict(), "after": self.after.to_dict() if self.after else None,
                "nvml_sampler": self.nvml_sampler}


@contextmanager
def memory_profiling(device_index: int = 0, use_torch: bool | None = None, sample_nvml: bool = True,
                     period_s: float = DEFAULT_PERIOD_S,
                     baseline_nvml_used_bytes: int | None = None) -> Iterator[MemoryProfile]:
    """Measure the block: ``with memory_profiling() as profile: ...`` then read ``profile.components``.

    Resets torch's peak counters on entry (when torch and CUDA are live) and samples NVML in the background.
    """
    before = MemorySnapshot(device_index, use_torch=use_torch, baseline_nvml_used_bytes=baseline_nvml_used_bytes)
    profile = MemoryProfile(before=before)
    torch, _ = _torch(use_torch)
    cuda_live = before.torch_allocated_bytes is not None and before.cuda_total_bytes is not None
    if cuda_live:
        torch.cuda.reset_peak_memory_stats(device_index)
    sampler = NvmlSampler(device_index, period_s=period_s) if sample_nvml else None
    if sampler is not None:
        sampler.start()
    started = time.perf_counter()
    try:
        yield profile
    finally:
        profile.seconds = time.perf_counter() - started
        if sampler is not None:
            sampler.stop()
        after = MemorySnapshot(device_index, use_torch=use_torch, baseline_nvml_used_bytes=baseline_nvml_used_bytes)
        profile.after = after
        _fill_profile(profile, sampler)


def _fill_profile(profile: MemoryProfile, sampler: Sampler | None) -> None:
    before, after = profile.before, profile.after
    pairs = {
        "torch_peak_increase": (after.torch_peak_allocated_bytes, before.torch_allocated_bytes,
                                "torch_peak_allocated_bytes"),
        "torch_reserved_peak_increase": (after.torch_peak_reserved_bytes, before.torch_reserved_bytes,
                                         "torch_peak_reserved_bytes"),
        "non_torch_increase": (after.non_torch_bytes, before.non_torch_bytes, "non_torch_bytes"),
        "host_rss_increase": (after.host_rss_bytes, before.host_rss_bytes, "host_rss_bytes"),
    }
    for name, (end, start, source) in pairs.items():
        if end is None or start is None:
            profile.missing[name] = after.reason(source) or before.reason(source) or "not measured"
        else:
            profile.components[name] = int(end - start)
    if sampler is None:
        profile.missing["nvml_peak_increase"] = "NVML sampling was switched off"
    elif sampler.peak_bytes is None or before.nvml_used_bytes is None:
        profile.missing["nvml_peak_increase"] = sampler.reason or before.reason("nvml_used_bytes") or "no samples"
    else:
        profile.components["nvml_peak_increase"] = int(sampler.peak_bytes - before.nvml_used_bytes)
    if sampler is not None:
        profile.nvml_sampler = sampler.to_dict(max_points=200)
