"""The plugin's fixtures: ``gpu_memory`` (measure your own GPU code) and ``grpo_step`` (run a GRPO setup in the
session's mode).

Both work with or without ``--gpu-budget``: without it nothing is judged, ``grpo_step`` returns the estimate
and ``gpu_memory`` still measures. Neither imports torch on its own: ``gpu_memory`` reads torch only when the
test has imported it (reading CUDA state from a process that never touched the GPU would create a CUDA context
there, ≈ 0.3–0.6 GiB — docs/memory-model.md §6) and asks NVML whether a device exists at all.

The plugin registers them in every pytest run, so their heavier parts (the tracker, the marker's setup reader, the
estimate) are imported when a test first asks for a fixture, not with the plugin.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..errors import GpuMemError, MarkerError
from .state import MANAGER_KEY, STATE_KEY, StepResult, StepSetupError

if TYPE_CHECKING:
    from ..measure.block import GpuMemory


@pytest.fixture
def gpu_memory(request: pytest.FixtureRequest) -> GpuMemory:
    """Measure your own GPU code for the test's ``gpu_budget``: ``with gpu_memory.track(): train_step()``."""
    from ..measure.block import GpuMemory  # off the plugin's import: registered in every run, used in few

    tracker = GpuMemory()
    state = request.node.stash.get(STATE_KEY, None)
    if state is not None:
        state.trackers.append(tracker)
    return tracker


@pytest.fixture
def grpo_step(request: pytest.FixtureRequest):
    """``grpo_step(setup)`` runs one GRPO setup (a GRPOSetup, dict of GRPOConfig names or setup-file path) in
    the session's mode — estimate, simulate, or measure (real steps on the GPU) — and records it for the
    test's ``gpu_budget``. ``grpo_step()`` with no argument uses the marker's ``setup=``. Returns a
    :class:`StepResult`. Without ``--gpu-budget`` it returns the estimate and judges nothing."""
    # off the plugin's import: registered in every run, used in few
    from ..predict.analytic import estimate
    from ..record import predicted_dict
    from .marker import describe_error, parse_setup

    manager = request.config.stash.get(MANAGER_KEY, None)
    state = request.node.stash.get(STATE_KEY, None)
    base_dirs = (Path(request.node.path).parent,) if getattr(request.node, "path", None) else ()

    def step(setup: Any = None) -> StepResult:
        __tracebackhide__ = True
        if setup is None:
            if state is None or state.spec is None or state.spec.setup is None:
                raise StepSetupError(describe_error(MarkerError(
                    "setup", "grpo_step() was called without a setup and the test's gpu_budget marker gives none",
                    fix="call grpo_step(SETUP) or add setup= to the marker"), given_to="grpo_step()"))
            resolved = state.spec.setup
        else:
            try:
                resolved = parse_setup(setup, base_dirs)
            except GpuMemError as exc:  # the marker's clean, named error — not a traceback through spec.py
                raise StepSetupError(describe_error(exc, given_to="grpo_step()")) from None
        if manager is not None:  # --gpu-budget is on: the session's mode, judged when the test is budgeted
            result = manager.run_step(resolved, state.spec if state is not None else None)
            if state is not None:
                state.steps.append(result)
            return result
        result_estimate = estimate(resolved)
        return StepResult("estimate", resolved, result_estimate, predicted_dict(result_estimate, None))

    return step
