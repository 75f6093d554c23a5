"""The pytest plugin: ``@pytest.mark.gpu_budget``, ``pytest --gpu-budget``, the summary and the JSON report.

Thin glue in pytest-memray's shape (shared/docs/anchors.md): the module-level hooks only register options,
the marker and the fixtures; when ``--gpu-budget`` (or ini ``gpu_budget = true``) is on, ``pytest_configure``
registers one :class:`Manager` that does the work. Without it the plugin is inert: marked tests run as plain
tests and nothing heavy is imported (no torch, ever, from this module).

Per budgeted test the Manager keeps a :class:`TestState`; after the test body it builds the test's *record*
(the JSON report's per-test entry)::

    {"nodeid", "mode": "estimate"|"simulate"|"measure", "budget_bytes", "budget_text": "17 GB = 15.83 GiB",
     "setup": {...}|None, "predicted": Breakdown.to_dict() (+ assumptions, warnings, largest allocation)|None,
     "measured": {"breakdown", "peak_reserved_bytes", "peak_allocated_bytes", "nvml_peak_bytes",
                  "reasons": {field: why missing}} (+ "run": RunResult.to_dict() in measure mode)|None,
     "baseline": {...}|None, "gpu": {"name", "total_bytes"}|None,
     "verdict": "passed"|"failed"|"error"|"xfailed"|"skipped", "reason": str|None}

runs ``Manager.checks`` on it (each ``check(record, item) -> failure message | None``) and fails the test
itself when one returns a message. Records travel on the test reports (``report.gpumem_record``), so under
pytest-xdist the controller receives every worker's records with the reports and writes the one summary
and the one JSON; at session end ``Manager.writers`` get the list of records.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from . import marker as marks
from ..errors import GpuMemError
from ..measure import device
from .fixtures import gpu_memory, grpo_step  # noqa: F401 - registers the fixtures with pytest
from .options import ini_bool, ini_value
from ..units import format_gib
from ..versions import PACKAGE_VERSION

MODES = ("auto", "estimate", "simulate", "measure")
OFF = "off"
REPORT_SECTION = "gpu budget"
SIMULATE_MODULE = "pytest_gpumem.predict.faketensor"
RUNNER_MODULE = "pytest_gpumem.measure.runner"
#: steps the runner measures (the first builds optimizer states; the second is the steady state)
MEASURE_STEPS = 2

STATE_KEY = pytest.StashKey["TestState"]()
MANAGER_KEY = pytest.StashKey["Manager"]()


class GpuBudgetFailure(AssertionError):
    """A budget check failed: the test fails with this message (first line = the one-line reason)."""


class MarkerArgumentError(Exception):
    """Raised at setup of a test whose ``gpu_budget`` marker could not be read at collection."""


# -- options -------------------------------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gpumem", "GPU memory budgets of GRPO training (pytest-gpumem)")
    group.addoption("--gpu-budget", dest="gpu_budget", nargs="?", const="", default=None, metavar="MODE",
                    help="judge tests marked gpu_budget: auto (default: measure on a CUDA machine, estimate "
                         "elsewhere), estimate, simulate, measure; 'off' disables an ini 'gpu_budget = true'")
    group.addoption("--gpu-budget-default", dest="gpu_budget_default", default=None, metavar="SIZE",
                    help="budget of marked tests that give none, e.g. '24 GiB' (ini gpu_budget_default)")
    group.addoption("--gpu-budget-gpu", dest="gpu_budget_gpu", default=None, metavar="GPU",
                    help="card to judge against when no GPU is present: a name (L4, A100-80GB) or a size "
                         "(24GiB); default: the budget is the card size (ini gpu_budget_gpu)")
    group.addoption("--gpu-budget-json", dest="gpu_budget_json", default=None, metavar="PATH",
                    help="write the GPU budget results as JSON (versioned schema) to PATH")
    parser.addini("gpu_budget", type="bool", default=False,
                  help="pytest-gpumem: judge gpu_budget tests in every run (like --gpu-budget)")
    parser.addini("gpu_budget_mode", default="auto", help="pytest-gpumem: auto, estimate, simulate or measure")
    parser.addini("gpu_budget_default", default="", help="pytest-gpumem: default budget, e.g. '24 GiB'")
    parser.addini("gpu_budget_gpu", default="", help="pytest-gpumem: card to judge against, e.g. 'L4' or '24GiB'")
    from . import baseline_gate as baseline_plugin  # --gpu-budget-save/-baseline/-strict/-baseline-tolerance, --gpu-budget-md/-html

    baseline_plugin.add_options(group, parser)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    """``pytest --gpu-budget examples/``: argparse would read ``examples/`` as the mode (``nargs="?"``); a
    value that is not a mode is left as a path, and ``--gpu-budget`` means "on, mode from ini or auto"."""
    for index, arg in enumerate(args[:-1]):
        if arg == "--gpu-budget":
            following = args[index + 1]
            if not following.startswith("-") and following.lower() not in MODES + (OFF,):
                args[index] = "--gpu-budget="


def resolve_mode(config: pytest.Config) -> tuple[str | None, str]:
    """The session's mode (None = inert) and why. CLI overrides ini; ``auto`` is decided here."""
    cli = config.getoption("gpu_budget", None)
    if cli is not None and cli.strip().lower() == OFF:
        return None, "--gpu-budget=off"
    if cli is None and not ini_bool(config, "gpu_budget"):
        return None, "--gpu-budget not given"
    requested = (cli or "").strip().lower() or str(ini_value(config, "gpu_budget_mode") or "auto").strip().lower()
    source = "--gpu-budget" if (cli or "").strip() else "ini gpu_budget_mode"
    if requested not in MODES:
        raise pytest.UsageError(f"pytest-gpumem: {source}: unknown mode {requested!r}; use one of "
                                f"{', '.join(MODES)} (or --gpu-budget=off)")
    simulate_ok = importlib.util.find_spec(SIMULATE_MODULE) is not None
    runner_ok = importlib.util.find_spec(RUNNER_MODULE) is not None
    if requested == "simulate" and not simulate_ok:
        raise pytest.UsageError("pytest-gpumem: --gpu-budget=simulate is not available in this installation "
                                f"({SIMULATE_MODULE} is missing); install pytest-gpumem[sim] or use "
                                "--gpu-budget=estimate")
    if requested == "measure" and not runner_ok:
        raise pytest.UsageError("pytest-gpumem: --gpu-budget=measure is not available in this installation "
                                f"({RUNNER_MODULE} is missing); install pytest-gpumem[trl] or use "
                                "--gpu-budget=estimate")
    if requested != "auto":
        return requested, f"{source}={requested}"
    if not device.cuda_available():
        return "estimate", "auto: no CUDA device, so estimate"
    if not runner_ok:
        return "estimate", f"auto: a CUDA device is present but {RUNNER_MODULE} is not installed, so estimate"
    return "measure", "auto: a CUDA device is present, so measure"


