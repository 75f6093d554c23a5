"""Building the simulated models: the transformers architecture from the spec on ``meta``, LoRA wrapped there by
PEFT, a 4-bit base's NF4 storage, then every tensor swapped for a fake CPU one; and TRL's checkpointing.

This module imports torch and transformers; the package imports it only when a simulation runs.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM

from ...versions import installed_version
from .fakes import quantise_linears_nf4, register_fake_flash_attention, swap_to_fake
from .hf_config import hf_config_for

if TYPE_CHECKING:  # the state of a run
    from .replay import Replay


def torch_dtype(name: str):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_model(state: Replay, fake_mode, *, reference: bool = False):
    """The policy (or reference) model on ``meta``, wrapped by PEFT there, then swapped to fake tensors.

    PEFT cannot wrap inside FakeTensorMode, and ``.to(dtype)`` under fake mode cannot swap parameters
    (docs/cpu-simulation.md), so the dtype is given at construction and the swap is done by hand."""
    setup, spec = state.setup, state.spec
    config = hf_config_for(spec, setup.seq_len)
    attn = setup.attn_implementation
    if attn.startswith("flash"):
        attn = register_fake_flash_attention()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(setup.dtype), attn_implementation=attn)
    model.config.use_cache = False
    built_params = sum(p.numel() for p in model.parameters())
    if built_params != spec.num_params and not reference:
        state.warnings.append(f"transformers' {type(model).__name__} has {built_params:,} parameters, the spec "
                             f"{spec.num_params:,}: the simulation follows transformers")
    if reference:
        model.requires_grad_(False)
        model.eval()
    elif setup.is_lora:
        model = wrap_lora(state, model)
    if setup.load_in_4bit and not reference:
        quantise_linears_nf4(model, double_quant=setup.backend_profile.nf4_double_quant, compute_dtype=torch.bfloat16)
    swap_to_fake(model, fake_mode)
    return model


def wrap_lora(state: Replay, model):
    """PEFT's LoRA on the setup's targets, wrapped on ``meta`` (PEFT cannot wrap under FakeTensorMode)."""
    from peft import LoraConfig, get_peft_model

    setup = state.setup
    targets = list(setup.resolve_target_modules())
    config = LoraConfig(r=setup.lora_rank, lora_alpha=2 * setup.lora_rank, target_modules=targets,
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    state.assumptions.append(f"LoRA r={setup.lora_rank} on {', '.join(targets)} (PEFT "
                             f"{installed_version('peft') or '?'}, lora_dropout=0: dropout would save one more input "
                             "copy per adapted module)")
    if setup.load_in_4bit:
        # trl/trainer/grpo_trainer.py: "When using QLoRA, the PEFT adapter weights are converted to bf16"
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    return model


def enable_checkpointing(state: Replay, policy) -> None:
    """TRL/Trainer: ``gradient_checkpointing_enable(gradient_checkpointing_kwargs)``; transformers 5
    defaults to ``use_reentrant=False``. PEFT models also get ``enable_input_require_grads()``
    (trl/trainer/grpo_trainer.py)."""
    target = state.causal_lm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hasattr(target, "activation_checkpointing_enable"):
            target.activation_checkpointing_enable()
        else:  # transformers < 5
            target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if state.setup.is_lora:
        policy.enable_input_require_grads()


def set_checkpointing(causal_lm, enabled: bool) -> None:
    """Switch checkpointing of ``causal_lm``'s layers (TRL's scoring passes run with it off)."""
    for module in causal_lm.modules():
        if hasattr(module, "gradient_checkpointing") and module is not causal_lm:
            module.gradient_checkpointing = enabled


def install_final_norm_hook(state: Replay, causal_lm) -> None:
    """Mark where the head's backward ends: a grad hook on the final norm's output switches the region
    from ``backward_head`` (logits) to ``backward_layers`` (recomputed layers / activation grads)."""
    backbone = getattr(causal_lm, getattr(causal_lm, "base_model_prefix", "model"), None)
    norm = getattr(backbone, "norm", None)
    if norm is None:
        return
    def grad_hook(grad):
        state.tracker.region = "backward_layers"
        state.tracker.module = ""
        return None

    def forward_hook(module, args, output):
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(grad_hook)

    norm.register_forward_hook(forward_hook)


def on_module_pre(state: Replay, name: str, module) -> None:
    """Called for every module entered: the materialised path's lm_head forward starts the logits."""
    if state.tracker.region == "forward" and id(module) in state.head_ids:
        state.tracker.region = "head"
