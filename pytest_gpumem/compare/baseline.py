"""Baselines: remember what each test's GPU memory was, and fail the test when it grows.

The design card promises "fail on regressions": after an upgrade of trl / vllm / transformers, or a config
change, a test that used 14 GiB and now uses 17 GiB fails, says *which component grew* and *what changed*.

Storage (default ``.gpumem/baselines.json``, meant to be committed) is one JSON document::

    {"schema": "pytest-gpumem-baselines", "schema_version": 1, "written_by": "pytest-gpumem 0.1.0",
     "baselines": {"<test id>": {"<hardware key>": <record>}}}

keyed by test id and a *hardware key* (:func:`hardware_key`): the GPU name and total memory in measure mode,
so a change of CI runner does not raise false alarms (pytest-torch keys ``"{test}|{hardware_id}"`` the same
way), and ``"estimate"`` / ``"simulate"`` otherwise. A record (:func:`record_from_result`) holds the
per-phase breakdown, peak reserved, NVML peak, predicted peak, the software versions and the setup.

Concurrency: pytest-xdist workers write the same file. :meth:`BaselineStore.put` takes a ``filelock`` lock
next to the file, re-reads the file under the lock, writes a temporary file in the same directory and
``os.replace``-s it over the store — readers never see a half-written file and no writer's update is lost.

A corrupt or wrong-schema file is a :class:`BaselineStoreError` naming the file; it is never silently
replaced. A file written with an older schema is migrated in memory (:data:`MIGRATIONS`) or, where no
migration exists, refused with instructions.

Regression gating differs from pytest-benchmark (regressions raised at session end while the test shows as
passed) and pytest-memray (``--fail-on-increase`` with zero tolerance): the growth fails the test itself,
with a tolerance of percent *and* absolute bytes (``"5%+256MiB"``), and shrinking never fails.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..breakdown import Breakdown
from ..errors import GpuMemError
from ..record import MEASURED_PEAKS
from ..units import MIB, Tolerance, format_gib
from ..versions import PACKAGE_VERSION, installed_versions
from . import DEFAULT_BASELINE_PATH, DEFAULT_TOLERANCE

SCHEMA_NAME = "pytest-gpumem-baselines"
SCHEMA_VERSION = 1
#: seconds to wait for another process's lock before giving up with an explanation
LOCK_TIMEOUT_S = 120.0

#: Packages whose versions change GPU memory (and this package, whose model may change the estimate).
VERSIONED_PACKAGES = ("torch", "transformers", "trl", "vllm", "unsloth", "peft", "accelerate",
                      "bitsandbytes", "liger-kernel", "pytest-gpumem")

#: Older schema version -> function turning such a document into the next version's document.
#: Version 1 is the first released schema, so nothing needs migrating yet; a future schema change adds
#: ``MIGRATIONS[1] = _migrate_1_to_2`` here and :meth:`BaselineStore.load` chains them.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}


class BaselineStoreError(GpuMemError):
    """The baseline file cannot be used as it is (corrupt, wrong schema, locked): names the file."""


# -- hardware key ---------------------------------------------------------------------------------
def hardware_key(mode: str, gpu_name: str | None = None, total_bytes: int | None = None) -> str:
    """The second half of a baseline's key.

    ``measure``: ``"NVIDIA H100 80GB HBM3 (81559 MiB)"`` — the device name and its total memory in whole
    MiB (a MIG slice or a different board of the same name has a different total, and must not share a
    baseline). ``estimate`` / ``simulate``: the mode itself; their numbers do not depend on the runner.
    """
    if mode in ("estimate", "simulate"):
        return mode
    if mode != "measure":
        raise GpuMemError("mode", f"unknown mode {mode!r} for a baseline key",
                          fix="use one of 'estimate', 'simulate', 'measure'")
    if not gpu_name or total_bytes is None or int(total_bytes) <= 0:
        raise GpuMemError("gpu", f"measure-mode baselines are keyed by the GPU, but got name={gpu_name!r}, "
                          f"total_bytes={total_bytes!r}", fix="pass the CUDA device's name and total memory")
    return f"{' '.join(str(gpu_name).split())} ({int(total_bytes) // MIB} MiB)"


# -- software versions ----------------------------------------------------------------------------
def software_versions(packages: Iterable[str] = VERSIONED_PACKAGES) -> dict[str, str | None]:
    """Installed versions from package metadata (``None`` = not installed). Imports nothing heavy:
    ``importlib.metadata`` reads ``*.dist-info`` files, so this is milliseconds, not torch's seconds."""
    return {"python": platform.python_version(), **installed_versions(packages)}


