"""Fit a GRPO setup to a GPU: search the levers of :mod:`pytest_gpumem.diagnose.levers` for the best setup
that fits.

The search space is the product of one list of options per *dimension*. Each list starts at the input's value
and moves only towards saving memory — fit pulls levers, it never spends memory the input did not ask for
(one exception: a colocated vLLM utilisation too low for vLLM to start at all — its KV cache could not hold
one sequence — is raised to the smallest that starts). Dimensions are ordered by what matters for training
quality (:data:`QUALITY_ORDER`), and the result is the lexicographically best fitting candidate: the longest
completions first, then the largest groups, then the most trainable capacity, and so on; quality-neutral
implementation levers (chunked log-probs, fused AdamW) come last, so they are used freely to avoid sacrificing
anything else, and left off when not needed.

Completions per optimizer step (``per_device_train_batch_size × gradient_accumulation_steps``) are kept:
halving the micro-batch doubles the accumulation. Memory depends on the micro-batch, not on the effective
batch (beyond the gradients kept between micro-steps), so keeping it hardly ever stops a setup from fitting;
pass ``keep=()`` to also allow smaller effective batches (they shrink the generation batch).

Search: depth-first in quality order. Before descending into a prefix of choices, the prefix is completed
with every remaining dimension at its most-saving option (the last of each list); if even that does not
fit, the whole subtree is skipped. This is exact when memory does not grow as any dimension moves to its
last option (the levers are built that way; ``tests/test_fit.py`` checks it per dimension on sample setups and
compares the pruned search with brute force) and estimates tens to hundreds of candidates instead of the
whole product (``benchmarks/bench_fit.py``).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..errors import GpuMemError, SetupError
from ..gpus import resolve_gpu
from ..predict.analytic import estimate
from ..spec import GRPOSetup
from .levers import min_vllm_utilization

#: The dimensions, most important first, with why (what each costs when moved off the input's value).
QUALITY_ORDER: tuple[tuple[str, str], ...] = (
    ("max_completion_length", "truncating completions changes what the policy can learn to write"),
    ("num_generations", "smaller groups give noisier group-relative advantages"),
    ("capacity", "full fine-tuning > LoRA; a higher LoRA rank > a lower one"),
    ("load_in_4bit", "a 16/32-bit base > an NF4-quantised base (QLoRA)"),
    ("dtype", "fp32 master weights > bf16 weights (TRL loads by name in fp32)"),
    ("optim", "fp32 AdamW states > 8-bit AdamW states"),
    ("batch", "a larger micro-batch (fewer accumulation steps) is faster; completions per step are kept"),
    ("steps_per_generation", "fewer, larger generation rounds are faster"),
    ("gradient_checkpointing", "no recomputation is ~30% faster"),
    ("vllm_enable_sleep_mode", "no sleep/wake cycle per generation round"),
    ("vllm_gpu_memory_utilization", "a larger vLLM KV cache decodes more sequences at once"),
    ("use_liger_kernel", "quality-neutral (chunked log-probs): used only when needed (needs liger-kernel)"),
    ("fused_optimizer", "quality-neutral (fused AdamW): used only when needed"),
)
DIMENSIONS = tuple(name for name, _ in QUALITY_ORDER)
#: the special keep name for ``per_device_train_batch_size × gradient_accumulation_steps``
EFFECTIVE_BATCH = "completions_per_optimizer_step"
DEFAULT_KEEP = (EFFECTIVE_BATCH,)
#: LoRA ranks offered when the input is full fine-tuning (all linear layers, as Unsloth and TRL's docs do)
LORA_RANKS_FROM_FULL = (64, 32, 16, 8)
COMPLETION_FRACTIONS = (1, 7 / 8, 3 / 4, 5 / 8, 1 / 2, 3 / 8, 1 / 4)
UTILIZATION_STEP = 0.05
#: the vLLM utilisation option "as low as vLLM still starts" (resolved per candidate)
FLOOR = "floor"


@dataclass(frozen=True)
class Dimension:
    name: str
    options: tuple  # option values, the input's first, the most-saving last (when monotone)
    #: False when a later option can need MORE memory than an earlier one, so the pruning bound must try
    #: every option. The batch split is such a dimension: from the second micro-step on all gradients stay
    #: live during the step, so b=4/GA=2 can peak above b=8/GA=1 (full FT; measured by the FakeTensor
    #: simulation: Qwen2.5-1.5B 24.90 → 26.92 GiB).
    monotone: bool = True


@dataclass(frozen=True)
class Candidate:
    """One evaluated setup."""

    setup: Any
    estimate: Any
    choice: tuple  # one option index per dimension
    fits: bool

    @property
    def peak_bytes(self) -> int:
        return self.estimate.peak_bytes


@dataclass(frozen=True)
class FitResult:
    """The best fitting setup (or None), what changed, and alternatives that keep one more thing."""

    input_setup: Any
    gpu: Any
    headroom: float
    best: Candidate | None
    closest: Candidate  # the most-saving candidate (what is left when nothing fits)
    alternatives: tuple = ()  # (keeps, Candidate)
    space_size: int = 0
    evaluated: int = 0
    seconds: float = 0.0
    keep: tuple = DEFAULT_KEEP

    @property
    def fits(self) -> bool:
        return self.best is not None

    @property
    def setup(self) -> Any:
        return self.best.setup if self.best else None

    @property
    def peak_bytes(self) -> int | None:
        return self.best.peak_bytes if self.best else None

    @property
    def budget_bytes(self) -> int:
        return int(self.gpu.total_bytes * (1 - self.headroom))

    def changes(self, candidate: Candidate | None = None) -> list[dict[str, Any]]:
        candidate = candidate or self.best
        return setup_changes(self.input_setup, candidate.setup) if candidate else []

    def to_dict(self) -> dict[str, Any]:
        def describe(candidate: Candidate) -> dict[str, Any]:
            return {"setup": candidate.setup.to_dict(), "peak_bytes": candidate.peak_bytes,
                    "peak_phase": candidate.estimate.peak_phase, "changes": self.changes(candidate),
                    "phases": candidate.estimate.breakdown.to_dict()["phases"]}

        data: dict[str, Any] = {"fits": self.fits, "gpu": self.gpu.to_dict(), "headroom": self.headroom,
                                "budget_bytes": self.budget_bytes, "keep": list(self.keep)}
        if self.best:
            best = describe(self.best)
            data.update(setup=best["setup"], peak_bytes=best["peak_bytes"], peak_phase=best["peak_phase"],
                        changes=best["changes"], phases=best["phases"])
        else:
            data.update(setup=None, peak_bytes=None, changes=[],
                        closest={**describe(self.closest),
                                 "short_by_bytes": self.closest.peak_bytes - self.budget_bytes})
        data["alternatives"] = [{"keeps": keeps, **describe(candidate)} for keeps, candidate in self.alternatives]
        data["order"] = [{"dimension": name, "why": why} for name, why in QUALITY_ORDER]
        data["search"] = {"space_size": self.space_size, "evaluated": self.evaluated,
                          "seconds": round(self.seconds, 4)}
        return data


def setup_changes(before: Any, after: Any) -> list[dict[str, Any]]:
    """Fields that differ between two setups: ``[{"field", "from", "to"}]`` (derived fields included)."""
    changes = []
    for name, old in before.to_dict().items():
        new = getattr(after, name)
        if isinstance(new, tuple):
            new = list(new)
        if old != new and name not in ("max_seq_length",):
            change = {"field": name, "from": old, "to": new}
            if name == "steps_per_generation" and name not in after.explicit_fields:
                change["note"] = "follows gradient_accumulation_steps, TRL's default"
            changes.append(change)
    return changes


# -- the space ------------------------------------------------------------------------------------------
def _halvings(value: int, minimum: int = 1) -> list[int]:
    out = [value]
    while out[-1] % 2 == 0 and out[-1] // 2 >= minimum:
        out.append(out[-1] // 2)
    return out


def dimensions(setup: Any, gpu: Any, keep: Iterable[str] = DEFAULT_KEEP) -> list[Dimension]:
    """The option lists of :data:`QUALITY_ORDER` for ``setup`` (a dimension in ``keep`` has one option)."""
    keep = set(keep)
    s = setup
    dims: dict[str, tuple] = {}
    completions = []
    for fraction in COMPLETION_FRACTIONS:
        length = int(s.max_completion_length * fraction)
        if fraction != 1 and length >= 64:
            length -= length % 8
        if length >= 1 and length not in completions:
            completions.append(length)
    dims["max_completion_length"] = tuple(completions)
    dims["num_generations"] = tuple(_halvings(s.num_generations, 2))
    if s.is_lora:
        dims["capacity"] = tuple(dict.fromkeys(r for r in _halvings(s.lora_rank) if r >= max(1, s.lora_rank // 4)))
    else:
        dims["capacity"] = (None,) + LORA_RANKS_FROM_FULL
    dims["load_in_4bit"] = (s.load_in_4bit,) if s.load_in_4bit else (False, True)
    dims["dtype"] = ((s.dtype, "bfloat16") if s.backend_profile.loads_by_name_in_fp32 and s.dtype == "float32"
                     else (s.dtype,))
    eight_bit = ("adamw_8bit", "paged_adamw_8bit", "adamw_bnb_8bit", "sgd", "adafactor")
    dims["optim"] = (s.optim,) if s.optim in eight_bit else (s.optim, "adamw_8bit")
    b, ga = s.per_device_train_batch_size, s.gradient_accumulation_steps
    batches = [(b // 2 ** k, ga * 2 ** k) for k in range(len(_halvings(b)))]
    if EFFECTIVE_BATCH not in keep:
        batches += [(b // 2 ** k, ga) for k in range(1, len(_halvings(b)))]
    dims["batch"] = tuple(batches)
    if s.backend_profile.offloaded_checkpointing and s.gradient_checkpointing is True:
        dims["gradient_checkpointing"] = (True, "unsloth")
    elif not s.gradient_checkpointing:
        dims["gradient_checkpointing"] = (False, True)
    else:
        dims["gradient_checkpointing"] = (s.gradient_checkpointing,)
    colocated = s.use_vllm and s.vllm_mode == "colocate"
    dims["vllm_enable_sleep_mode"] = (False, True) if colocated and not s.vllm_enable_sleep_mode \
        else (s.vllm_enable_sleep_mode,)
    # vLLM utilisation: the input's, lower steps, and finally FLOOR — the smallest at which vLLM still starts
    # for that candidate (its KV cache must hold one sequence; the floor depends on the candidate's weights
    # and lengths, so it is resolved per candidate, and a step below it is clamped to it)
    utils: list = [s.vllm_gpu_memory_utilization]
    if colocated:
        step = 1
        while round(s.vllm_gpu_memory_utilization - step * UTILIZATION_STEP, 2) >= UTILIZATION_STEP:
            utils.append(round(s.vllm_gpu_memory_utilization - step * UTILIZATION_STEP, 2))
            step += 1
        utils.append(FLOOR)
    dims["vllm_gpu_memory_utilization"] = tuple(utils)
    liger = s.backend_profile.liger_kernel and s.logits == "materialized" and not s.use_liger_kernel
    dims["use_liger_kernel"] = (s.use_liger_kernel, True) if liger else (s.use_liger_kernel,)
    dims["fused_optimizer"] = (False, True) if s.optim in ("adamw_torch", "adamw_hf") else (False,)

    # steps_per_generation: how many rounds the generation batch is split into (1 = as input); a split must
    # leave whole steps and a generation batch divisible by num_generations (TRL GRPOConfig)
    generation_batch = s.generation_batch_size
    dims["steps_per_generation"] = tuple(f for f in (1, 2, 4, 8, 16) if s.steps_per_generation % f == 0
                                         and (generation_batch // f) % s.num_generations == 0)

    fixed_by_keep = {"max_completion_length", "num_generations", "load_in_4bit", "dtype", "optim",
                     "gradient_checkpointing", "vllm_enable_sleep_mode", "vllm_gpu_memory_utilization",
                     "use_liger_kernel", "steps_per_generation"}
    for name in keep:
        if name in fixed_by_keep and name in dims:
            dims[name] = dims[name][:1]
        elif name in ("lora_rank", "capacity"):
            dims["capacity"] = dims["capacity"][:1]
        elif name in ("per_device_train_batch_size", "batch", "gradient_accumulation_steps"):
            dims["batch"] = dims["batch"][:1]
        elif name != EFFECTIVE_BATCH and name not in dims:
            raise GpuMemError("keep", f"unknown name {name!r}",
                              fix=f"use any of {', '.join((EFFECTIVE_BATCH,) + DIMENSIONS)} or lora_rank")
    return [Dimension(name, dims[name], monotone=name not in NON_MONOTONE) for name in DIMENSIONS]


def build_setup(base: Any, dims: list[Dimension], choice: tuple, utilization_floor: float | None = None) -> Any:
    """The setup of one candidate (``choice``: an option index per dimension). Raises SetupError when the
    combination breaks a TRL rule (e.g. the generation batch no longer divides by num_generations).
    ``utilization_floor``: the candidate's smallest vLLM utilisation that starts; the chosen utilisation is
    raised to it (and :data:`FLOOR` becomes it). Without it, FLOOR stands for the input's value."""
    value = {dim.name: dim.options[index] for dim, index in zip(dims, choice)}
    data = {name: getattr(base, name) for name in base.explicit_fields}
    data["model"] = base.model
    if value["max_completion_length"] != base.max_completion_length:
        data["max_completion_length"] = value["max_completion_length"]
        data.pop("max_seq_length", None)
    data["num_generations"] = value["num_generations"]
    rank = value["capacity"]
    if rank != base.lora_rank:
        data["lora_rank"] = rank
        if not base.is_lora:
            data["lora_target_modules"] = "all-linear"
    if value["load_in_4bit"] != base.load_in_4bit:
        data["load_in_4bit"] = value["load_in_4bit"]
    if value["dtype"] != base.dtype:
        data["dtype"] = value["dtype"]
    optim = value["optim"]
    if value["fused_optimizer"] and optim in ("adamw_torch", "adamw_hf"):
        optim = "adamw_torch_fused"
    if optim != base.optim:
        data["optim"] = optim
    b, ga = value["batch"]
    if (b, ga) != (base.per_device_train_batch_size, base.gradient_accumulation_steps):
        data["per_device_train_batch_size"], data["gradient_accumulation_steps"] = b, ga
    # steps_per_generation scales with the accumulation (the generation batch follows b × GA as in the
    # input), divided by the extra generation rounds of the steps_per_generation dimension
    rounds = value["steps_per_generation"]
    scaled = ga * base.steps_per_generation
    if scaled % (base.gradient_accumulation_steps * rounds):
        raise SetupError("steps_per_generation", "the generation batch does not split into that many rounds")
    steps = scaled // (base.gradient_accumulation_steps * rounds)
    if "steps_per_generation" in base.explicit_fields or steps != ga:
        data["steps_per_generation"] = steps
    else:
        data.pop("steps_per_generation", None)
    if value["gradient_checkpointing"] != base.gradient_checkpointing:
        data["gradient_checkpointing"] = value["gradient_checkpointing"]
    if value["vllm_enable_sleep_mode"] != base.vllm_enable_sleep_mode:
        data["vllm_enable_sleep_mode"] = value["vllm_enable_sleep_mode"]
    utilization = _resolve_utilization(base, value["vllm_gpu_memory_utilization"], utilization_floor)
    if utilization != base.vllm_gpu_memory_utilization:
        data["vllm_gpu_memory_utilization"] = utilization
    if value["use_liger_kernel"] != base.use_liger_kernel:
        data["use_liger_kernel"] = value["use_liger_kernel"]
    return GRPOSetup.from_dict(data)


