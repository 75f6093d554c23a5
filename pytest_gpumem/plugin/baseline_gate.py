"""Plugin glue for baselines (``--gpu-budget-save``, ``--gpu-budget-baseline``, ``--gpu-budget-strict``,
``--gpu-budget-baseline-tolerance``) and the CI reports (``--gpu-budget-md``, ``--gpu-budget-html``).

:mod:`pytest_gpumem.plugin` calls :func:`add_options` from ``pytest_addoption`` and :func:`configure` from
its ``Manager``; everything else is here. The baseline check is one more ``Manager.checks`` entry, so a
regression fails *the test itself* (pytest-benchmark raises it at session end while the test shows as
passed); the reports are ``Manager.writers``, run once on the xdist controller with every worker's records.

Comparison is opt-in by the file: without a baseline file, ``--gpu-budget-save`` or ``--gpu-budget-strict``
no test is compared and nothing is reported about baselines.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping

import pytest

from ..compare.baseline import (DEFAULT_BASELINE_PATH, DEFAULT_TOLERANCE, BaselineStore, Tolerance, check_against_baseline,
                       hardware_key, record_from_result, software_versions)
from ..errors import GpuMemError
from .options import ini_bool, ini_value

MARKER_KEYWORD = "baseline_tolerance"


def add_options(group: Any, parser: pytest.Parser) -> None:
    group.addoption("--gpu-budget-baseline", dest="gpu_budget_baseline", default=None, metavar="PATH",
                    help=f"baseline file to compare with and save to (default {DEFAULT_BASELINE_PATH} under the "
                         "rootdir; ini gpu_budget_baseline)")
    group.addoption("--gpu-budget-save", dest="gpu_budget_save", action="store_true", default=False,
                    help="record (create or update) each budgeted test's baseline; growth is reported, not failed")
    group.addoption("--gpu-budget-strict", dest="gpu_budget_strict", action="store_true", default=None,
                    help="fail budgeted tests that have no baseline for this hardware (ini gpu_budget_strict)")
    group.addoption("--gpu-budget-baseline-tolerance", dest="gpu_budget_baseline_tolerance", default=None,
                    metavar="TOL", help=f"allowed growth over the baseline, percent and/or size, e.g. "
                                        f"'{DEFAULT_TOLERANCE}' (the default; ini gpu_budget_baseline_tolerance; per "
                                        f"test: gpu_budget(..., {MARKER_KEYWORD}='10%'))")
    group.addoption("--gpu-budget-md", dest="gpu_budget_md", default=None, metavar="PATH",
                    help="write a Markdown summary to PATH (also appended to $GITHUB_STEP_SUMMARY when set)")
    group.addoption("--gpu-budget-html", dest="gpu_budget_html", default=None, metavar="PATH",
                    help="write one self-contained HTML picture of where the memory goes to PATH")
    parser.addini("gpu_budget_baseline", default="", help=f"pytest-gpumem: baseline file (default {DEFAULT_BASELINE_PATH})")
    parser.addini("gpu_budget_baseline_tolerance", default="",
                  help=f"pytest-gpumem: allowed growth over the baseline (default '{DEFAULT_TOLERANCE}')")
    parser.addini("gpu_budget_strict", type="bool", default=False,
                  help="pytest-gpumem: fail budgeted tests without a baseline")


def _resolve(path: str, base: Path) -> Path:
    target = Path(path).expanduser()
    return target if target.is_absolute() else base / target


class BaselineGate:
    """The session's baseline settings, and the per-test check the Manager runs."""

    def __init__(self, manager: Any):
        config: pytest.Config = manager.config
        self.manager = manager
        self.save = bool(config.getoption("gpu_budget_save", False))
        cli_strict = config.getoption("gpu_budget_strict", None)
        self.strict = bool(cli_strict) if cli_strict is not None else ini_bool(config, "gpu_budget_strict")
        invocation_dir = Path(config.invocation_params.dir)
        cli_path, ini_path = config.getoption("gpu_budget_baseline", None), ini_value(config, "gpu_budget_baseline")
        if cli_path:
            path = _resolve(cli_path, invocation_dir)
        elif ini_path:  # relative to the ini file, like the file it sits next to
            path = _resolve(ini_path, Path(config.inipath).parent if config.inipath else Path(config.rootpath))
        else:
            path = Path(config.rootpath) / DEFAULT_BASELINE_PATH
        self.store = BaselineStore(path)
        text = config.getoption("gpu_budget_baseline_tolerance", None) or ini_value(config, "gpu_budget_baseline_tolerance")
        source = "--gpu-budget-baseline-tolerance" if config.getoption("gpu_budget_baseline_tolerance", None) else \
            "gpu_budget_baseline_tolerance"
        try:
            self.tolerance = Tolerance.parse(text or DEFAULT_TOLERANCE, field=source)
            # a corrupt or foreign file stops the session here, naming it, before any test runs
            self.exists = self.store.path.exists()
            if self.exists:
                self.store.load()
        except GpuMemError as exc:
            raise pytest.UsageError(f"pytest-gpumem: {exc}") from None
        self.active = self.exists or self.save or self.strict
        self._versions: dict[str, Any] | None = None

    def versions(self) -> dict[str, Any]:
        if self._versions is None:
            versions = software_versions()
            torch = sys.modules.get("torch")  # only if measuring already imported it: never import it here
            if self.manager.mode == "measure" and torch is not None:
                versions["cuda"] = getattr(torch.version, "cuda", None)
            self._versions = versions
        return self._versions

    def key(self) -> str:
        if self.manager.mode != "measure":
            return hardware_key(self.manager.mode)
        device = self.manager.device_gpu()  # the card measured on, not the card the budget is judged for
        return hardware_key("measure", getattr(device, "name", None), getattr(device, "total_bytes", None))

    def tolerance_for(self, item: Any) -> Tolerance:
        marker = item.get_closest_marker("gpu_budget") if item is not None else None
        value = marker.kwargs.get(MARKER_KEYWORD) if marker is not None else None
        return Tolerance.parse(value, field=MARKER_KEYWORD) if value is not None else self.tolerance

    def check(self, record: dict, item: Any = None) -> str | None:
        """``Manager.checks`` entry: compare (and save) this test; the failure message when it regressed."""
        if not self.active:
            return None
        run = (record.get("measured") or {}).get("run") or {}
        if run.get("status") not in (None, "ok"):  # an OOM or crash: its numbers are not a baseline
            record["baseline"] = None
            return None
        try:
            current = record_from_result(_for_baseline(record), versions=self.versions())
            outcome = check_against_baseline(self.store, record["nodeid"], self.key(), current,
                                             self.tolerance_for(item), strict=self.strict, save=self.save)
        except GpuMemError as exc:  # a corrupt file, a lock timeout, no GPU identity: this test's failure
            record["baseline"] = {"peak_bytes": None, "delta_bytes": None, "status": "missing",
                                  "message": f"baseline not checked: {exc}"}
            return f"gpu budget baseline: {exc}"
        record["baseline"] = outcome.result
        return outcome.failure_message

    def summary(self, records: list, manager: Any) -> str | None:
        """``Manager.writers`` entry: one line of counts, and the tests that grew or shrank."""
        compared = [r for r in records if r.get("baseline") and r["baseline"].get("status")]
        if not self.active or not compared:
            return None
        counts: dict[str, int] = {}
        for record in compared:
            counts[record["baseline"]["status"]] = counts.get(record["baseline"]["status"], 0) + 1
        words = {"missing": "new"} if self.save else {"same": "within tolerance", "missing": "without a baseline"}
        parts = [f"{counts[s]} {words.get(s, s)}" for s in ("grew", "shrank", "same", "missing") if counts.get(s)]
        action = "saved to" if self.save else "compared with"
        lines = [f"gpu budget baselines {action} {self.store.path}: {', '.join(parts)}"]
        for record in compared:
            status = record["baseline"]["status"]
            if status in ("grew", "shrank"):
                lines.append(f"  {status.upper()} {record['nodeid']}: {record['baseline']['message'].splitlines()[0]}")
        if counts.get("missing") and not self.save:
            lines.append("  (record missing baselines with --gpu-budget-save and commit the file)")
        return "\n".join(lines)