# -- records --------------------------------------------------------------------------------------
def headline_peak_bytes(record: Mapping[str, Any]) -> tuple[str | None, int | None]:
    """The one number a baseline gates on, and its name.

    measure: NVML's device-level peak (it sees vLLM's and the CUDA context's non-torch memory too), else the
    caching allocator's peak reserved, else the measured breakdown's peak — the same order as the budget
    check (:data:`pytest_gpumem.record.MEASURED_PEAKS`), so the baseline and the budget speak of one number.
    estimate / simulate: the breakdown's peak (the prediction itself).
    """
    candidates = [key for key, _, _ in MEASURED_PEAKS] if record.get("mode") == "measure" else []
    for name in candidates:
        if record.get(name) is not None:
            return name, int(record[name])
    breakdown = record.get("breakdown")
    if breakdown and breakdown.get("phases") is not None:
        return "breakdown_peak_bytes", Breakdown.from_dict(breakdown).peak_bytes
    if record.get("predicted_peak_bytes") is not None:
        return "predicted_peak_bytes", int(record["predicted_peak_bytes"])
    return None, None


SOURCE_PEAK_LABELS = {"estimate": "estimated peak", "simulate": "simulated peak", "measure": "measured peak"}
METRIC_LABELS = {"peak_reserved_bytes": "peak reserved", "nvml_peak_bytes": "NVML device peak",
                 "breakdown_peak_bytes": "peak", "predicted_peak_bytes": "predicted peak"}


def record_from_result(result: Mapping[str, Any], *, versions: Mapping[str, str | None] | None = None,
                       recorded_at: str | None = None) -> dict[str, Any]:
    """The baseline record for one per-test result record (the JSON report's per-test entry).

    The stored breakdown is the measured one where there is one (measure, and simulate if it reports its
    simulation there), else the prediction.
    """
    measured = result.get("measured") or {}
    predicted = result.get("predicted")
    breakdown = measured.get("breakdown") or predicted
    gpu = result.get("gpu")
    record = {
        "mode": result.get("mode"),
        "breakdown": dict(breakdown) if breakdown else None,
        "peak_reserved_bytes": measured.get("peak_reserved_bytes"),
        "peak_allocated_bytes": measured.get("peak_allocated_bytes"),
        "nvml_peak_bytes": measured.get("nvml_peak_bytes"),
        "predicted_peak_bytes": predicted.get("peak_bytes") if predicted else None,
        "budget_bytes": result.get("budget_bytes"),
        "gpu": {"name": gpu["name"], "total_bytes": int(gpu["total_bytes"])} if gpu else None,
        "versions": dict(versions if versions is not None else software_versions()),
        "setup": dict(result["setup"]) if result.get("setup") else None,
        "recorded_at": recorded_at or datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    }
    record["peak_bytes"] = headline_peak_bytes(record)[1]
    return record


# -- the store ------------------------------------------------------------------------------------
_RECORD_INT_FIELDS = ("peak_bytes", "peak_reserved_bytes", "peak_allocated_bytes", "nvml_peak_bytes",
                      "predicted_peak_bytes", "budget_bytes")
_RECORD_DICT_FIELDS = ("breakdown", "versions", "setup", "gpu")