def _resolve_utilization(base: Any, option: Any, floor: float | None) -> float:
    """The utilisation an option stands for: FLOOR is the floor (the input's value while the floor is not
    known yet); a number is raised to the floor."""
    if option == FLOOR:
        return base.vllm_gpu_memory_utilization if floor is None else floor
    return option if floor is None else max(option, floor)


class _Search:
    """Memoised candidate evaluation over one space.

    vLLM's utilisation floor depends on the candidate but not on its utilisation, so it is computed once per
    group of candidates that differ only in utilisation, and candidates whose utilisation clamps to the same
    value share one estimate."""

    def __init__(self, base: Any, gpu: Any, headroom: float, dims: list[Dimension]):
        self.base, self.gpu, self.headroom, self.dims = base, gpu, headroom, dims
        self.cache: dict[tuple, Candidate | None] = {}
        self.level = DIMENSIONS.index("vllm_gpu_memory_utilization")
        self.floors: dict[tuple, float | None] = {}
        self.resolved: dict[tuple, Any] = {}  # (group, utilisation) -> (setup, estimate)
        self.estimates = 0

    def _estimate(self, setup: Any) -> Any:
        self.estimates += 1
        return estimate(setup, self.gpu)

    def evaluate(self, choice: tuple) -> Candidate | None:
        """The candidate, or None when the combination is not a valid setup."""
        if choice in self.cache:
            return self.cache[choice]
        level = self.level
        group = choice[:level] + choice[level + 1:]
        try:
            if group not in self.floors:
                # any utilisation gives the floor: use the input's, and keep that estimate
                first = choice[:level] + (0,) + choice[level + 1:]
                setup = build_setup(self.base, self.dims, first)
                result = self._estimate(setup)
                self.floors[group] = min_vllm_utilization(setup, self.gpu.total_bytes, result)
                self.resolved[(group, setup.vllm_gpu_memory_utilization)] = (setup, result)
            floor = self.floors[group]
            key = (group, _resolve_utilization(self.base, self.dims[level].options[choice[level]], floor))
            if key not in self.resolved:
                setup = build_setup(self.base, self.dims, choice, utilization_floor=floor)
                self.resolved[key] = (setup, self._estimate(setup))
            setup, result = self.resolved[key]
        except SetupError:
            self.floors.setdefault(group, None)
            self.cache[choice] = None
            return None
        candidate = Candidate(setup, result, choice, result.fits(headroom=self.headroom))
        self.cache[choice] = candidate
        return candidate

    def _lowest(self, prefix: tuple, fixed: Mapping[int, int]) -> Candidate | None:
        """The lowest-peak valid completion of ``prefix``: monotone dimensions at their last option, the
        others (``Dimension.monotone`` False) at every option, forced dimensions as forced."""
        per_level = []
        for level in range(len(prefix), len(self.dims)):
            dim = self.dims[level]
            if level in fixed:
                per_level.append((fixed[level],))
            elif dim.monotone:
                per_level.append((len(dim.options) - 1,))
            else:
                per_level.append(tuple(range(len(dim.options))))
        lowest = None
        for rest in itertools.product(*per_level):
            candidate = self.evaluate(prefix + rest)
            if candidate is not None and (lowest is None or (candidate.fits, -candidate.peak_bytes)
                                          > (lowest.fits, -lowest.peak_bytes)):
                lowest = candidate
        return lowest

    def optimistic(self, prefix: tuple) -> Candidate | None:
        """``prefix`` completed with each remaining dimension's most-saving option that gives a valid setup
        (a later option first; e.g. splitting the generation batch may not divide)."""
        candidate = self._lowest(prefix, {})
        if candidate is not None:
            return candidate
        rest = self.dims[len(prefix):]
        choice = prefix + tuple(len(d.options) - 1 for d in rest)
        # the all-last completion is invalid: walk each remaining dimension back towards the input's option
        for position in range(len(prefix), len(self.dims)):
            for index in range(len(self.dims[position].options) - 2, -1, -1):
                trial = choice[:position] + (index,) + choice[position + 1:]
                candidate = self.evaluate(trial)
                if candidate is not None:
                    return candidate
        return None

    def best(self, fixed: Mapping[int, int] | None = None) -> Candidate | None:
        """The first fitting candidate in quality order (``fixed``: dimension index -> forced option)."""
        fixed = fixed or {}

        def options(level: int) -> Iterable[int]:
            return (fixed[level],) if level in fixed else range(len(self.dims[level].options))

        def descend(prefix: tuple) -> Candidate | None:
            level = len(prefix)
            if level == len(self.dims):
                candidate = self.evaluate(prefix)
                return candidate if candidate is not None and candidate.fits else None
            for index in options(level):
                trial = prefix + (index,)
                if level + 1 < len(self.dims):
                    bound = self._bound(trial, fixed)
                    if bound is None or not bound.fits:
                        continue
                found = descend(trial)
                if found is not None:
                    return found
            return None

        return descend(())

    def _bound(self, prefix: tuple, fixed: Mapping[int, int]) -> Candidate | None:
        if not fixed:
            return self.optimistic(prefix)
        # forced dimensions stay forced in the optimistic completion
        candidate = self._lowest(prefix, fixed)
        return candidate if candidate is not None else self.optimistic(prefix)


