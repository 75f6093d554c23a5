"""Overhead of GpuMemCallback per training step (goal: < 1 % of step time).

    python benchmarks/bench_callback.py [--steps 10] [--device cpu|cuda] [--threads 1]

A real TRL ``GRPOTrainer`` on the tiny local Qwen2 (random weights, no hub) trains ``--steps`` steps with the
callback. The callback times its own per-step hooks (``on_step_begin``, ``on_step_end``, ``on_log``:
``overhead_seconds``); that time over the steps is its overhead, compared with the mean step time of the same run.
The one-time ``on_train_begin`` (building the setup, the estimate, the levers) is printed apart. On CPU the
hooks only bookkeep (no CUDA to read); with ``--device cuda`` they also reset and read torch's peaks and NVML.
The tiny model's step is short (a few hundred ms on CPU), so the percentage is an upper bound for real models.
``--threads`` sets torch's CPU threads (default 1: on a shared 2-core machine more threads oversubscribe the cores
and the step time, not the callback, becomes the noise).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pytest_gpumem.measure.child import tiny  # noqa: E402

GOAL = 0.01


def train(steps: int, device: str, callbacks: list) -> float:
    """Seconds of ``trainer.train()`` for ``steps`` steps of the tiny model."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    vocab = tiny.TINY_QWEN2_CONFIG["vocab_size"]
    model = tiny.build_model(tiny.build_config(tiny.TINY_QWEN2_CONFIG), device=device)
    args = GRPOConfig(output_dir="/tmp/gpumem-bench-callback", max_steps=steps, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=32, report_to="none", save_strategy="no",
                      logging_steps=1, disable_tqdm=True, learning_rate=1e-6, seed=0, use_cpu=device == "cpu",
                      bf16=False)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [float(len(c) % 7) for c in completions],
                          args=args, train_dataset=Dataset.from_dict({"prompt": tiny.make_prompts(4 * steps + 8, 32,
                                                                                                   vocab)}),
                          processing_class=tiny.build_tokenizer(vocab), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # keep the output to the figures (disable_tqdm adds the printer)
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    from pytest_gpumem.trl import GpuMemCallback

    callback = GpuMemCallback(gpu="24GiB" if args.device == "cpu" else None, stream=io.StringIO())
    seconds = train(args.steps, args.device, [callback])
    step_seconds = seconds / args.steps
    per_step = callback.overhead_seconds / args.steps
    share = per_step / step_seconds
    print(f"device {args.device} ({args.threads} CPU thread(s)), {args.steps} steps of the tiny Qwen2 GRPO run: "
          f"{step_seconds * 1e3:.1f} ms per step")
    print(f"callback per-step hooks: {per_step * 1e3:.3f} ms per step = {share:.3%} of step time "
          f"(goal < {GOAL:.0%}: {'met' if share < GOAL else 'NOT met'})")
    print(f"on_train_begin once: {callback.start_seconds * 1e3:.1f} ms (setup from the trainer, estimate, levers)")
    return 0 if share < GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