class BaselineStore:
    """The baseline file. Reads need no lock (the file is only ever replaced atomically); writes do.

    >>> store = BaselineStore(".gpumem/baselines.json")
    >>> store.put("tests/test_x.py::test_fits", "estimate", record)   # doctest: +SKIP
    >>> store.get("tests/test_x.py::test_fits", "estimate")           # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike = DEFAULT_BASELINE_PATH, *, lock_timeout_s: float = LOCK_TIMEOUT_S):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.lock_timeout_s = lock_timeout_s

    def __repr__(self) -> str:
        return f"BaselineStore({str(self.path)!r})"

    # -- reading ----------------------------------------------------------------------------------
    def load(self) -> dict[str, Any]:
        """The whole document (current schema), ``{"baselines": {}}``-shaped if the file does not exist."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return _empty_document()
        except OSError as exc:
            raise self._error(f"cannot read it ({exc.strerror or exc})", "check the path and its permissions") from None
        return self._parse(text)

    def get(self, test_id: str, key: str) -> dict[str, Any] | None:
        return self.load()["baselines"].get(test_id, {}).get(key)

    def keys_for(self, test_id: str) -> list[str]:
        """The hardware keys that have a baseline for ``test_id`` (to say "there is one for an A100")."""
        return sorted(self.load()["baselines"].get(test_id, {}))

    # -- writing ----------------------------------------------------------------------------------
    def put(self, test_id: str, key: str, record: Mapping[str, Any]) -> None:
        """Create or update one baseline: locked read-modify-write, then an atomic replace."""
        self.put_many([(test_id, key, record)])

    def put_many(self, items: Iterable[tuple[str, str, Mapping[str, Any]]]) -> None:
        items = list(items)
        for test_id, key, record in items:
            _validate_record(record, where=f"{test_id} [{key}]", error=self._error)
        with self._locked():
            document = self.load()
            for test_id, key, record in items:
                document["baselines"].setdefault(test_id, {})[key] = json.loads(json.dumps(dict(record)))
            self._write(document)

    def _locked(self):
        from filelock import FileLock, Timeout  # small and pure Python; only needed when writing

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_path), timeout=self.lock_timeout_s)

        class _Guard:
            def __enter__(guard):
                try:
                    lock.acquire()
                except Timeout:
                    raise BaselineStoreError(
                        str(self.path), f"could not take the lock {self.lock_path} within {self.lock_timeout_s:g} s",
                        fix="another pytest is writing baselines; if none is running, delete the .lock file") from None
                return guard

            def __exit__(guard, *exc_info):
                lock.release()
                return False

        return _Guard()

    def _write(self, document: dict[str, Any]) -> None:
        document["schema"] = SCHEMA_NAME
        document["schema_version"] = SCHEMA_VERSION
        document["written_by"] = f"pytest-gpumem {PACKAGE_VERSION}"
        # Sorted keys and a trailing newline: the committed file diffs cleanly in code review.
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            # mkstemp creates 0600; keep the existing file's mode (or a normal 0644) for a committed file
            try:
                mode = self.path.stat().st_mode & 0o777
            except FileNotFoundError:
                mode = 0o644
            os.chmod(tmp_name, mode)
            _replace(tmp_name, self.path)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise

    # -- validation -------------------------------------------------------------------------------
    def _error(self, problem: str, fix: str) -> BaselineStoreError:
        return BaselineStoreError(str(self.path), problem, fix)

    def _parse(self, text: str) -> dict[str, Any]:
        restore = (f"restore it from version control (git checkout -- {self.path}), or move it away and "
                   "re-record with --gpu-budget-save")
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise self._error(f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", restore) from None
        if not isinstance(document, dict) or document.get("schema") != SCHEMA_NAME:
            found = document.get("schema") if isinstance(document, dict) else type(document).__name__
            raise self._error(f"not a pytest-gpumem baseline file (schema {found!r}, expected {SCHEMA_NAME!r})",
                              f"point --gpu-budget-baseline at a baseline file, or {restore}")
        version = document.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise self._error(f"schema_version is {version!r}, expected an integer", restore)
        if version > SCHEMA_VERSION:
            raise self._error(f"written by a newer pytest-gpumem ({document.get('written_by', 'unknown')}, "
                              f"schema {version}; this one reads schema {SCHEMA_VERSION})",
                              "upgrade pytest-gpumem (pip install -U pytest-gpumem)")
        while version < SCHEMA_VERSION:
            migrate = MIGRATIONS.get(version)
            if migrate is None:
                raise self._error(
                    f"schema {version} ({document.get('written_by', 'unknown writer')}) is older than this "
                    f"pytest-gpumem's schema {SCHEMA_VERSION} and cannot be migrated",
                    "re-record the baselines: move the file away, run pytest with --gpu-budget-save and commit "
                    "the new file (or pin the pytest-gpumem version that wrote it)")
            document = migrate(document)
            version = document["schema_version"]
        baselines = document.get("baselines")
        if not isinstance(baselines, dict):
            raise self._error(f"'baselines' is {type(baselines).__name__}, expected an object", restore)
        for test_id, per_key in baselines.items():
            if not isinstance(per_key, dict):
                raise self._error(f"baselines[{test_id!r}] is {type(per_key).__name__}, expected an object "
                                  "keyed by hardware", restore)
            for key, record in per_key.items():
                _validate_record(record, where=f"baselines[{test_id!r}][{key!r}]",
                                 error=lambda p, f: self._error(p, restore))
        return document


def _replace(source: str, target: Path, attempts: int = 50) -> None:
    """``os.replace``; on Windows a reader holding the target open makes it fail briefly, so retry."""
    import time

    for attempt in range(attempts):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if os.name != "nt" or attempt == attempts - 1:
                raise
            time.sleep(0.02)


def _empty_document() -> dict[str, Any]:
    return {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "baselines": {}}


def _validate_record(record: Any, *, where: str, error: Callable[[str, str], Exception]) -> None:
    fix = "pass a record built by record_from_result()"
    if not isinstance(record, Mapping):
        raise error(f"{where} is {type(record).__name__}, expected an object", fix)
    for name in _RECORD_INT_FIELDS:
        value = record.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise error(f"{where}.{name} is {value!r}, expected a non-negative integer (bytes) or null", fix)
    for name in _RECORD_DICT_FIELDS:
        value = record.get(name)
        if value is not None and not isinstance(value, Mapping):
            raise error(f"{where}.{name} is {type(value).__name__}, expected an object or null", fix)
    breakdown = record.get("breakdown")
    if breakdown is not None:
        phases = breakdown.get("phases")
        if not isinstance(phases, Mapping) or not all(
                isinstance(c, Mapping) and all(isinstance(b, int) and not isinstance(b, bool) for b in c.values())
                for c in phases.values()):
            raise error(f"{where}.breakdown.phases must map phase -> component -> bytes (integers)", fix)
    if headline_peak_bytes(record)[1] is None:
        raise error(f"{where} has no peak to compare (no peak_bytes, breakdown or measurement)", fix)


# -- comparing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """One test's current memory against its baseline."""

    metric: str  # peak_reserved_bytes | nvml_peak_bytes | breakdown_peak_bytes | predicted_peak_bytes
    baseline_bytes: int
    current_bytes: int
    tolerance: Tolerance
    allowed_growth_bytes: int
    #: "grew" (beyond tolerance: a regression), "shrank" (below by more than the tolerance), "same"
    status: str
    #: (phase, component, delta bytes) from Breakdown.diff, largest growth first; peak phase first
    grown_components: tuple[tuple[str, str, int], ...] = ()
    shrunk_components: tuple[tuple[str, str, int], ...] = ()
    baseline_peak_phase: str | None = None
    current_peak_phase: str | None = None
    #: package -> (baseline version, current version); None = not installed
    changed_versions: Mapping[str, tuple[Any, Any]] = field(default_factory=dict)
    #: setup field -> (baseline value, current value)
    changed_setup: Mapping[str, tuple[Any, Any]] = field(default_factory=dict)
    #: other measurements that moved (e.g. NVML's peak when gating on reserved): name -> (baseline, current)
    other_metrics: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    baseline_recorded_at: str | None = None
    #: who produced the breakdowns ("estimate", "simulate", "measure"), for the wording
    breakdown_source: str | None = None

    @property
    def delta_bytes(self) -> int:
        return self.current_bytes - self.baseline_bytes

    @property
    def regressed(self) -> bool:
        return self.status == "grew"

    def summary(self) -> str:
        """One line: ``NVML device peak 17.00 GiB vs baseline 14.00 GiB (+3.00 GiB, +21.4%)``."""
        label = METRIC_LABELS.get(self.metric, self.metric)
        if self.metric == "breakdown_peak_bytes" and self.breakdown_source in SOURCE_PEAK_LABELS:
            label = SOURCE_PEAK_LABELS[self.breakdown_source]
        return (f"{label} {format_gib(self.current_bytes)} vs baseline {format_gib(self.baseline_bytes)} "
                f"({_signed_gib(self.delta_bytes)}{_percent(self.delta_bytes, self.baseline_bytes)})")

    def message(self, max_components: int = 5) -> str:
        """The failure (or report) text: what grew, by how much, against which tolerance, and what changed."""
        if self.status == "grew":
            head = (f"GPU memory regression: {self.summary()}, beyond the tolerance {self.tolerance} "
                    f"(allows +{format_gib(self.allowed_growth_bytes)}).")
        elif self.status == "shrank":
            head = (f"GPU memory shrank: {self.summary()}; re-record with --gpu-budget-save to tighten "
                    "the baseline.")
        else:
            head = f"GPU memory within tolerance {self.tolerance} of the baseline: {self.summary()}."
        lines = [head]
        components = self.grown_components if self.status != "shrank" else self.shrunk_components
        # name the parts that matter: at least 1 MiB and 2% of the change (allocator rounding is noise)
        floor = max(MIB, abs(self.delta_bytes) * 0.02)
        significant = [c for c in components if abs(c[2]) >= floor]
        if significant:
            word = "Grew" if self.status != "shrank" else "Shrank"
            shown = ", ".join(f"{phase}/{name} {_signed_gib(delta)}"
                              for phase, name, delta in significant[:max_components])
            hidden = len(components) - min(len(significant), max_components)
            more = f" (and {hidden} smaller or in other phases)" if hidden else ""
            lines.append(f"{word}: {shown}{more}.")
        elif self.status == "grew":
            lines.append("No component breakdown to attribute the growth to.")
        if self.baseline_peak_phase and self.current_peak_phase and self.baseline_peak_phase != self.current_peak_phase:
            lines.append(f"Peak phase moved: {self.baseline_peak_phase} -> {self.current_peak_phase}.")
        for name, (before, after) in self.other_metrics.items():
            lines.append(f"{METRIC_LABELS.get(name, name)}: {format_gib(after)} vs baseline {format_gib(before)} "
                         f"({_signed_gib(after - before)}).")
        changes = [f"{pkg} {_version_text(old)} -> {_version_text(new)}"
                   for pkg, (old, new) in self.changed_versions.items()]
        changes += [f"setup.{name} {_value_text(old)} -> {_value_text(new)}"
                    for name, (old, new) in self.changed_setup.items()]
        if changes:
            lines.append("Changed since the baseline: " + "; ".join(changes) + ".")
        elif self.status == "grew":
            lines.append("No version or setup change recorded since the baseline.")
        if self.baseline_recorded_at and self.status == "grew":
            lines.append(f"Baseline recorded {self.baseline_recorded_at}; if the growth is expected, re-record "
                         "with --gpu-budget-save.")
        return "\n".join(lines)

    def to_result(self) -> dict[str, Any]:
        """The per-test result record's ``"baseline"`` entry."""
        return {"peak_bytes": self.baseline_bytes, "delta_bytes": self.delta_bytes, "status": self.status,
                "message": self.message(), "metric": self.metric, "tolerance": str(self.tolerance)}


def compare(baseline_record: Mapping[str, Any], current_record: Mapping[str, Any],
            tolerance: "Tolerance | str") -> Comparison:
    """Compare two baseline records (:func:`record_from_result`) under ``tolerance``.

    Gates on :func:`headline_peak_bytes` of the baseline, using the same metric for the current record when
    it has it (so a measure run compares reserved with reserved); growth beyond ``tolerance`` is ``"grew"``.
    """
    tolerance = Tolerance.parse(tolerance)
    metric, baseline_bytes = headline_peak_bytes(baseline_record)
    current_bytes = _metric_value(current_record, metric)
    if current_bytes is None:  # the current run lacks the baseline's metric: fall back to its own headline
        metric, current_bytes = headline_peak_bytes(current_record)
        baseline_bytes = _metric_value(baseline_record, metric) if metric else None
        if baseline_bytes is None:
            baseline_bytes = headline_peak_bytes(baseline_record)[1]
    if baseline_bytes is None or current_bytes is None:
        raise GpuMemError("baseline", "nothing to compare: a record has no peak",
                          fix="record with record_from_result()")
    allowed = tolerance.allowed_bytes(baseline_bytes)
    delta = current_bytes - baseline_bytes
    status = "grew" if delta > allowed else "shrank" if -delta > allowed else "same"

    grown: list[tuple[str, str, int]] = []
    shrunk: list[tuple[str, str, int]] = []
    baseline_phase = current_phase = None
    if baseline_record.get("breakdown") and current_record.get("breakdown"):
        before = Breakdown.from_dict(baseline_record["breakdown"])
        after = Breakdown.from_dict(current_record["breakdown"])
        baseline_phase, current_phase = before.peak_phase, after.peak_phase
        for phase, deltas in before.diff(after).items():
            for name, change in deltas.items():
                (grown if change > 0 else shrunk).append((phase, name, change))
        # the phase that sets the peak now comes first: that is where the growth matters
        grown.sort(key=lambda item: (item[0] != current_phase, -item[2], item[0], item[1]))
        shrunk.sort(key=lambda item: (item[0] != current_phase, item[2], item[0], item[1]))

    other: dict[str, tuple[int, int]] = {}
    for name in ("peak_reserved_bytes", "nvml_peak_bytes", "predicted_peak_bytes"):
        before_value, after_value = baseline_record.get(name), current_record.get(name)
        if (name != metric and before_value is not None and after_value is not None and before_value != after_value
                and (before_value, after_value) != (baseline_bytes, current_bytes)):  # not the headline again
            other[name] = (int(before_value), int(after_value))

    return Comparison(
        metric=metric, baseline_bytes=int(baseline_bytes), current_bytes=int(current_bytes), tolerance=tolerance,
        allowed_growth_bytes=allowed, status=status, grown_components=tuple(grown), shrunk_components=tuple(shrunk),
        baseline_peak_phase=baseline_phase, current_peak_phase=current_phase,
        changed_versions=_changed(baseline_record.get("versions") or {}, current_record.get("versions") or {}),
        changed_setup=_changed(baseline_record.get("setup") or {}, current_record.get("setup") or {}),
        other_metrics=other, baseline_recorded_at=baseline_record.get("recorded_at"),
        breakdown_source=(current_record.get("breakdown") or baseline_record.get("breakdown") or {}).get("source"))


@dataclass(frozen=True)
class BaselineOutcome:
    """What :func:`check_against_baseline` found: ``failure_message`` is ``None`` unless the test must fail;
    ``result`` is the per-test result record's ``"baseline"`` entry (``None`` when nothing was measured)."""

    failure_message: str | None
    result: dict[str, Any] | None
    comparison: Comparison | None = None
    saved: bool = False

    @property
    def failed(self) -> bool:
        return self.failure_message is not None


def check_against_baseline(store: BaselineStore, test_id: str, key: str, current_record: Mapping[str, Any],
                           tolerance: "Tolerance | str" = DEFAULT_TOLERANCE, *, strict: bool = False,
                           save: bool = False) -> BaselineOutcome:
    """Compare one test with its baseline (and record it when ``save``): the one call the plugin makes.

    - baseline exists: growth beyond ``tolerance`` fails (unless ``save``: re-recording accepts the new
      numbers, and the comparison with the old baseline is still reported); shrinking is reported.
    - no baseline: reported as ``"missing"``; fails only when ``strict`` (and not ``save``).
    - ``save``: the current record replaces the baseline (locked read-modify-write).
    """
    tolerance = Tolerance.parse(tolerance)
    current_peak = headline_peak_bytes(current_record)[1]
    if current_peak is None:
        return BaselineOutcome(None, None)
    baseline_record = store.get(test_id, key)
    if save:
        store.put(test_id, key, current_record)
    if baseline_record is None:
        others = [k for k in store.keys_for(test_id) if k != key] if not save else []
        if save:
            message = f"baseline recorded for [{key}] in {store.path}: {format_gib(current_peak)}"
        else:
            message = f"no baseline for [{key}] in {store.path}; record one with --gpu-budget-save"
            if others:
                message += f" (baselines exist for: {', '.join(others)})"
        result = {"peak_bytes": None, "delta_bytes": None, "status": "missing", "message": message}
        failure = message if strict and not save else None
        if failure:
            failure = f"--gpu-budget-strict: {message}"
        return BaselineOutcome(failure, result, saved=save)
    comparison = compare(baseline_record, current_record, tolerance)
    result = comparison.to_result()
    if save:
        result["message"] = f"baseline updated in {store.path} (was: {comparison.summary()})"
    failure = comparison.message() if comparison.regressed and not save else None
    return BaselineOutcome(failure, result, comparison, saved=save)


# -- helpers --------------------------------------------------------------------------------------
def _metric_value(record: Mapping[str, Any], metric: str | None) -> int | None:
    if metric is None:
        return None
    if metric == "breakdown_peak_bytes":
        breakdown = record.get("breakdown")
        return Breakdown.from_dict(breakdown).peak_bytes if breakdown and breakdown.get("phases") is not None else None
    value = record.get(metric)
    return int(value) if value is not None else None


def _changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    changed = {}
    for name in list(before) + [n for n in after if n not in before]:
        old, new = before.get(name), after.get(name)
        # compare through JSON so a tuple from a live setup equals the list read back from the file
        if json.dumps(old, sort_keys=True, default=str) != json.dumps(new, sort_keys=True, default=str):
            changed[name] = (old, new)
    return changed


def _signed_gib(num_bytes: int) -> str:
    return ("+" if num_bytes >= 0 else "-") + format_gib(abs(num_bytes))


def _percent(delta: int, base: int) -> str:
    return f", {delta / base * 100:+.1f}%" if base else ""


def _version_text(version: Any) -> str:
    return "(not installed)" if version is None else str(version)


def _value_text(value: Any) -> str:
    return "(unset)" if value is None else json.dumps(value, default=str) if not isinstance(value, str) else value
