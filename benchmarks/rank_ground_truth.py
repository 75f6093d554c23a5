"""The FSDP2 rank simulation against the CPU allocator, for several world sizes and setups: the figures of
docs/distributed-simulation.md §2.

    python benchmarks/rank_ground_truth.py

Each row replays the same tiny GRPO step (Qwen2.5-0.5B's shapes with 2 layers, b = 2, L = 32 + 32) as rank 0
of N twice under a fake process group: on fake tensors with the tracker (the simulation), and on real
(uninitialised) CPU tensors under ``torch.profiler(profile_memory=True)``, whose Allocation events give the
allocator's own peak (``measure.profiling.cpu_allocator_peak_bytes``). Prints both peaks and their difference.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pytest_gpumem.measure.profiling import cpu_allocator_peak_bytes  # noqa: E402
from pytest_gpumem.predict.faketensor import reduced_config, replay  # noqa: E402
from pytest_gpumem.predict.faketensor.ranks import ShardingPlan  # noqa: E402
from pytest_gpumem.spec import GRPOSetup  # noqa: E402

SMALL = {"model": reduced_config("Qwen/Qwen2.5-0.5B", 2), "per_device_train_batch_size": 2, "num_generations": 2,
         "max_prompt_length": 32, "max_completion_length": 32}
CASES = [(1, {}), (4, {}), (8, {"beta": 0.04}), (2, {"use_vllm": True}), (2, {"gradient_accumulation_steps": 2}),
         (4, {"lora_rank": 8, "use_vllm": True})]
if len(sys.argv) > 1:  # e.g. `python benchmarks/rank_ground_truth.py 5`: only the sixth case
    CASES = [CASES[int(i)] for i in sys.argv[1:]]


def main() -> int:
    print("N  setup                           simulated B      allocator B   sim - alloc   real-tensor tracker - alloc")
    for world_size, changes in CASES:
        setup = GRPOSetup.coerce({**SMALL, **changes})
        started = time.perf_counter()
        simulated, real_tracker, allocator = replay.against_allocator(
            setup, ShardingPlan(world_size=world_size), cpu_allocator_peak_bytes)
        label = ", ".join(f"{k}={v}" for k, v in changes.items()) or "defaults"
        print(f"{world_size:<2} {label:30s} {simulated:14,d} {allocator:14,d} "
              f"{simulated - allocator:+12,d} {real_tracker - allocator:+12,d}"
              f"   ({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