#: dimensions whose last option is not always the most saving (see Dimension.monotone)
NON_MONOTONE = frozenset({"batch"})


def space_size(dims: list[Dimension]) -> int:
    size = 1
    for dim in dims:
        size *= len(dim.options)
    return size


def fit(setup: Any, gpu: Any, headroom: float = 0.1, keep: Iterable[str] = DEFAULT_KEEP,
        alternatives: bool = True) -> FitResult:
    """The best setup of the lever space that fits ``gpu`` with ``headroom`` (a fraction of its total).

    ``setup``: GRPOSetup, dict or file path. ``gpu``: card name, size or bytes. ``keep``: dimension names
    (:data:`DIMENSIONS`, ``lora_rank``, ``per_device_train_batch_size``) that must not change, plus
    ``"completions_per_optimizer_step"`` (the default) to keep ``b × gradient_accumulation_steps``.
    Alternatives: for each quality dimension the best result changed, the best setup that keeps it."""
    started = time.perf_counter()
    base = GRPOSetup.coerce(setup)
    gpu = resolve_gpu(gpu)
    if gpu is None:
        raise GpuMemError("gpu", "no GPU given", fix="pass a card name ('L4', 'A100-80GB') or a size ('24GiB')")
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 0 <= headroom < 1:
        raise GpuMemError("headroom", f"must be a fraction in [0, 1), got {headroom!r}", fix="e.g. 0.1 (10%)")
    keep = tuple(keep)
    dims = dimensions(base, gpu, keep)
    search = _Search(base, gpu, float(headroom), dims)
    best = search.best()
    closest = search.optimistic(()) or search.evaluate(tuple(0 for _ in dims))
    found_alternatives: list[tuple[str, Candidate]] = []
    if best is not None and alternatives:
        seen = {best.choice}
        for level, dim in enumerate(dims):
            if best.choice[level] == 0 or dim.name in ("use_liger_kernel", "fused_optimizer"):
                continue
            other = search.best({level: 0})
            if other is not None and other.choice not in seen:
                seen.add(other.choice)
                found_alternatives.append((dim.name, other))
    return FitResult(base, gpu, float(headroom), best, closest, tuple(found_alternatives), space_size(dims),
                     search.estimates, time.perf_counter() - started, keep)
