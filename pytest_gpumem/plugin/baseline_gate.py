"""Baselines in a pytest session (``--gpu-budget-save``, ``--gpu-budget-baseline``, ``--gpu-budget-strict``,
``--gpu-budget-baseline-tolerance``): the session's settings and one more per-test check.

The check is one more ``Manager.checks`` entry, so a regression fails *the test itself* (pytest-benchmark
raises it at session end while the test shows as passed); the summary line is one more ``Manager.writers``
entry, run once on the xdist controller with every worker's records. Comparison is opt-in by the file:
without a baseline file, ``--gpu-budget-save`` or ``--gpu-budget-strict`` no test is compared and nothing is
reported about baselines. The store and the comparison themselves are ``compare/baseline.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping

import pytest

from ..compare.baseline import (
    DEFAULT_BASELINE_PATH,
    DEFAULT_TOLERANCE,
    BaselineStore,
    check_against_baseline,
    hardware_key,
    record_from_result,
    software_versions,
)
from ..errors import GpuMemError
from ..record import BudgetSpec
from ..report.text import short_nodeid, wrapped
from ..units import Tolerance, format_gib
from .options import ini_bool, ini_value, resolve_path


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
            path = resolve_path(cli_path, invocation_dir)
        elif ini_path:  # relative to the ini file, like the file it sits next to
            path = resolve_path(ini_path, Path(config.inipath).parent if config.inipath else Path(config.rootpath))
        else:
            path = Path(config.rootpath) / DEFAULT_BASELINE_PATH
        self.store = BaselineStore(path)
        text = (config.getoption("gpu_budget_baseline_tolerance", None)
                or ini_value(config, "gpu_budget_baseline_tolerance"))
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

    def tolerance_for(self, spec: BudgetSpec | None) -> Tolerance:
        """The test's own ``baseline_tolerance=`` (read with its marker), else the session's."""
        return spec.baseline_tolerance if spec is not None and spec.baseline_tolerance is not None else self.tolerance

    def check(self, record: dict, spec: BudgetSpec | None = None) -> str | None:
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
                                             self.tolerance_for(spec), strict=self.strict, save=self.save)
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
        lines = [f"gpu budget baselines {action} {self.store.path}: {', '.join(parts)}"]  # a path is not wrapped
        for record in compared:
            baseline = record["baseline"]
            if baseline["status"] in ("grew", "shrank"):
                # the figures only: a regression's whole text is its test's failure, listed once by pytest
                delta, base = baseline.get("delta_bytes"), baseline.get("peak_bytes")
                change = "" if delta is None else (f"{'+' if delta >= 0 else '−'}{format_gib(abs(delta))}"
                                                   + (f" ({delta / base:+.1%})" if base else "")
                                                   + (f" vs baseline {format_gib(base)}" if base else ""))
                nodeid = short_nodeid(record["nodeid"], 70)
                line = f"  {baseline['status'].upper()} {nodeid}: {change or baseline['message']}"
                lines += wrapped(line, indent="      ")
        if counts.get("missing") and not self.save:
            lines.append("  (record missing baselines with --gpu-budget-save and commit the file)")
        return "\n".join(lines)


def _for_baseline(record: Mapping[str, Any]) -> dict:
    """The record with the prediction trimmed to its breakdown (assumptions and warnings stay in the JSON)."""
    trimmed = dict(record)
    predicted = record.get("predicted")
    if predicted:
        trimmed["predicted"] = {k: predicted[k] for k in ("source", "phases", "peak_phase", "peak_bytes")
                                if k in predicted}
    return trimmed
