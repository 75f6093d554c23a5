"""measure.py: snapshots that say why a field is missing, samplers, per-phase peaks.

On this CPU machine NVML is really absent (``NVMLError_LibraryNotFound``) and torch is a CPU build, so the
"missing, because …" paths run for real. The NVML and CUDA arithmetic runs against small fakes that behave
like ``pynvml`` and ``torch.cuda`` (same call names, same errors); the GPU test at the end uses the real ones.
"""

from __future__ import annotations

import os
import sys
import time
import types

import pytest

from pytest_gpumem.measure import nvml as measure
from pytest_gpumem.measure.nvml import nvml, nvml_handle, visible_device_entries
from pytest_gpumem.measure.profiling import memory_profiling
from pytest_gpumem.measure.sampler import NvmlSampler, PhaseTracker, RssSampler, Sampler
from pytest_gpumem.measure.snapshot import MemorySnapshot
from pytest_gpumem.units import GIB, MIB


@pytest.fixture(autouse=True)
def fresh_nvml_cache():
    measure._reset_nvml_cache_for_tests()
    yield
    measure._reset_nvml_cache_for_tests()


def _has_nvml() -> bool:
    module, _ = nvml()
    measure._reset_nvml_cache_for_tests()
    return module is not None


# -- a pynvml look-alike ------------------------------------------------------------------------------
class FakeNVMLError(Exception):
    pass


def fake_pynvml(used=3 * GIB, total=80 * GIB, reserved=512 * MIB, pids=(), v2=True, process_bytes=1 * GIB):
    module = types.SimpleNamespace()
    module.NVMLError = FakeNVMLError
    module.nvmlMemory_v2 = 0x02000028
    module.calls = []

    def by_index(index):
        module.calls.append(("index", index))
        return f"handle-{index}"

    def by_uuid(uuid):
        module.calls.append(("uuid", uuid))
        return f"handle-{uuid}"

    def memory_info(handle, version=None):
        if version is not None and not v2:
            raise FakeNVMLError("Function Not Found")
        info = types.SimpleNamespace(total=total, free=total - used - (reserved if version else 0), used=used)
        if version is not None:
            info.reserved = reserved
        return info

    module.nvmlDeviceGetHandleByIndex = by_index
    module.nvmlDeviceGetHandleByUUID = by_uuid
    module.nvmlDeviceGetMemoryInfo = memory_info
    module.nvmlDeviceGetComputeRunningProcesses = lambda handle: [
        types.SimpleNamespace(pid=pid, usedGpuMemory=process_bytes) for pid in pids]
    module.nvmlDeviceGetName = lambda handle: b"Fake GPU 80GB"
    module.nvmlDeviceGetCount = lambda: 4
    return module


def install(module) -> None:
    measure._nvml_state.update(module=module, reason=None)


# -- NVML absent, torch CPU-only: real reasons -----------------------------------------------------------
@pytest.mark.skipif(_has_nvml(), reason="this machine has an NVIDIA driver")
def test_no_driver_is_library_not_found():
    module, reason = nvml()
    assert module is None
    assert reason == "NVML library not found (no NVIDIA driver on this machine)"
    snapshot = MemorySnapshot(use_torch=False)
    for name in ("nvml_used_bytes", "nvml_total_bytes", "process_used_bytes"):
        assert getattr(snapshot, name) is None
        assert snapshot.reason(name) == reason
    sampler = NvmlSampler()
    assert not sampler.available and sampler.reason == reason
    with sampler:  # start/stop are harmless no-ops
        pass
    assert sampler.num_samples == 0 and sampler.peak_bytes is None


