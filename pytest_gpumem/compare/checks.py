"""The checks a budgeted test runs on its record: each a plain function ``check(record, spec) -> failure message
| None`` (the shape of pytest-memray's marker functions), pure, pytest-free. The plugin runs
:data:`DEFAULT_CHECKS` (and the baseline gate's check) after the test body and fails the test itself with the
first message.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ..diagnose.explain import diagnose
from ..errors import GpuMemError
from ..record import DEFAULT_TOLERANCE, PHASE_WORDS, BudgetSpec, judged_peak
from ..units import Tolerance, format_gib


def check_run_completed(record: Mapping[str, Any], spec: BudgetSpec | None = None) -> str | None:
    """measure mode: the GRPO steps must have run (an OOM, a crash or a timeout fails the test)."""
    run = (record.get("measured") or {}).get("run") if isinstance(record.get("measured"), Mapping) else None
    if not run or run.get("status") in (None, "ok", "skipped"):
        return None
    reason = run.get("reason") or ""
    status = {"oom": "ran out of GPU memory", "crashed": "crashed", "timeout": "timed out"}.get(run["status"],
                                                                                                run["status"])
    message = f"the measured GRPO run {status} against the {record.get('budget_text')} budget" + (
        f": {reason}" if reason else "")
    if run["status"] == "oom" and record.get("setup"):
        # explain it: the shortfall, the phase and which predicted tensor the failed allocation is (the levers
        # follow in the failure text); an unreadable message only loses the explanation
        text = (run.get("oom") or {}).get("message") or reason
        try:
            message += "\n" + diagnose(text, setup=record["setup"]).short(n=0)
        except GpuMemError:
            pass
    return message


def _largest_parts(components: Mapping[str, int], origins: Mapping[str, str] | None = None,
                   labelled: str = "estimate") -> str:
    """The peak phase's three largest components, as a failure prints them; with ``origins``, each one's origin
    (``labelled``, the breakdown's own source, where none is given)."""
    top = sorted(components.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    return ", ".join(f"{name} {format_gib(num_bytes)}" + (f" [{origins.get(name, labelled)}]" if origins is not None
                                                           else "") for name, num_bytes in top)


def check_peak_within_budget(record: Mapping[str, Any], spec: BudgetSpec | None = None) -> str | None:
    """The judged peak must not exceed the budget."""
    budget = record.get("budget_bytes")
    peak, what = judged_peak(record)
    if budget is None or peak is None or peak <= budget:
        return None
    source = record.get("measured", {}).get("breakdown") if what.startswith("measured") and record.get("measured") \
        else record.get("predicted")
    phase, parts = None, ""
    if source:
        phase = source.get("peak_phase")
        origins = (source.get("origins") or {}).get(phase) if source.get("origins") else None
        # simulate mode's whole step labels each part's origin
        parts = _largest_parts(source.get("phases", {}).get(phase, {}), origins, source.get("source", "estimate"))
    where = f" in the {PHASE_WORDS.get(phase, phase)}" if phase else ""
    gpu = record.get("gpu") or {}
    limit = (f"the {record.get('budget_text')} of the {gpu['name']}"
             if spec is not None and spec.budget_origin == "gpu" and gpu.get("name")
             else f"the {record.get('budget_text')} budget")
    return (f"{what} {format_gib(peak)}{where} exceeds {limit} by {format_gib(peak - budget)}"
            + (f": {parts}" if parts else ""))


def check_roles_within_budget(record: Mapping[str, Any], spec: BudgetSpec | None = None) -> str | None:
    """Each GPU role that is not a training rank (a vLLM server GPU) must stay under its own budget; its peak is
    the prediction (the measured run is the trainer's process only)."""
    roles = ((record.get("predicted") or {}).get("roles")) or {}
    failures = []
    for role, budget in (record.get("role_budgets") or {}).items():
        predicted = roles.get(role)
        if not predicted or predicted["peak_bytes"] <= budget["budget_bytes"]:
            continue
        phase = predicted.get("peak_phase")
        parts = _largest_parts(predicted["phases"].get(phase, {}))
        failures.append(f"{role}: predicted peak {format_gib(predicted['peak_bytes'])} in the "
                        f"{PHASE_WORDS.get(phase, phase)} exceeds its {budget['budget_text']} budget by "
                        f"{format_gib(predicted['peak_bytes'] - budget['budget_bytes'])}: {parts}")
    return "\n".join(failures) or None


def check_vllm_can_start(record: Mapping[str, Any], spec: BudgetSpec | None = None) -> str | None:
    """A colocated vLLM that would refuse to start fails the test even when the peak would fit."""
    if record.get("measured") and (record["measured"].get("breakdown") or record["measured"].get("run")):
        return None  # a real run says what happened
    for warning in (record.get("predicted") or {}).get("warnings", ()):
        if warning.startswith("vLLM would refuse"):
            return warning
    return None


def check_prediction_matches_measurement(record: Mapping[str, Any], spec: BudgetSpec | None = None,
                                         tolerance: Tolerance | None = None) -> str | None:
    """With both a prediction and a measurement, they must agree within the tolerance (relative to the
    measurement)."""
    predicted = record.get("predicted")
    measured = record.get("measured") or {}
    measured_peak, what = judged_peak({"measured": measured})
    if not predicted or measured_peak is None or not what.startswith("measured"):
        return None
    if tolerance is None:
        tolerance = spec.tolerance if spec is not None else DEFAULT_TOLERANCE
    predicted_peak = int(predicted["peak_bytes"])
    gap = abs(predicted_peak - measured_peak)
    if gap <= tolerance.allowed_bytes(measured_peak):
        return None
    word = "over" if predicted_peak > measured_peak else "under"
    return (f"prediction and measurement disagree: predicted {format_gib(predicted_peak)}, {what} "
            f"{format_gib(measured_peak)} — the prediction is {gap / max(measured_peak, 1):.1%} {word} "
            f"(tolerance {tolerance.text})")


#: the checks run on every budgeted test, in order; the plugin's Manager copies this list (add yours there)
DEFAULT_CHECKS: tuple[Callable[..., str | None], ...] = (
    check_run_completed, check_vllm_can_start, check_peak_within_budget, check_roles_within_budget,
    check_prediction_matches_measurement)
