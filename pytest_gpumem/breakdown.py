"""The one memory-breakdown type shared by estimate, simulate and measure.

A :class:`Breakdown` maps each *phase* of a GRPO step to the named *components* (bytes) that are live at
that phase's peak. Every phase's mapping is complete — it includes the persistent components (weights,
optimizer states, vLLM's reservation, ...) as well as the phase's transients — so ``total(phase)`` is
directly comparable with a measured per-phase peak, and the step's peak is simply the largest phase.

Component names are shared vocabulary (:class:`Component`, in the spirit of torch MemTracker's category
enum) so that an estimate, a FakeTensor simulation and a GPU measurement can be compared component by
component. A producer may add names of its own (a measurement cannot always attribute bytes): those are
compared by name too, and reported as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Mapping

from .errors import GpuMemError
from .units import format_gib


class Phase(str, Enum):
    """The phases of one GRPO optimizer step on one GPU (see :mod:`pytest_gpumem.predict.analytic`)."""

    PERSISTENT = "persistent"  # between phases: what never goes away
    GENERATION = "generation"  # rollouts (vLLM or HF generate)
    SCORING = "scoring"  # no-grad old/reference log-prob passes
    TRAINING = "training"  # one training micro-step: forward + loss + backward
    OPTIMIZER = "optimizer_step"  # optimizer.step()

    def __str__(self) -> str:  # so f-strings print "training", not "Phase.TRAINING"
        return self.value


PHASE_ORDER = [p.value for p in Phase]


class Role(str, Enum):
    """Whose memory a breakdown is, in a multi-GPU job (a one-GPU breakdown has no roles)."""

    RANK0 = "rank0"  # training rank 0: the largest padded shard and anything only the main process does
    OTHER_RANKS = "rank1+"  # the worst of the other training ranks
    HOST = "host"  # CPU memory of one machine: what ZeRO / FSDP offload put there (all its ranks together)
    VLLM_SERVER = "vllm_server"  # one GPU of a `trl vllm-serve` server (every TP/DP worker alike)

    def __str__(self) -> str:
        return self.value


#: the roles that are training GPUs: a budget per GPU is judged on the worst of them. A GPU that is not a
#: training rank (issue 14's vLLM server) is a role of its own outside this set, reported beside the ranks.
TRAINER_ROLES = frozenset({Role.RANK0.value, Role.OTHER_RANKS.value})
#: roles that are not GPU memory at all
HOST_ROLES = frozenset({Role.HOST.value})


class Component(str, Enum):
    """Canonical component names (bytes)."""

    CUDA_CONTEXT = "cuda_context"  # CUDA context + cuBLAS/cuDNN workspaces (non-torch)
    WEIGHTS = "weights"  # the policy's base weights (fp32 / bf16 / NF4 + unquantised parts)
    LORA = "lora_params"  # LoRA adapter weights
    GRADIENTS = "gradients"  # .grad of trainable parameters
    OPTIMIZER_STATES = "optimizer_states"  # AdamW exp_avg / exp_avg_sq (8-bit or fp32)
    OPTIMIZER_TEMP = "optimizer_step_temp"  # foreach AdamW's step-time temporaries
    REFERENCE = "reference_weights"  # a separate reference model (beta != 0 without PEFT)
    VLLM_WEIGHTS = "vllm_weights"
    VLLM_KV_CACHE = "vllm_kv_cache"
    VLLM_ACTIVATIONS = "vllm_activations"  # vLLM's profiled activation peak
    VLLM_CUDA_GRAPHS = "vllm_cuda_graphs"
    VLLM_NON_TORCH = "vllm_non_torch"  # vLLM's own non-torch memory (NCCL, cuBLAS handles)
    VLLM_WEIGHT_SYNC = "vllm_weight_sync"  # a vLLM server worker's received weight chunks (full parameters)
    GENERATE_KV_CACHE = "generate_kv_cache"  # HF generate's dynamic KV cache
    GENERATE_LOGITS = "generate_logits"  # HF generate's per-step fp32 logits rows
    ACTIVATIONS = "activations"  # saved activations (checkpointed layer inputs, or all of them)
    RECOMPUTED_LAYER = "recomputed_layer"  # the one layer recomputed in backward, with its grads
    LOGITS = "logits"  # logits / log-prob temporaries (the usual biggest transient)
    ATTENTION_MASK = "attention_mask"  # SDPA's materialised 4-D mask
    WEIGHT_CASTS = "autocast_weight_copies"  # bf16 copies of fp32 weights under autocast
    BATCH_BUFFERS = "batch_buffers"  # the buffered generation batch: ids, masks, advantages
    MASTER_WEIGHTS = "master_weights"  # DeepSpeed's fp32 partition of the trained parameters (this rank's share)
    GATHERED_PARAMS = "gathered_params"  # ZeRO-3 / FSDP all-gathered (unsharded) parameters, live while used
    REDUCE_BUCKETS = "reduce_buckets"  # DDP buckets, ZeRO's IPG bucket, FSDP's reduce-scatter input
    WEIGHT_SYNC = "weight_sync_gather"  # parameters gathered to push to vLLM (TRL's sync_weights)
    NCCL_BUFFERS = "nccl_buffers"  # NCCL communicator buffers (non-torch)
    ALLOCATOR_SLACK = "allocator_slack"  # reserved-but-unallocated (caching allocator)
    OTHER = "other"  # measured bytes not attributed to any of the above

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Breakdown:
    """Named components in bytes, per phase.

    ``phases[phase][component] = bytes`` — everything live at that phase's peak.
    ``source`` says who produced it: ``"estimate"``, ``"simulate"`` or ``"measure"``.
    ``largest_tensors`` optionally lists ``{"name", "shape", "dtype", "bytes", "phase"}`` records (the
    simulation and the estimate's largest single allocation).
    ``origins[phase][component]`` names the producer of a component when it is not ``source``: the whole step
    judged in simulate mode is the simulated torch tensors plus the estimate's parts a simulation cannot see
    (``predict.analytic.whole_step``), each labelled by where it came from.

    A multi-GPU job has one breakdown per *role* (:class:`Role`: rank 0, the other ranks, host memory):
    ``roles[role]`` holds each role's phases, and the top-level ``phases`` are those of the worst training
    GPU (``worst_role``), so everything that reads one GPU's phases reads the GPU that runs out first.
    """

    phases: Mapping[str, Mapping[str, int]]
    source: str = "estimate"
    largest_tensors: tuple = field(default=())
    origins: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: role -> phase -> component -> bytes; empty for one GPU
    roles: Mapping[str, Mapping[str, Mapping[str, int]]] = field(default_factory=dict)
    #: the role whose phases are ``phases`` (None for one GPU)
    worst_role: str | None = None

    def __post_init__(self) -> None:
        # Normalise enum keys to their string values and drop zero components, so that two breakdowns
        # built differently compare equal and JSON round-trips exactly.
        normalised = {}
        for phase, components in self.phases.items():
            normalised[str(phase)] = {str(name): int(num_bytes) for name, num_bytes in components.items()
                                      if int(num_bytes) != 0}
        object.__setattr__(self, "phases", normalised)
        # only the origins that differ from ``source``, of components present: equal breakdowns compare equal
        origins = {str(phase): {str(name): str(origin) for name, origin in by_name.items()
                                if str(origin) != self.source and str(name) in normalised.get(str(phase), {})}
                   for phase, by_name in self.origins.items()}
        object.__setattr__(self, "origins", {phase: by_name for phase, by_name in origins.items() if by_name})
        roles = {str(role): Breakdown(phases, source=self.source).phases for role, phases in self.roles.items()}
        object.__setattr__(self, "roles", roles)

    @classmethod
    def from_roles(cls, roles: Mapping[str, Mapping[str, Mapping[str, int]]], source: str) -> "Breakdown":
        """One breakdown of a multi-GPU job: the top level is the worst training GPU (ties: the earlier role)."""
        gpus = [str(r) for r in roles if str(r) in TRAINER_ROLES]
        if not gpus:
            raise GpuMemError("roles", "a multi-GPU breakdown needs at least one training rank",
                              fix=f"give one of {', '.join(sorted(TRAINER_ROLES))}")
        by_peak = {r: cls(phases=roles[r], source=source).peak_bytes for r in gpus}
        worst = max(gpus, key=lambda r: (by_peak[r], -gpus.index(r)))
        return cls(phases=roles[worst], source=source, roles=dict(roles), worst_role=worst)

    def role(self, name: str | Role) -> "Breakdown":
        """The breakdown of one role (the whole breakdown for a one-GPU job asked for rank 0)."""
        name = str(name)
        if not self.roles and name == Role.RANK0.value:
            return Breakdown(phases=self.phases, source=self.source)
        if name not in self.roles:
            raise GpuMemError("role", f"no role {name!r} in this breakdown",
                              fix=f"use one of {', '.join(self.roles) or Role.RANK0.value}")
        return Breakdown(phases=self.roles[name], source=self.source)

    def role_names(self) -> list[str]:
        return list(self.roles)

    def gpu_role_names(self) -> list[str]:
        """The roles that are GPU memory (training ranks and any other GPU), in order."""
        return [r for r in self.roles if r not in HOST_ROLES]

    # -- reading --------------------------------------------------------------------------------
    def phase_names(self) -> list[str]:
        """Phases present, in pipeline order (unknown names last, alphabetically)."""
        known = [p for p in PHASE_ORDER if p in self.phases]
        return known + sorted(p for p in self.phases if p not in PHASE_ORDER)

    def components(self, phase: str | Phase) -> dict[str, int]:
        return dict(self.phases.get(str(phase), {}))

    def total(self, phase: str | Phase) -> int:
        return sum(self.phases.get(str(phase), {}).values())

    @property
    def peak_phase(self) -> str | None:
        names = self.phase_names()
        if not names:
            return None
        # ties go to the earlier phase in pipeline order: that is where an OOM would happen first
        best, best_total = names[0], self.total(names[0])
        for phase in names[1:]:
            total = self.total(phase)
            if total > best_total:
                best, best_total = phase, total
        return best

    @property
    def peak_bytes(self) -> int:
        phase = self.peak_phase
        return self.total(phase) if phase is not None else 0

    def top_components(self, phase: str | Phase | None = None, n: int = 3) -> list[tuple[str, int]]:
        """The ``n`` largest components of ``phase`` (default: the peak phase), largest first."""
        phase = self.peak_phase if phase is None else str(phase)
        items = sorted(self.components(phase).items(), key=lambda kv: (-kv[1], kv[0]))
        return items[:n]

    def origin(self, phase: str | Phase, component: str) -> str:
        """Who produced ``component`` of ``phase``: ``source`` unless :attr:`origins` says otherwise."""
        return self.origins.get(str(phase), {}).get(str(component), self.source)

    def component_origin(self, component: str) -> str:
        """One label for a component across the phases: ``"simulate"``, ``"estimate"``, or
        ``"simulate; estimate in generation"`` when the phases differ."""
        by_origin: dict[str, list[str]] = {}
        for phase in self.phase_names():
            if component in self.phases[phase]:
                by_origin.setdefault(self.origin(phase, component), []).append(phase)
        if len(by_origin) <= 1:
            return next(iter(by_origin), self.source)
        main = max(by_origin, key=lambda origin: len(by_origin[origin]))
        rest = "; ".join(f"{origin} in {', '.join(phases)}" for origin, phases in by_origin.items() if origin != main)
        return f"{main}; {rest}"

    def component_names(self) -> list[str]:
        seen: dict[str, None] = {}
        for phase in self.phase_names():
            for name in self.phases[phase]:
                seen.setdefault(name, None)
        return list(seen)

    # -- comparing ------------------------------------------------------------------------------
    def diff(self, other: "Breakdown") -> dict[str, dict[str, int]]:
        """``other − self`` per phase and component (only non-zero deltas)."""
        result: dict[str, dict[str, int]] = {}
        for phase in sorted(set(self.phases) | set(other.phases), key=_phase_sort_key):
            mine, theirs = self.phases.get(phase, {}), other.phases.get(phase, {})
            deltas = {name: theirs.get(name, 0) - mine.get(name, 0)
                      for name in sorted(set(mine) | set(theirs))}
            deltas = {name: delta for name, delta in deltas.items() if delta}
            if deltas:
                result[phase] = deltas
        return result

    # -- serialising ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = {"source": self.source,
                "phases": {phase: dict(self.phases[phase]) for phase in self.phase_names()},
                "peak_phase": self.peak_phase, "peak_bytes": self.peak_bytes}
        if self.largest_tensors:
            data["largest_tensors"] = [dict(t) for t in self.largest_tensors]
        if self.origins:
            data["origins"] = {phase: dict(by_name) for phase, by_name in self.origins.items()}
        data.update(self.roles_dict())
        return data

    def roles_dict(self) -> dict:
        """``{"roles": {...}, "worst_role": ...}`` when there is more than one role, else ``{}`` (a one-GPU
        breakdown's JSON is what it always was)."""
        if len(self.roles) <= 1:
            return {}
        roles = {}
        for name in self.roles:
            one = self.role(name)
            roles[name] = {"phases": {p: dict(one.phases[p]) for p in one.phase_names()},
                           "peak_phase": one.peak_phase, "peak_bytes": one.peak_bytes}
        return {"roles": roles, "worst_role": self.worst_role}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Breakdown":
        roles = {name: role["phases"] for name, role in (data.get("roles") or {}).items()}
        return cls(phases=data["phases"], source=data.get("source", "estimate"),
                   largest_tensors=tuple(data.get("largest_tensors", ())), origins=data.get("origins") or {},
                   roles=roles, worst_role=data.get("worst_role"))

    @classmethod
    def from_phases(cls, phases: Iterable[tuple[str | Phase, Mapping[str, int]]], source: str) -> "Breakdown":
        return cls(phases={str(p): dict(c) for p, c in phases}, source=source)


def _phase_sort_key(phase: str) -> tuple[int, str]:
    return (PHASE_ORDER.index(phase) if phase in PHASE_ORDER else len(PHASE_ORDER), phase)


class PeakJudgement:
    """What an estimate and a simulation share: their peak, judged against a card.

    Mixed into dataclasses that have ``breakdown`` (:class:`Breakdown`), ``gpu`` (a ``gpus.GPU`` or None)
    and ``warnings`` (a "vLLM would refuse to start" warning means it cannot fit the card it was made for).
    """

    #: the verb of :meth:`summary`: "predicted" (estimate) or "simulated"
    peak_verb = "predicted"

    @property
    def peak_bytes(self) -> int:
        return self.breakdown.peak_bytes

    @property
    def peak_phase(self) -> str | None:
        return self.breakdown.peak_phase

    @property
    def total_bytes(self) -> int | None:
        return self.gpu.total_bytes if self.gpu else None

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.total_bytes is None else self.total_bytes - self.peak_bytes

    def fits(self, total_bytes: int | None = None, headroom: float = 0.0) -> bool:
        """Whether the peak stays under ``total_bytes × (1 − headroom)`` (default: the card it was made for,
        where vLLM must also be able to start)."""
        total = self.total_bytes if total_bytes is None else total_bytes
        if total is None:
            raise GpuMemError("gpu", "no GPU size to judge the fit against", fix="pass gpu='24GiB' or a card name")
        if total_bytes is None and any(w.startswith("vLLM would refuse") for w in self.warnings):
            return False
        return self.peak_bytes <= total * (1 - headroom)

    def to_dict(self) -> dict:
        """The JSON of ``gpumem estimate`` / ``gpumem simulate`` (needs ``setup``, ``model``,
        ``largest_allocation_bytes/_name`` and ``assumptions`` besides the attributes above)."""
        spec = self.model
        return {
            "peak_bytes": self.peak_bytes,
            "peak_phase": self.peak_phase,
            "largest_allocation_bytes": self.largest_allocation_bytes,
            "largest_allocation_name": self.largest_allocation_name,
            "fits": self.fits() if self.gpu else None,
            "total_bytes": self.total_bytes,
            "headroom_bytes": self.headroom_bytes,
            "gpu": self.gpu.to_dict() if self.gpu else None,
            "phases": self.breakdown.to_dict()["phases"],
            **self.breakdown.roles_dict(),
            "assumptions": list(self.assumptions),
            "warnings": list(self.warnings),
            "setup": self.setup.to_dict(),
            "model": {"name": spec.name, "num_params": spec.num_params, "model_type": spec.model_type,
                      "source": spec.source, "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
                      "num_hidden_layers": spec.num_hidden_layers},
        }

    def summary(self) -> str:
        """One line: the peak, its phase and the three largest components."""
        top = ", ".join(f"{name} {format_gib(num_bytes)}" for name, num_bytes in self.breakdown.top_components())
        return f"{self.peak_verb} peak {format_gib(self.peak_bytes)} in the {self.peak_phase} phase: {top}"
