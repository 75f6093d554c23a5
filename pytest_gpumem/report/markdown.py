"""The Markdown summary for CI: counts, one table row per test, then the reasons of failures; appended to
``$GITHUB_STEP_SUMMARY`` too when that is set (GitHub Actions shows it on the run's page)."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..record import measured_peak
from . import cells
from .cells import baseline_of, budget_cell, context, counts, delta_text, gib_or_dash, predicted_peak, signed_or_dash

VERDICT_SYMBOLS = {"passed": "✅", "failed": "❌", "error": "💥", "xfailed": "➖", "skipped": "⏭️"}


def _md_cell(text: Any) -> str:
    # a table cell is one line; a pipe would end it (GFM honours \| even inside code spans)
    return " ".join(str(text).split()).replace("|", "\\|")


def render_markdown(results: Sequence[Mapping[str, Any]], *, title: str = "GPU memory (pytest-gpumem)") -> str:
    """The Markdown summary: counts, one table row per test, then the reasons of failures."""
    lines = [f"## {title}", "", f"**{counts(results)}**" + (f" · {context(results)}" if context(results) else ""), ""]
    if not results:
        lines.append("No test had a GPU memory budget.")
        return "\n".join(lines) + "\n"
    lines += ["| Test | Mode | Budget | Predicted | Measured | Baseline | Δ vs baseline | Verdict |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for result in results:
        what, measured = measured_peak(result)
        measured_text = f"{gib_or_dash(measured)} ({what})" if measured is not None else "—"
        verdict = result.get("verdict") or "unknown"
        lines.append("| " + " | ".join(_md_cell(cell) for cell in (
            f"`{result.get('nodeid', '?')}`", result.get("mode") or "—", budget_cell(result),
            gib_or_dash(predicted_peak(result)), measured_text, gib_or_dash(baseline_of(result).get("peak_bytes")),
            delta_text(result), f"{VERDICT_SYMBOLS.get(verdict, '')} {verdict}".strip())) + " |")
    lines += _roles_section(results) + _origins_section(results)
    problems = [r for r in results if r.get("verdict") in ("failed", "error") and r.get("reason")]
    grown = [r for r in results if baseline_of(r).get("status") == "grew" and r not in problems]
    if problems or grown:
        lines += ["", "### Why", ""]
        for result in problems + grown:
            text = result.get("reason") or baseline_of(result).get("message") or ""
            lines += [f"<details><summary><code>{html.escape(str(result.get('nodeid')))}</code>: "
                      f"{html.escape(_first_line(text))}</summary>", "", "```", str(text).replace("```", "'''"), "```",
                      "", "</details>", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _per_test_tables(results: Sequence[Mapping[str, Any]], title: str, intro: str,
                     table: Callable[[Mapping[str, Any]], tuple[str, str, list[tuple]] | None]) -> list[str]:
    """A section with one table per test that has one: ``table(result)`` gives (header, alignment, rows) or None."""
    tables = [(result, found) for result in results for found in [table(result)] if found]
    if not tables:
        return []
    lines = ["", f"### {title}", "", intro]
    for result, (header, align, rows) in tables:
        lines += ["", f"`{_md_cell(result.get('nodeid', '?'))}`", "", header, align]
        lines += ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def _roles_table(result: Mapping[str, Any]) -> tuple[str, str, list[tuple]] | None:
    rows = [(row.role, "—" if row.gpus is None else row.gpus, row.budget_text or gib_or_dash(row.budget_bytes),
             f"{gib_or_dash(row.peak_bytes)} ({row.peak_phase})", gib_or_dash(row.measured_bytes),
             signed_or_dash(row.headroom_bytes), row.top_text,
             ("❌ " if row.over else "") + row.note) for row in cells.record_role_rows(result)]
    return ("| Role | GPUs | Budget | Predicted peak | Measured | Headroom | Largest components | |",
            "|---|---:|---:|---:|---:|---:|---|---|", rows) if rows else None


def _origins_table(result: Mapping[str, Any]) -> tuple[str, str, list[tuple]] | None:
    breakdown = cells.breakdown_of(result.get("predicted"))
    rows = cells.origin_rows(breakdown) if breakdown is not None else []
    return (f"| Component | At the peak ({breakdown.peak_phase}) | Origin |", "|---|---:|---|",
            [(name, gib_or_dash(num_bytes), cells.origin_label(origin, breakdown.source))
             for name, num_bytes, origin in rows]) if rows else None


def _roles_section(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """A multi-GPU test's roles (rank 0, the other ranks, host memory, a vLLM server), each against its own
    budget; nothing for one-GPU tests."""
    return _per_test_tables(results, "Per role", "Per GPU, each role against its own budget: the training ranks "
                            "share the test's budget (judged on the worst of them), a vLLM server GPU has its own; "
                            "host memory is one machine's offload.", _roles_table)


def _origins_section(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """simulate mode's whole step: where each component came from (the simulation or the estimate's parts a
    simulation cannot see); nothing for tests without origins."""
    return _per_test_tables(results, "Where the whole step comes from", "simulate mode judges the simulated torch "
                            "tensors plus the estimate's parts a simulation cannot see (CUDA context, allocator slack, "
                            "vLLM, generation), each marked [estimate].", _origins_table)


def _first_line(text: str, limit: int = 160) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def write_markdown(results: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                   environ: Mapping[str, str] | None = None, title: str = "GPU memory (pytest-gpumem)") -> list[Path]:
    """Write the summary to ``path``; append it to ``$GITHUB_STEP_SUMMARY`` when set. Returns the files."""
    text = render_markdown(results, title=title)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    written = [target]
    step_summary = (os.environ if environ is None else environ).get("GITHUB_STEP_SUMMARY")
    if step_summary:
        # appended, never overwritten: other steps write their own sections to the same file
        with open(step_summary, "a", encoding="utf-8") as handle:
            handle.write("\n" + text)
        written.append(Path(step_summary))
    return written


def write_report(records: Sequence[Mapping[str, Any]], path: Path, session: Any) -> str:
    """``--gpu-budget-md``: the summary at ``path`` (and ``$GITHUB_STEP_SUMMARY``); the terminal line."""
    written = write_markdown(records, path)
    return f"gpu budget Markdown: {path}" + (" (and $GITHUB_STEP_SUMMARY)" if len(written) > 1 else "")