def _defaults(config: pytest.Config) -> marks.Defaults:
    size = config.getoption("gpu_budget_default", None) or ini_value(config, "gpu_budget_default")
    gpu = config.getoption("gpu_budget_gpu", None) or ini_value(config, "gpu_budget_gpu")
    budget_bytes = budget_text = gpu_spec = None
    try:
        if size:
            budget_bytes, unit = marks.parse_size_string(size, "gpu_budget_default")
            budget_text = marks.budget_text(budget_bytes, unit)
        if gpu:
            from ..gpus import resolve_gpu

            gpu_spec = resolve_gpu(gpu, field="gpu_budget_gpu")
    except GpuMemError as exc:
        raise pytest.UsageError(f"pytest-gpumem: {exc}") from None
    return marks.Defaults(budget_bytes=budget_bytes, budget_text=budget_text, gpu=gpu_spec)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", marks.MARKER_HELP)
    mode, reason = resolve_mode(config)
    if mode is None:
        return
    manager = Manager(config, mode, reason, _defaults(config), config.getoption("gpu_budget_json", None))
    config.stash[MANAGER_KEY] = manager
    config.pluginmanager.register(manager, "gpumem-manager")


def pytest_unconfigure(config: pytest.Config) -> None:
    manager = config.stash.get(MANAGER_KEY, None)
    if manager is not None:
        config.pluginmanager.unregister(manager)
        del config.stash[MANAGER_KEY]


