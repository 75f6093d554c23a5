"""Where the child measures: the trainer's own methods wrapped into phases, the step callback, the token-length
hooks and the injected faults.

Phases are found by wrapping the trainer's methods (trl 1.16 ``trl/trainer/grpo_trainer.py``): ``training_step``
(training; it calls ``_prepare_inputs`` → generation and scoring), ``_generate_and_score_completions``
(scoring: rewards, old/reference log-probs; it contains generation), ``_generate`` (generation: HF ``generate``
or vLLM, weight sync included), and transformers' ``_clip_grad_norm`` plus the ``on_pre_optimizer_step`` /
``on_optimizer_step`` callbacks (optimizer step; transformers ``trainer.py``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ...breakdown import Phase
from ...units import format_gib
from ..sampler import NvmlSampler, PhaseTracker, RssSampler
from ..snapshot import torch_device_uuid
from .results import gradient_bytes, optimizer_state_bytes
from .tiny import exact_length_ids

if TYPE_CHECKING:
    from .process import Child


def context(child: Child) -> dict[str, Any]:
    """What is live besides the model (optimizer states, gradients), read at every phase boundary."""
    trainer = child.trainer
    if trainer is None:
        return {}
    return {"optimizer_state_bytes": optimizer_state_bytes(getattr(trainer, "optimizer", None)),
            "gradient_bytes": gradient_bytes(trainer.model)}


def install_hooks(child: Child, trainer) -> None:
    """Samplers, the phase tracker, and the trainer's methods wrapped so each phase is measured apart."""
    samplers = []
    if child.cuda:
        nvml_sampler = NvmlSampler(0, uuid=torch_device_uuid(child.torch, 0))
        if not nvml_sampler.available:  # e.g. a MIG UUID this driver cannot look up: match by index
            nvml_sampler = NvmlSampler(0)
        if nvml_sampler.available:
            samplers.append(nvml_sampler)
        else:
            child.result["gpu"]["reasons"]["nvml_peak_bytes"] = nvml_sampler.reason
    rss = RssSampler()
    if rss.available:
        samplers.append(rss)
    else:
        child.result["host_memory"]["reason"] = rss.reason
    child.tracker = PhaseTracker(child.torch if child.cuda else None, 0, tuple(samplers),
                                 context=lambda: context(child))
    wraps = {"training_step": Phase.TRAINING.value, "_generate_and_score_completions": Phase.SCORING.value,
             "_generate": Phase.GENERATION.value}
    for method, phase in wraps.items():
        if hasattr(trainer, method):
            setattr(trainer, method, wrap(child, getattr(trainer, method), phase))
        else:
            child.note(f"trainer has no {method}: the {phase} phase is not separated by it")
    if hasattr(trainer, "_clip_grad_norm"):
        trainer._clip_grad_norm = wrap_clip(child, trainer._clip_grad_norm)
    for method, hook in (("_tokenize_prompts", hook_tokenize_prompts),
                         ("_generate_single_turn", hook_generate_single_turn)):
        if hasattr(trainer, method):
            setattr(trainer, method, hook(child, getattr(trainer, method)))


def wrap(child: Child, function, phase: str):
    tracker = child.tracker

    def wrapped(*args, **kwargs):
        with tracker.phase(phase):
            maybe_fault(child, phase)
            return function(*args, **kwargs)

    wrapped.__wrapped__ = function
    return wrapped


def wrap_clip(child: Child, function):
    """Gradient clipping opens the optimizer-step phase (transformers calls it just before
    ``on_pre_optimizer_step``); ``on_optimizer_step`` closes it, so one step is one occurrence."""
    tracker = child.tracker

    def wrapped(*args, **kwargs):
        if tracker.current != Phase.OPTIMIZER.value:
            tracker.enter(Phase.OPTIMIZER.value)
        return function(*args, **kwargs)

    wrapped.__wrapped__ = function
    return wrapped


