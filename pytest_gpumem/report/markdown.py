"""The Markdown summary for CI: counts, one table row per test, then the reasons of failures; appended to
``$GITHUB_STEP_SUMMARY`` too when that is set (GitHub Actions shows it on the run's page)."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..record import measured_peak
from .cells import baseline_of, budget_cell, context, counts, delta_text, gib_or_dash, predicted_peak

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