# -- per-test state and record helpers -------------------------------------------------------------------------
@dataclass
class TestState:
    """What the plugin knows about one budgeted test."""

    __test__ = False  # not a test class, whatever pytest's python_classes says

    spec: marks.BudgetSpec | None = None
    error: str | None = None  # the marker could not be read: the test errors at setup with this text
    steps: list = field(default_factory=list)  # StepResults of grpo_step calls (or of the marker's setup)
    trackers: list = field(default_factory=list)  # GpuMemory objects handed to the test
    record: dict | None = None
    failures: list = field(default_factory=list)
    levers: list = field(default_factory=list)


def predicted_dict(estimate: Any, spec: marks.BudgetSpec | None) -> dict:
    """The record's ``predicted``: the estimate's Breakdown.to_dict() plus what it assumed and warns."""
    data = estimate.breakdown.to_dict()
    assumptions = list(estimate.assumptions)
    if spec is not None and spec.gpu is None and spec.budget_bytes is not None:
        if estimate.setup.use_vllm and estimate.setup.vllm_mode == "colocate":
            assumptions.append(f"no gpu given: the {spec.budget_text} budget is taken as the card size, so vLLM "
                               f"reserves gpu_memory_utilization × {spec.budget_text.split(' = ')[0]} "
                               "(pass gpu='L4' or --gpu-budget-gpu for a real card)")
        else:
            assumptions.append(f"no gpu given: judged against the {spec.budget_text} budget as the card size")
    data.update(assumptions=assumptions, warnings=list(estimate.warnings),
                largest_allocation_bytes=estimate.largest_allocation_bytes,
                largest_allocation_name=estimate.largest_allocation_name)
    return data


def _measured_from_run(run: Any) -> dict:
    breakdown = getattr(run, "breakdown", None)
    reasons = dict(getattr(run, "reasons", None) or {})
    for name in ("peak_reserved_bytes", "peak_allocated_bytes", "nvml_peak_bytes"):
        if getattr(run, name, None) is None and name not in reasons:
            reasons[name] = f"not measured: {getattr(run, 'reason', None) or 'the runner did not report it'}"
    return {"breakdown": breakdown.to_dict() if breakdown is not None else None,
            "peak_reserved_bytes": getattr(run, "peak_reserved_bytes", None),
            "peak_allocated_bytes": getattr(run, "peak_allocated_bytes", None),
            "nvml_peak_bytes": getattr(run, "nvml_peak_bytes", None), "reasons": reasons,
            "run": run.to_dict() if hasattr(run, "to_dict") else {"status": getattr(run, "status", None),
                                                                   "reason": getattr(run, "reason", None)}}


