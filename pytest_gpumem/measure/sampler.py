"""Samplers and per-phase peaks.

:class:`Sampler` / :class:`NvmlSampler` / :class:`RssSampler`: a daemon thread that reads a byte counter every
~10 ms and keeps the peak, a timeline and a peak per named phase. NVML sees memory that torch's counters miss:
vLLM's CuMemAllocator pool (sleep mode), cuBLAS/NCCL workspaces, the CUDA context. :class:`PhaseTracker`:
torch's peak counters are reset at every phase boundary (``torch.cuda.reset_peak_memory_stats``) and read at
the next one, so each phase of a GRPO step gets its own allocated / reserved peak.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from .nvml import nvml, nvml_handle
from .snapshot import host_rss_bytes

#: default sampling period of the background samplers (seconds)
DEFAULT_PERIOD_S = 0.010
#: timeline points kept by a sampler before it halves its resolution (memory stays bounded on long runs)
MAX_TIMELINE_POINTS = 20_000


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
