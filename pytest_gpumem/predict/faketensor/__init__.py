"""Simulate one GRPO step of the real Hugging Face architecture on CPU, under ``FakeTensorMode``.

No weights, no memory, no GPU: the model is built from its config on ``meta`` (PEFT wraps it there), its
tensors are swapped for fake CPU tensors, and TRL's training step is replayed op for op while
:class:`~pytest_gpumem.tracker.LiveStorageTracker` accounts every live storage (rounded to CUDA's 512-byte
blocks). The result is a :class:`~pytest_gpumem.breakdown.Breakdown` with the same phases and component
names as :func:`pytest_gpumem.estimate.estimate`, so the two can be compared component by component
(``tests/test_accuracy_matrix.py``; ``docs/accuracy.md``).

What is replayed (sources: trl 1.16 ``trainer/grpo_trainer.py``, ``trainer/utils.py``,
``kernels/chunked_logprob.py``; trl 1.9 ``grpo_trainer.py`` for the materialised path; transformers 5
``Trainer.training_step``; accelerate ``convert_outputs_to_fp32``):

* persistent: weights (the setup's dtype; NF4 linears for 4-bit bases), LoRA adapters (PEFT's dtypes, bf16
  for a quantised base as TRL casts them), AdamW states at steady state (created by one warm-up
  ``optimizer.step()`` before the measured step), the reference model when ``beta != 0`` without PEFT;
* scoring (when TRL runs one): the no-grad old/reference log-prob pass over ``b`` rows, checkpointing off;
* training: ``min(gradient_accumulation_steps, 2)`` micro-steps (the second one has the earlier gradients
  live) — forward under bf16 autocast with TRL's checkpointing (non-reentrant), the log-prob path of the
  setup's ``logits`` mode, the loss, ``backward()``;
* optimizer_step: ``clip_grad_norm_`` and ``optimizer.step()`` (fused / foreach AdamW as configured; bnb
  8-bit states are allocated with bitsandbytes' layout, its fused kernel allocates nothing).

Not simulated (and so absent from the breakdown; :func:`comparable_total` removes them from an estimate
before comparing): the CUDA context, the caching allocator's slack, vLLM, and the generation phase.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ...architectures import transformers_architecture
from ...breakdown import Breakdown, Component, PeakJudgement, Phase
from ...errors import GpuMemError
from ...gpus import GPU, resolve_gpu
from ...models import ModelSpec
from ...spec import GRPOSetup
from ...units import format_gib
from ...versions import installed_version

#: Components a FakeTensor simulation cannot see: non-torch memory, the allocator's reserve, vLLM, HF generate.
NOT_SIMULATED_COMPONENTS = frozenset({
    Component.CUDA_CONTEXT.value, Component.ALLOCATOR_SLACK.value, Component.VLLM_WEIGHTS.value,
    Component.VLLM_KV_CACHE.value, Component.VLLM_ACTIVATIONS.value, Component.VLLM_CUDA_GRAPHS.value,
    Component.VLLM_NON_TORCH.value, Component.GENERATE_KV_CACHE.value, Component.GENERATE_LOGITS.value,
    Component.BATCH_BUFFERS.value,
})
#: Phases the simulation produces (generation is not simulated: HF generate is data-dependent).
SIMULATED_PHASES = (Phase.PERSISTENT.value, Phase.SCORING.value, Phase.TRAINING.value, Phase.OPTIMIZER.value)

#: GRPOConfig defaults the simulated loss uses (trl 1.16: temperature 1.0, epsilon 0.2, max_grad_norm 1.0).
TEMPERATURE = 1.0
EPSILON = 0.2
MAX_GRAD_NORM = 1.0
#: bitsandbytes 8-bit optimizers: tensors under 4096 elements keep 32-bit state (``min_8bit_size``), the
#: others blockwise uint8 state with one fp32 absmax per 256 values (``bnb.optim.optimizer.Optimizer2State``).
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK_SIZE = 256
#: NF4 (bitsandbytes ``quantize_4bit``): one fp32 absmax per 64 weights; with double quantisation the absmax
#: is itself 8-bit with an fp32 absmax per 256 blocks (QLoRA, arXiv:2305.14314).
NF4_BLOCK_SIZE = 64
NF4_NESTED_BLOCK_SIZE = 256


class SimulationError(GpuMemError):
    """The simulation could not run this setup (raised instead of crashing the caller)."""


@dataclass(frozen=True)
class Simulation(PeakJudgement):
    """A simulated step: the breakdown, what was assumed, and the tensors alive at the peak."""

    peak_verb = "simulated"

    setup: GRPOSetup
    model: ModelSpec
    breakdown: Breakdown
    gpu: GPU | None
    assumptions: tuple[str, ...]
    warnings: tuple[str, ...]
    elapsed_seconds: float
    num_ops: int

    @property
    def largest_tensors(self) -> list[dict]:
        return [dict(t) for t in self.breakdown.largest_tensors]

    def peak_tensors(self) -> list[dict]:
        """The largest tensors alive at the peak phase's peak, largest first."""
        return [t for t in self.largest_tensors if t["phase"] == self.peak_phase]

    @property
    def largest_allocation_bytes(self) -> int:
        tensors = self.peak_tensors()
        return tensors[0]["bytes"] if tensors else 0

    @property
    def largest_allocation_name(self) -> str:
        tensors = self.peak_tensors()
        if not tensors:
            return "none"
        top = tensors[0]
        return f"{top['name']} {tuple(top['shape'])} {top['dtype']}"

    def summary(self) -> str:
        # the simulated peak has no CUDA context, allocator slack or vLLM: judge a real card with the estimate
        return f"{super().summary()} ({self.elapsed_seconds:.1f} s, {self.num_ops} ops)"

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``gpumem estimate`` (same keys) plus ``largest_tensors`` and the run's cost."""
        return {"source": "simulate", **super().to_dict(), "largest_tensors": self.largest_tensors,
                "elapsed_seconds": round(self.elapsed_seconds, 3), "num_ops": self.num_ops}


# -- public API --------------------------------------------------------------------------------------
def simulate(setup: GRPOSetup | Mapping | str | Path, gpu: str | int | GPU | None = None) -> Breakdown:
    """The simulated per-phase breakdown of ``setup`` (``source="simulate"``). ``gpu`` is accepted for
    symmetry with :func:`~pytest_gpumem.estimate.estimate`; the breakdown does not depend on it."""
    return run_simulation(setup, gpu=gpu).breakdown


