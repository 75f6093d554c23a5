"""The analytic memory model of one GRPO step on one GPU — pure Python, no torch, microseconds.

Peak ≈ CUDA context + persistent + max(generation, scoring, training, optimizer-step transients) + slack
(docs/memory-model.md §1). Each phase of the returned :class:`~pytest_gpumem.breakdown.Breakdown` lists
everything live at that phase's peak, so the step's peak is the largest phase. The model is of the steady
state (optimizer states exist; step ≥ 2), which is what a long run lives in.

Notation (docs/memory-model.md): b = per_device_train_batch_size, G = num_generations, P / C = prompt /
completion tokens, L = P + C, V = vocab, h = hidden, I = MLP intermediate, n_l = layers, Ψ = parameters.
Every formula cites where it comes from; numbers "measured on CPU" come from live-tensor accounting of
TRL's exact op sequence and are checked against the FakeTensor simulation (tests/test_accuracy_matrix.py)
and, where a session had a GPU, against measurements committed under validation/.

The calculators are module-level functions of one frozen :class:`~.context.Ctx`, by concern: ``params``
(model states), ``activations``, ``logits``, ``vllm``; ``phases`` assembles them phase by phase and
``constants`` holds every sourced constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ...breakdown import Breakdown, PeakJudgement, Role
from ...gpus import GPU, resolve_gpu
from ...models import ModelSpec
from ...spec import GRPOSetup
from . import parallel, phases, vllm, vllm_parallel
from .context import Ctx


@dataclass(frozen=True)
class Estimate(PeakJudgement):
    """The predicted memory of one GRPO step: a :class:`Breakdown` plus what an OOM would report."""

    setup: GRPOSetup
    model: ModelSpec
    breakdown: Breakdown
    gpu: GPU | None
    largest_allocation_bytes: int
    largest_allocation_name: str
    assumptions: tuple[str, ...]
    warnings: tuple[str, ...]
    #: ((role, GPU), ...) for GPU roles on other cards than the training ranks' (the vLLM server's)
    role_cards: tuple = ()

    def role_totals(self) -> dict[str, int]:
        """The card size each GPU role is judged against (the training ranks: ``gpu``)."""
        totals = {role: card.total_bytes for role, card in self.role_cards if card is not None}
        if self.gpu is not None:
            for role in self.breakdown.gpu_role_names() or ["rank0"]:
                totals.setdefault(role, self.gpu.total_bytes)
        return totals

    def fits(self, total_bytes: int | None = None, headroom: float = 0.0) -> bool:
        """:meth:`PeakJudgement.fits` for the training GPUs, and (judged against the cards) every other GPU role
        on its own card. A vLLM server GPU is judged without ``headroom``: it takes ``util × total`` by design, so
        its margin is the server's utilisation, not the trainer's."""
        if not super().fits(total_bytes, headroom):
            return False
        if total_bytes is not None:
            return True
        totals = self.role_totals()
        return all(self.breakdown.role(role).peak_bytes <= total for role, total in totals.items()
                   if role in self.breakdown.roles and role not in ("rank0", "rank1+"))


def estimate(setup: GRPOSetup | Mapping | str | Path, gpu: str | int | GPU | None = None) -> Estimate:
    """Predict the per-phase memory of ``setup`` (optionally judged against ``gpu``: a size or card name)."""
    ctx = Ctx.of(GRPOSetup.coerce(setup), resolve_gpu(gpu))
    _note_assumptions(ctx)
    if ctx.setup.is_distributed:
        breakdown, persistent, compute = parallel.estimate_roles(ctx)
    elif vllm_parallel.server_mode(ctx):
        # one training GPU and a `trl vllm-serve` server on its own GPUs: two roles
        by_phase, persistent = phases.step(ctx, vllm_parallel.server_sync_adjuster(ctx, 0))
        roles = {Role.RANK0.value: by_phase, Role.VLLM_SERVER.value: vllm_parallel.server_phases(ctx)}
        breakdown, compute = Breakdown.from_roles(roles, source="estimate"), ctx
    else:
        by_phase, persistent = phases.step(ctx)
        breakdown, compute = Breakdown(phases=by_phase, source="estimate"), ctx
    peak_phase = breakdown.peak_phase
    tensors = ctx.notes.tensors
    candidates = [t for t in tensors if t[0] == peak_phase] or tensors
    largest = max(candidates, key=lambda t: t[2]) if candidates else (peak_phase, "none", 0)
    vllm.check_start(compute, persistent)
    setup, notes = ctx.setup, ctx.notes
    if setup.use_vllm and setup.vllm_mode == "server":
        notes.assumptions.append("vllm_mode='server': vLLM runs on its own GPUs (the vllm_server role); a training "
                                 "GPU holds the weight sync and the completions, none of vLLM's reservation")
    cards = ((Role.VLLM_SERVER.value, vllm_parallel.server_gpu(ctx)),) if vllm_parallel.server_mode(ctx) else ()
    return Estimate(setup=setup, model=ctx.spec, breakdown=breakdown, gpu=ctx.gpu,
                    largest_allocation_bytes=int(largest[2]), largest_allocation_name=largest[1],
                    assumptions=tuple(notes.assumptions), warnings=tuple(notes.warnings), role_cards=cards)


def _note_assumptions(ctx: Ctx) -> None:
    """What the estimate assumed because the setup did not say."""
    setup, explicit, add = ctx.setup, ctx.setup.explicit_fields, ctx.notes.assumptions.append
    if ctx.backend.logits_follow_trl_version and "logits" not in explicit:
        mode = "chunked log-probs (fused lm_head)" if setup.logits == "chunked" else "materialised fp32 logits"
        add(f"trl {setup.trl_version} → {mode}")
    if "dtype" not in explicit and ctx.backend.loads_by_name_in_fp32:
        add("dtype not given: TRL loads a model given by name in float32 "
            "(set dtype='bfloat16' if you pass model_init_kwargs={'dtype': torch.bfloat16})")
    if "max_prompt_length" not in explicit and "max_seq_length" not in explicit:
        add(f"max_prompt_length not given: prompts assumed ≤ {setup.max_prompt_length} tokens "
            "(TRL ≥ 0.28 does not truncate prompts)")
    if setup.is_lora and "lora_target_modules" not in explicit:
        add(f"lora_target_modules not given: {', '.join(setup.resolve_target_modules())} "
            f"({ctx.backend.lora_defaults_from}'s default)")
    if setup.load_in_4bit:
        add("4-bit base: NF4 linears, embeddings/head/norms unquantised; dequantisation is transient, one layer "
            "at a time")
    if ctx.spec.is_moe:
        add("MoE: all experts' weights are resident; activations use the active experts "
            f"({ctx.spec.num_experts_per_tok} of {ctx.spec.num_experts})")
