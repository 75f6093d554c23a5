"""Speed of ``fit`` (goal: 10,000 candidates < 1 s). Run: python benchmarks/bench_fit.py

Prints, for setups whose lever space holds ≥ 10,000 candidates:
  * the time of ``fit`` itself (pruned depth-first search, with alternatives) and how many candidates it
    actually estimated;
  * the time to build and estimate 10,000 candidates of that space one by one (the brute-force rate, i.e.
    what a search that visited every candidate would cost).
"""

from __future__ import annotations

import itertools
import time

from pytest_gpumem import GRPOSetup
from pytest_gpumem.diagnose.fit import _Search, dimensions, fit, space_size
from pytest_gpumem.gpus import resolve_gpu

CASES = {
    "Qwen2.5-1.5B TRL, vLLM colocate, on 16 GiB": ({"model": "Qwen/Qwen2.5-1.5B", "use_vllm": True,
                                                   "max_completion_length": 1024, "per_device_train_batch_size": 16,
                                                   "num_generations": 16, "trl_version": "1.9.0",
                                                   "optim": "adamw_torch", "gradient_checkpointing": False},
                                                  "16GiB"),
    "Qwen2.5-7B TRL full FT, on an L4": ({"model": "Qwen/Qwen2.5-7B", "per_device_train_batch_size": 16,
                                          "num_generations": 16, "use_vllm": True}, "L4"),
    "Llama-3.1-8B TRL, materialised logits, on 8 GiB": ({"model": "meta-llama/Llama-3.1-8B", "trl_version": "1.9.0",
                                                         "per_device_train_batch_size": 16, "num_generations": 16,
                                                         "gradient_checkpointing": False}, "8GiB"),
}


def main() -> None:
    for label, (data, gpu_name) in CASES.items():
        setup, gpu = GRPOSetup.from_dict(data), resolve_gpu(gpu_name)
        dims = dimensions(setup, gpu)
        size = space_size(dims)
        start = time.perf_counter()
        result = fit(setup, gpu)
        fit_s = time.perf_counter() - start
        search = _Search(setup, gpu, 0.1, dims)
        choices = itertools.islice(itertools.product(*(range(len(d.options)) for d in dims)), 10_000)
        start = time.perf_counter()
        count = sum(1 for choice in choices if search.evaluate(choice) is not None or True)
        brute_s = time.perf_counter() - start
        estimates = search.estimates
        verdict = f"fits at {result.peak_bytes / 2**30:.2f} GiB" if result.fits else "nothing fits"
        print(f"{label}: space {size:,} candidates; fit() {fit_s * 1e3:.1f} ms ({result.evaluated} estimated, "
              f"{verdict}, {len(result.alternatives)} alternatives) | {count:,} candidates built + estimated one by "
              f"one: {brute_s:.3f} s (goal < 1 s; {estimates:,} estimates, candidates differing only in a "
              f"vLLM utilisation clamped to the same floor share one)")


if __name__ == "__main__":
    main()
