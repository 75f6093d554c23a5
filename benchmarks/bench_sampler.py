"""Overhead of the background NVML sampler (goal: < 2 % on a training-like workload).

    python benchmarks/bench_sampler.py [--period-ms 10] [--repeats 7]

The sampler is a Python thread that calls ``nvmlDeviceGetMemoryInfo`` every period; its cost to the measured
program is GIL time and driver calls. Two workloads are timed with and without it, interleaved, and the
medians compared:

* ``python-bound``: many small CUDA kernels launched from Python (a decode loop is like this) — the worst
  case for GIL contention;
* ``gpu-bound``: large matmuls (a training step's forward/backward is like this).

Also printed: the mean time of one NVML read. Without NVML (no NVIDIA driver) or without a CUDA device it
prints that it cannot measure, and why, and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pytest_gpumem.measure.nvml import nvml, nvml_handle  # noqa: E402
from pytest_gpumem.measure.sampler import NvmlSampler  # noqa: E402

GOAL = 0.02


def _workloads(torch):
    small = torch.randn(256, 256, device="cuda")
    large = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def python_bound():
        x = small
        for _ in range(3000):
            x = torch.tanh(x @ small) * 0.5
        torch.cuda.synchronize()

    def gpu_bound():
        y = large
        for _ in range(40):
            y = (y @ large).clamp_(-1, 1)
        torch.cuda.synchronize()

    return {"python-bound": python_bound, "gpu-bound": gpu_bound}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--period-ms", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    module, reason = nvml()
    if module is None:
        print(f"cannot measure the NVML sampler's overhead: {reason}")
        return 0
    handle, _how, reason = nvml_handle(0)
    if handle is None:
        print(f"cannot measure the NVML sampler's overhead: {reason}")
        return 0
    try:
        import torch
    except ImportError:
        print("cannot measure the NVML sampler's overhead: torch is not installed (needed for the GPU workload)")
        return 0
    if not torch.cuda.is_available():
        print("cannot measure the NVML sampler's overhead: no CUDA device visible to torch "
              f"(torch {torch.__version__})")
        return 0

    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, period {args.period_ms:g} ms, "
          f"{args.repeats} repeats per workload")
    period_s = args.period_ms / 1000
    workloads = _workloads(torch)
    worst = 0.0
    read_times = []
    for name, workload in workloads.items():
        workload()  # warm-up: kernels, allocator, clocks
        plain, sampled, samples = [], [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            workload()
            plain.append(time.perf_counter() - started)
            sampler = NvmlSampler(0, period_s=period_s)
            sampler.start()
            started = time.perf_counter()
            workload()
            sampled.append(time.perf_counter() - started)
            sampler.stop()
            samples.append(sampler.num_samples)
            if sampler.mean_read_seconds is not None:
                read_times.append(sampler.mean_read_seconds)
        base, with_sampler = statistics.median(plain), statistics.median(sampled)
        overhead = with_sampler / base - 1
        worst = max(worst, overhead)
        print(f"{name:13s} without {base * 1000:8.1f} ms   with sampler {with_sampler * 1000:8.1f} ms   "
              f"overhead {overhead:+6.2%}   ({statistics.median(samples):.0f} samples per run)")
    if read_times:
        print(f"one NVML read: {statistics.mean(read_times) * 1e6:.1f} µs on average")
    verdict = "meets" if worst < GOAL else "MISSES"
    print(f"worst overhead {worst:+.2%}: {verdict} the goal of < {GOAL:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
