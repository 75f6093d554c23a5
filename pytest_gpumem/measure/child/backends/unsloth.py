"""Unsloth: ``FastLanguageModel`` loads the model (with vLLM in-process when ``fast_inference``) and applies its
own LoRA; its import must come first, as it patches transformers and trl."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..results import Skip
from ..tiny import torch_dtype

if TYPE_CHECKING:
    from ..process import Child


def load_unsloth(child: Child, model_dir: Path):
    """``FastLanguageModel.from_pretrained`` (and ``get_peft_model``) as an Unsloth GRPO notebook calls them."""
    from unsloth import FastLanguageModel

    setup = child.setup
    if not child.cuda:
        raise Skip("Unsloth needs a CUDA device")
    child.progress(f"loading with Unsloth FastLanguageModel (fast_inference={setup.use_vllm}, "
                  f"load_in_4bit={setup.load_in_4bit})")
    kwargs = dict(model_name=str(model_dir), max_seq_length=setup.max_prompt_length + setup.max_completion_length,
                  load_in_4bit=setup.load_in_4bit, fast_inference=setup.use_vllm,
                  max_lora_rank=setup.max_lora_rank or setup.lora_rank or 16,
                  dtype=None if setup.load_in_4bit else torch_dtype(setup.dtype))
    if setup.use_vllm:
        kwargs["gpu_memory_utilization"] = setup.vllm_gpu_memory_utilization
    # Unsloth's own switches, passed only when on (older releases do not know them)
    for name in ("unsloth_vllm_standby", "offload_embedding", "load_in_fp8"):
        if getattr(setup, name):
            kwargs[name] = True
    before = child.torch.cuda.memory_allocated(0)
    model, tokenizer = FastLanguageModel.from_pretrained(**kwargs)
    child.result["gpu"]["unsloth_load_allocated_bytes"] = int(child.torch.cuda.memory_allocated(0) - before)
    if setup.is_lora:
        targets = list(setup.resolve_target_modules())
        checkpointing = setup.gradient_checkpointing
        model = FastLanguageModel.get_peft_model(
            model, r=setup.lora_rank, target_modules=targets, lora_alpha=setup.lora_rank,
            use_gradient_checkpointing="unsloth" if checkpointing == "unsloth" else bool(checkpointing),
            random_state=0)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return child.model_ready(model, tokenizer, peft_done=True)

class _UnslothBackend:
    needs_model_dir = True

    def check(self, child: Child) -> None:
        if importlib.util.find_spec("unsloth") is None:
            raise Skip("unsloth not installed")

    def import_first(self) -> None:
        import unsloth  # noqa: F401 - must be imported before trl/transformers to patch them

    def load(self, child: Child, model_dir: Path, tokenizer: Any) -> tuple[Any, Any, Any]:
        return load_unsloth(child, model_dir)

    def before_trainer(self, child: Child) -> None:
        return None


UNSLOTH = _UnslothBackend()
