"""Plain-text rendering of a Breakdown for terminals and pytest report sections (no dependencies)."""

from __future__ import annotations

from typing import Any

from ..breakdown import Breakdown, Phase
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


def compare_table(predicted: Breakdown, measured: Breakdown, phases: list[str] | None = None) -> str:
    """Predicted vs measured, per phase and component, as aligned text (for failure messages and the CLI)."""
    phases = phases or [p for p in measured.phase_names() if p in predicted.phases] or measured.phase_names()
    rows = [("phase", "component", "predicted", "measured", "measured − predicted")]
    for phase in phases:
        mine, theirs = predicted.components(phase), measured.components(phase)
        names = sorted(set(mine) | set(theirs), key=lambda n: (-max(mine.get(n, 0), theirs.get(n, 0)), n))
        for name in names:
            p, m = mine.get(name), theirs.get(name)
            rows.append((phase, name, format_gib(p) if p is not None else "—", format_gib(m) if m is not None else "—",
                         _signed(m - p) if p is not None and m is not None else ""))
        p_total, m_total = predicted.total(phase), measured.total(phase)
        rows.append((phase, "TOTAL", format_gib(p_total), format_gib(m_total), _signed(m_total - p_total)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _signed(num_bytes: int) -> str:
    return ("+" if num_bytes >= 0 else "−") + format_gib(abs(num_bytes))


# -- text output -------------------------------------------------------------------------------------------
def format_result(result: Any, predicted: Breakdown | None = None) -> str:
    """A measured run (a :class:`~pytest_gpumem.measure.protocol.RunResult`) for people: status, the per-phase
    table, peaks, and predicted vs measured when given."""
    lines = [result.summary()]
    data = result.data
    tokens = data.get("tokens") or {}
    if tokens.get("prompt_max") is not None:
        lines.append(f"tokens: prompts {tokens.get('prompt_min')}–{tokens.get('prompt_max')}, completions "
                     f"{tokens.get('completion_min')}–{tokens.get('completion_max')}")
    phases = result.phases
    if phases:
        header = ("phase", "times", "seconds", "peak allocated", "peak reserved", "non-torch", "NVML peak",
                  "host RSS peak")
        rows = [header]
        for phase in [p for p in (*[ph.value for ph in Phase], "outside_phases") if p in phases]:
            stats = phases[phase]
            rows.append((phase, str(stats.get("occurrences", 0)), f"{stats.get('seconds', 0):.2f}",
                         *(format_gib(stats[k]) if stats.get(k) is not None else "—"
                           for k in ("peak_allocated_bytes", "peak_reserved_bytes", "non_torch_bytes",
                                     "nvml_peak_bytes", "peak_rss_bytes"))))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for index, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                                   for i, cell in enumerate(row)))
            if index == 0:
                lines.append("  ".join("-" * w for w in widths))
    for name, reason in sorted(result.reasons.items()):
        lines.append(f"{name}: {reason}")
    if result.oom:
        oom = result.oom
        lines.append(f"OOM in the {oom.get('phase')} phase ({oom.get('type')}): {oom.get('message', '')[:400]}")
    measured = result.breakdown
    if predicted is not None and measured is not None:
        lines.append("")
        lines.append("predicted vs measured:")
        lines.append(compare_table(predicted, measured))
    timings = data.get("timings_s") or {}
    if timings:
        parts = [f"{k} {v:.1f}s" for k, v in timings.items() if isinstance(v, (int, float))]
        if timings.get("steps"):
            parts.append("steps " + ", ".join(f"{s:.1f}s" for s in timings["steps"]))
        lines.append("timings: " + ", ".join(parts))
    for note in data.get("notes") or ():
        lines.append(f"note: {note}")
    return "\n".join(lines)