def _for_baseline(record: Mapping[str, Any]) -> dict:
    """The record with the prediction trimmed to its breakdown (assumptions and warnings stay in the JSON)."""
    trimmed = dict(record)
    predicted = record.get("predicted")
    if predicted:
        trimmed["predicted"] = {k: predicted[k] for k in ("source", "phases", "peak_phase", "peak_bytes") if k in predicted}
    return trimmed


def _writer_md(path: Path):
    def write(records: list, manager: Any) -> str:
        from ..report.html import write_markdown

        written = write_markdown(records, path)
        return f"gpu budget Markdown: {path}" + (" (and $GITHUB_STEP_SUMMARY)" if len(written) > 1 else "")

    return write


def _writer_html(path: Path):
    def write(records: list, manager: Any) -> str:
        from ..report.html import write_html

        write_html(records, path)
        return f"gpu budget HTML: {path}"

    return write


def configure(manager: Any) -> BaselineGate:
    """Called by ``Manager.__init__``: add the baseline check and the report writers."""
    config: pytest.Config = manager.config
    gate = BaselineGate(manager)
    manager.checks.append(gate.check)
    manager.writers.append(gate.summary)
    invocation_dir = Path(config.invocation_params.dir)
    if config.getoption("gpu_budget_md", None):
        manager.writers.append(_writer_md(_resolve(config.getoption("gpu_budget_md"), invocation_dir)))
    if config.getoption("gpu_budget_html", None):
        manager.writers.append(_writer_html(_resolve(config.getoption("gpu_budget_html"), invocation_dir)))
    return gate
