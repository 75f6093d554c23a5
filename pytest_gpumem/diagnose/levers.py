"""Levers: the one-step changes of a setup that lower its peak, each re-estimated and ranked by what it saves.

This automates the method users follow by hand: map the consumers, calculate before changing, pull the biggest
levers first, keep the effective batch with gradient accumulation. ``diagnose.fit`` searches combinations of
the same levers; ``diagnose.explain`` ranks them for an OOM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..breakdown import Component
from ..errors import SetupError
from ..gpus import resolve_gpu
from ..predict.analytic import Estimate, estimate
from ..predict.analytic.constants import CUDA_CONTEXT_BYTES
from ..units import format_gib
from .strategy_levers import generation_candidates, strategy_candidates

#: 8-bit optimizers (bitsandbytes) and optimizers without Adam moments: the 8-bit lever does not apply
_EIGHT_BIT_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "adamw_bnb_8bit")
_STATELESS_OPTIMIZERS = ("sgd", "adafactor")


@dataclass(frozen=True)
class Lever:
    """A concrete one-step change of a setup and what it does, by re-estimating the changed setup.

    ``saves_bytes`` = predicted peak before − after (never negative: levers that save nothing are dropped);
    ``fits_after`` judges the changed setup against the GPU or budget (None when there is neither);
    ``trade_off`` says what the change costs."""

    name: str
    changes: Mapping[str, tuple[Any, Any]]  # field -> (old, new)
    saves_bytes: int
    peak_after_bytes: int
    fits_after: bool | None
    trade_off: str
    setup: Any = field(default=None, compare=False, repr=False)  # the changed GRPOSetup
    phase_saves_bytes: int | None = None  # saving in the phase that failed (when known)

    @property
    def change(self) -> str:
        """``per_device_train_batch_size 8 → 4, gradient_accumulation_steps 1 → 2``"""
        return ", ".join(f"{name} {_show(old)} → {_show(new)}" for name, (old, new) in self.changes.items())

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "change": self.change,
                "changes": {name: {"from": old, "to": new} for name, (old, new) in self.changes.items()},
                "saves_bytes": self.saves_bytes, "peak_after_bytes": self.peak_after_bytes,
                "fits_after": self.fits_after, "trade_off": self.trade_off}
        if self.phase_saves_bytes is not None:
            data["phase_saves_bytes"] = self.phase_saves_bytes
        return data

    def line(self) -> str:
        fits = {True: "fits", False: "still too big", None: ""}[self.fits_after]
        after = f"peak {format_gib(self.peak_after_bytes)}" + (f", {fits}" if fits else "")
        return f"{self.name}: {self.change} — saves {format_gib(self.saves_bytes)} ({after}); costs: {self.trade_off}"


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "null"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def min_vllm_utilization(setup: Any, total_bytes: int, result: Any = None) -> float | None:
    """The smallest ``vllm_gpu_memory_utilization`` (2 decimals, rounded up) whose KV pool still holds one
    full sequence: ``(vLLM weights + activation peak + non-torch + CUDA graphs + one sequence) / total``
    (Unsloth scales by the memory free when vLLM starts: total − CUDA context). None without colocated vLLM.
    ``result``: an estimate of ``setup`` at any utilisation (the fixed parts do not depend on it)."""
    if not (setup.use_vllm and setup.vllm_mode == "colocate"):
        return None
    if result is None:
        result = estimate(setup, gpu=total_bytes)
    # the generation phase: vLLM is awake there even in sleep mode (the persistent phase then omits it)
    persistent = result.breakdown.components("generation")
    fixed = sum(persistent.get(c.value, 0) for c in (Component.VLLM_WEIGHTS, Component.VLLM_ACTIVATIONS,
                                                      Component.VLLM_NON_TORCH, Component.VLLM_CUDA_GRAPHS))
    basis = total_bytes - CUDA_CONTEXT_BYTES if setup.backend_profile.vllm.budget_excludes_context else total_bytes
    needed = (fixed + setup.model_spec.kv_cache_bytes(setup.seq_len)) / basis
    return min(1.0, -(-round(needed * 10000) // 100) / 100)  # ceil to 0.01 (via integer math, no float drift)


def batch_halved_changes(setup: Any) -> dict[str, Any] | None:
    """``per_device_train_batch_size`` halved with ``gradient_accumulation_steps`` doubled: completions per
    optimizer step unchanged; an explicit ``steps_per_generation`` doubles too, so the generation batch
    (b × steps_per_generation, which must stay divisible by num_generations — TRL GRPOConfig) is unchanged."""
    b = setup.per_device_train_batch_size
    if b < 2 or b % 2:
        return None
    changes: dict[str, Any] = {"per_device_train_batch_size": b // 2,
                               "gradient_accumulation_steps": setup.gradient_accumulation_steps * 2}
    if "steps_per_generation" in setup.explicit_fields:
        changes["steps_per_generation"] = setup.steps_per_generation * 2
    return changes


def lever_candidates(setup: Any, total_bytes: int | None = None) -> list[tuple[str, dict[str, Any], str]]:
    """The one-step changes that apply to ``setup``: ``(name, {field: new value}, trade_off)``.

    Nothing here claims a saving: :func:`rank_levers` re-estimates each one."""
    s = setup
    out: list[tuple[str, dict[str, Any], str]] = []
    colocated = s.use_vllm and s.vllm_mode == "colocate"
    if colocated and total_bytes:
        floor = min_vllm_utilization(s, total_bytes) or 0.01
        new = max(round(s.vllm_gpu_memory_utilization - 0.1, 2), floor)
        if new < s.vllm_gpu_memory_utilization:
            out.append(("vLLM utilisation −0.1", {"vllm_gpu_memory_utilization": new},
                        f"smaller KV cache (floor {floor:g}: one {s.seq_len}-token sequence): fewer sequences "
                        "decoded at once, slower generation"))
    if colocated and not s.vllm_enable_sleep_mode:
        out.append(("vLLM sleep mode", {"vllm_enable_sleep_mode": True},
                    "vLLM's weights and KV cache are released outside generation and restored for it: "
                    "a few seconds of wake-up per generation round"))
    if colocated and s.backend_profile.vllm.server_mode:
        out.append(("vLLM server mode", {"vllm_mode": "server"},
                    "vLLM moves to other GPU(s) (`trl vllm-serve`): needs a second GPU"))
    batch = batch_halved_changes(s)
    if batch:
        out.append(("batch halved, accumulation doubled", batch,
                    "same completions per optimizer step, twice the micro-steps: slower step"))
    if s.steps_per_generation >= 2 and s.steps_per_generation % 2 == 0:
        out.append(("generation batch halved", {"steps_per_generation": s.steps_per_generation // 2},
                    "rollouts generated in twice as many rounds of half the rows: lower generation throughput"))
    if s.num_generations >= 4 and s.num_generations % 2 == 0:
        out.append(("num_generations halved", {"num_generations": s.num_generations // 2},
                    "smaller groups: noisier group-relative advantages"))
    completion = _shorter(s.max_completion_length)
    if completion:
        out.append(("completion length −25%", {"max_completion_length": completion},
                    "completions truncated earlier: long answers / reasoning cut off"))
    prompt = _shorter(s.max_prompt_length)
    if prompt:
        out.append(("prompt length −25%", {"max_prompt_length": prompt},
                    "longer prompts must be filtered or truncated (TRL ≥ 0.28 does not truncate prompts)"))
    if s.is_lora and s.lora_rank >= 2:
        out.append(("LoRA rank halved", {"lora_rank": s.lora_rank // 2}, "fewer trainable parameters (capacity)"))
    if not s.is_lora:
        out.append(("LoRA instead of full fine-tuning", {"lora_rank": 16, "lora_target_modules": "all-linear"},
                    "trains rank-16 adapters on all linear layers instead of every weight"))
    if not s.gradient_checkpointing:
        out.append(("gradient checkpointing on", {"gradient_checkpointing": True},
                    "the forward is recomputed in backward: ~30% slower training step"))
    elif s.backend_profile.offloaded_checkpointing and s.gradient_checkpointing is True:
        out.append(("Unsloth offloaded checkpointing", {"gradient_checkpointing": "unsloth"},
                    "checkpoints offloaded to CPU RAM: slightly slower backward"))
    if s.optim not in _EIGHT_BIT_OPTIMIZERS + _STATELESS_OPTIMIZERS:
        out.append(("8-bit optimizer", {"optim": "adamw_8bit"},
                    "bitsandbytes 8-bit AdamW states: needs bitsandbytes; slightly different numerics"))
    if s.optim in ("adamw_torch", "adamw_hf"):
        out.append(("fused AdamW", {"optim": "adamw_torch_fused"}, "none (fused CUDA kernel, torch ≥ 2.x)"))
    if s.backend_profile.liger_kernel and s.logits == "materialized" and not s.use_liger_kernel:
        out.append(("chunked log-probs (Liger)", {"use_liger_kernel": True},
                    "needs liger-kernel (or TRL ≥ 1.16, which chunks by default); same results"))
    if s.cast_lm_head_to_fp32:
        out.append(("lm_head in bf16", {"cast_lm_head_to_fp32": False}, "bf16 logits: less precise log-probs"))
    if s.backend_profile.loads_by_name_in_fp32 and s.dtype == "float32" and not s.load_in_4bit:
        out.append(("bf16 weights", {"dtype": "bfloat16"},
                    "no fp32 master weights: small updates can be lost to bf16 rounding"
                    if not s.is_lora else "bf16 base weights (adapters stay fp32): standard for LoRA"))
    if s.is_lora and not s.load_in_4bit:
        out.append(("4-bit base (QLoRA)", {"load_in_4bit": True},
                    "NF4-quantised base: slower forward (dequantisation), slight quality loss"))
    if s.beta != 0 and not s.is_lora:
        out.append(("no reference model (beta = 0)", {"beta": 0.0},
                    "no KL penalty towards the reference policy"))
    if s.attn_implementation in ("sdpa", "eager"):
        out.append(("FlashAttention-2", {"attn_implementation": "flash_attention_2"},
                    "needs flash-attn (Ampere or newer); no padding mask"))
    if s.use_vllm and s.vllm_mode == "colocate":
        out.append(("generate with transformers, not vLLM", {"use_vllm": False},
                    "HF generate: several times slower rollouts"))
    out += strategy_candidates(s)
    out += generation_candidates(s)
    return out


def _shorter(length: int) -> int | None:
    """75% of a length, rounded down to a multiple of 8 above 64 tokens (None when it would not shrink)."""
    new = int(length * 0.75)
    if new >= 64:
        new -= new % 8
    return new if 1 <= new < length else None


def _apply(setup: Any, changes: Mapping[str, Any]) -> Any:
    """``setup.replace(**changes)``; when TRL's divisibility rule breaks (SetupError), halve num_generations
    along (b and G together), else give up (None)."""
    if "distributed" in changes:  # a strategy switch drops the old strategy's knobs
        rest = {k: v for k, v in changes.items() if k != "distributed"}
        try:
            return setup.with_strategy(changes["distributed"], **rest)
        except SetupError:
            return None
    try:
        return setup.replace(**changes)
    except SetupError:
        if "num_generations" in changes or setup.num_generations < 4 or setup.num_generations % 2:
            return None
        try:
            return setup.replace(**changes, num_generations=setup.num_generations // 2)
        except SetupError:
            return None


#: a lever must save at least this fraction of the predicted peak to be shown: the estimate itself is held to the
#: simulation within 5% (2.0% worst on full-size setups, docs/accuracy.md), so a smaller saving is noise — one
#: lever once read "saves 0.049 MiB" (issue 11)
MIN_SAVING_FRACTION = 0.01


def min_saving_bytes(peak_bytes: int) -> int:
    """The smallest saving a lever must make to be listed (:data:`MIN_SAVING_FRACTION` of the peak)."""
    return max(1, int(peak_bytes * MIN_SAVING_FRACTION))


def no_lever_text(peak_bytes: int) -> str:
    """What to say when no lever passes the threshold."""
    return (f"no one-step lever saves {format_gib(min_saving_bytes(peak_bytes))} or more "
            f"({MIN_SAVING_FRACTION:.0%} of the predicted peak): none helps enough to list")


def rank_levers(setup: Any, gpu: Any = None, *, budget_bytes: int | None = None, headroom: float = 0.0,
                phase: str | None = None, n: int | None = None) -> list[Lever]:
    """Every applicable one-step lever, re-estimated, ranked by saving (largest first).

    ``setup``: a GRPOSetup (or dict / path) or an :class:`~pytest_gpumem.predict.analytic.Estimate`.
    ``fits_after`` is judged against ``budget_bytes`` when given, else against ``gpu``'s total with
    ``headroom`` (and vLLM's start-up checks). Levers that save less than :func:`min_saving_bytes` or give an
    invalid setup are dropped."""
    if isinstance(setup, Estimate):
        before = setup
        gpu = resolve_gpu(gpu) if gpu is not None else setup.gpu
        if gpu is not setup.gpu:
            before = estimate(setup.setup, gpu)
    else:
        gpu = resolve_gpu(gpu)
        before = estimate(setup, gpu)
    base = before.setup
    total = gpu.total_bytes if gpu is not None else None
    levers: list[Lever] = []
    for name, changes, trade_off in lever_candidates(base, total):
        after_setup = _apply(base, changes)
        if after_setup is None:
            continue
        after = estimate(after_setup, gpu)
        saves = before.peak_bytes - after.peak_bytes
        if saves < min_saving_bytes(before.peak_bytes):
            continue
        actual = {key: (getattr(base, key), getattr(after_setup, key)) for key in
                  list(changes) + ["num_generations"] if getattr(base, key) != getattr(after_setup, key)}
        if "num_generations" in actual and "num_generations" not in changes:
            trade_off += "; num_generations halved too (TRL: the generation batch must divide by it)"
        if budget_bytes is not None:
            fits = after.peak_bytes <= budget_bytes and not _vllm_refuses(after)
        elif gpu is not None:
            fits = after.fits(headroom=headroom)
        else:
            fits = None
        phase_saves = None
        if phase and phase in before.breakdown.phases and phase in after.breakdown.phases:
            phase_saves = before.breakdown.total(phase) - after.breakdown.total(phase)
        levers.append(Lever(name, actual, saves, after.peak_bytes, fits, trade_off, after_setup, phase_saves))
    levers.sort(key=lambda lever: (-lever.saves_bytes, lever.name))
    return levers[:n] if n is not None else levers


def _vllm_refuses(result: Any) -> bool:
    return any(w.startswith("vLLM would refuse") for w in result.warnings)


def levers_for(estimate_or_setup: Any, budget_bytes: int | None = None, n: int = 3, gpu: Any = None) -> list[Lever]:
    """The top ``n`` levers for a plugin failure message: those that bring the peak under ``budget_bytes``
    first (largest saving first), then the rest by saving. Each lever's ``line()`` is one printable line."""
    levers = rank_levers(estimate_or_setup, gpu, budget_bytes=budget_bytes)
    levers.sort(key=lambda lever: (lever.fits_after is not True, -lever.saves_bytes, lever.name))
    return levers[:n]
