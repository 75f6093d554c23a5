"""The quick-reference table: :func:`~pytest_gpumem.diagnose.fit.fit` for one setup on GPUs of several sizes,
as Markdown (``gpumem table``; the README's table)."""

from __future__ import annotations

from typing import Any, Iterable

from ..spec import GRPOSetup
from ..units import format_gib
from .fit import DEFAULT_KEEP, fit

#: the GPU sizes of the table by default, GiB as torch reports them
TABLE_SIZES_GIB = (8, 12, 16, 24, 40, 48, 80, 141)


def _method_label(setup: Any) -> str:
    if not setup.is_lora:
        return "full"
    return f"{'QLoRA' if setup.load_in_4bit else 'LoRA'} r={setup.lora_rank}"


def _precision_label(setup: Any) -> str:
    """The base weights' precision: a row's size depends on it as much as on the method (an fp32 LoRA row beside
    a bf16 one read as "bigger card, smaller batch" while it was only the precision)."""
    if setup.load_in_4bit:
        return "NF4"
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(setup.dtype, str(setup.dtype))


def _training_label(setup: Any) -> str:
    return f"{_method_label(setup)} ({_precision_label(setup)})"


def _logprobs_label(setup: Any) -> str:
    if not setup.backend_profile.model_head_logprobs:
        return f"{setup.backend_profile.label} chunks"
    if setup.use_liger_kernel:
        return "Liger"
    return "chunked" if setup.logits == "chunked" else "full logits"


def _vllm_label(setup: Any) -> str:
    if not setup.use_vllm:
        return "no (HF generate)"
    if setup.vllm_mode == "server":
        return "server"
    return f"{setup.vllm_gpu_memory_utilization:g}" + (" + sleep" if setup.vllm_enable_sleep_mode else "")


def table(setup: Any, sizes_gib: Iterable[float] = TABLE_SIZES_GIB, headroom: float = 0.1,
          keep: Iterable[str] = DEFAULT_KEEP) -> str:
    """A Markdown table of :func:`fit` results for ``setup`` on GPUs of ``sizes_gib`` (torch-reported GiB)."""

    base = GRPOSetup.coerce(setup)
    header = ("| GPU | method | base precision | b × GA | G | completion | optimizer | checkpointing | log-probs | "
              "vLLM | predicted peak |")
    rows = [header, "|" + "---|" * 11]
    for size in sizes_gib:
        result = fit(base, f"{size}GiB", headroom=headroom, keep=keep, alternatives=False)
        label = f"{size:g} GiB"
        if not result.fits:
            short = result.closest.peak_bytes - result.budget_bytes
            rows.append(f"| {label} | does not fit (short by {format_gib(short)} even with every lever) "
                        + "| " * 9 + "|")
            continue
        s = result.setup
        checkpointing = {True: "on", False: "off", "unsloth": "offloaded"}[s.gradient_checkpointing]
        rows.append(f"| {label} | {_method_label(s)} | {_precision_label(s)} | {s.per_device_train_batch_size} × "
                    f"{s.gradient_accumulation_steps} | {s.num_generations} | {s.max_completion_length} | {s.optim} | "
                    f"{checkpointing} | {_logprobs_label(s)} | {_vllm_label(s)} | {format_gib(result.peak_bytes)} |")
    spec = base.model_spec
    notes = (f"\n{spec.name} ({spec.num_params / 1e9:.2f}B), backend {base.backend}, prompt ≤ {base.max_prompt_length} "
             f"tokens; input: {_training_label(base)}, b × GA = {base.per_device_train_batch_size} × "
             f"{base.gradient_accumulation_steps}, G = {base.num_generations}, "
             f"completion {base.max_completion_length}. "
             f"Sizes are the totals torch reports; each row fits with {headroom:.0%} headroom, keeps "
             f"{base.completions_per_optimizer_step} completions per optimizer step, and is the best by "
             "`gpumem fit`'s order (completion length, group size, capacity, precision, optimizer, speed).")
    return "\n".join(rows) + "\n" + notes