def _crash_line(report: pytest.TestReport) -> str | None:
    longrepr = report.longrepr
    if longrepr is None:
        return None
    if isinstance(longrepr, str):
        text = longrepr
    elif isinstance(longrepr, tuple):  # a skip: (path, line, reason)
        text = str(longrepr[2])
    else:
        crash = getattr(longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(longrepr)
    return text.strip().splitlines()[0] if text.strip() else None


# -- the manager -----------------------------------------------------------------------------------------------
class Manager:
    """Everything the plugin does once ``--gpu-budget`` is on. Registered as a pytest plugin."""

    def __init__(self, config: pytest.Config, mode: str, mode_reason: str, defaults: marks.Defaults,
                 json_path: str | None):
        self.config = config
        self.mode = mode
        self.mode_reason = mode_reason
        self.defaults = defaults
        self.json_path = json_path
        self.started_at = time.time()
        self.records: dict[str, dict] = {}  # nodeid -> record, in report order (xdist: from every worker)
        self.collection_errors: dict[str, str] = {}
        self.written: list[str] = []  # lines for the terminal summary from the writers
        self._device_gpu: Any = None
        # ---- per-test checks: each check(record, item) -> failure message | None. Add new checks here. ----
        self.checks: list[Callable[[dict, Any], str | None]] = list(marks.DEFAULT_CHECKS)
        # ---- session-end writers: each writer(records: list[dict], manager) -> summary line | None. --------
        self.writers: list[Callable[[list, "Manager"], str | None]] = []
        if json_path:
            self.writers.append(write_json_report)
        from . import baseline_gate as baseline_plugin  # baselines: one more check; Markdown/HTML reports: more writers

        baseline_plugin.configure(self)

    @property
    def is_worker(self) -> bool:
        return hasattr(self.config, "workerinput")

    # -- header ---------------------------------------------------------------------------------------------
    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        line = f"gpumem: mode={self.mode} ({self.mode_reason})"
        if self.defaults.budget_text:
            line += f", default budget {self.defaults.budget_text}"
        line += f", judged on {self.defaults.gpu.name}" if self.defaults.gpu else ", no gpu given (budget = card size)"
        return [line]

    # -- collection: read every marker once; errors become errors of that test ------------------------------
    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        for item in items:
            marker = item.get_closest_marker(marks.MARKER)
            uses_fixture = bool({"grpo_step", "gpu_memory"} & set(getattr(item, "fixturenames", ())))
            if marker is None and not (uses_fixture and self.defaults.budget_bytes is not None):
                continue
            state = TestState()
            try:
                if marker is None:
                    state.spec = marks.default_spec(self.defaults)
                else:
                    base_dirs = (Path(item.path).parent,) if getattr(item, "path", None) else ()
                    state.spec = marks.spec_from_marker(marker.args, marker.kwargs, self.defaults, base_dirs)
            except Exception as exc:  # noqa: BLE001 - any failure to read a marker is that test's error
                state.error = marks.describe_error(exc, marker.kwargs if marker is not None else None)
                self.collection_errors[item.nodeid] = state.error
            item.stash[STATE_KEY] = state

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        state = item.stash.get(STATE_KEY, None)
        if state is not None and state.error is not None:
            raise MarkerArgumentError(state.error)

    # -- after the test body: predict / measure, check, fail the test itself -------------------------------
    @pytest.hookimpl(trylast=True)
    def pytest_runtest_call(self, item: pytest.Item) -> None:
        """Runs after pytest's own ``pytest_runtest_call`` has run the body without an exception."""
        state = item.stash.get(STATE_KEY, None)
        if state is None or state.spec is None:
            return
        __tracebackhide__ = True
        if not state.steps and state.spec.setup is not None:
            state.steps.append(self.run_step(state.spec.setup, state.spec))
        record = self.make_record(item, state)
        state.failures = [message for check in self.checks if (message := check(record, item))]
        if state.failures:
            record["reason"] = state.failures[0]  # the whole failure text once the levers are known (below)
            # levers answer "too big", not "the prediction was off"
            if any(check(record, item) for check in (marks.check_peak_within_budget, marks.check_vllm_can_start,
                                                      marks.check_run_completed)):
                state.levers = self._levers(state)
            record["reason"] = self.failure_text(state, section_hint=False)
            raise GpuBudgetFailure(self.failure_text(state))

    def run_step(self, setup: Any, spec: marks.BudgetSpec | None) -> Any:
        """One setup in this session's mode → a :class:`~pytest_gpumem.fixtures.StepResult`."""
        from ..predict.analytic import estimate
        from .fixtures import StepResult

        gpu = spec.gpu if spec is not None else None
        if self.mode == "measure" and gpu is None:
            gpu = self.device_gpu()
        if gpu is None and spec is not None:
            gpu = spec.judge_gpu()
        predicted_estimate = estimate(setup, gpu=gpu)
        predicted = predicted_dict(predicted_estimate, spec if self.mode != "measure" else None)
        if self.mode == "simulate":
            simulate = importlib.import_module(SIMULATE_MODULE).simulate
            simulated = simulate(setup)
            predicted = {**simulated.to_dict(), "assumptions": predicted["assumptions"],
                         "warnings": predicted["warnings"]}
        result = StepResult(self.mode, setup, predicted_estimate, predicted)
        if self.mode == "measure":
            runner = importlib.import_module(RUNNER_MODULE)
            run = runner.run(setup, steps=MEASURE_STEPS, device="cuda")
            result.run = run
            if getattr(run, "status", None) == "skipped":
                message = f"gpu budget: the measured run was skipped: {getattr(run, 'reason', '')}"
                try:  # reported at the test's location, not this line of the plugin
                    raise pytest.skip.Exception(message, _use_item_location=True)
                except TypeError:  # pytest < 7.1
                    pytest.skip(message)
            result.measured = _measured_from_run(run)
        return result

    def device_gpu(self) -> Any:
        if self._device_gpu is None:
            self._device_gpu = device.device_gpu()
        return self._device_gpu

    def make_record(self, item: pytest.Item, state: TestState) -> dict:
        """The per-test record (see the module docstring) from what the test produced so far."""
        spec = state.spec
        step = max(state.steps, key=lambda s: s.peak_bytes or 0) if state.steps else None
        measured = step.measured if step is not None else None
        tracked = [t.measurement for t in state.trackers if t.measurement.blocks]
        if measured is None and tracked:
            best = max(tracked, key=lambda m: m.measured)
            measured = best.to_dict()
        gpu = None
        if step is not None and step.estimate.gpu is not None:
            gpu = {"name": step.estimate.gpu.name, "total_bytes": step.estimate.gpu.total_bytes}
        elif spec is not None and spec.judge_gpu() is not None:
            judge = spec.judge_gpu()
            gpu = {"name": judge.name, "total_bytes": judge.total_bytes}
        record = {
            "nodeid": item.nodeid, "mode": self.mode,
            "budget_bytes": spec.budget_bytes if spec else None, "budget_text": spec.budget_text if spec else None,
            "setup": step.setup.to_dict() if step is not None else (spec.setup.to_dict() if spec and spec.setup
                                                                    else None),
            "predicted": step.predicted if step is not None else None, "measured": measured,
            "baseline": None, "gpu": gpu, "verdict": None, "reason": None,
        }
        state.record = record
        return record

    def _levers(self, state: TestState) -> list[str]:
        """explain.levers_for: the top three changes that bring the peak down (when explain is installed)."""
        step = max(state.steps, key=lambda s: s.peak_bytes or 0) if state.steps else None
        if step is None or importlib.util.find_spec("pytest_gpumem.diagnose.explain") is None:
            return []
        try:
            from ..diagnose.levers import levers_for

            levers = levers_for(step.estimate, budget_bytes=state.spec.budget_bytes, n=3)
            return [lever.line() for lever in levers]
        except Exception as exc:  # noqa: BLE001 - advice must never hide the failure it explains
            return [f"(levers unavailable: {type(exc).__name__}: {exc})"]

    def failure_text(self, state: TestState, section_hint: bool = True) -> str:
        lines = list(state.failures)
        record = state.record or {}
        predicted = record.get("predicted") or {}
        if predicted.get("largest_allocation_name"):
            lines.append(f"largest single allocation: {predicted['largest_allocation_name']} = "
                         f"{format_gib(predicted.get('largest_allocation_bytes') or 0)}")
        if state.levers:
            if predicted.get("source", "estimate") == "estimate" and not record.get("measured"):
                lines.append("top levers (each re-estimated):")
            else:
                step = max(state.steps, key=lambda s: s.peak_bytes or 0)
                lines.append(f"top levers (re-estimated by the analytic model, which predicts "
                             f"{format_gib(step.estimate.peak_bytes)} for this setup):")
            lines += [f"  {number}. {line}" for number, line in enumerate(state.levers, 1)]
        if section_hint:
            lines.append(f"(mode {record.get('mode')}; the breakdown by phase is in the '{REPORT_SECTION}' section)")
        return "\n".join(lines)

    # -- the report ----------------------------------------------------------------------------------------
    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        outcome = yield
        state = item.stash.get(STATE_KEY, None)
        if state is None:
            return
        report: pytest.TestReport = outcome.get_result()
        if report.when == "setup" and call.excinfo is not None and call.excinfo.errisinstance(MarkerArgumentError):
            report.longrepr = state.error
        if report.when == "teardown" or (report.when == "setup" and report.passed):
            return
        record = state.record if state.record is not None else (self.make_record(item, state) if state.spec
                                                                 else self._error_record(item, state))
        budget_failure = call.excinfo is not None and call.excinfo.errisinstance(GpuBudgetFailure)
        if budget_failure:
            report.longrepr = self.failure_text(state)
            report.gpumem_budget_failure = True
        if hasattr(report, "wasxfail") and report.skipped:
            record["verdict"] = "xfailed"
        elif report.skipped:
            record["verdict"] = "skipped"
        elif report.failed:
            record["verdict"] = "error" if report.when == "setup" else "failed"
        else:
            record["verdict"] = "passed"
        if record["verdict"] != "passed" and record.get("reason") is None:
            record["reason"] = state.error or (state.failures[0] if state.failures else _crash_line(report))
        if record["verdict"] == "passed":
            record["reason"] = None
        if state.spec is not None:
            report.sections.append((REPORT_SECTION, render_section(record)))
        report.gpumem_record = record

    def _error_record(self, item: pytest.Item, state: TestState) -> dict:
        record = {"nodeid": item.nodeid, "mode": self.mode, "budget_bytes": None, "budget_text": None,
                  "setup": None, "predicted": None, "measured": None, "baseline": None, "gpu": None,
                  "verdict": "error", "reason": state.error}
        state.record = record
        return record

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        record = getattr(report, "gpumem_record", None)
        if record is not None:
            self.records[report.nodeid] = record

    def pytest_report_teststatus(self, report: pytest.TestReport, config: pytest.Config):
        if report.when == "call" and report.failed and getattr(report, "gpumem_budget_failure", False):
            return "failed", "G", ("GPU BUDGET", {"red": True})
        return None

    # -- session end -----------------------------------------------------------------------------------------
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.is_worker:
            return
        self.exitstatus = int(exitstatus)
        records = list(self.records.values())
        for writer in self.writers:
            line = writer(records, self)
            if line:
                self.written.append(line)

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        if self.is_worker:
            return
        records = list(self.records.values())
        if config.option.collectonly and self.collection_errors:
            terminalreporter.write_sep("=", "gpu budget marker errors", red=True)
            for nodeid, text in self.collection_errors.items():
                terminalreporter.write_line(f"{nodeid}: {text}")
        if not records and not self.written:
            return
        terminalreporter.write_sep("=", f"gpu budget ({self.mode})")
        if records:
            for line in render_table(records):
                terminalreporter.write_line(line)
            problems = [r for r in records if r.get("verdict") in ("failed", "error", "xfailed") and r.get("reason")]
            if problems:
                terminalreporter.write_line("")
                for record in problems:
                    lines = record["reason"].splitlines()
                    terminalreporter.write_line(f"{record['verdict'].upper()} {record['nodeid']}: {lines[0]}")
                    if record["verdict"] == "xfailed":  # an xfail's text is shown nowhere else
                        for line in lines[1:]:
                            terminalreporter.write_line(f"    {line}")
        for line in self.written:
            terminalreporter.write_line(line)


# -- rendering -----------------------------------------------------------------------------------------------------
def _short_gib(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**30:.2f} GiB"


def render_table(records: list[dict]) -> list[str]:
    """One row per budgeted test: test, mode, budget, predicted peak (phase), measured reserved / NVML,
    headroom (budget − judged peak) and verdict."""
    headers = ["test", "mode", "budget", "predicted peak (phase)", "measured reserved / NVML", "headroom", "verdict"]
    rows = []
    for record in records:
        predicted = record.get("predicted") or {}
        measured = record.get("measured") or {}
        predicted_text = "-"
        if predicted.get("peak_bytes") is not None:
            predicted_text = f"{_short_gib(predicted['peak_bytes'])} ({predicted.get('peak_phase')})"
        if measured and any(measured.get(k) is not None for k in ("peak_reserved_bytes", "nvml_peak_bytes")):
            measured_text = f"{_short_gib(measured.get('peak_reserved_bytes'))} / {_short_gib(measured.get('nvml_peak_bytes'))}"
        elif measured and measured.get("reasons"):
            measured_text = sorted(set(measured["reasons"].values()))[0].replace("not measured: ", "not measured: ")
        else:
            measured_text = "-"
        peak, _ = marks.judged_peak(record)
        budget = record.get("budget_bytes")
        headroom = "-" if budget is None else "not judged" if peak is None else f"{(budget - peak) / 2**30:+.2f} GiB"
        budget_text = (record.get("budget_text") or "-").split(" = ")[0]
        rows.append([record["nodeid"], record.get("mode") or "-", budget_text, predicted_text, measured_text,
                     headroom, (record.get("verdict") or "?").upper()])
    widths = [max(len(str(row[i])) for row in [headers] + rows) for i in range(len(headers))]
    right = {2, 5}
    def fmt(row):
        return "  ".join(str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i])
                         for i, c in enumerate(row)).rstrip()
    return [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows]


