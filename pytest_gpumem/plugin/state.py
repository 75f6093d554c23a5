"""What the plugin keeps per test and per session, and its exceptions; it imports nothing else of the plugin,
so the manager, the fixtures and the marker hooks all import it and none of them imports another for it. Light:
the inert plugin imports it (the stash keys, StepSetupError), and records are imported only by
:attr:`StepResult.peak_bytes`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ..record import BudgetSpec

STATE_KEY = pytest.StashKey["TestState"]()
MANAGER_KEY = pytest.StashKey["Any"]()  # the session's plugin.manager.Manager, while --gpu-budget is on


class GpuBudgetFailure(AssertionError):
    """A budget check failed: the test fails with this message (first line = the one-line reason)."""


class NothingToJudge(Exception):
    """A budgeted test gave nothing to judge (no setup=, no grpo_step call, nothing measured): its error."""


class StepSetupError(Exception):
    """``grpo_step(setup)`` was given a setup that cannot be read: the test errors with the marker's wording."""


class MarkerArgumentError(Exception):
    """Raised at setup of a test whose ``gpu_budget`` marker could not be read at collection."""


@dataclass
class TestState:
    """What the plugin knows about one budgeted test."""

    __test__ = False  # not a test class, whatever pytest's python_classes says

    spec: BudgetSpec | None = None
    error: str | None = None  # the marker could not be read: the test errors at setup with this text
    steps: list = field(default_factory=list)  # StepResults of grpo_step calls (or of the marker's setup)
    trackers: list = field(default_factory=list)  # measure.block.GpuMemory objects handed to the test
    record: dict | None = None
    failures: list = field(default_factory=list)
    levers: list = field(default_factory=list)
    wants_levers: bool = False  # the failure is "too big": levers were asked for (none may pass the threshold)


@dataclass
class StepResult:
    """One ``grpo_step(setup)``: the setup, the prediction and (measure mode) the run.

    ``estimate`` is the analytic :class:`~pytest_gpumem.predict.analytic.Estimate` (always there); ``predicted`` the
    record's prediction (the estimate, or the simulation in simulate mode); ``measured`` the record's
    measurement (measure mode) and ``run`` the runner's RunResult."""

    mode: str
    setup: Any
    estimate: Any
    predicted: dict | None
    measured: dict | None = None
    run: Any = None

    @property
    def peak_bytes(self) -> int | None:
        """The peak the budget is judged on: measured when measured, else predicted."""
        from ..record import judged_peak  # records (setups, breakdowns) stay off the inert plugin's import

        return judged_peak({"predicted": self.predicted, "measured": self.measured})[0]
