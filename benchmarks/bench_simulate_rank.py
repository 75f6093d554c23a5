"""Benchmark: simulate rank 0 of an 8-GPU FSDP2 GRPO job for Qwen2.5-1.5B on this machine's CPU.

    python benchmarks/bench_simulate_rank.py              # prints the time and rank 0's peak
    python benchmarks/bench_simulate_rank.py --world-size 64

The model comes from the registry config (``data/models.json``: Qwen/Qwen2.5-1.5B, all 28 layers), with no
weights: FakeTensorMode under a fake process group of 8 ranks; the policy wrapped by accelerate's FSDP2
(per decoder layer + the root), TRL defaults otherwise (fp32 master / bf16 compute, gradient checkpointing,
chunked log-probs, fused AdamW) at b = 8, L = 512 + 512, with the reference model (beta = 0.04, TRL's root-only
wrap) and the FSDP2 → vLLM weight sync. Goal: under 30 s warm on 2 cores (the issue's figure).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pytest_gpumem.predict.faketensor import run_simulation  # noqa: E402
from pytest_gpumem.units import GIB  # noqa: E402

GOAL_SECONDS = 30.0
SETUP = {"model": "Qwen/Qwen2.5-1.5B", "per_device_train_batch_size": 8, "num_generations": 8,
         "max_prompt_length": 512, "max_completion_length": 512, "beta": 0.04, "use_vllm": True}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=8)
    args = parser.parse_args(argv)
    timings = []
    for label in ("cold", "warm"):
        started = time.perf_counter()
        simulation = run_simulation(SETUP, world_size=args.world_size, strategy="fsdp2")
        timings.append(time.perf_counter() - started)
        print(f"{label}: {timings[-1]:.1f} s ({simulation.num_ops} aten ops)", flush=True)
    breakdown = simulation.breakdown
    print(f"Qwen2.5-1.5B, rank 0 of {args.world_size} (FSDP2), b=8, L=1024: warm {timings[-1]:.1f} s — goal < "
          f"{GOAL_SECONDS:.0f} s: {'met' if timings[-1] < GOAL_SECONDS else 'NOT met'}")
    for phase in breakdown.phase_names():
        parts = ", ".join(f"{name} {num_bytes / GIB:.2f}" for name, num_bytes in breakdown.top_components(phase, 5))
        print(f"  {phase:15s} {breakdown.total(phase) / GIB:6.2f} GiB  ({parts})")
    return 0 if timings[-1] < GOAL_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
