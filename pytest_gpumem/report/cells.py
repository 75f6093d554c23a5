"""How a record's numbers read in a report, the same in every format: peaks, baselines, budgets, counts."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..breakdown import Breakdown
from ..units import format_gib

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
