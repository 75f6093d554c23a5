"""``--gpu-budget-json=PATH``: the session's GPU budget results as one versioned JSON document.

Schema (``schema_version`` 1; a consumer should check both ``schema`` and ``schema_version``)::

    {"schema": "pytest-gpumem-report", "schema_version": 1,
     "session": {"started_at", "finished_at", "duration_s", "exitstatus", "mode", "mode_reason",
                 "pytest_args", "rootdir", "xdist_workers", "defaults": {"budget_bytes", "budget_text", "gpu"}},
     "environment": {"python", "platform", "hostname", "packages": {name: version | None},
                     "gpus": [{"index", "name", "total_bytes"}], "gpus_reason": str | None},
     "summary": {"tests": n, "passed": n, "failed": n, "error": n, "xfailed": n, "skipped": n},
     "tests": [<record>, ...]}

Each ``tests`` entry is the plugin's per-test record (:class:`pytest_gpumem.record.BudgetRecord`): nodeid, mode, budget,
setup, the predicted breakdown, the measurement, the baseline comparison, the GPU judged against, the verdict
and the reason. Under pytest-xdist the controller writes the one document with every worker's records.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

SCHEMA = "pytest-gpumem-report"
SCHEMA_VERSION = 1
VERDICTS = ("passed", "failed", "error", "xfailed", "skipped")


def summary(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    records = list(records)
    counts = {"tests": len(records)}
    for verdict in VERDICTS:
        counts[verdict] = sum(1 for r in records if r.get("verdict") == verdict)
    return counts


def build(records: Iterable[Mapping[str, Any]], session: Mapping[str, Any],
          env: Mapping[str, Any]) -> dict[str, Any]:
    """The report document: the session, the environment (``measure.device.environment()``), the counts and the
    per-test records."""
    records = [dict(r) for r in records]
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "session": dict(session), "environment": dict(env),
            "summary": summary(records), "tests": records}


def write(path: str | os.PathLike, document: Mapping[str, Any]) -> Path:
    """Write atomically (a temporary file in the same directory, then ``os.replace``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent, prefix=f".{target.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            json.dump(document, handle, indent=2, sort_keys=False, default=_jsonable)
            handle.write("\n")
        # NamedTemporaryFile creates 0600; a report is read by CI uploaders and people: 0644 like the others
        os.chmod(handle.name, 0o644)
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return target


def _jsonable(value: Any) -> Any:
    """Last resort for values a setup may hold (a Path, a tuple inside a config dict, a ModelSpec)."""
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def iso_utc(timestamp: float) -> str:
    """A Unix time as the report writes every time: ISO 8601 in UTC, seconds, ``+00:00``."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a report back, checking its schema (for tools that merge or compare reports)."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    if document.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a pytest-gpumem report (schema {document.get('schema')!r})")
    if document.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: report schema version {document.get('schema_version')!r}, this pytest-gpumem "
                         f"reads version {SCHEMA_VERSION}")
    return document


def write_report(records: Sequence[Mapping[str, Any]], path: Path, session: Any) -> str:
    """``--gpu-budget-json``: the document at ``path`` (``session``: a :class:`~pytest_gpumem.report.ReportSession`);
    the terminal line."""
    write(path, build(records, session.info, session.environment()))
    return f"gpu budget JSON report: {path}"
