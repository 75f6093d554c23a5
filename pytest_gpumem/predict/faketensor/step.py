"""The replayed GRPO step, op for op: the micro-batch, the log-prob paths (materialised and TRL 1.16's chunked
one), the no-grad scoring pass, a training micro-step and the optimizer HF's Trainer builds.

Sources: trl 1.16 ``trainer/grpo_trainer.py``, ``trainer/utils.py``, ``kernels/chunked_logprob.py``; trl 1.9
``grpo_trainer.py`` for the materialised path; transformers 5 ``Trainer.training_step``; accelerate
``convert_outputs_to_fp32``. This module imports torch; the package imports it only when a simulation runs.
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING

import torch

from ...spec import GRPOSetup
from ...versions import installed_version
from . import build
from .fakes import BnbLikeAdamW
from .scope import SimulationError

if TYPE_CHECKING:  # the state of a run
    from .replay import Replay

#: GRPOConfig defaults the simulated loss uses (trl 1.16: temperature 1.0, epsilon 0.2, max_grad_norm 1.0).
TEMPERATURE = 1.0
EPSILON = 0.2
MAX_GRAD_NORM = 1.0


def make_batch(setup: GRPOSetup) -> dict:
    """One micro-batch as TRL buffers it: left-padded prompts, right-padded completions, masks,
    advantages, and the old/reference log-probs when they were computed."""
    b, prompt, completion = setup.per_device_train_batch_size, setup.max_prompt_length, setup.max_completion_length
    batch = {
        "prompt_ids": torch.zeros(b, prompt, dtype=torch.long),
        "prompt_mask": torch.ones(b, prompt, dtype=torch.long),
        "completion_ids": torch.zeros(b, completion, dtype=torch.long),
        "completion_mask": torch.ones(b, completion, dtype=torch.long),
        "advantages": torch.zeros(b, dtype=torch.float32),
    }
    if "old" in setup.scoring_passes:
        batch["old_per_token_logps"] = torch.zeros(b, completion, dtype=torch.float32)
    if setup.beta != 0:
        batch["ref_per_token_logps"] = torch.zeros(b, completion, dtype=torch.float32)
    if setup.use_vllm and setup.vllm_importance_sampling_correction:
        batch["importance_sampling_ratio"] = torch.ones(b, completion, dtype=torch.float32)
    return batch


def autocast(setup: GRPOSetup):
    # accelerate's native AMP (bf16=True, TRL's default) wraps the model's forward in autocast; fp16 weights
    # get fp16 autocast (bf16=False, fp16=True is what such users set); bf16=False without fp16 on fp32 weights
    # is no autocast at all (pure fp32)
    if setup.dtype == "float32" and setup.bf16 is False and not setup.fp16:
        return contextlib.nullcontext()
    dtype = torch.float16 if setup.dtype == "float16" or setup.fp16 else torch.bfloat16
    return torch.autocast("cpu", dtype=dtype)


def per_token_logps(state: Replay, model, input_ids, attention_mask, *, compute_entropy: bool):
    """trl ``_get_per_token_logps_and_entropies`` for one chunk of ``b`` rows."""
    if state.setup.logits == "materialized":
        return logps_materialized(state, model, input_ids, attention_mask, compute_entropy)
    return logps_chunked(state, model, input_ids, attention_mask, compute_entropy)


def logps_materialized(state: Replay, model, input_ids, attention_mask, compute_entropy: bool):
    """trl 1.9 ``_get_per_token_logps_and_entropies``: ``logits_to_keep = C + 1``; accelerate's
    ``convert_outputs_to_fp32`` upcasts the bf16 logits; ``[:, :-1]``; ``div_(temperature)``;
    ``selective_log_softmax``; the entropy under no_grad (``_entropy_bonus_enabled`` is False by default)."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    completion = state.setup.max_completion_length
    state.tracker.region = "forward"
    with autocast(state.setup):
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=completion + 1,
                        use_cache=False)
    state.tracker.region = "head"
    logits = outputs.logits
    del outputs
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # accelerate.utils.operations.convert_outputs_to_fp32
    logits = logits[:, :-1, :]
    logits = logits[:, -completion:, :]
    logits.div_(TEMPERATURE)
    completion_ids = input_ids[:, -completion:]
    logps = selective_log_softmax(logits, completion_ids)
    entropies = None
    if compute_entropy:
        with torch.no_grad():
            entropies = entropy_from_logits(logits)
    del logits
    return logps, entropies


