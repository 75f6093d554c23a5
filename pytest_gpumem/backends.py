"""The training backends pytest-gpumem models: each one's defaults and the traits the stages branch on.

A backend is a :class:`Backend` profile in :data:`BACKENDS`: its own defaults for every setup key (TRL's
``GRPOConfig``; Unsloth's patched one and its loaders), and named traits — "Unsloth loads 4-bit bases
double-quantised", "TRL's policy is on the GPU before colocated vLLM starts" — that the estimate, the
simulation, the measurement and the levers read instead of comparing backend names. Adding a backend is a
profile here, its child loader in ``measure/child/backends/``, and whatever new arithmetic its traits imply in
``predict/analytic/``. Sources: trl 1.16 ``trl/trainer/grpo_config.py`` and ``grpo_trainer.py``; Unsloth's
``FastLanguageModel.from_pretrained`` / ``get_peft_model`` defaults and GRPO patches
(docs/memory-model.md §2, §3.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

#: The newest TRL version whose memory behaviour is modelled (its GRPO log-prob path).
NEWEST_MODELLED_TRL = "1.16.0"
#: First TRL release whose GRPOTrainer computes log-probs with the fused/chunked lm_head
#: (``trl/kernels/chunked_logprob.py``, ``add_fused_lm_head``); earlier ones materialise (b, C+1, V) logits.
FIRST_CHUNKED_TRL = (1, 16)
#: The newest vLLM / Unsloth releases whose memory behaviour is modelled (predict/analytic/vllm.py); a setup
#: without the package installed is predicted for these
NEWEST_MODELLED_VLLM = "0.20.0"
NEWEST_MODELLED_UNSLOTH = "2026.3.4"


@dataclass(frozen=True)
class VllmIntegration:
    """How a backend runs colocated vLLM (TRL: its ``VLLMGeneration`` in the trainer's process, or a
    ``trl vllm-serve`` server; Unsloth: ``fast_inference``, vLLM loaded first)."""

    #: the policy (and a reference model) is on the GPU before vLLM starts, so vLLM's "free memory <
    #: utilisation × total" refusal is predictable
    policy_loaded_first: bool = False
    #: the utilisation is a fraction of the memory free when vLLM starts first on an empty card (total − the
    #: CUDA context), not of the total
    budget_excludes_context: bool = False
    #: the training model is built on vLLM's weights: one copy of the base serves both
    shares_weights: bool = False
    #: ``vllm_mode="server"`` (vLLM on other GPUs) is available
    server_mode: bool = True
    #: the ``max_num_seqs`` passed to vLLM when the setup does not say: None = the generation batch (TRL:
    #: ``max_num_seqs=per_device_train_batch_size × steps_per_generation``, trl/trainer/grpo_trainer.py)
    default_max_num_seqs: int | None = None
    #: the ``max_num_batched_tokens`` passed to vLLM: None = max_seq_length (Unsloth: every logged Unsloth
    #: start-up has max_num_batched_tokens == max_model_len, tests/data/realworld/vllm-startup-logs.json)
    default_max_num_batched_tokens: int | None = None
    #: vLLM is started with ``enable_lora=True`` (Unsloth's load_vllm): LoRA slots of ``max_lora_rank`` for every
    #: supported Linear are allocated with the weights
    enables_lora: bool = False


@dataclass(frozen=True)
class Backend:
    """One training backend: its defaults and what it does differently (every trait named for its effect)."""

    name: str
    #: the name as printed in messages
    label: str
    #: the backend's default for every setup key (a setup holds concrete values after construction)
    defaults: Mapping[str, Any] = field(repr=False)
    #: whose default LoRA targets apply when none are given ("PEFT" for TRL's peft_config)
    lora_defaults_from: str = "PEFT"
    #: the log-prob path follows the installed TRL's version (TRL ≥ 1.16 chunks, older TRL materialises)
    logits_follow_trl_version: bool = False
    #: log-probs go through the model's lm_head (materialised or chunked by ``logits``); else Unsloth's own
    #: ``chunked_hidden_states_selective_log_softmax`` chunks
    model_head_logprobs: bool = True
    #: ``use_liger_kernel`` is honoured (TRL's chunked Liger loss)
    liger_kernel: bool = False
    #: a model given by name loads in fp32 unless told otherwise (TRL; its fp32 → bf16 lever applies)
    loads_by_name_in_fp32: bool = False
    #: PEFT adapters are cast to bf16 for a quantised base ("When using QLoRA, the PEFT adapter weights are
    #: converted to bf16", trl/trainer/grpo_trainer.py); else they stay fp32 (autocast_adapter_dtype=True)
    adapters_bf16_on_4bit_base: bool = False
    vllm: VllmIntegration = VllmIntegration()
    #: 4-bit bases are loaded double-quantised (8-bit absmax)
    nf4_double_quant: bool = False
    #: a generation batch not divisible by num_generations resets the batch to num_generations (instead of
    #: TRL's error)
    resets_indivisible_batch: bool = False
    #: ``gradient_checkpointing="unsloth"`` (checkpoints offloaded to CPU) is available
    offloaded_checkpointing: bool = False
    #: transformers builds the padded batch's 4-D b·L² mask in training; Unsloth's fast models do not
    #: (unsloth/models/llama.py ``LlamaModel_fast_forward``: ``elif self.training: attention_mask = None``,
    #: padding zeroed in the embeddings instead)
    builds_4d_mask: bool = True
    #: the GRPO loss runs the micro-batch's rows in ``unsloth_grpo_mini_batch`` separate forward passes
    #: (unsloth_zoo rl_replacements.py ``grpo_accumulated_loss``: ``batch_size = ceil(total_samples / B)`` rows a
    #: pass), so checkpointed layers recompute one pass's tokens in backward
    mini_batch_passes: bool = False
    #: the FakeTensor simulation replays this backend's step (predict/faketensor)
    simulated: bool = False
    #: runs under ``accelerate launch`` on several GPUs (DDP, DeepSpeed ZeRO, FSDP) as modelled here
    multi_gpu: bool = False
    #: a measured run needs a CUDA device
    needs_cuda: bool = False
    #: the package a measured run imports first (it patches transformers and trl), None for plain TRL
    package: str | None = None


TRL = Backend(
    name="trl", label="TRL", lora_defaults_from="PEFT", logits_follow_trl_version=True, loads_by_name_in_fp32=True,
    adapters_bf16_on_4bit_base=True, liger_kernel=True, simulated=True, multi_gpu=True,
    # trl/generation/vllm_generation.py: LLM(..., max_num_batched_tokens=4096)
    vllm=VllmIntegration(policy_loaded_first=True, default_max_num_batched_tokens=4096),
    defaults={
        "dtype": "float32",  # a model given by name loads in fp32 unless model_init_kwargs sets dtype
        "load_in_4bit": False,
        "lora_rank": None,  # full fine-tuning unless a peft_config is passed
        "lora_target_modules": None,  # -> PEFT's default for the architecture (see resolve_target_modules)
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "steps_per_generation": None,  # -> gradient_accumulation_steps
        "num_iterations": 1,
        "num_generations": 8,
        "max_prompt_length": 512,  # removed from TRL 0.28 (prompts untruncated): 512 is the old default
        "max_completion_length": 512,
        "max_seq_length": None,
        "gradient_checkpointing": True,
        "optim": "adamw_torch_fused",
        "beta": 0.0,
        "use_vllm": False,
        "vllm_mode": "colocate",
        "vllm_gpu_memory_utilization": 0.3,
        "vllm_enable_sleep_mode": False,
        "vllm_importance_sampling_correction": True,
        "attn_implementation": "sdpa",
        "use_liger_kernel": False,
        "cast_lm_head_to_fp32": False,
    })

UNSLOTH = Backend(
    name="unsloth", label="Unsloth", lora_defaults_from="Unsloth", model_head_logprobs=False, nf4_double_quant=True,
    # unsloth_zoo/vllm_utils.py load_vllm(max_num_seqs=256, "Default vLLM 256", enable_lora=True, max_loras=1)
    vllm=VllmIntegration(budget_excludes_context=True, shares_weights=True, server_mode=False,
                         default_max_num_seqs=256, enables_lora=True),
    resets_indivisible_batch=True, offloaded_checkpointing=True, package="unsloth", needs_cuda=True,
    builds_4d_mask=False, mini_batch_passes=True,
    defaults={
        "dtype": "bfloat16",
        "load_in_4bit": True,
        "lora_rank": 16,
        "lora_target_modules": "all-linear",
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "steps_per_generation": None,
        "num_iterations": 1,
        "num_generations": 8,
        "max_prompt_length": 512,
        "max_completion_length": 512,
        "max_seq_length": None,
        "gradient_checkpointing": "unsloth",
        "optim": "adamw_8bit",
        "beta": 0.001,
        "use_vllm": True,  # fast_inference=True
        "vllm_mode": "colocate",
        "vllm_gpu_memory_utilization": 0.5,
        "vllm_enable_sleep_mode": False,
        "vllm_importance_sampling_correction": True,
        "attn_implementation": "sdpa",
        "use_liger_kernel": False,
        "cast_lm_head_to_fp32": False,
    })

#: name -> profile; the setup's ``backend`` key is one of these names
BACKENDS: dict[str, Backend] = {profile.name: profile for profile in (TRL, UNSLOTH)}


def run_label(setup: Any) -> str:
    """How a measured run names what it ran: ``trl-hf-generate``, ``trl-vllm-colocate-sleep``, ``unsloth-vllm``."""
    if setup.backend == UNSLOTH.name:
        return "unsloth-vllm" if setup.use_vllm else "unsloth"
    if setup.use_vllm:
        return f"trl-vllm-{setup.vllm_mode}" + ("-sleep" if setup.vllm_enable_sleep_mode else "")
    return "trl-hf-generate"