def test_missing_nvidia_ml_py_is_said(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    module, reason = nvml()
    assert module is None and "nvidia-ml-py is not installed" in reason


def test_torch_not_read_unless_asked():
    snapshot = MemorySnapshot(use_torch=False)
    assert snapshot.torch_allocated_bytes is None
    assert snapshot.reason("torch_allocated_bytes") == "torch reading disabled"
    assert snapshot.host_rss_bytes > 10 * MIB
    assert snapshot.host_peak_rss_bytes >= snapshot.host_rss_bytes * 0.5
    assert set(snapshot.to_dict()) >= {"torch_peak_reserved_bytes", "non_torch_bytes", "missing", "nvml_api"}


def test_cpu_torch_says_no_cuda_device():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    snapshot = MemorySnapshot(use_torch=True)
    for name in ("torch_allocated_bytes", "torch_peak_reserved_bytes", "cuda_free_bytes", "non_torch_bytes"):
        assert snapshot.reason(name).startswith("no CUDA device"), name


# -- NVML arithmetic against the look-alike ---------------------------------------------------------------
def test_own_pid_visible_uses_nvml_per_process_figure():
    install(fake_pynvml(pids=(12345, os.getpid()), process_bytes=2 * GIB))
    snapshot = MemorySnapshot(use_torch=False)
    assert snapshot.process_used_bytes == 2 * GIB
    assert snapshot.process_used_source == "nvml-pid"
    assert snapshot.nvml_api == "v2"
    assert snapshot.nvml_reserved_bytes == 512 * MIB
    assert snapshot.device_name == "Fake GPU 80GB"


def test_container_pid_falls_back_to_device_delta_from_baseline():
    install(fake_pynvml(used=7 * GIB, pids=(999999,)))  # host PIDs only: ours is not there
    snapshot = MemorySnapshot(use_torch=False, baseline_nvml_used_bytes=5 * GIB)
    assert snapshot.process_used_bytes == 2 * GIB
    assert snapshot.process_used_source == "device-delta-from-baseline"
    without = MemorySnapshot(use_torch=False)
    assert without.process_used_bytes is None
    assert "host PIDs" in without.reason("process_used_bytes")
    assert "no baseline" in without.reason("process_used_bytes")


def test_old_driver_falls_back_to_v1():
    install(fake_pynvml(v2=False))
    snapshot = MemorySnapshot(use_torch=False)
    assert snapshot.nvml_api == "v1"
    assert snapshot.nvml_used_bytes == 3 * GIB
    assert "v1" in snapshot.reason("nvml_reserved_bytes")


def test_cuda_visible_devices_maps_to_nvml_devices(monkeypatch):
    module = fake_pynvml()
    install(module)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert nvml_handle(1)[:2] == ("handle-1", "CUDA_VISIBLE_DEVICES index")
    assert nvml_handle(0)[:2] == ("handle-3", "CUDA_VISIBLE_DEVICES index")
    assert "has no device 2" in nvml_handle(2)[2]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc")
    assert nvml_handle(0)[:2] == ("handle-GPU-abc", "CUDA_VISIBLE_DEVICES uuid")
    assert nvml_handle(0, uuid="GPU-xyz")[:2] == ("handle-GPU-xyz", "uuid")  # torch's UUID wins
    assert visible_device_entries({"CUDA_VISIBLE_DEVICES": "0,-1,2"}) == ["0"]
    assert visible_device_entries({}) is None


# -- samplers ---------------------------------------------------------------------------------------------
def test_sampler_keeps_peak_timeline_and_phase_peaks():
    value = {"bytes": 100}
    sampler = Sampler(lambda: value["bytes"], period_s=0.002, name="fake")
    sampler.start()
    sampler.set_phase("generation")
    value["bytes"] = 500
    time.sleep(0.03)
    sampler.set_phase("training")  # the sample taken here still counts for generation
    value["bytes"] = 300
    time.sleep(0.03)
    sampler.stop()
    assert sampler.peak_bytes == 500
    assert sampler.phase_peaks == {"generation": 500, "training": 300}
    assert sampler.first_bytes == 100 and sampler.last_bytes == 300
    assert sampler.num_samples >= 10  # ~30 in 60 ms at 2 ms
    assert not sampler.running
    times = [t for t, _ in sampler.timeline]
    assert times == sorted(times)
    data = sampler.to_dict(max_points=5)
    assert len(data["timeline"]) <= 6 and 500 in [v for _, v in data["timeline"]]  # peak kept when thinned


def test_sampler_stops_on_read_failure_with_the_reason():
    calls = {"n": 0}

    def read():
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError("device lost")
        return 7

    sampler = Sampler(read, period_s=0.001, name="nvml")
    sampler.start()
    time.sleep(0.05)
    assert not sampler.running
    sampler.stop()
    assert sampler.reason == "nvml read failed: device lost"
    assert sampler.peak_bytes == 7


def test_rss_sampler_sees_a_host_allocation_in_its_phase():
    sampler = RssSampler(period_s=0.002)
    sampler.start()
    sampler.set_phase("idle")
    time.sleep(0.02)
    sampler.set_phase("allocating")
    block = bytearray(200 * MIB)  # touched pages: resident
    block[::4096] = b"x" * len(block[::4096])
    time.sleep(0.02)
    sampler.set_phase(None)
    del block
    sampler.stop()
    assert sampler.phase_peaks["allocating"] - sampler.phase_peaks["idle"] > 150 * MIB


def test_nvml_sampler_reads_the_device(monkeypatch):
    install(fake_pynvml(used=9 * GIB))
    with NvmlSampler(period_s=0.002) as sampler:
        time.sleep(0.01)
    assert sampler.available and sampler.peak_bytes == 9 * GIB


# -- per-phase peaks ---------------------------------------------------------------------------------------
class FakeCuda:
    """torch.cuda's allocator counters: peaks since the last reset_peak_memory_stats."""

    def __init__(self):
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.non_torch = 500 * MIB
        self.total = 80 * GIB

    def set(self, allocated, reserved):
        self.allocated, self.reserved = allocated, reserved
        self.peak_allocated = max(self.peak_allocated, allocated)
        self.peak_reserved = max(self.peak_reserved, reserved)

    def max_memory_allocated(self, index):
        return self.peak_allocated

    def max_memory_reserved(self, index):
        return self.peak_reserved

    def memory_reserved(self, index):
        return self.reserved

    def mem_get_info(self, index):
        return self.total - self.reserved - self.non_torch, self.total

    def reset_peak_memory_stats(self, index):
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved


def test_nested_phases_get_their_own_peaks():
    cuda = FakeCuda()
    context = {"optimizer_state_bytes": 0}
    tracker = PhaseTracker(types.SimpleNamespace(cuda=cuda), context=lambda: dict(context))
    tracker.start()
    with tracker.phase("training"):  # TRL: training_step -> _generate_and_score_completions -> _generate
        cuda.set(2 * GIB, 3 * GIB)
        with tracker.phase("scoring"):
            with tracker.phase("generation"):
                cuda.set(9 * GIB, 10 * GIB)  # the KV cache
                cuda.set(4 * GIB, 10 * GIB)
            cuda.set(5 * GIB, 10 * GIB)  # reference log-probs
        cuda.set(12 * GIB, 14 * GIB)  # backward
        cuda.set(4 * GIB, 14 * GIB)
    context["optimizer_state_bytes"] = 8 * GIB
    with tracker.phase("training"):  # step 2: peak after the states exist
        cuda.set(13 * GIB, 15 * GIB)
    tracker.finish()
    stats = tracker.stats
    assert stats["generation"].peak_allocated_bytes == 9 * GIB
    assert stats["generation"].peak_reserved_bytes == 10 * GIB
    assert stats["scoring"].peak_allocated_bytes == 5 * GIB  # the generation peak is not the scoring's
    assert stats["training"].peak_allocated_bytes == 13 * GIB
    assert stats["training"].occurrences == 2
    assert stats["training"].context_at_peak == {"optimizer_state_bytes": 8 * GIB}  # the occurrence of the peak
    assert stats["training"].non_torch_bytes == 500 * MIB
    assert tracker.overall_peak_reserved_bytes == 15 * GIB
    assert tracker.stack == []


def test_failure_is_attributed_to_the_innermost_phase():
    tracker = PhaseTracker(None)
    tracker.start()
    with pytest.raises(MemoryError):
        with tracker.phase("training"):
            with tracker.phase("generation"):
                raise MemoryError("out of memory")
    assert tracker.failed_phase == "generation"
    assert tracker.current == PhaseTracker.OUTSIDE
    tracker.enter("optimizer_step")  # a phase opened by a callback and never closed: the top-level handler
    tracker.note_failure()
    assert tracker.failed_phase == "generation"  # first one wins
    tracker.exit("optimizer_step")
    tracker.finish()
    assert tracker.stats["generation"].seconds >= 0 and tracker.stats["generation"].occurrences == 1


def test_memory_profiling_names_what_grew_on_cpu():
    with memory_profiling(use_torch=False) as profile:
        block = bytearray(64 * MIB)
        block[::4096] = b"y" * len(block[::4096])
    assert profile.components["host_rss_increase"] > 32 * MIB
    assert "torch_peak_increase" not in profile.components
    assert profile.missing["torch_peak_increase"] == "torch reading disabled"
    assert "nvml_peak_increase" in profile.missing
    assert profile.seconds > 0
    assert profile.to_dict()["after"]["host_rss_bytes"] > 0


# -- on a GPU ---------------------------------------------------------------------------------------------
def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
def test_gpu_snapshot_and_profiling_measure_for_real():
    import torch

    snapshot = MemorySnapshot(use_torch=True)
    assert snapshot.cuda_total_bytes > 0 and snapshot.non_torch_bytes >= 0
    assert snapshot.non_torch_bytes == snapshot.cuda_used_bytes - snapshot.torch_reserved_bytes
    with memory_profiling(use_torch=True, period_s=0.002) as profile:
        tensor = torch.empty(512 * MIB, dtype=torch.uint8, device="cuda")
        del tensor
    assert profile.components["torch_peak_increase"] >= 512 * MIB
    if "nvml_peak_increase" in profile.components:
        assert profile.after.nvml_api in ("v1", "v2")
    else:
        assert profile.missing["nvml_peak_increase"]
