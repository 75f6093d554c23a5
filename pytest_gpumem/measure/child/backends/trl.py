"""TRL's own GRPOTrainer: models loaded by transformers (bitsandbytes for a 4-bit base), vLLM colocated through
TRL's ``VLLMGeneration`` (whose start-up is measured apart)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ....units import format_gib
from ..results import Skip
from ..tiny import torch_dtype

if TYPE_CHECKING:
    from ..process import Child


def load_pretrained(child: Child, model_dir: Path):
    """transformers' ``from_pretrained`` in the setup's dtype, NF4 through bitsandbytes for a 4-bit base."""
    from transformers import AutoModelForCausalLM

    setup = child.setup
    kwargs: dict[str, Any] = {"dtype": torch_dtype(setup.dtype), "attn_implementation": setup.attn_implementation}
    if setup.load_in_4bit:
        if not child.cuda:
            raise Skip("load_in_4bit needs a CUDA device (bitsandbytes)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise Skip("bitsandbytes not installed (needed for load_in_4bit)")
        from transformers import BitsAndBytesConfig

        # TRL's QLoRA recipe: NF4, bf16 compute, no double quantisation (what the estimate models)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=child.torch.bfloat16)
    kwargs["device_map"] = {"": 0} if child.cuda else {"": "cpu"}
    child.progress(f"loading weights from {model_dir} ({'4-bit NF4' if setup.load_in_4bit else setup.dtype})")
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)

def watch_vllm_init(child: Child) -> None:
    """Measure vLLM's start-up (TRL's ``VLLMGeneration.__init__``, trl/generation/vllm_generation.py)."""
    try:
        from trl.generation.vllm_generation import VLLMGeneration
    except ImportError as exc:
        child.note(f"vLLM start-up not measured separately: {exc}")
        return
    original = VLLMGeneration.__init__

    def init(self_, *args, **kwargs):
        torch = child.torch
        allocated, reserved = torch.cuda.memory_allocated(0), torch.cuda.memory_reserved(0)
        free, _total = torch.cuda.mem_get_info(0)
        started = time.perf_counter()
        original(self_, *args, **kwargs)
        free_after, _ = torch.cuda.mem_get_info(0)
        child.result["gpu"]["vllm_init"] = {
            "allocated_delta_bytes": int(torch.cuda.memory_allocated(0) - allocated),
            "reserved_delta_bytes": int(torch.cuda.memory_reserved(0) - reserved),
            "device_used_delta_bytes": int(free - free_after),
            "sleep_mode": bool(child.setup.vllm_enable_sleep_mode),
            "seconds": round(time.perf_counter() - started, 3)}
        child.progress(f"vLLM started in {time.perf_counter() - started:.1f}s, "
                       f"{format_gib(free - free_after)} of device memory")

    VLLMGeneration.__init__ = init


class _TrlBackend:
    needs_model_dir = False

    def check(self, child: Child) -> None:
        return None

    def import_first(self) -> None:
        return None

    def load(self, child: Child, model_dir: Path, tokenizer: Any) -> tuple[Any, Any, Any]:
        return child.model_ready(load_pretrained(child, model_dir), tokenizer)

    def before_trainer(self, child: Child) -> None:
        setup = child.setup
        if setup.use_vllm:
            watch_vllm_init(child)
            child.progress(f"starting vLLM colocate (gpu_memory_utilization={setup.vllm_gpu_memory_utilization}, "
                           f"sleep mode {'on' if setup.vllm_enable_sleep_mode else 'off'})")


TRL = _TrlBackend()
