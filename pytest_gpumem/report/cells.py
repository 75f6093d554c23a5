"""How a record's numbers read in a report, the same in every format: peaks, baselines, budgets, counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..breakdown import HOST_ROLES, TRAINER_ROLES, Breakdown, Role
from ..record import measured_peak
from ..units import format_gib
from ..vllm_layout import role_gpu_counts

BASELINE_SYMBOLS = {"grew": "📈", "shrank": "📉", "same": "", "missing": ""}


def predicted_peak(result: Mapping[str, Any]) -> int | None:
    breakdown = breakdown_of(result.get("predicted"))
    return breakdown.peak_bytes if breakdown is not None and breakdown.phases else None


def breakdown_of(data: Mapping[str, Any] | None) -> Breakdown | None:
    return Breakdown.from_dict(data) if data and data.get("phases") is not None else None


def baseline_of(result: Mapping[str, Any]) -> Mapping[str, Any]:
    return result.get("baseline") or {}


def gib_or_dash(num_bytes: int | None) -> str:
    return "—" if num_bytes is None else format_gib(num_bytes)


def signed_or_dash(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "—"
    if num_bytes == 0:
        return "±0"
    return ("+" if num_bytes >= 0 else "−") + format_gib(abs(num_bytes))


def budget_cell(result: Mapping[str, Any]) -> str:
    """The budget as the user wrote it (``17 GB`` of ``17 GB = 15.83 GiB``), else in GiB."""
    text = result.get("budget_text")
    return str(text).split(" = ")[0] if text else gib_or_dash(result.get("budget_bytes"))


def counts(results: Sequence[Mapping[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for result in results:
        counts[result.get("verdict") or "unknown"] = counts.get(result.get("verdict") or "unknown", 0) + 1
    order = ["failed", "error", "passed", "xfailed", "skipped"]
    names = sorted(counts, key=lambda v: (order.index(v) if v in order else len(order), v))
    return ", ".join(f"{counts[name]} {name}" for name in names) or "no tests"


def context(results: Sequence[Mapping[str, Any]]) -> str:
    modes = sorted({r.get("mode") for r in results if r.get("mode")})
    gpus = sorted({r["gpu"]["name"] for r in results if r.get("gpu") and r["gpu"].get("name")})
    parts = [f"mode: {', '.join(modes)}"] if modes else []
    if gpus:
        parts.append(f"GPU: {', '.join(gpus)}")
    return " · ".join(parts)


def delta_text(result: Mapping[str, Any], symbols: Mapping[str, str] = BASELINE_SYMBOLS) -> str:
    baseline = baseline_of(result)
    status = baseline.get("status")
    if not status:
        return "—"
    if status == "missing":
        return "no baseline"
    if status == "same":
        if not baseline.get("delta_bytes"):
            return "±0"
        return f"{signed_or_dash(baseline.get('delta_bytes'))} (within tolerance)"
    return f"{signed_or_dash(baseline.get('delta_bytes'))} {status} {symbols.get(status, '')}".strip()


@dataclass(frozen=True)
class RoleRow:
    """One role of a multi-GPU record as every format shows it: its GPUs, its predicted (and measured) peak, the
    budget it is judged against and the headroom left."""

    role: str
    gpus: int | None  # GPUs in the role (None: not a GPU count, e.g. host memory)
    peak_bytes: int  # predicted
    peak_phase: str | None
    top: tuple  # ((component, bytes), ...) of the peak phase, largest first
    budget_bytes: int | None  # the role's own: the training ranks share the test's budget, a vLLM server has its own
    budget_text: str | None  # as the user wrote it ("80 GB"), else None
    measured_bytes: int | None = None  # the measured process's peak (rank 0's: the plugin measures one process)
    worst: bool = False  # the worst training GPU, the one the test's budget is judged on

    @property
    def host(self) -> bool:
        return self.role in HOST_ROLES

    @property
    def headroom_bytes(self) -> int | None:
        """Budget − the judged peak: the measured one when there is one (as the budget check judges)."""
        if not self.budget_bytes:
            return None
        return self.budget_bytes - (self.measured_bytes if self.measured_bytes is not None else self.peak_bytes)

    @property
    def top_text(self) -> str:
        """The peak phase's largest components as every format prints them: ``"weights 1.00 GiB, ..."``."""
        return ", ".join(f"{name} {format_gib(num_bytes)}" for name, num_bytes in self.top)

    @property
    def mark(self) -> str:
        return "← worst training GPU" if self.worst else ("CPU" if self.host else "")

    @property
    def over(self) -> bool:
        return self.headroom_bytes is not None and self.headroom_bytes < 0

    @property
    def note(self) -> str:
        """The Markdown / HTML note: which GPU is judged, host memory, over its own budget."""
        notes = ["worst training GPU"] if self.worst else ["host memory (CPU)"] if self.host else []
        return ", ".join(notes + (["over its budget"] if self.over else []))