def render_section(record: dict) -> str:
    """The report section: budget, judged peak, the breakdown by phase, measurement, assumptions, warnings."""
    from ..breakdown import Breakdown
    from ..report.text import breakdown_table

    lines = [f"mode: {record.get('mode')}    budget: {record.get('budget_text')}"
             + (f"    card: {record['gpu']['name']} ({format_gib(record['gpu']['total_bytes'])})"
                if record.get("gpu") else "")]
    peak, what = marks.judged_peak(record)
    if peak is not None and record.get("budget_bytes") is not None:
        lines.append(f"judged on the {what}: {format_gib(peak)}, headroom "
                     f"{format_gib(record['budget_bytes'] - peak)}")
    setup = record.get("setup")
    if setup:
        import textwrap

        shown = ", ".join(f"{k}={v!r}" for k, v in setup.items() if v is not None)
        lines += textwrap.wrap("setup: " + shown, width=110, subsequent_indent="       ")
    predicted = record.get("predicted")
    if predicted and predicted.get("phases"):
        lines.append("")
        lines.append(f"{'simulated' if predicted.get('source') == 'simulate' else 'predicted'} breakdown by phase:")
        lines.append(breakdown_table(Breakdown.from_dict(predicted), total_bytes=record.get("budget_bytes")))
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


def write_json_report(records: list[dict], manager: Manager) -> str:
    from ..report import json as jsonreport

    config = manager.config
    session = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(manager.started_at)),
        "finished_at": jsonreport.now_iso(), "duration_s": round(time.time() - manager.started_at, 3),
        "exitstatus": getattr(manager, "exitstatus", None), "mode": manager.mode, "mode_reason": manager.mode_reason,
        "pytest_args": list(config.invocation_params.args), "rootdir": str(config.rootpath),
        "xdist_workers": getattr(config.option, "numprocesses", None),
        "plugin_version": PACKAGE_VERSION,
        "defaults": {"budget_bytes": manager.defaults.budget_bytes, "budget_text": manager.defaults.budget_text,
                     "gpu": manager.defaults.gpu.to_dict() if manager.defaults.gpu else None},
    }
    path = Path(manager.json_path)
    if not path.is_absolute():
        path = Path(config.invocation_params.dir) / path
    jsonreport.write(path, jsonreport.build(records, session, device.environment()))
    return f"gpu budget JSON report: {path}"
