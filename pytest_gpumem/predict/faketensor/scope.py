"""What the FakeTensor simulation covers: the setups it refuses, the components and phases it cannot see, what
it assumes, and how an estimate is compared with it. Torch-free: the CLI and the plugin read it without
starting a simulation.
"""

from __future__ import annotations

from ...breakdown import Breakdown, Component, Phase
from ...errors import GpuMemError
from ...models import ModelSpec
from ...spec import GRPOSetup

#: Components a FakeTensor simulation cannot see: non-torch memory, the allocator's reserve, vLLM, HF generate,
#: and what only a measurement has (``other``: measured bytes it could not attribute). The simulation's own
#: batch buffers are one micro-batch, the estimate's the whole generation batch: not comparable either.
NOT_SIMULATED_COMPONENTS = frozenset({
    Component.CUDA_CONTEXT.value, Component.ALLOCATOR_SLACK.value, Component.VLLM_WEIGHTS.value,
    Component.VLLM_KV_CACHE.value, Component.VLLM_ACTIVATIONS.value, Component.VLLM_CUDA_GRAPHS.value,
    Component.VLLM_NON_TORCH.value, Component.VLLM_WEIGHT_SYNC.value, Component.GENERATE_KV_CACHE.value,
    Component.GENERATE_LOGITS.value,
    Component.BATCH_BUFFERS.value, Component.OTHER.value,
    # DeepSpeed's fp32 master partitions (ZeRO is not traced: ranks.ANALYTIC_STRATEGIES); NCCL's buffers are
    # never torch's
    Component.MASTER_WEIGHTS.value, Component.NCCL_BUFFERS.value,
})
#: Phases the simulation produces (generation is not simulated: HF generate is data-dependent).
SIMULATED_PHASES = (Phase.PERSISTENT.value, Phase.SCORING.value, Phase.TRAINING.value, Phase.OPTIMIZER.value)


class SimulationError(GpuMemError):
    """The simulation could not run this setup (raised instead of crashing the caller)."""


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


def check_supported(setup: GRPOSetup, spec: ModelSpec) -> None:
    """Refuse, naming the field and the fix, what the simulation cannot trace."""
    if not setup.backend_profile.simulated:
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


def assumptions(setup: GRPOSetup) -> list[str]:
    """What a simulation of ``setup`` assumes (its Simulation's ``assumptions``, after the setup's own notes)."""
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
                     + ("(double-quantised) " if setup.backend_profile.nf4_double_quant else "")
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

