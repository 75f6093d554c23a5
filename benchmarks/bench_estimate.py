"""Time of one estimate (goal < 1 ms) and of 10,000 (goal < 1 s). Run: python benchmarks/bench_estimate.py"""

from __future__ import annotations

import time

from pytest_gpumem import GRPOSetup, estimate

SETUPS = {
    "Qwen2.5-0.5B full FT, HF generate": {"model": "Qwen/Qwen2.5-0.5B"},
    "Llama-3.1-8B QLoRA + vLLM colocate": {"model": "meta-llama/Llama-3.1-8B", "load_in_4bit": True,
                                           "lora_rank": 16, "use_vllm": True, "dtype": "bfloat16"},
    "gemma-3-1b Unsloth": {"model": "google/gemma-3-1b-it", "backend": "unsloth"},
}


def main() -> None:
    for label, data in SETUPS.items():
        setup = GRPOSetup.from_dict(data)
        start = time.perf_counter()
        estimate(setup, gpu="L4")
        first_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        for _ in range(10_000):
            estimate(setup, gpu="L4")
        many_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(1_000):
            estimate(GRPOSetup.from_dict(data), gpu="L4")
        with_validation_ms = (time.perf_counter() - start)
        print(f"{label:40s} one estimate {first_ms:7.3f} ms (goal < 1 ms) | 10,000 estimates {many_s:6.3f} s "
              f"(goal < 1 s) | setup validation + estimate {with_validation_ms:.3f} ms each")


if __name__ == "__main__":
    main()
