"""Plain-text rendering of a Breakdown for terminals and pytest report sections (no dependencies)."""

from __future__ import annotations

from ..breakdown import Breakdown
from ..units import format_gib


def breakdown_table(breakdown: Breakdown, *, total_bytes: int | None = None) -> str:
    """A components × phases table in GiB/MiB, the peak phase marked, plus the totals row."""
    phases = breakdown.phase_names()
    names = breakdown.component_names()
    peak = breakdown.peak_phase
    headers = ["component"] + [f"{p}{' *' if p == peak else ''}" for p in phases]
    rows = [[name] + [format_gib(breakdown.phases[p][name]) if name in breakdown.phases[p] else "-" for p in phases]
            for name in names]
    rows.append(["TOTAL"] + [format_gib(breakdown.total(p)) for p in phases])
    widths = [max(len(str(row[i])) for row in [headers] + rows) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(widths[i]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(headers))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    lines.append(f"* peak phase: {peak}, {format_gib(breakdown.peak_bytes)}"
                 + (f" of {format_gib(total_bytes)} ({format_gib(total_bytes - breakdown.peak_bytes)} headroom)"
                    if total_bytes else ""))
    return "\n".join(lines)