def role_rows(breakdown: Breakdown, *, total_bytes: int | None = None, budgets: Mapping[str, int] | None = None,
              gpus: Mapping[str, int] | None = None, budget_texts: Mapping[str, str] | None = None,
              measured: Mapping[str, int] | None = None) -> list[RoleRow]:
    """A row per role of a multi-GPU breakdown (none for one role): the training ranks are judged against
    ``total_bytes``, any other role against ``budgets[role]``; ``measured`` gives a role's measured peak."""
    if len(breakdown.roles) <= 1:
        return []
    budgets, gpus, texts = dict(budgets or {}), dict(gpus or {}), dict(budget_texts or {})
    measured = dict(measured or {})
    rows = []
    for name in breakdown.role_names():
        one = breakdown.role(name)
        limit = budgets.get(name, total_bytes if name in TRAINER_ROLES else None)
        rows.append(RoleRow(name, gpus.get(name), one.peak_bytes, one.peak_phase, tuple(one.top_components(n=3)),
                            limit or None, texts.get(name) if limit else None, measured.get(name),
                            name == breakdown.worst_role))
    return rows


def record_role_rows(result: Mapping[str, Any]) -> list[RoleRow]:
    """:func:`role_rows` of a record: its predicted roles, its budget and ``role_budgets``, the GPUs its setup
    gives each role, and its measurement on rank 0 (the one process the plugin measures)."""
    predicted = breakdown_of(result.get("predicted"))
    if predicted is None:
        return []
    role_budgets = result.get("role_budgets") or {}
    texts = {role: budget_cell(budget) for role, budget in role_budgets.items()}
    texts.update({role: budget_cell(result) for role in TRAINER_ROLES})
    _, measured = measured_peak(result)
    return role_rows(predicted, total_bytes=result.get("budget_bytes"),
                     budgets={role: b["budget_bytes"] for role, b in role_budgets.items()},
                     gpus=role_gpu_counts(result.get("setup") or {}), budget_texts=texts,
                     measured={Role.RANK0.value: measured} if measured is not None else None)


def origin_rows(breakdown: Breakdown) -> list[tuple[str, int | None, str]]:
    """Simulate mode's whole step, per component: (name, bytes at the peak phase or None, where it came from —
    ``Breakdown.component_origin``); none when every component is the breakdown's own ``source``."""
    if not breakdown.origins:
        return []
    at_peak = breakdown.components(breakdown.peak_phase)
    return [(name, at_peak.get(name), breakdown.component_origin(name)) for name in breakdown.component_names()]


def origin_label(origin: str, source: str) -> str:
    """A component's origin as the reports print it: ``[estimate]`` for a part another producer supplied, the
    breakdown's own source (and a mixed ``"simulate; estimate in generation"``) as it is."""
    return f"[{origin}]" if origin != source and ";" not in origin else origin