def run_simulation(setup: GRPOSetup | Mapping | str | Path, gpu: str | int | GPU | None = None,
                   *, top_tensors: int = 10) -> Simulation:
    """Simulate ``setup`` and return the breakdown with assumptions and the largest live tensors.

    Every failure is raised as :class:`SimulationError` (a :class:`~pytest_gpumem.errors.GpuMemError`): the
    simulation runs in-process, so it must never take its caller (a pytest worker) down with it."""
    setup = GRPOSetup.coerce(setup)
    resolved_gpu = resolve_gpu(gpu)
    spec = setup.model_spec
    _check_supported(setup, spec)
    started = time.perf_counter()
    runner = _Runner(setup, spec, top_tensors=top_tensors)
    try:
        with warnings.catch_warnings():
            # transformers/PEFT deprecation notices about their own internal calls: nothing a user can act on
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            breakdown = runner.run()
    except GpuMemError:
        raise
    except ImportError as exc:
        raise SimulationError("simulate", f"needs torch, transformers, peft and trl: {exc}",
                              fix="pip install 'pytest-gpumem[trl]' (CPU torch first), or use `gpumem estimate`"
                              ) from None
    except Exception as exc:  # noqa: BLE001 - any failure of a traced model becomes a clear error
        raise SimulationError(
            "simulate", f"the FakeTensor simulation of {spec.name} failed while {runner.stage}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            fix="use `gpumem estimate` for this setup, and report the setup so the simulation can cover it"
        ) from exc
    elapsed = time.perf_counter() - started
    return Simulation(setup=setup, model=spec, breakdown=breakdown, gpu=resolved_gpu,
                      assumptions=tuple(runner.assumptions), warnings=tuple(runner.warnings),
                      elapsed_seconds=elapsed, num_ops=runner.num_ops)


def comparable_components(breakdown: Breakdown, phase: str | Phase) -> dict[str, int]:
    """``breakdown``'s components of ``phase`` without those a simulation cannot see
    (:data:`NOT_SIMULATED_COMPONENTS`: CUDA context, allocator slack, vLLM, HF generate, batch buffers)."""
    return {name: num_bytes for name, num_bytes in breakdown.components(phase).items()
            if name not in NOT_SIMULATED_COMPONENTS}


def comparable_total(breakdown: Breakdown, phase: str | Phase) -> int:
    """The total of ``phase`` that an estimate and a simulation can both account: the phase's total minus
    :data:`NOT_SIMULATED_COMPONENTS`. Apply it to both sides of a comparison."""
    return sum(comparable_components(breakdown, phase).values())


def comparable_peak(breakdown: Breakdown, phases: tuple[str, ...] = SIMULATED_PHASES) -> int:
    """The largest :func:`comparable_total` over ``phases`` (default: the phases a simulation produces)."""
    return max((comparable_total(breakdown, phase) for phase in phases if phase in breakdown.phases), default=0)


# -- the cross-check matrix --------------------------------------------------------------------------
#: (name, registry model, CI layers, CI (b, P, C), full-size (b, P, C), other setup keys). Covers Llama-,
#: Qwen2-, Qwen3- and Gemma3-style blocks, full fine-tuning / LoRA (q,v and all-linear) / QLoRA, checkpointing
#: on and off, fp32 and bf16 weights, materialised and chunked log-probs, sdpa / eager / FlashAttention,
#: fused / foreach / 8-bit AdamW, gradient accumulation and the scoring passes (beta, misaligned GA).
_MATRIX: tuple = (
    ("llama full bf16 mat ckpt", "meta-llama/Llama-3.2-1B", 3, (8, 128, 256), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "materialized"}),
    ("llama full fp32 mat ckpt", "meta-llama/Llama-3.2-1B", 3, (2, 64, 512), (4, 256, 768),
     {"dtype": "float32", "logits": "materialized"}),
    ("llama full bf16 chunk nockpt", "meta-llama/Llama-3.2-1B", 3, (8, 256, 256), (4, 512, 512),
     {"dtype": "bfloat16", "logits": "chunked", "gradient_checkpointing": False}),
    ("llama-8b full bf16 chunk nockpt", "meta-llama/Llama-3.1-8B", 2, (2, 128, 256), (2, 256, 256),
     {"dtype": "bfloat16", "logits": "chunked", "gradient_checkpointing": False}),
    ("llama full fp32 chunk nockpt", "meta-llama/Llama-3.2-1B", 3, (4, 128, 128), (4, 256, 256),
     {"dtype": "float32", "logits": "chunked", "gradient_checkpointing": False}),
    ("llama lora-all bf16 mat ckpt", "meta-llama/Llama-3.2-1B", 3, (4, 128, 128), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "materialized", "lora_rank": 16, "lora_target_modules": "all-linear"}),
    ("llama lora-qv fp32 chunk ckpt", "meta-llama/Llama-3.2-1B", 3, (8, 64, 512), (8, 512, 1024),
     {"dtype": "float32", "logits": "chunked", "lora_rank": 16}),
    ("llama-8b lora-all bf16 chunk ckpt", "meta-llama/Llama-3.1-8B", 2, (4, 128, 256), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "chunked", "lora_rank": 32, "lora_target_modules": "all-linear"}),
    ("qwen2 full bf16 mat ckpt", "Qwen/Qwen2.5-0.5B", 3, (8, 64, 512), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "materialized"}),
    ("qwen2 full fp32 chunk ckpt", "Qwen/Qwen2.5-0.5B", 3, (4, 128, 128), (8, 512, 512),
     {"dtype": "float32", "logits": "chunked"}),
    ("qwen2 lora-qv bf16 chunk nockpt", "Qwen/Qwen2.5-0.5B", 3, (8, 128, 256), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "chunked", "lora_rank": 8, "gradient_checkpointing": False}),
    ("qwen2 lora-all fp32 mat foreach", "Qwen/Qwen2.5-0.5B", 3, (4, 128, 128), (8, 512, 512),
     {"dtype": "float32", "logits": "materialized", "lora_rank": 16, "lora_target_modules": "all-linear",
      "optim": "adamw_torch"}),
    ("qwen2 full bf16 eager nockpt", "Qwen/Qwen2.5-0.5B", 3, (4, 256, 256), (4, 512, 512),
     {"dtype": "bfloat16", "logits": "materialized", "attn_implementation": "eager",
      "gradient_checkpointing": False}),
    ("qwen2 full bf16 flash-attn chunk", "Qwen/Qwen2.5-0.5B", 3, (4, 128, 128), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "chunked", "attn_implementation": "flash_attention_2"}),
    ("qwen2-7b qlora-all bf16 chunk", "Qwen/Qwen2.5-7B", 2, (4, 128, 128), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "chunked", "lora_rank": 16, "lora_target_modules": "all-linear",
      "load_in_4bit": True}),
    ("qwen2-7b full bf16 mat GA2", "Qwen/Qwen2.5-7B", 2, (2, 128, 128), (2, 256, 256),
     {"dtype": "bfloat16", "logits": "materialized", "gradient_accumulation_steps": 2}),
    ("gemma3 full bf16 mat ckpt", "google/gemma-3-1b-it", 3, (4, 128, 256), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "materialized"}),
    ("gemma3 lora-all bf16 chunk ckpt", "google/gemma-3-1b-it", 3, (8, 128, 128), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "chunked", "lora_rank": 16, "lora_target_modules": "all-linear"}),
    ("gemma3 full bf16 mat nockpt", "google/gemma-3-1b-it", 3, (2, 128, 128), (2, 512, 512),
     {"dtype": "bfloat16", "logits": "materialized", "gradient_checkpointing": False}),
    ("gemma3 lora-qv fp32 mat nockpt", "google/gemma-3-1b-it", 3, (4, 128, 128), (4, 512, 512),
     {"dtype": "float32", "logits": "materialized", "lora_rank": 16, "gradient_checkpointing": False}),
    ("llama-8b full fp32 mat ckpt", "meta-llama/Llama-3.1-8B", 2, (2, 128, 128), (2, 256, 256),
     {"dtype": "float32", "logits": "materialized"}),
    ("qwen3 full bf16 mat beta", "Qwen/Qwen3-0.6B", 3, (4, 128, 128), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "materialized", "beta": 0.04}),
    ("qwen3 qlora-qv bf16 chunk beta", "Qwen/Qwen3-0.6B", 3, (4, 128, 128), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "chunked", "lora_rank": 16, "beta": 0.04, "load_in_4bit": True}),
    ("llama full bf16 8bit-adam chunk", "meta-llama/Llama-3.2-1B", 3, (4, 128, 128), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "chunked", "optim": "adamw_8bit"}),
    ("qwen3 lora-qv bf16 mat GA3 spg2", "Qwen/Qwen3-0.6B", 3, (4, 128, 128), (8, 512, 512),
     {"dtype": "bfloat16", "logits": "materialized", "lora_rank": 16, "gradient_accumulation_steps": 3,
      "steps_per_generation": 2}),
)


