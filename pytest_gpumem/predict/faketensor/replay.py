"""One simulation run: build the models, replay TRL's step under FakeTensorMode while the tracker accounts every
live storage, and attribute the live sets at each phase's peak (``build``, ``step``, ``attribution``).

This module imports torch; :func:`pytest_gpumem.predict.faketensor.run_simulation` imports it only when a
simulation runs, and turns any failure into a SimulationError naming :attr:`Replay.stage`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ...breakdown import Breakdown, Component, Phase
from ...models import ModelSpec
from ...spec import GRPOSetup
from . import attribution, build, fakes, step
from .ranks import WEIGHT_SYNC_REGION, ShardingPlan
from .scope import assumptions
from .tracker import LiveStorageTracker, ModuleNamer


class Replay:
    """The state of one simulation, shared by its stages: the setup, what it has noted so far, and the live
    objects (tracker, the causal LM whose head computes log-probs, the heads' ids)."""

    def __init__(self, setup: GRPOSetup, spec: ModelSpec, *, top_tensors: int = 10,
                 progress: Callable[[str], None] | None = None, sharding: ShardingPlan | None = None,
                 real_tensors: bool = False, round_bytes: bool = True, observer=None):
        self.progress = progress  # told each stage as it starts (`gpumem simulate`'s progress lines)
        self._started = time.perf_counter()
        self.stage = "starting"  # what it was doing: a failure's message names it
        self.setup = setup
        self.sharding = sharding  # None: one GPU; else the rank of the FSDP2 job replayed (ranks.py)
        self.accelerator = None  # the stand-in fsdp.py hands accelerate's and TRL's FSDP2 functions
        self.fsdp_roots: dict[int, object] = {}  # id(causal LM) → the FSDP root module that wraps it
        self.unsharded_grad_ids: set[int] = set()  # FSDP2: allocations that were a unit's unsharded gradients
        # the ground truth of tests/test_simulate_rank.py: the same replay on real (empty) CPU tensors, with
        # ``observer`` (a context manager, e.g. torch.profiler) around the tracked step, sizes unrounded
        self.real_tensors = real_tensors
        self.round_bytes = round_bytes
        self.observer = observer
        self.base_bytes = 0
        self.spec = spec
        self.top_tensors = top_tensors
        self.assumptions: list[str] = list(setup.resolution_notes)
        self.warnings: list[str] = []
        self.num_ops = 0
        self.tracker: LiveStorageTracker | None = None
        self.causal_lm = None
        self.head_ids: set[int] = set()

    @property
    def stage(self) -> str:
        return self._stage

    @stage.setter
    def stage(self, value: str) -> None:
        self._stage = value
        if self.progress is not None and value != "starting":
            self.progress(f"{value} ({time.perf_counter() - self._started:.1f} s)")


def run(state: Replay) -> Breakdown:
    """The simulated step of ``state.setup`` as a Breakdown (``source="simulate"``); for a sharded plan, rank
    ``plan.rank``'s, under a fake process group that lives as long as the run."""
    if state.sharding is None:
        return _run(state, contextlib.nullcontext())
    from . import fsdp

    with fsdp.fake_process_group(state.sharding) as mesh:
        return _run(state, mesh)


def _run(state: Replay, mesh) -> Breakdown:
    setup = state.setup
    state.stage = "building the model"
    fake_mode = contextlib.nullcontext() if state.real_tensors else FakeTensorMode()
    policy = build.build_model(state, fake_mode)
    reference = None
    if setup.beta != 0 and not setup.is_lora:
        state.stage = "building the reference model"
        reference = build.build_model(state, fake_mode, reference=True)
    if setup.gradient_checkpointing:  # TRL enables it on the model before accelerate wraps it
        state.causal_lm = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        build.enable_checkpointing(state, policy)
    if state.sharding is not None:
        policy, reference = _shard(state, fake_mode, mesh, policy, reference)
    tracker = LiveStorageTracker(round_bytes=state.round_bytes)
    state.tracker = tracker
    for name, param in policy.named_parameters():
        tracker.register(param, Component.LORA.value if "lora_" in name else Component.WEIGHTS.value, name)
    for name, buffer in policy.named_buffers():
        tracker.register(buffer, Component.WEIGHTS.value, name)
    if reference is not None:
        for name, tensor in [*reference.named_parameters(), *reference.named_buffers()]:
            tracker.register(tensor, Component.REFERENCE.value, "reference." + name)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    causal_lm = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    state.causal_lm = causal_lm
    if state.sharding is not None:
        state.fsdp_roots = {id(causal_lm): policy}
        if reference is not None:
            state.fsdp_roots[id(reference)] = reference
    policy.train()
    named = list(policy.named_modules())
    if reference is not None:
        named += [("reference." + n if n else "reference", m) for n, m in reference.named_modules()]
    build.install_final_norm_hook(state, causal_lm)
    state.head_ids = {id(causal_lm.get_output_embeddings())}
    if reference is not None:
        state.head_ids.add(id(reference.get_output_embeddings()))

    state.assumptions.extend(assumptions(setup))
    with contextlib.ExitStack() as stack:
        stack.enter_context(fake_mode)
        stack.enter_context(tracker)
        if state.observer is not None:
            state.base_bytes = tracker.current_bytes  # what the observer cannot see allocated: the models
            stack.enter_context(state.observer)
        stack.enter_context(ModuleNamer(tracker, named, on_pre=lambda name, module: build.on_module_pre(
            state, name, module)))
        stack.enter_context(fakes.fake_cuda_logprob_kernels())
        if state.sharding is not None:
            from . import fsdp

            stack.enter_context(fsdp.region_hooks(state))
        state.stage = "creating the optimizer state (warm-up step)"
        optimizer = step.make_optimizer(state, policy, trainable)
        if state.sharding is not None and setup.use_vllm:
            # TRL syncs the weights to vLLM at the start of a step's generation (vllm_generation.sync_weights)
            from . import fsdp

            state.stage = "simulating the FSDP2 weight sync to vLLM"
            tracker.region = WEIGHT_SYNC_REGION
            tracker.begin_phase(Phase.GENERATION.value)
            fsdp.sync_weights(policy, state.accelerator)
            tracker.end_phase()
        tracker.region = "inputs"
        batch = step.make_batch(setup)
        passes = setup.scoring_passes
        if passes:
            state.stage = "simulating the scoring pass"
            tracker.begin_phase(Phase.SCORING.value)
            for which in passes:
                step.scoring_pass(state, policy, reference, batch, which)
            tracker.end_phase()
        state.stage = "simulating the training micro-step"
        tracker.begin_phase(Phase.TRAINING.value)
        micro_steps = min(setup.gradient_accumulation_steps, 2)
        for index in range(micro_steps):
            if state.sharding is not None:
                # transformers' Trainer runs all but the last micro-step under accelerator.no_sync, which for
                # FSDP2 is set_requires_gradient_sync(False): unsharded gradients accumulate until the last
                policy.set_requires_gradient_sync(index == micro_steps - 1)
            step.training_micro_step(state, policy, batch)
        tracker.end_phase()
        state.stage = "simulating the optimizer step"
        tracker.region = "optimizer"
        tracker.begin_phase(Phase.OPTIMIZER.value)
        torch.nn.utils.clip_grad_norm_(trainable, step.MAX_GRAD_NORM)
        optimizer.step()
        tracker.end_phase()
        param_names = {id(p): n for n, p in policy.named_parameters()}
        grad_ids = {tracker.alloc_id(p.grad): param_names.get(id(p), "?") + ".grad"
                    for p in trainable if p.grad is not None}
        state_ids = step.optimizer_state_ids(tracker, optimizer, param_names)
        optimizer.zero_grad(set_to_none=True)
        tracker.region = "after_step"
        tracker.begin_phase(Phase.PERSISTENT.value)
        tracker.end_phase()
    state.num_ops = tracker.num_ops
    state.stage = "attributing the live tensors"
    grad_ids.pop(None, None)
    state_ids.pop(None, None)
    breakdown = attribution.breakdown(state, grad_ids, state_ids)
    tracker.close()
    return breakdown


def _shard(state: Replay, fake_mode, mesh, policy, reference):
    """The policy wrapped by accelerate's FSDP2 and the reference by TRL's root-only wrap (``fsdp.py``)."""
    from . import fsdp

    plan = state.sharding
    state.stage = "sharding the policy with accelerate's FSDP2 wrap"
    accelerator = fsdp.accelerator_stand_in(plan, mesh, fsdp.mixed_precision_of(state.setup))
    state.accelerator = accelerator
    with fake_mode:
        policy = fsdp.shard_policy(policy, accelerator)
        if reference is not None:
            state.stage = "sharding the reference model with TRL's prepare_fsdp"
            reference = fsdp.shard_reference(reference, accelerator)
    state.assumptions.append(
        f"{plan.describe()}: a fake process group (collectives allocate their buffers and move no data); "
        f"the policy wrapped by accelerate's fsdp2_prepare_model (fp32 sharded master, "
        f"{accelerator.state.fsdp_plugin.mixed_precision_policy}), "
        + ("the reference by TRL's root-only prepare_fsdp" if reference is not None else "no reference model"))
    return policy, reference


def against_allocator(setup: GRPOSetup, sharding: ShardingPlan,
                      allocator_peak_bytes: Callable[[object], int]) -> tuple[int, int, int]:
    """The rank simulation's ground truth (tests/test_simulate_rank.py, benchmarks/rank_ground_truth.py): the
    same step as rank 0 of ``sharding`` on fake tensors (the simulation) and on real (uninitialised) CPU tensors
    under ``torch.profiler.profile(profile_memory=True)``. Returns (simulated peak, real-tensor tracker peak,
    allocator peak), sizes unrounded; the allocator's is the models built before the profile started plus
    ``allocator_peak_bytes(profiler)`` — the caller passes ``measure.profiling.cpu_allocator_peak_bytes``,
    which this layer may not import."""
    from torch.profiler import ProfilerActivity, profile

    fake = Replay(setup, setup.model_spec, sharding=sharding, round_bytes=False)
    run(fake)
    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    real = Replay(setup, setup.model_spec, sharding=sharding, round_bytes=False, real_tensors=True,
                  observer=profiler)
    run(real)
    return fake.tracker.max_bytes, real.tracker.max_bytes, real.base_bytes + allocator_peak_bytes(profiler)
