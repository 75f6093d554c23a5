"""Stage 5: rendering records — one module per format behind :data:`WRITERS`.

Every format renders the plugin's per-test records (:class:`pytest_gpumem.record.BudgetRecord`): ``text`` for
the terminal and the report sections (and the CLI), and the files a session can write — ``json``,
``markdown``, ``html`` — each with a ``write_report(records, path, session) -> terminal line``. A new format
is a module with that function plus one row in :data:`WRITERS`; the plugin generates its
``--gpu-budget-<name>=PATH`` option from the row. Markdown and HTML are imported on first write: the
plugin declares their options in every pytest run, and importing them (and the records they read) would cost
an inert run ≈ 15 ms (README "What the plugin costs").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import json  # stdlib only: light


@dataclass(frozen=True)
class ReportSession:
    """What a report knows of the session besides its records."""

    #: started_at, finished_at, duration_s, exitstatus, mode, pytest_args, ... (the JSON report's "session")
    info: Mapping[str, Any]
    #: the machine (Python, packages, GPUs): read only by the formats that print it
    environment: Callable[[], Mapping[str, Any]]


@dataclass(frozen=True)
class ReportFormat:
    """One file format a session can write: ``--gpu-budget-<name>=PATH``."""

    name: str
    help: str
    write: Callable[[Sequence[Mapping[str, Any]], Path, ReportSession], str]


def _write_markdown(records: Sequence[Mapping[str, Any]], path: Path, session: ReportSession) -> str:
    from .markdown import write_report

    return write_report(records, path, session)


def _write_html(records: Sequence[Mapping[str, Any]], path: Path, session: ReportSession) -> str:
    from .html import write_report

    return write_report(records, path, session)


#: the formats, in the order they are written (and their options listed)
WRITERS: dict[str, ReportFormat] = {fmt.name: fmt for fmt in (
    ReportFormat("json", "write the GPU budget results as JSON (versioned schema) to PATH", json.write_report),
    ReportFormat("md", "write a Markdown summary to PATH (also appended to $GITHUB_STEP_SUMMARY when set)",
                 _write_markdown),
    ReportFormat("html", "write one self-contained HTML picture of where the memory goes to PATH", _write_html),
)}
