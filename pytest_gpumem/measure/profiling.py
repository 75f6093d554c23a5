"""``memory_profiling``: what a block did to memory, named by component (vLLM's ``memory_profiling``)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from .sampler import DEFAULT_PERIOD_S, NvmlSampler, Sampler
from .snapshot import MemorySnapshot, torch_module


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
    torch, _ = torch_module(use_torch)
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


def cpu_allocator_peak_bytes(prof) -> int:
    """The peak of what the allocator held over a ``torch.profiler.profile(profile_memory=True)`` run, above
    what it held when the profile started: its Allocation events (``alloc_size`` > 0 allocates, < 0 frees)
    replayed in time order. (Replaying each op's net ``self_cpu_memory_usage`` instead moves frees to the end
    of their parent op — an autograd node frees its inputs after its child kernels ran — and can read one
    activation high: 230,400 B on the FSDP2 step of ``tests/test_simulate_rank.py``.)"""
    from torch._C._profiler import _EventType
    from torch.profiler._utils import traverse_dfs

    events = sorted((node.start_time_ns, node.typed[1].alloc_size)
                    for node in traverse_dfs(prof.profiler.kineto_results.experimental_event_tree())
                    if node.typed[0] == _EventType.Allocation)
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak
