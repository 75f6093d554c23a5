"""``gpumem validate --plan``: which runs to make on a GPU that is at hand for minutes, in what order, and
how long each is expected to take.

**Order: what each run teaches.** Every matrix entry belongs to one component family (:data:`FAMILIES`: the
thing its measurement checks that no other family's does — full fine-tuning's gradients and optimizer
states, fp32 weights' autocast copies, activations without checkpointing, LoRA, 4-bit, the reference model,
foreach AdamW's temporary, long sequences' logits and masks, gradient accumulation, colocated vLLM, vLLM's
sleep mode). The plan runs the quickest entry of each family first, then the rest quickest first, so a
session cut short has still measured one of everything.

**Expected run time** (:func:`expected_seconds`), a stated model, not a measurement — the first GPU session's
``timings_s`` in validation/*.json is what should replace its rates:

* start-up: :data:`IMPORT_SECONDS` (``python -c "import torch, transformers, trl, peft, accelerate,
  datasets"`` took 7.1 s on this project's 2-core CPU runner, rounded up for a cold GPU image) plus building
  the model at :data:`BUILD_BYTES_PER_SECOND`; colocated vLLM adds :data:`VLLM_START_SECONDS` ("Graph
  capturing finished in 31 secs" in a public T4 start-up log, tests/data/realworld/, plus the profile run);
* per optimizer step: generation, one decode step per completion token at the larger of HF generate's
  Python-loop floor :data:`DECODE_STEP_FLOOR_SECONDS` and reading the weights once at :data:`HBM_BYTES_PER_SECOND`;
  the training forward + backward at 6 FLOPs per active parameter per token (8 with checkpointing's
  recomputation, + 2 per scoring pass) at :data:`TRAINING_FLOPS_PER_SECOND`.
"""

from __future__ import annotations

from typing import Iterable

from ..predict.analytic import estimate
from ..predict.analytic.context import Ctx
from ..predict.analytic.vllm import colocated
from ..units import format_gib

#: matrix entry name (without ``-small``) -> the component family its measurement checks
FAMILIES = {
    "qwen2.5-0.5b-full-bf16-gc": "full fine-tuning (gradients, optimizer states)",
    "qwen2.5-0.5b-full-bf16-nogc": "activations without checkpointing",
    "qwen2.5-0.5b-full-fp32-gc": "fp32 weights (autocast copies)",
    "qwen2.5-0.5b-lora16-bf16-gc": "LoRA adapters",
    "qwen2.5-0.5b-full-bf16-gc-long": "long sequences (logits, masks)",
    "qwen2.5-0.5b-full-bf16-gc-ga2": "gradient accumulation",
    "qwen3-0.6b-full-bf16-gc-beta": "reference model (beta > 0)",
    "llama-3.2-1b-lora16-bf16-gc": "LoRA adapters",
    "llama-3.2-1b-full-bf16-nogc": "activations without checkpointing",
    "gemma-3-1b-lora16-bf16-gc": "LoRA adapters",
    "qwen2.5-1.5b-full-bf16-gc-foreach": "foreach AdamW temporary",
    "qwen2.5-1.5b-qlora16-gc": "4-bit base (NF4)",
    "qwen3-1.7b-lora16-bf16-gc": "LoRA adapters",
    "llama-3.2-3b-lora16-bf16-gc": "LoRA adapters",
    "qwen2.5-3b-full-bf16-gc": "full fine-tuning (gradients, optimizer states)",
    "qwen3-4b-lora16-bf16-nogc": "activations without checkpointing",
    "qwen2.5-7b-lora16-bf16-gc": "LoRA adapters",
    "llama-3.1-8b-qlora16-gc": "4-bit base (NF4)",
    "llama-3.1-8b-lora16-bf16-gc": "LoRA adapters",
    "qwen2.5-0.5b-vllm-lora16": "colocated vLLM",
    "llama-3.2-1b-vllm-full-bf16": "colocated vLLM",
    "qwen2.5-1.5b-vllm-sleep-full-bf16": "vLLM sleep mode",
    "tiny-qwen2-smoke": "pipeline smoke test",
}

IMPORT_SECONDS = 15.0
#: random-init of the model from its config on the GPU (no checkpoint is read): assumed 1 GB/s
BUILD_BYTES_PER_SECOND = 1e9
VLLM_START_SECONDS = 60.0
#: HF generate's per-token Python/launch overhead for one decode step of the whole batch: assumed 25 ms
DECODE_STEP_FLOOR_SECONDS = 0.025
#: assumed effective weight-read bandwidth in decode (an H100's 3.35 TB/s at ~60%)
HBM_BYTES_PER_SECOND = 2e12
#: assumed effective training throughput (bf16 dense, ~30% of an H100's 989 TFLOP/s)
TRAINING_FLOPS_PER_SECOND = 3e14


def family(name: str) -> str:
    return FAMILIES.get(name.removesuffix("-small"), "other")


def expected_seconds(setup, steps: int) -> float:
    """The stated run-time model of the module docstring for ``steps`` optimizer steps (+1 warm-up step)."""
    ctx = Ctx.of(setup, None)
    spec = ctx.spec
    weights = spec.num_params * ctx.weight_bytes_per_param
    seconds = IMPORT_SECONDS + weights / BUILD_BYTES_PER_SECOND
    if colocated(ctx):
        seconds += VLLM_START_SECONDS
    decode = max(DECODE_STEP_FLOOR_SECONDS, weights / HBM_BYTES_PER_SECOND)
    generation = setup.max_completion_length * decode * setup.gradient_accumulation_steps / setup.steps_per_generation
    tokens = setup.per_device_train_batch_size * setup.seq_len * setup.gradient_accumulation_steps
    flops_per_token = 6 + (2 if setup.gradient_checkpointing else 0) + 2 * len(setup.scoring_passes)
    training = flops_per_token * spec.active_params_per_token() * tokens / TRAINING_FLOPS_PER_SECOND
    return seconds + (steps + 1) * (generation + training)


def order(entries: Iterable, steps: int) -> list:
    """One entry per family first (each family's quickest, quickest family first), then the rest quickest first."""
    timed = sorted(entries, key=lambda entry: expected_seconds(entry.setup, steps))
    first, rest, seen = [], [], set()
    for entry in timed:
        (rest if family(entry.name) in seen else first).append(entry)
        seen.add(family(entry.name))
    return first + rest


def plan_text(entries: list, gpu_name: str, total_bytes: int, steps: int) -> str:
    """The plan as printed by ``gpumem validate --plan``."""
    lines = [f"plan for {gpu_name} ({format_gib(total_bytes)}), {len(entries)} runs of {steps} steps, in order "
             "(one per component family first):",
             f"  {'#':>2} {'setup':40s} {'teaches':48s} {'predicted peak':>14s} {'expected':>9s} {'cumulative':>10s}"]
    cumulative = 0.0
    for index, entry in enumerate(entries, 1):
        seconds = expected_seconds(entry.setup, steps)
        cumulative += seconds
        peak = entry.predicted_peak_bytes or estimate(entry.setup, gpu=total_bytes).peak_bytes
        lines.append(f"  {index:>2} {entry.name:40s} {family(entry.name):48s} {format_gib(peak):>14s} "
                     f"{seconds / 60:8.1f}m {cumulative / 60:9.1f}m")
    lines.append(f"total expected: {cumulative / 60:.1f} min (assumed rates, see pytest_gpumem/compare/plan.py; "
                 "--max-minutes N stops before a run that would not finish in time; every finished run is written)")
    return "\n".join(lines)
