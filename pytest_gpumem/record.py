"""The per-test record: what a budgeted test is held to (:class:`BudgetSpec`), the record the plugin builds for it
(the JSON report's per-test entry, :class:`BudgetRecord`), and the peak it is judged on.

The checks (``compare/checks.py``), the baselines (``compare/baseline.py``) and every report format
(``report/``) read records; only the plugin writes them. Records stay plain dicts at runtime — the TypedDict
only documents them — so pytest-xdist ships them from the workers to the controller unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, TypedDict

from .breakdown import Breakdown
from .gpus import GPU
from .spec import GRPOSetup
from .units import Tolerance

#: the prediction-vs-measurement band when a marker gives none; revisit once validation/ has enough GPU runs
DEFAULT_TOLERANCE = Tolerance(0.10, 0, "10%")


class BudgetRecord(TypedDict):
    """One budgeted test, as the JSON report (``report/json.py``, schema_version 1) writes it."""

    nodeid: str
    mode: str  # "estimate" | "simulate" | "measure"
    budget_bytes: int | None
    budget_text: str | None  # "17 GB = 15.83 GiB"
    setup: dict | None  # GRPOSetup.to_dict()
    #: Breakdown.to_dict() of the estimate (or the simulation), plus assumptions, warnings, largest allocation
    predicted: dict | None
    #: {"breakdown", "peak_reserved_bytes", "peak_allocated_bytes", "nvml_peak_bytes", "reasons": {field: why
    #: missing}} (+ "run": RunResult.to_dict() in measure mode)
    measured: dict | None
    baseline: dict | None  # {"peak_bytes", "delta_bytes", "status", "message", ...} (compare/baseline.py)
    gpu: dict | None  # {"name", "total_bytes"} of the card judged against
    #: {role: {"budget_bytes", "budget_text"}} for GPU roles that are not training ranks (a vLLM server); the key
    #: is present only when the setup has such a role
    role_budgets: dict
    verdict: str | None  # "passed" | "failed" | "error" | "xfailed" | "skipped"
    reason: str | None


@dataclass(frozen=True)
class Defaults:
    """Session-wide values a marker may override (ini ``gpu_budget_default``, ``gpu_budget_gpu``, ...)."""

    budget_bytes: int | None = None
    budget_text: str | None = None
    gpu: GPU | None = None
    tolerance: Tolerance = DEFAULT_TOLERANCE
    #: setup keys for every marker's setup (ini ``gpu_budget_accelerate_config`` / ``gpu_budget_world_size``):
    #: how the whole suite is launched; a marker's own setup keys win
    setup_keys: tuple = ()


@dataclass(frozen=True)
class BudgetSpec:
    """What one test is held to."""

    budget_bytes: int | None
    budget_text: str | None
    setup: GRPOSetup | None
    tolerance: Tolerance  # prediction vs measurement band (the marker's tolerance=, else 10%)
    gpu: GPU | None  # the card given by the marker / option / ini; None: the budget is the card size
    budget_origin: str  # "marker", "gpu" (the marker's card) or "default" (gpu_budget_default)
    #: allowed growth over the saved baseline (the marker's baseline_tolerance=), None: the session's
    baseline_tolerance: Tolerance | None = None
    #: ((role, (bytes, text)), ...): the budget of each GPU role that is not a training rank (vllm_server)
    role_budgets: tuple = ()

    def judge_gpu(self) -> GPU | None:
        """The card a prediction is made for: the given one, else a card the size of the budget."""
        if self.gpu is not None:
            return self.gpu
        if self.budget_bytes is not None:
            return GPU(f"a {self.budget_text} card (the budget)", self.budget_bytes, "budget")
        return None



#: the measured figures a budget is judged on, best first: (record key, short name, what it is). NVML sees the
#: whole device (the CUDA context and non-torch memory included); torch's reserved peak sees its allocator only.
MEASURED_PEAKS = (("nvml_peak_bytes", "NVML", "measured peak (NVML, device)"),
                  ("peak_reserved_bytes", "reserved", "measured peak (torch reserved)"))
PHASE_WORDS = {"persistent": "between phases", "generation": "generation (rollouts)", "scoring": "scoring pass",
               "training": "training micro-step", "optimizer_step": "optimizer step"}


def judged_peak(record: Mapping[str, Any]) -> tuple[int | None, str]:
    """The peak a budget is judged on, and what it is: a measurement when there is one (NVML's device-level
    peak, else torch's reserved peak, else the measured breakdown), otherwise the prediction."""
    measured = record.get("measured") or {}
    for key, _, what in MEASURED_PEAKS:
        if measured.get(key):
            return int(measured[key]), what
    if measured.get("breakdown"):
        return int(measured["breakdown"]["peak_bytes"]), "measured peak"
    predicted = record.get("predicted")
    if predicted:
        word = "predicted"
        if predicted.get("source") == "simulate":  # with origins: simulate mode's whole step (analytic parts added)
            word = "simulated + estimated" if predicted.get("origins") else "simulated"
        return int(predicted["peak_bytes"]), f"{word} peak"
    return None, "nothing to judge"


def measured_peak(result: Mapping[str, Any]) -> tuple[str | None, int | None]:
    """The measured peak and what it is: NVML's device peak, else torch's peak reserved, else the measured
    breakdown's peak (the order the budget check judges in: :func:`judged_peak`)."""
    measured = result.get("measured") or {}
    for key, short, _ in MEASURED_PEAKS:
        if measured.get(key) is not None:
            return short, int(measured[key])
    data = measured.get("breakdown")
    breakdown = Breakdown.from_dict(data) if data and data.get("phases") is not None else None
    if breakdown is not None and breakdown.phases:
        return breakdown.source, breakdown.peak_bytes
    return None, None


def predicted_dict(estimate: Any, spec: BudgetSpec | None) -> dict:
    """The record's ``predicted``: the estimate's Breakdown.to_dict() plus what it assumed and warns."""
    data = estimate.breakdown.to_dict()
    assumptions = list(estimate.assumptions)
    if spec is not None and spec.gpu is None and spec.budget_bytes is not None:
        if estimate.setup.use_vllm and estimate.setup.vllm_mode == "colocate":
            assumptions.append(f"no gpu given: the {spec.budget_text} budget is taken as the card size, so vLLM "
                               f"reserves gpu_memory_utilization × {spec.budget_text.split(' = ')[0]} "
                               "(pass gpu='L4' or --gpu-budget-gpu for a real card)")
        else:
            assumptions.append(f"no gpu given: judged against the {spec.budget_text} budget as the card size")
    data.update(assumptions=assumptions, warnings=list(estimate.warnings),
                largest_allocation_bytes=estimate.largest_allocation_bytes,
                largest_allocation_name=estimate.largest_allocation_name)
    return data