def logps_chunked(state: Replay, model, input_ids, attention_mask, compute_entropy: bool):
    """trl 1.16: ``model(..., labels, fused_lm_head=True)`` → ``add_fused_lm_head``'s forward: the backbone,
    ``last_hidden_state[:, :-1]``, the compacted valid positions (on CUDA ``hidden[mask]``: here the last
    C positions, every completion token valid), TRL's ``ChunkedLogProbFunction``, and the per-token
    outputs scattered back to (b, L−1)."""
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except ImportError:
        raise SimulationError("logits", f"the chunked log-prob path is TRL's ChunkedLogProbFunction (trl ≥ 1.16); "
                              f"the installed trl is {installed_version('trl') or '?'}",
                              fix="install trl>=1.16, or simulate logits='materialized'") from None
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk_size
    except ImportError:  # pragma: no cover - older trl
        chunk_size = 32768
    setup = state.setup
    completion = setup.max_completion_length
    causal_lm = state.causal_lm
    text_config = causal_lm.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    state.tracker.region = "forward"
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-completion] = -100

    def fused_forward(input_ids=None, attention_mask=None, labels=None, **_ignored):  # PEFT passes more
        # trl.trainer.utils.add_fused_lm_head's _fused_forward (the backbone and head looked up per call)
        backbone = getattr(causal_lm, causal_lm.base_model_prefix)
        with autocast(state.setup):
            backbone_outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            state.tracker.region = "head"
            hidden_states = backbone_outputs.last_hidden_state[:, :-1]
            del backbone_outputs
            labels = labels[:, 1:]
            mask = labels != -100
            hidden = hidden_states[:, -completion:].reshape(-1, hidden_states.size(-1))  # = hidden_states[mask]
            targets = labels[:, -completion:].reshape(-1)  # = labels[mask]
            lm_head = causal_lm.get_output_embeddings()
            weight, bias = lm_head.weight, lm_head.bias
            if hasattr(weight, "full_tensor"):  # TRL: "FSDP2 exposes sharded parameters as DTensors" → gather
                weight = weight.full_tensor()
                bias = bias.full_tensor() if bias is not None else None
            outputs = ("log_probs", "entropy")
            per_token = ChunkedLogProbFunction.apply(hidden, weight, bias, targets, TEMPERATURE, chunk_size,
                                                     softcap, 1.0, outputs)
        # masked_scatter onto (b, L-1) zeros; slice_scatter allocates the same and stays data-independent
        start = mask.shape[1] - completion
        scattered = []
        for x in per_token[:2]:
            if x is None:
                scattered.append(None)
                continue
            full = x.new_zeros(mask.shape).slice_scatter(x.view(mask.shape[0], completion), dim=1, start=start)
            scattered.append(full)
        return tuple(scattered)  # TRL returns them in a FusedCausalLMOutput: FSDP2 hooks its backward on them

    if state.sharding is None:
        log_probs, entropy = fused_forward(input_ids, attention_mask, labels)
    else:
        # TRL calls the (FSDP2 root) model, whose patched forward is the fused one: the root's hooks run
        from .fsdp import forward_through_root

        # the FSDP root: the causal LM itself, or the PeftModel around it (whose forward reaches the patched one)
        root = state.fsdp_roots.get(id(causal_lm), causal_lm)
        with forward_through_root(causal_lm, fused_forward):
            log_probs, entropy = root(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    logps = log_probs[:, -completion:]
    entropies = entropy[:, -completion:] if compute_entropy and entropy is not None else None
    return logps, entropies


def scoring_pass(state: Replay, policy, reference, batch, which: str) -> None:
    """One no-grad log-prob pass over ``b`` rows (TRL scores the generation batch in chunks of ``b``),
    with gradient checkpointing disabled (trl ``disable_gradient_checkpointing``)."""
    state.tracker.region = "inputs"
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    if state.setup.gradient_checkpointing:
        build.set_checkpointing(state.causal_lm, False)
    try:
        with torch.no_grad():
            if which == "ref" and reference is not None:
                saved = state.causal_lm
                state.causal_lm = reference
                try:
                    logps, _ = per_token_logps(state, reference, input_ids, attention_mask, compute_entropy=False)
                finally:
                    state.causal_lm = saved
            elif which == "ref" and state.setup.is_lora:
                with policy.disable_adapter():
                    logps, _ = per_token_logps(state, policy, input_ids, attention_mask, compute_entropy=False)
            else:
                logps, _ = per_token_logps(state, policy, input_ids, attention_mask, compute_entropy=False)
        del logps
    finally:
        if state.setup.gradient_checkpointing:
            build.set_checkpointing(state.causal_lm, True)


def training_micro_step(state: Replay, policy, batch) -> None:
    """transformers ``Trainer.training_step`` → trl ``_compute_loss`` (loss_type "dapo", the 1.16 default;
    the other loss types differ only in (b, C) fp32 tensors) → ``accelerator.backward(loss)``."""
    setup = state.setup
    tracker = state.tracker
    tracker.region = "inputs"
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    mask = batch["completion_mask"]
    logps, entropies = per_token_logps(state, policy, input_ids, attention_mask, compute_entropy=True)
    tracker.region = "head"
    advantages = batch["advantages"].unsqueeze(1)
    old = batch.get("old_per_token_logps")
    old = logps.detach() if old is None else old
    coef_1 = torch.exp(logps - old)
    if setup.beta != 0:
        ref = batch["ref_per_token_logps"]
        per_token_kl = torch.exp(ref - logps) - (ref - logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - EPSILON, 1 + EPSILON)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if setup.use_vllm and setup.vllm_importance_sampling_correction:
        per_token_loss = per_token_loss * batch["importance_sampling_ratio"]
    if setup.beta != 0:
        per_token_loss = per_token_loss + setup.beta * per_token_kl
    loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    del logps, entropies, coef_1, coef_2, per_token_loss, input_ids, attention_mask
    if setup.beta != 0:
        del per_token_kl
    tracker.region = "backward_head"
    tracker.module = ""
    loss.backward()
    del loss
    tracker.region = "after_backward"


def param_groups(policy, trainable):
    """transformers ``Trainer.get_decay_parameter_names``: no weight decay on biases and norms — two groups,
    which matters for foreach AdamW (its step temporary is per group)."""
    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay, no_decay = [], []
    for name, param in policy.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if any(re.search(p, name.lower()) for p in forbidden) else decay).append(param)
    return [g for g in ({"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def make_optimizer(state: Replay, policy, trainable):
    """The optimizer HF's Trainer builds for ``optim``, brought to steady state by one step on zero
    gradients (the state is created lazily at the first step; it is the same size at every later one)."""
    optim = state.setup.optim
    groups = param_groups(policy, trainable)
    state.tracker.region = "optimizer_warmup"
    if optim == "adamw_torch_fused":
        optimizer = torch.optim.AdamW(groups, lr=1e-6, fused=True)
    elif optim in ("adamw_torch", "adamw_hf"):
        # torch picks foreach on CUDA by default (_default_to_fused_or_foreach); on CPU it would not
        optimizer = torch.optim.AdamW(groups, lr=1e-6, foreach=True)
    elif optim in ("adamw_8bit", "paged_adamw_8bit", "adamw_bnb_8bit", "paged_adamw_32bit"):
        optimizer = BnbLikeAdamW(groups, bits=32 if optim == "paged_adamw_32bit" else 8)
    elif optim == "sgd":
        optimizer = torch.optim.SGD(groups, lr=1e-6)
    else:  # pragma: no cover - _check_supported guards the rest
        raise SimulationError("optim", f"{optim!r} is not simulated", fix="use `gpumem estimate`")
    for param in trainable:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def optimizer_state_ids(tracker, optimizer, param_names: dict) -> dict:
    """alloc id → "<parameter>.<state key>" for every tensor the optimizer holds."""
    ids = {}
    for param, param_state in optimizer.state.items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                ids[tracker.alloc_id(value)] = f"{param_names.get(id(param), '?')}.{key}"
    return ids

