"""Plain text for terminals and pytest report sections: breakdowns, predicted vs measured, a measured run, the
session summary table and a test's section — all through one table renderer, :func:`columns`."""

from __future__ import annotations

import textwrap
from typing import Any, Callable, Mapping, Sequence

from ..breakdown import Breakdown, Phase
from ..record import judged_peak
from ..units import format_gib
from .cells import RoleRow, record_role_rows, role_rows


def columns(rows: Sequence[Sequence[str]], right: Callable[[int], bool]) -> list[str]:
    """The one aligned-text table: ``rows[0]`` is the header, a rule of dashes under it, columns two spaces
    apart, each padded to its widest cell — on the right for the columns ``right(index)`` says, else on the left."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(cell.rjust(widths[i]) if right(i) else cell.ljust(widths[i]) for i, cell in enumerate(row))

    return [line(row).rstrip() for row in (rows[0], ["-" * w for w in widths], *rows[1:])]


def breakdown_table(breakdown: Breakdown, *, total_bytes: int | None = None) -> str:
    """A components × phases table in GiB/MiB, the peak phase marked, plus the totals row."""
    phases = breakdown.phase_names()
    names = breakdown.component_names()
    peak = breakdown.peak_phase
    headers = ["component"] + [f"{p}{' *' if p == peak else ''}" for p in phases]
    rows = [[name] + [format_gib(breakdown.phases[p][name]) if name in breakdown.phases[p] else "-" for p in phases]
            for name in names]
    rows.append(["TOTAL"] + [format_gib(breakdown.total(p)) for p in phases])
    if breakdown.origins:  # simulate mode's whole step: which producer each component came from
        headers.append("origin")
        for row, name in zip(rows, names):
            row.append(breakdown.component_origin(name))
        rows[-1].append("")
    last = len(headers) - 1 if breakdown.origins else len(headers)
    lines = columns([headers, *rows], right=lambda column: 0 < column < last)
    lines.append(f"* peak phase: {peak}, {format_gib(breakdown.peak_bytes)}"
                 + (f" of {format_gib(total_bytes)} ({format_gib(total_bytes - breakdown.peak_bytes)} headroom)"
                    if total_bytes else ""))
    return "\n".join(lines)


ROLE_WORDS = {"rank0": "training rank 0", "rank1+": "the other training ranks (worst of them)",
              "host": "host memory of one machine (offloaded)", "vllm_server": "each GPU of the vLLM server"}


def roles_table(breakdown: Breakdown, *, total_bytes: int | None = None, budgets: Mapping[str, int] | None = None,
                gpus: Mapping[str, int] | None = None, measured: Mapping[str, int] | None = None) -> str:
    """One row per role of a multi-GPU breakdown (:func:`~pytest_gpumem.report.cells.role_rows`): GPUs, peak and
    phase, the role's own budget and headroom (the training ranks': ``total_bytes``; others': ``budgets[role]``),
    the worst training GPU marked; "" for one role."""
    rows = role_rows(breakdown, total_bytes=total_bytes, budgets=budgets, gpus=gpus, measured=measured)
    return role_rows_table(rows, breakdown.worst_role)


def role_rows_table(rows: Sequence[RoleRow], worst_role: str | None) -> str:
    """The aligned text of :func:`roles_table` (a record's rows: ``cells.record_role_rows``); "" for no rows."""
    if not rows:
        return ""
    judged = any(row.budget_bytes for row in rows)
    with_measured = any(row.measured_bytes is not None for row in rows)
    header = (("role", "GPUs", "peak", "phase") + (("measured",) if with_measured else ())
              + (("budget", "headroom") if judged else ()) + ("top components", ""))
    table = [header]
    for one in rows:
        row = (one.role, "" if one.gpus is None else str(one.gpus), format_gib(one.peak_bytes), str(one.peak_phase))
        if with_measured:
            row += ("-" if one.measured_bytes is None else format_gib(one.measured_bytes),)
        if judged:
            row += (format_gib(one.budget_bytes), format_gib(one.headroom_bytes)) if one.budget_bytes else ("-", "-")
        table.append(row + (one.top_text, one.mark))
    numbers = {1, 2} | ({4} if with_measured else set())
    if judged:
        numbers |= {len(header) - 4, len(header) - 3}
    lines = columns(table, right=lambda column: column in numbers)
    words = "; ".join(f"{one.role}: {ROLE_WORDS.get(one.role, one.role)}" for one in rows)
    lines.append(f"per GPU, each role against its own budget (training ranks: the worst, {worst_role}); "
                 f"{words}")
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
    return "\n".join(columns(rows, right=lambda column: column >= 2))


def _signed(num_bytes: int) -> str:
    return ("+" if num_bytes >= 0 else "−") + format_gib(abs(num_bytes))


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
        lines += columns(rows, right=lambda column: column > 0)
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


def _short_gib(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**30:.2f} GiB"


#: the terminal summary fits this many columns (a CI log, a laptop terminal)
SUMMARY_WIDTH = 120
#: phase names as the summary prints them (the section has the full names)
SHORT_PHASES = {"persistent": "persist", "generation": "gen", "scoring": "score", "training": "train",
                "optimizer_step": "optim"}
#: why a test did not pass, in a word or three: (start of the record's reason, the word); first match wins
REASON_WORDS = (("nothing to judge", "nothing to judge"), ("invalid setup", "bad setup"),
                ("invalid @pytest.mark", "bad marker"), ("GPU memory regression", "regression"),
                ("vLLM would refuse", "vLLM cannot start"), ("prediction and measurement disagree", "pred ≠ measured"),
                ("the measured GRPO run ran out", "run OOM"), ("the measured GRPO run crashed", "run crashed"),
                ("the measured GRPO run timed out", "run timed out"), ("--gpu-budget-strict: no baseline",
                                                                       "no baseline"),
                ("gpu budget baseline:", "baseline error"))


def reason_word(record: dict) -> str:
    """The summary's reason column: why the test is not PASSED (a regression reads as one, not as FAILED beside
    positive headroom)."""
    verdict = record.get("verdict")
    reason = (record.get("reason") or "").strip()
    if verdict == "passed" or not verdict:
        return ""
    if verdict == "skipped":
        return "skipped"
    for start, word in REASON_WORDS:
        if reason.startswith(start):
            if word == "regression" and (record.get("baseline") or {}).get("delta_bytes") is not None:
                return f"regression +{record['baseline']['delta_bytes'] / 2**30:.2f} GiB"
            return word
    if " exceeds " in reason.splitlines()[0] if reason else False:
        return "over budget"
    return "test failed" if verdict in ("failed", "xfailed") else verdict


def short_nodeid(nodeid: str, width: int) -> str:
    """The node id within ``width``: without its folders first, then elided in the middle (the full id is in
    pytest's own short summary and in the reports)."""
    if len(nodeid) <= width:
        return nodeid
    path, sep, name = nodeid.partition("::")
    short = path.rsplit("/", 1)[-1] + sep + name
    if len(short) <= width:
        return short
    head = max(1, min(len(short) // 3, (width - 1) // 3))
    return short[:head] + "…" + short[-(width - 1 - head):]


def wrapped(text: str, width: int = SUMMARY_WIDTH, indent: str = "    ") -> list[str]:
    """A long summary line wrapped to ``width`` (continuation lines indented)."""
    return textwrap.wrap(text, width=width, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False) or [""]


def summary_table(records: list[dict], width: int = SUMMARY_WIDTH) -> list[str]:
    """One row per budgeted test — test, budget, peak (phase), measured reserved / NVML, headroom (budget − judged
    peak), verdict, reason — within ``width`` columns (the test id is elided to fit)."""
    headers = ["test", "budget", "peak (phase)", "measured res/NVML", "headroom", "verdict", "reason"]
    rows = []
    for record in records:
        predicted = record.get("predicted") or {}
        measured = record.get("measured") or {}
        peak_text = "-"
        if predicted.get("peak_bytes") is not None:
            phase = predicted.get("peak_phase")
            peak_text = f"{_short_gib(predicted['peak_bytes'])} {SHORT_PHASES.get(phase, phase)}"
        measured_text = "-"  # why a figure is missing is in the test's section
        if measured and any(measured.get(k) is not None for k in ("peak_reserved_bytes", "nvml_peak_bytes")):
            measured_text = (f"{_short_gib(measured.get('peak_reserved_bytes'))} / "
                             f"{_short_gib(measured.get('nvml_peak_bytes'))}")
        peak, _ = judged_peak(record)
        budget = record.get("budget_bytes")
        headroom = "-" if budget is None else "not judged" if peak is None else f"{(budget - peak) / 2**30:+.2f} GiB"
        budget_text = (record.get("budget_text") or "-").split(" = ")[0]
        rows.append([record["nodeid"], budget_text, peak_text, measured_text, headroom,
                     (record.get("verdict") or "?").upper(), reason_word(record)])
    others = [max(len(row[i]) for row in [headers, *rows]) for i in range(1, len(headers))]
    test_width = max(len("test"), width - sum(others) - 2 * (len(headers) - 1))
    for row in rows:
        row[0] = short_nodeid(row[0], test_width)
    return columns([headers, *rows], right=lambda column: column in (1, 4))


def test_section(record: dict) -> str:
    """A test's ``gpu budget`` report section: budget, judged peak, the breakdown by phase, measurement,
    assumptions, warnings."""
    lines = [f"mode: {record.get('mode')}    budget: {record.get('budget_text')}"
             + (f"    card: {record['gpu']['name']} ({format_gib(record['gpu']['total_bytes'])})"
                if record.get("gpu") else "")]
    peak, what = judged_peak(record)
    if peak is not None and record.get("budget_bytes") is not None:
        lines.append(f"judged on the {what}: {format_gib(peak)}, headroom "
                     f"{format_gib(record['budget_bytes'] - peak)}")
    setup = record.get("setup")
    if setup:
        shown = ", ".join(f"{k}={v!r}" for k, v in setup.items() if v is not None)
        lines += textwrap.wrap("setup: " + shown, width=110, subsequent_indent="       ")
    predicted = record.get("predicted")
    if predicted and predicted.get("phases"):
        lines.append("")
        if predicted.get("source") == "simulate":
            title = ("whole step (simulated torch tensors + estimated parts, see origin)" if predicted.get("origins")
                     else "simulated")
        else:
            title = "predicted"
        lines.append(f"{title} breakdown by phase:")
        breakdown = Breakdown.from_dict(predicted)
        if breakdown.roles:
            lines.append(f"(the worst training GPU: {breakdown.worst_role})")
        lines.append(breakdown_table(breakdown, total_bytes=record.get("budget_bytes")))
        if breakdown.roles:
            lines.append("")
            lines.append(role_rows_table(record_role_rows(record), breakdown.worst_role))
    measured = record.get("measured")
    if measured:
        lines.append("")
        parts = [f"{name.replace('_bytes', '').replace('_', ' ')} {format_gib(measured[name])}"
                 for name in ("peak_reserved_bytes", "peak_allocated_bytes", "nvml_peak_bytes")
                 if measured.get(name) is not None]
        lines.append("measured: " + (", ".join(parts) if parts else "nothing"))
        for name, why in sorted((measured.get("reasons") or {}).items()):
            lines.append(f"  {name}: {why}")
        if measured.get("breakdown") and measured["breakdown"].get("phases"):
            lines.append(breakdown_table(Breakdown.from_dict(measured["breakdown"]),
                                         total_bytes=record.get("budget_bytes")))
    if predicted:
        for title, key in (("assumptions", "assumptions"), ("warnings", "warnings")):
            if predicted.get(key):
                lines.append(f"{title}:")
                lines += [f"  - {text}" for text in predicted[key]]
    return "\n".join(lines)