def maybe_fault(child: Child, phase: str) -> None:
    if child.fault_fired or child.fault is None:
        return
    if child.fault == "oom-in-generation" and phase == Phase.GENERATION.value:
        child.fault_fired = True
        oom_type = getattr(child.torch, "OutOfMemoryError", None) or child.torch.cuda.OutOfMemoryError
        raise oom_type(child.request.get("fault_message") or "CUDA out of memory. Tried to allocate 2.00 GiB")


def hook_tokenize_prompts(child: Child, function):
    """Prompts of exactly max_prompt_length tokens, whatever the tokenizer (TRL ≥ 0.28 does not truncate)."""
    length = child.setup.max_prompt_length
    filler = child.tokenizer.pad_token_id or 0

    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        if isinstance(result, tuple) and result and isinstance(result[0], list):
            ids = result[0]
            if any(len(row) != length for row in ids):
                child.result["tokens"]["prompt_length_forced"] = True
                ids = [exact_length_ids(list(row), length, filler) for row in ids]
                result = (ids, *result[1:])
        return result

    return wrapped


def hook_generate_single_turn(child: Child, function):
    tokens = child.result["tokens"]

    def wrapped(prompt_ids, *args, **kwargs):
        output = function(prompt_ids, *args, **kwargs)
        completion_ids = output[0] if isinstance(output, tuple) else None
        prompt_lengths = [len(row) for row in prompt_ids]
        tokens["prompt_min"] = min(prompt_lengths + [tokens.get("prompt_min", 10**9)])
        tokens["prompt_max"] = max(prompt_lengths + [tokens.get("prompt_max", 0)])
        tokens["prompts_generated"] = tokens.get("prompts_generated", 0) + len(prompt_ids)
        if completion_ids is not None:
            lengths = [len(row) for row in completion_ids]
            tokens["completion_min"] = min(lengths + [tokens.get("completion_min", 10**9)])
            tokens["completion_max"] = max(lengths + [tokens.get("completion_max", 0)])
            tokens["completions_generated"] = tokens.get("completions_generated", 0) + len(lengths)
        return output

    return wrapped


def callback(child: Child):
    """A TrainerCallback: step boundaries, the optimizer step's phase, the persistent sample after a step."""
    from transformers import TrainerCallback

    class PhaseCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            child.step_started = time.perf_counter()
            if child.tracker is not None:
                child.tracker.step = state.global_step + 1

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if child.tracker is not None and child.tracker.current != Phase.OPTIMIZER.value:
                child.tracker.enter(Phase.OPTIMIZER.value)

        def on_optimizer_step(self, args, state, control, **kwargs):
            if child.tracker is not None:
                child.tracker.exit(Phase.OPTIMIZER.value)

        def on_step_end(self, args, state, control, **kwargs):
            on_step_end(child, state)

    return PhaseCallback()


def on_step_end(child: Child, state) -> None:
    seconds = time.perf_counter() - (child.step_started or child.started)
    child.result["steps_completed"] = int(state.global_step)
    child.result["timings_s"].setdefault("steps", []).append(round(seconds, 3))
    detail = ""
    if child.cuda:
        torch = child.torch
        free, total = torch.cuda.mem_get_info(0)
        reserved = int(torch.cuda.memory_reserved(0))
        # between steps: grads freed by zero_grad(set_to_none=True), optimizer states live
        child.result["gpu"]["persistent_sample"] = {
            "step": int(state.global_step), "allocated_bytes": int(torch.cuda.memory_allocated(0)),
            "reserved_bytes": reserved, "non_torch_bytes": int(total - free) - reserved,
            "context": context(child)}
        peak = child.tracker.overall_peak_reserved_bytes if child.tracker else None
        if peak is not None:
            detail = f", peak reserved so far {format_gib(max(peak, torch.cuda.max_memory_reserved(0)))}"
    child.progress(f"step {state.global_step}/{child.result['steps_requested']} done in {seconds:.1f}s{detail}")
