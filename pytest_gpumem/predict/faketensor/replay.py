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
from .scope import assumptions
from .tracker import LiveStorageTracker, ModuleNamer


class Replay:
    """The state of one simulation, shared by its stages: the setup, what it has noted so far, and the live
    objects (tracker, the causal LM whose head computes log-probs, the heads' ids)."""

    def __init__(self, setup: GRPOSetup, spec: ModelSpec, *, top_tensors: int = 10,
                 progress: Callable[[str], None] | None = None):
        self.progress = progress  # told each stage as it starts (`gpumem simulate`'s progress lines)
        self._started = time.perf_counter()
        self.stage = "starting"  # what it was doing: a failure's message names it
        self.setup = setup
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
    """The simulated step of ``state.setup`` as a Breakdown (``source="simulate"``)."""
    setup = state.setup
    state.stage = "building the model"
    fake_mode = FakeTensorMode()
    policy = build.build_model(state, fake_mode)
    reference = None
    if setup.beta != 0 and not setup.is_lora:
        state.stage = "building the reference model"
        reference = build.build_model(state, fake_mode, reference=True)
    tracker = LiveStorageTracker()
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
    if setup.gradient_checkpointing:
        build.enable_checkpointing(state, policy)
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
        stack.enter_context(ModuleNamer(tracker, named, on_pre=lambda name, module: build.on_module_pre(
            state, name, module)))
        stack.enter_context(fakes.fake_cuda_logprob_kernels())
        state.stage = "creating the optimizer state (warm-up step)"
        optimizer = step.make_optimizer(state, policy, trainable)
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
        for _ in range(min(setup.gradient_accumulation_steps, 2)):
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