def accuracy_matrix(scale: str = "ci") -> list[tuple[str, dict[str, Any]]]:
    """The estimate-vs-simulation cross-check setups (``tests/test_accuracy_matrix.py``,
    ``benchmarks/bench_simulate.py``). ``scale="ci"``: the real vocabulary, hidden size, heads and MLP width
    but 2–3 layers and short sequences (a second or less each); ``scale="full"``: the registry model with all
    its layers and full-size batches."""
    if scale not in ("ci", "full"):
        raise GpuMemError("scale", f"{scale!r} is not 'ci' or 'full'", fix="use scale='ci' or scale='full'")
    setups = []
    for name, model, layers, ci_shape, full_shape, keys in _MATRIX:
        b, prompt, completion = ci_shape if scale == "ci" else full_shape
        setup = {"model": reduced_config(model, layers) if scale == "ci" else model,
                 "per_device_train_batch_size": b, "num_generations": max(b, 2),
                 "max_prompt_length": prompt, "max_completion_length": completion, **keys}
        setups.append((name, setup))
    return setups


# -- what the simulation covers ----------------------------------------------------------------------
def _check_supported(setup: GRPOSetup, spec: ModelSpec) -> None:
    if setup.backend != "trl":
        raise SimulationError(
            "backend", f"the simulation replays TRL's GRPOTrainer; backend {setup.backend!r} (its own chunked "
                       "log-probs, offloaded checkpointing and fused kernels) is not traced",
            fix="use `gpumem estimate` for Unsloth setups, or backend='trl'")
    if setup.gradient_checkpointing == "unsloth":
        raise SimulationError("gradient_checkpointing", "Unsloth's offloaded checkpointing (layer inputs moved to "
                              "CPU) is not simulated", fix="simulate gradient_checkpointing=true, or use `gpumem "
                              "estimate`")
    if spec.is_moe:
        raise SimulationError(
            "model", f"{spec.name} is a mixture of experts: its routing is data-dependent (nonzero, tolist) and "
                     "cannot run under FakeTensorMode", fix="use `gpumem estimate` for MoE models")
    if setup.attn_implementation == "flex_attention":
        raise SimulationError("attn_implementation", "flex_attention compiles a Triton kernel and cannot be traced "
                              "on CPU", fix="simulate with 'sdpa' (or use `gpumem estimate`)")
    if setup.cast_lm_head_to_fp32:
        raise SimulationError("cast_lm_head_to_fp32", "the fp32 lm_head patch is not simulated yet",
                              fix="use `gpumem estimate` for this setup")
    if setup.optim == "adafactor":
        raise SimulationError("optim", "transformers' Adafactor branches on tensor values (data-dependent) and "
                              "cannot run under FakeTensorMode", fix="use `gpumem estimate` for adafactor")


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def hf_config_for(spec: ModelSpec, seq_len: int):
    """A transformers config with the spec's shapes (random weights are built from it; no download).

    Built from the :class:`ModelSpec` — the same shapes the estimate uses — rather than from a raw
    ``config.json``, because registry records store a normalised summary. Architecture details that change
    memory follow transformers' own class for ``model_type`` (Gemma's four norms, Qwen2's q/k/v biases,
    Qwen3/Gemma3 q/k norms, Phi-3's fused projections)."""
    from transformers import AutoConfig

    arch = transformers_architecture(spec.model_type)
    model_type = arch.model_type
    kwargs: dict[str, Any] = {
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim, "tie_word_embeddings": spec.tie_word_embeddings,
        "max_position_embeddings": max(seq_len + 1, 4096), "use_cache": False,
        "attention_dropout": 0.0,
    }
    if arch.config_takes_attention_bias:
        kwargs["attention_bias"] = bool(spec.qkv_bias or spec.o_proj_bias)
    if arch.config_takes_mlp_bias:
        kwargs["mlp_bias"] = spec.mlp_bias
    if arch.sliding_window == "layer_types" and spec.num_sliding_layers and spec.sliding_window:
        sliding = _sliding_pattern(spec)
        kwargs["sliding_window"] = spec.sliding_window
        kwargs["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    elif arch.sliding_window == "every_layer":
        kwargs["sliding_window"] = spec.sliding_window
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except (KeyError, ValueError) as exc:
        raise SimulationError("model", f"transformers {__import__('transformers').__version__} has no architecture "
                              f"for model_type {spec.model_type!r} ({exc})",
                              fix="use `gpumem estimate`, or give an inline config with a transformers model_type "
                                  "such as 'llama', 'qwen2', 'gemma3_text'") from None


def reduced_config(model: str | Mapping | ModelSpec, num_hidden_layers: int) -> dict[str, Any]:
    """An inline config dict with ``model``'s real vocabulary, hidden size, heads and MLP width but only
    ``num_hidden_layers`` layers: what CI simulates to keep each run to a second or two. Both
    :func:`~pytest_gpumem.estimate.estimate` and :func:`simulate` accept it as ``model``."""
    from ...models import resolve_model

    spec = resolve_model(model)
    config: dict[str, Any] = {
        "name": f"{spec.name} ({num_hidden_layers} layers)", "model_type": spec.model_type,
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": num_hidden_layers, "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads, "head_dim": spec.head_dim,
        "tie_word_embeddings": spec.tie_word_embeddings, "qkv_bias": spec.qkv_bias, "o_proj_bias": spec.o_proj_bias,
        "mlp_bias": spec.mlp_bias, "qk_norm": spec.qk_norm, "torch_dtype": spec.checkpoint_dtype,
    }
    if spec.is_moe:
        config.update({"num_experts": spec.num_experts, "num_experts_per_tok": spec.num_experts_per_tok,
                       "moe_intermediate_size": spec.moe_intermediate_size})
    if spec.num_sliding_layers and spec.sliding_window:
        full_every = max(1, round(spec.num_hidden_layers / max(spec.num_full_attention_layers, 1)))
        config["sliding_window"] = spec.sliding_window
        config["layer_types"] = ["full_attention" if (i + 1) % full_every == 0 else "sliding_attention"
                                 for i in range(num_hidden_layers)]
    return config


def _sliding_pattern(spec: ModelSpec) -> list[bool]:
    """Which layers use the sliding window: Gemma's every-6th-layer-is-global pattern, trimmed so the count
    matches the spec (reduced-layer configs keep their own count)."""
    pattern = [((i + 1) % 6) != 0 for i in range(spec.num_hidden_layers)]
    if sum(pattern) != spec.num_sliding_layers:
        pattern = [i < spec.num_sliding_layers for i in range(spec.num_hidden_layers)]
    return pattern


# -- the run -----------------------------------------------------------------------------------------
class _Runner:
    """One simulation: builds the models, replays the step, turns the tracker's log into a Breakdown."""

    def __init__(self, setup: GRPOSetup, spec: ModelSpec, *, top_tensors: int = 10):
        self.stage = "starting"
        self.setup = setup
        self.spec = spec
        self.top_tensors = top_tensors
        self.assumptions: list[str] = list(setup.resolution_notes)
        self.warnings: list[str] = []
        self.num_ops = 0

    def _stage(self, text: str) -> None:
        self.stage = text

    # -- building ---------------------------------------------------------------------------------
    def build_model(self, fake_mode, *, reference: bool = False):
        """The policy (or reference) model on ``meta``, wrapped by PEFT there, then swapped to fake tensors.

        PEFT cannot wrap inside FakeTensorMode, and ``.to(dtype)`` under fake mode cannot swap parameters
        (shared/docs/cpu-simulation.md), so the dtype is given at construction and the swap is done by hand."""
        import torch
        from transformers import AutoModelForCausalLM

        setup, spec = self.setup, self.spec
        config = hf_config_for(spec, setup.seq_len)
        attn = setup.attn_implementation
        if attn.startswith("flash"):
            attn = _register_fake_flash_attention()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(setup.dtype), attn_implementation=attn)
        model.config.use_cache = False
        built_params = sum(p.numel() for p in model.parameters())
        if built_params != spec.num_params and not reference:
            self.warnings.append(f"transformers' {type(model).__name__} has {built_params:,} parameters, the spec "
                                 f"{spec.num_params:,}: the simulation follows transformers")
        if reference:
            model.requires_grad_(False)
            model.eval()
        elif setup.is_lora:
            model = self._wrap_lora(model)
        if setup.load_in_4bit and not reference:
            _quantise_linears_nf4(model, double_quant=setup.backend == "unsloth",
                                  compute_dtype=torch.bfloat16)
        _swap_to_fake(model, fake_mode)
        return model

    def _wrap_lora(self, model):
        import torch
        from peft import LoraConfig, get_peft_model

        setup = self.setup
        targets = list(setup.resolve_target_modules())
        config = LoraConfig(r=setup.lora_rank, lora_alpha=2 * setup.lora_rank, target_modules=targets,
                            lora_dropout=0.0, task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        self.assumptions.append(f"LoRA r={setup.lora_rank} on {', '.join(targets)} (PEFT {installed_version('peft') or '?'}, "
                                "lora_dropout=0: dropout would save one more input copy per adapted module)")
        if setup.load_in_4bit:
            # trl/trainer/grpo_trainer.py: "When using QLoRA, the PEFT adapter weights are converted to bf16"
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.to(torch.bfloat16)
        return model

    # -- the step ---------------------------------------------------------------------------------
    def run(self) -> Breakdown:
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode

        from .tracker import LiveStorageTracker, ModuleNamer

        setup = self.setup
        self._stage("building the model")
        fake_mode = FakeTensorMode()
        policy = self.build_model(fake_mode)
        reference = None
        if setup.beta != 0 and not setup.is_lora:
            self._stage("building the reference model")
            reference = self.build_model(fake_mode, reference=True)
        tracker = LiveStorageTracker()
        self.tracker = tracker
        for name, param in policy.named_parameters():
            tracker.register(param, Component.LORA.value if "lora_" in name else Component.WEIGHTS.value, name)
        for name, buffer in policy.named_buffers():
            tracker.register(buffer, Component.WEIGHTS.value, name)
        if reference is not None:
            for name, tensor in [*reference.named_parameters(), *reference.named_buffers()]:
                tracker.register(tensor, Component.REFERENCE.value, "reference." + name)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        self.trainable = trainable
        causal_lm = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        self.causal_lm = causal_lm
        if setup.gradient_checkpointing:
            self._enable_checkpointing(policy)
        policy.train()
        named = list(policy.named_modules())
        if reference is not None:
            named += [("reference." + n if n else "reference", m) for n, m in reference.named_modules()]
        self._install_final_norm_hook(causal_lm)
        self._head_ids = {id(causal_lm.get_output_embeddings())}
        if reference is not None:
            self._head_ids.add(id(reference.get_output_embeddings()))

        self.assumptions.extend(self._assumptions())
        with contextlib.ExitStack() as stack:
            stack.enter_context(fake_mode)
            stack.enter_context(tracker)
            stack.enter_context(ModuleNamer(tracker, named, on_pre=self._on_module_pre))
            stack.enter_context(_fake_cuda_logprob_kernels())
            self._stage("creating the optimizer state (warm-up step)")
            optimizer = self._make_optimizer(policy, trainable)
            tracker.region = "inputs"
            batch = self._make_batch()
            passes = self.setup.scoring_passes
            if passes:
                self._stage("simulating the scoring pass")
                tracker.begin_phase(Phase.SCORING.value)
                for which in passes:
                    self._scoring_pass(policy, reference, batch, which)
                tracker.end_phase()
            self._stage("simulating the training micro-step")
            tracker.begin_phase(Phase.TRAINING.value)
            for _ in range(min(setup.gradient_accumulation_steps, 2)):
                self._training_micro_step(policy, batch)
            tracker.end_phase()
            self._stage("simulating the optimizer step")
            tracker.region = "optimizer"
            tracker.begin_phase(Phase.OPTIMIZER.value)
            torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
            optimizer.step()
            tracker.end_phase()
            param_names = {id(p): n for n, p in policy.named_parameters()}
            grad_ids = {tracker.alloc_id(p.grad): param_names.get(id(p), "?") + ".grad"
                        for p in trainable if p.grad is not None}
            state_ids = self._optimizer_state_ids(optimizer, param_names)
            optimizer.zero_grad(set_to_none=True)
            tracker.region = "after_step"
            tracker.begin_phase(Phase.PERSISTENT.value)
            tracker.end_phase()
        self.num_ops = tracker.num_ops
        self._stage("attributing the live tensors")
        grad_ids.pop(None, None)
        state_ids.pop(None, None)
        breakdown = self._breakdown(grad_ids, state_ids)
        tracker.close()
        return breakdown

    def _assumptions(self) -> list[str]:
        setup = self.setup
        notes = ["FakeTensorMode on CPU: every tensor's size and lifetime as in TRL's step; CUDA context, "
                 "allocator slack/fragmentation, vLLM and generation are not simulated (512-byte rounding is)",
                 "bf16 autocast as TRL's default bf16=True, with CPU autocast's op lists (CUDA's differ in "
                 "which reductions run in fp32)"]
        if setup.logits == "materialized":
            notes.append("materialised log-probs (TRL ≤ 1.15): logits (b, C+1, V) → accelerate's fp32 "
                         "conversion → [:, :-1] → div_(temperature) → TRL's selective_log_softmax and no-grad "
                         "entropy_from_logits (trl.trainer.utils, their CPU code = TRL 1.9's)")
        else:
            notes.append("chunked log-probs (TRL 1.16 add_fused_lm_head): TRL's own ChunkedLogProbFunction with "
                         "its Triton folds (which allocate nothing on CUDA) replaced by in-place no-ops; the "
                         "compaction hidden[labels != -100] is modelled as all b·C completion tokens valid")
        if setup.gradient_checkpointing:
            notes.append("gradient checkpointing as TRL enables it (non-reentrant, every decoder layer)")
        if setup.load_in_4bit:
            notes.append("4-bit base modelled: packed uint8 NF4 weights + fp32 absmax per 64 "
                         + ("(double-quantised) " if setup.backend == "unsloth" else "")
                         + "as bitsandbytes stores them; each matmul dequantises its weight to a transient bf16 "
                           "copy (forward and backward), as bnb's MatMul4Bit does; no bitsandbytes kernel runs")
        if setup.attn_implementation.startswith("flash"):
            notes.append(f"{setup.attn_implementation} modelled (not run): no 4-D mask, unpadded q/k/v copies, "
                         "saved output and fp32 log-sum-exp, fp32 dq accumulator in backward")
        if setup.use_vllm:
            notes.append("vLLM (its weights, KV cache, graphs) is not simulated; only its effect on TRL's step "
                         "(the importance-sampling scoring pass) is")
        if setup.use_liger_kernel:
            notes.append("Liger's layer kernels (Triton) are not traced: transformers' own layers are")
        if setup.gradient_accumulation_steps > 2:
            notes.append(f"{setup.gradient_accumulation_steps} accumulation micro-steps: 2 simulated (the later "
                         "ones repeat the second)")
        if setup.optim in ("adamw_8bit", "paged_adamw_8bit", "adamw_bnb_8bit"):
            notes.append("8-bit AdamW states allocated with bitsandbytes' blockwise layout (uint8 + fp32 absmax "
                         "per 256; tensors < 4096 elements 32-bit); its fused update allocates nothing")
        return notes

    # -- pieces of the step -----------------------------------------------------------------------
    def _enable_checkpointing(self, policy) -> None:
        """TRL/Trainer: ``gradient_checkpointing_enable(gradient_checkpointing_kwargs)``; transformers 5
        defaults to ``use_reentrant=False``. PEFT models also get ``enable_input_require_grads()``
        (trl/trainer/grpo_trainer.py)."""
        target = self.causal_lm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if hasattr(target, "activation_checkpointing_enable"):
                target.activation_checkpointing_enable()
            else:  # transformers < 5
                target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.setup.is_lora:
            policy.enable_input_require_grads()

    def _set_checkpointing(self, enabled: bool) -> None:
        for module in self.causal_lm.modules():
            if hasattr(module, "gradient_checkpointing") and module is not self.causal_lm:
                module.gradient_checkpointing = enabled

    def _install_final_norm_hook(self, causal_lm) -> None:
        """Mark where the head's backward ends: a grad hook on the final norm's output switches the region
        from ``backward_head`` (logits) to ``backward_layers`` (recomputed layers / activation grads)."""
        import torch

        backbone = getattr(causal_lm, getattr(causal_lm, "base_model_prefix", "model"), None)
        norm = getattr(backbone, "norm", None)
        if norm is None:
            return
        runner = self

        def grad_hook(grad):
            runner.tracker.region = "backward_layers"
            runner.tracker.module = ""
            return None

        def forward_hook(module, args, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(grad_hook)

        norm.register_forward_hook(forward_hook)

    def _on_module_pre(self, name: str, module) -> None:
        # the materialised path: the lm_head's forward starts the logits
        if self.tracker.region == "forward" and id(module) in self._head_ids:
            self.tracker.region = "head"

    def _make_batch(self) -> dict:
        """One micro-batch as TRL buffers it: left-padded prompts, right-padded completions, masks,
        advantages, and the old/reference log-probs when they were computed."""
        import torch

        setup = self.setup
        b, prompt, completion = setup.per_device_train_batch_size, setup.max_prompt_length, setup.max_completion_length
        batch = {
            "prompt_ids": torch.zeros(b, prompt, dtype=torch.long),
            "prompt_mask": torch.ones(b, prompt, dtype=torch.long),
            "completion_ids": torch.zeros(b, completion, dtype=torch.long),
            "completion_mask": torch.ones(b, completion, dtype=torch.long),
            "advantages": torch.zeros(b, dtype=torch.float32),
        }
        if "old" in self.setup.scoring_passes:
            batch["old_per_token_logps"] = torch.zeros(b, completion, dtype=torch.float32)
        if setup.beta != 0:
            batch["ref_per_token_logps"] = torch.zeros(b, completion, dtype=torch.float32)
        if setup.use_vllm and setup.vllm_importance_sampling_correction:
            batch["importance_sampling_ratio"] = torch.ones(b, completion, dtype=torch.float32)
        return batch

    def _autocast(self):
        import torch

        # accelerate's native AMP (bf16=True, TRL's default) wraps the model's forward in autocast; fp16 weights
        # get fp16 autocast (bf16=False, fp16=True is what such users set)
        dtype = torch.float16 if self.setup.dtype == "float16" else torch.bfloat16
        return torch.autocast("cpu", dtype=dtype)

    def _logps(self, model, input_ids, attention_mask, *, compute_entropy: bool):
        """trl ``_get_per_token_logps_and_entropies`` for one chunk of ``b`` rows."""
        if self.setup.logits == "materialized":
            return self._logps_materialized(model, input_ids, attention_mask, compute_entropy)
        return self._logps_chunked(model, input_ids, attention_mask, compute_entropy)

    def _logps_materialized(self, model, input_ids, attention_mask, compute_entropy: bool):
        """trl 1.9 ``_get_per_token_logps_and_entropies``: ``logits_to_keep = C + 1``; accelerate's
        ``convert_outputs_to_fp32`` upcasts the bf16 logits; ``[:, :-1]``; ``div_(temperature)``;
        ``selective_log_softmax``; the entropy under no_grad (``_entropy_bonus_enabled`` is False by default)."""
        import torch
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        completion = self.setup.max_completion_length
        self.tracker.region = "forward"
        with self._autocast():
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=completion + 1,
                            use_cache=False)
        self.tracker.region = "head"
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

    def _logps_chunked(self, model, input_ids, attention_mask, compute_entropy: bool):
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
        setup = self.setup
        completion = setup.max_completion_length
        causal_lm = self.causal_lm
        text_config = causal_lm.config.get_text_config()
        softcap = getattr(text_config, "final_logit_softcapping", None)
        self.tracker.region = "forward"
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-completion] = -100
        backbone = getattr(causal_lm, causal_lm.base_model_prefix)
        with self._autocast():
            backbone_outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            self.tracker.region = "head"
            hidden_states = backbone_outputs.last_hidden_state[:, :-1]
            del backbone_outputs
            labels = labels[:, 1:]
            mask = labels != -100
            hidden = hidden_states[:, -completion:].reshape(-1, hidden_states.size(-1))  # = hidden_states[mask]
            targets = labels[:, -completion:].reshape(-1)  # = labels[mask]
            lm_head = causal_lm.get_output_embeddings()
            outputs = ("log_probs", "entropy")
            per_token = ChunkedLogProbFunction.apply(hidden, lm_head.weight, lm_head.bias, targets, TEMPERATURE,
                                                     chunk_size, softcap, 1.0, outputs)
        # masked_scatter onto (b, L-1) zeros; slice_scatter allocates the same and stays data-independent
        start = mask.shape[1] - completion
        scattered = []
        for x in per_token[:2]:
            if x is None:
                scattered.append(None)
                continue
            full = x.new_zeros(mask.shape).slice_scatter(x.view(mask.shape[0], completion), dim=1, start=start)
            scattered.append(full)
        log_probs, entropy = scattered
        del per_token, hidden, hidden_states
        logps = log_probs[:, -completion:]
        entropies = entropy[:, -completion:] if compute_entropy and entropy is not None else None
        return logps, entropies

    def _scoring_pass(self, policy, reference, batch, which: str) -> None:
        """One no-grad log-prob pass over ``b`` rows (TRL scores the generation batch in chunks of ``b``),
        with gradient checkpointing disabled (trl ``disable_gradient_checkpointing``)."""
        import torch

        self.tracker.region = "inputs"
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        if self.setup.gradient_checkpointing:
            self._set_checkpointing(False)
        try:
            with torch.no_grad():
                if which == "ref" and reference is not None:
                    saved = self.causal_lm
                    self.causal_lm = reference
                    try:
                        logps, _ = self._logps(reference, input_ids, attention_mask, compute_entropy=False)
                    finally:
                        self.causal_lm = saved
                elif which == "ref" and self.setup.is_lora:
                    with policy.disable_adapter():
                        logps, _ = self._logps(policy, input_ids, attention_mask, compute_entropy=False)
                else:
                    logps, _ = self._logps(policy, input_ids, attention_mask, compute_entropy=False)
            del logps
        finally:
            if self.setup.gradient_checkpointing:
                self._set_checkpointing(True)

    def _training_micro_step(self, policy, batch) -> None:
        """transformers ``Trainer.training_step`` → trl ``_compute_loss`` (loss_type "dapo", the 1.16 default;
        the other loss types differ only in (b, C) fp32 tensors) → ``accelerator.backward(loss)``."""
        import torch

        setup = self.setup
        tracker = self.tracker
        tracker.region = "inputs"
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        mask = batch["completion_mask"]
        logps, entropies = self._logps(policy, input_ids, attention_mask, compute_entropy=True)
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

    # -- optimizer --------------------------------------------------------------------------------
    def _param_groups(self, policy, trainable):
        """transformers ``Trainer.get_decay_parameter_names``: no weight decay on biases and norms — two groups,
        which matters for foreach AdamW (its step temporary is per group)."""
        import re

        forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
        decay, no_decay = [], []
        for name, param in policy.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if any(re.search(p, name.lower()) for p in forbidden) else decay).append(param)
        return [g for g in ({"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0})
                if g["params"]]

    def _make_optimizer(self, policy, trainable):
        """The optimizer HF's Trainer builds for ``optim``, brought to steady state by one step on zero
        gradients (the state is created lazily at the first step; it is the same size at every later one)."""
        import torch

        optim = self.setup.optim
        groups = self._param_groups(policy, trainable)
        self.tracker.region = "optimizer_warmup"
        if optim == "adamw_torch_fused":
            optimizer = torch.optim.AdamW(groups, lr=1e-6, fused=True)
        elif optim in ("adamw_torch", "adamw_hf"):
            # torch picks foreach on CUDA by default (_default_to_fused_or_foreach); on CPU it would not
            optimizer = torch.optim.AdamW(groups, lr=1e-6, foreach=True)
        elif optim in ("adamw_8bit", "paged_adamw_8bit", "adamw_bnb_8bit", "paged_adamw_32bit"):
            optimizer = _BnbLikeAdamW(groups, bits=32 if optim == "paged_adamw_32bit" else 8)
        elif optim == "sgd":
            optimizer = torch.optim.SGD(groups, lr=1e-6)
        else:  # pragma: no cover - _check_supported guards the rest
            raise SimulationError("optim", f"{optim!r} is not simulated", fix="use `gpumem estimate`")
        for param in trainable:
            param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return optimizer

    def _optimizer_state_ids(self, optimizer, param_names: dict) -> dict:
        """alloc id → "<parameter>.<state key>" for every tensor the optimizer holds."""
        import torch

        ids = {}
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    ids[self.tracker.alloc_id(value)] = f"{param_names.get(id(param), '?')}.{key}"
        return ids

    # -- attribution ------------------------------------------------------------------------------
    def _tensor_name(self, record, grad_ids: dict, state_ids: dict) -> str:
        """A readable name: the parameter / gradient / optimizer state it is, else the module that created it
        (in backward: the region, and the last module entered — recomputation enters the layer's modules)."""
        if record.kind == "registered":
            return record.op
        if record.alloc_id in grad_ids:
            return grad_ids[record.alloc_id]
        if record.alloc_id in state_ids:
            return "optimizer state " + state_ids[record.alloc_id]
        if record.region.startswith("backward"):
            return f"{record.region} (after {record.module})" if record.module else record.region
        if record.kind == "weight_cast":
            return f"autocast copy in {record.module}"
        return record.module or record.region

    def _component(self, record, grad_ids: dict, state_ids: dict) -> str:
        """Which Component a live storage belongs to: identity first (parameters, gradients, optimizer state),
        then what created it (an autocast weight cast, the 4-D attention mask), then the region it was born in."""
        if record.category is not None:
            return record.category
        if record.alloc_id in grad_ids:
            return Component.GRADIENTS.value
        if record.alloc_id in state_ids:
            return Component.OPTIMIZER_STATES.value
        if record.kind == "weight_cast":
            return Component.WEIGHT_CASTS.value
        shape = record.shape
        if len(shape) == 4 and shape[1] == 1 and shape[-1] == shape[-2] == self.setup.seq_len:
            return Component.ATTENTION_MASK.value
        region = record.region
        if region == "inputs":
            return Component.BATCH_BUFFERS.value
        if region in ("head", "backward_head"):
            return Component.LOGITS.value
        if region == "backward_layers":
            if shape and shape[-1] == self.spec.vocab_size:
                return Component.LOGITS.value
            return Component.RECOMPUTED_LAYER.value if self.setup.gradient_checkpointing else Component.ACTIVATIONS.value
        if region in ("optimizer", "optimizer_warmup"):
            return Component.OPTIMIZER_TEMP.value
        return Component.ACTIVATIONS.value

    def _breakdown(self, grad_ids: dict, state_ids: dict) -> Breakdown:
        tracker = self.tracker
        marks = list(tracker.phases.values())
        live = tracker.live_sets([mark.peak_event for mark in marks])
        phases: dict[str, dict[str, int]] = {}
        largest: list[dict] = []
        for mark in marks:
            components: dict[str, int] = {}
            records = [tracker.records[i] for i in live[mark.peak_event]]
            for record in records:
                name = self._component(record, grad_ids, state_ids)
                components[name] = components.get(name, 0) + record.num_bytes
            phases[mark.name] = components
            for record in sorted(records, key=lambda r: -r.num_bytes)[:self.top_tensors]:
                largest.append({"phase": mark.name, "name": self._tensor_name(record, grad_ids, state_ids),
                                "op": "parameter" if record.kind == "registered" else record.op,
                                "shape": list(record.shape), "dtype": record.dtype, "bytes": record.num_bytes,
                                "component": self._component(record, grad_ids, state_ids)})
        ordered = {p: phases[p] for p in SIMULATED_PHASES if p in phases}
        return Breakdown(phases=ordered, source="simulate", largest_tensors=tuple(largest))


# -- fakes for what cannot run on CPU ----------------------------------------------------------------
@contextlib.contextmanager
def _fake_cuda_logprob_kernels():
    """Inside the simulation, TRL's chunked log-prob kernels behave as on CUDA: the Triton folds and the
    ``out_dtype`` addmm write in place and allocate nothing, so their CPU stand-ins (which allocate fp32
    copies of every tile) are replaced by no-ops. Restored on exit."""
    try:
        from trl.kernels import chunked_logprob as module
    except ImportError:
        yield
        return

    def _no_op(*args, **kwargs):
        return None

    saved = {name: getattr(module, name) for name in ("_forward_tile", "_backward_tile", "_addmm_fp32")
             if hasattr(module, name)}
    for name in saved:
        setattr(module, name, _no_op)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _swap_to_fake(model, fake_mode) -> None:
    """Replace every meta parameter/buffer by a fake CPU tensor of the same shape and dtype (ties kept)."""
    import torch

    memo: dict[int, Any] = {}
    with fake_mode:
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                new = memo.get(id(param))
                if new is None:
                    new = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                             requires_grad=param.requires_grad)
                    memo[id(param)] = new
                module._parameters[name] = new
            for name, buffer in list(module._buffers.items()):
                if buffer is None:
                    continue
                new = memo.get(id(buffer))
                if new is None:
                    new = torch.empty(buffer.shape, dtype=buffer.dtype)
                    memo[id(buffer)] = new
                module._buffers[name] = new


def _quantise_linears_nf4(model, *, double_quant: bool, compute_dtype) -> None:
    """Replace the decoder's ``nn.Linear`` weights (what bitsandbytes quantises: not lm_head, not LoRA's
    A/B) by :class:`_FakeLinear4bit` modules holding NF4's storage."""
    import torch

    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replacements = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if type(child) is torch.nn.Linear and child is not lm_head and "lora_" not in child_name \
                    and not name.split(".")[-1].startswith("lora_"):
                replacements.append((module, child_name, child))
    for parent, child_name, linear in replacements:
        setattr(parent, child_name, _make_fake_linear4bit(linear, double_quant, compute_dtype))


def _make_fake_linear4bit(linear, double_quant: bool, compute_dtype):
    import torch

    class _Dequant4bitMatmul(torch.autograd.Function):
        """bitsandbytes ``MatMul4Bit``: dequantise to the compute dtype, matmul, keep only the packed
        weight for backward (which dequantises again)."""

        @staticmethod
        def forward(ctx, x, packed, out_features, in_features):
            weight = torch.empty((out_features, in_features), dtype=x.dtype, device=x.device)
            ctx.shape = (out_features, in_features)
            return torch.nn.functional.linear(x, weight)

        @staticmethod
        def backward(ctx, grad_output):
            weight = torch.empty(ctx.shape, dtype=grad_output.dtype, device=grad_output.device)
            return torch.matmul(grad_output, weight), None, None, None

    class _FakeLinear4bit(torch.nn.Module):
        """The storage of ``bnb.nn.Linear4bit`` (packed uint8 weight, absmax) and its forward's dtypes."""

        def __init__(self):
            super().__init__()
            numel = linear.in_features * linear.out_features
            self.in_features, self.out_features = linear.in_features, linear.out_features
            device = linear.weight.device
            self.weight = torch.nn.Parameter(torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=device),
                                             requires_grad=False)
            blocks = -(-numel // NF4_BLOCK_SIZE)
            if double_quant:
                self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
                self.register_buffer("nested_absmax", torch.empty(-(-blocks // NF4_NESTED_BLOCK_SIZE),
                                                                  dtype=torch.float32, device=device))
            else:
                self.register_buffer("absmax", torch.empty(blocks, dtype=torch.float32, device=device))
            self.bias = None
            if linear.bias is not None:
                self.bias = torch.nn.Parameter(torch.empty(linear.out_features, dtype=linear.bias.dtype,
                                                           device=device), requires_grad=False)

        def forward(self, x):
            # bnb.nn.Linear4bit.forward: x → compute dtype, bias → compute dtype, matmul_4bit, back to x's dtype
            input_dtype = x.dtype
            x = x.to(compute_dtype)
            out = _Dequant4bitMatmul.apply(x, self.weight, self.out_features, self.in_features)
            if self.bias is not None:
                out = out + self.bias.to(compute_dtype)
            return out.to(input_dtype)

    return _FakeLinear4bit()


class _BnbLikeAdamW:
    """bitsandbytes AdamW's state layout without bitsandbytes (a CUDA library): per parameter ``state1``,
    ``state2`` as uint8 with fp32 ``absmax1/2`` per 256 values (8-bit, tensors ≥ 4096 elements) or fp32
    (32-bit, and small tensors). The update is one fused kernel that allocates nothing."""

    def __init__(self, groups, bits: int):
        self.param_groups = groups
        self.bits = bits
        self.state: dict = {}

    def step(self):
        import torch

        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None or param in self.state:
                    continue
                numel = param.numel()
                if self.bits == 8 and numel >= BNB_MIN_8BIT_SIZE:
                    blocks = -(-numel // BNB_BLOCK_SIZE)
                    self.state[param] = {"state1": torch.zeros(param.shape, dtype=torch.uint8),
                                         "state2": torch.zeros(param.shape, dtype=torch.uint8),
                                         "absmax1": torch.zeros(blocks, dtype=torch.float32),
                                         "absmax2": torch.zeros(blocks, dtype=torch.float32)}
                else:
                    self.state[param] = {"state1": torch.zeros(param.shape, dtype=torch.float32),
                                         "state2": torch.zeros(param.shape, dtype=torch.float32)}

    def zero_grad(self, set_to_none: bool = True):
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = None


_FLASH_NAME = "gpumem_unpadded_attention"  # a name with "flash" in it makes transformers look for a hub kernel


def _register_fake_flash_attention() -> str:
    """Register an attention function with FlashAttention-2's memory behaviour (it cannot run on CPU):
    transformers' varlen path copies the unpadded q/k/v, the kernel saves q/k/v/out and an fp32 log-sum-exp
    (heads × tokens), the output is padded back; backward allocates dq/dk/dv and an fp32 dq accumulator.
    No 4-D mask is built (transformers' ``flash_attention_mask`` keeps the 2-D padding mask)."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    class _FlashFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            # q: (tokens, heads, d) unpadded copies
            out = torch.empty_like(q)
            lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, out, lse = ctx.saved_tensors
            dq_accum = torch.empty(q.shape, dtype=torch.float32, device=q.device)
            softmax_d = torch.empty_like(lse)
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            del dq_accum, softmax_d
            return dq, dk, dv

    def fake_flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        # query: (b, heads, L, d) → unpad to (b·L, heads, d) copies (index_first_axis)
        b, heads, length, dim = query.shape
        q = query.transpose(1, 2).reshape(b * length, heads, dim).clone()
        k = key.transpose(1, 2).reshape(b * key.shape[2], key.shape[1], dim).clone()
        v = value.transpose(1, 2).reshape(b * value.shape[2], value.shape[1], value.shape[3]).clone()
        out = _FlashFunction.apply(q, k, v)
        return out.reshape(b, length, heads, dim).clone(), None  # pad_input

    def padding_mask_2d(batch_size, q_length, kv_length, *args, attention_mask=None, **kwargs):
        # transformers' flash_attention_mask, minus its data-dependent `attention_mask.all()` shortcut: GRPO
        # batches are padded, so the 2-D mask is kept (and the varlen path unpads)
        return None if attention_mask is None else attention_mask[:, -kv_length:]

    AttentionInterface.register(_FLASH_NAME, fake_flash_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_FLASH_NAME, padding_mask_2d)
    return _FLASH_NAME


# -- command line ------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...cli.estimate import add_setup_arguments

    add_setup_arguments(parser)
    parser.add_argument("--gpu", help="card name (L4, A100-80GB, H100, ...) or size (24GiB, 80GB)")
    parser.add_argument("--json", action="store_true", help="print JSON (the estimate's keys + largest_tensors)")
    parser.add_argument("--top", type=int, default=10, help="how many of the largest live tensors to list per phase")


def run(args: argparse.Namespace) -> int:
    from ...cli.estimate import print_result, setup_from_args

    setup = setup_from_args(args)
    result = run_simulation(setup, gpu=args.gpu, top_tensors=args.top)
    spec = result.model
    header = (f"{spec.name}: {spec.num_params / 1e9:.2f}B params ({spec.model_type}), simulated on CPU "
              f"(FakeTensorMode) in {result.elapsed_seconds:.1f} s, b={setup.per_device_train_batch_size} "
              f"P={setup.max_prompt_length} C={setup.max_completion_length} logits={setup.logits}")
    details = ["", f"largest tensors alive at the peak ({result.peak_phase}):"]
    details += [f"  {format_gib(tensor['bytes']):>12}  {tensor['component']:<22} {tensor['name']}: "
                f"{tensor['op']} {tuple(tensor['shape'])} {tensor['dtype']}" for tensor in result.peak_tensors()]
    return print_result(result, args.json, header, details,
                        verdict_note=" — simulated torch tensors only: no CUDA context, allocator slack or vLLM")
