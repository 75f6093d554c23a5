"""The Manager: everything the plugin does once ``--gpu-budget`` is on (registered as a pytest plugin).

Per budgeted test it keeps a :class:`~pytest_gpumem.plugin.state.TestState`; after the test body it builds the
test's record (:class:`pytest_gpumem.record.BudgetRecord`), runs ``Manager.checks`` on it (each
``check(record, spec) -> failure message | None``: ``compare/checks.py`` and the baseline gate) and fails the
test itself when one returns a message. Records travel on the test reports (``report.gpumem_record``), so
under pytest-xdist the controller receives every worker's records with the reports and writes the one summary
and the one set of report files; at session end ``Manager.writers`` get the list of records.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from ..breakdown import Role
from ..compare.checks import (
    DEFAULT_CHECKS,
    check_peak_within_budget,
    check_roles_within_budget,
    check_run_completed,
    check_vllm_can_start,
)
from ..diagnose.generation_levers import server_levers
from ..diagnose.levers import levers_for, no_lever_text
from ..measure import device
from ..predict.analytic import estimate
from ..predict.analytic.whole_step import origin_note, whole_step
from ..record import BudgetSpec, Defaults, judged_peak, predicted_dict
from ..report import WRITERS, ReportFormat, ReportSession
from ..report.json import iso_utc, now_iso
from ..report.text import short_nodeid, summary_table, test_section, wrapped
from ..units import format_gib
from ..versions import PACKAGE_VERSION
from . import mode
from .baseline_gate import BaselineGate
from .marker import default_spec, describe_error, spec_from_marker
from .options import MARKER, report_paths
from .state import (
    STATE_KEY,
    GpuBudgetFailure,
    MarkerArgumentError,
    NothingToJudge,
    StepResult,
    StepSetupError,
    TestState,
)

REPORT_SECTION = "gpu budget"
#: a budgeted test that gives the plugin nothing to judge errors (README "The marker"): passing it "not judged"
#: let a budget silently check nothing
NOTHING_TO_JUDGE = ("nothing to judge: give setup= or call grpo_step/gpu_memory — the gpu_budget marker gives no "
                    "setup= and the test neither calls grpo_step(SETUP) nor measures with gpu_memory.track()"
                    "\n  fix: add setup=dict(model=..., ...) (or a setup file) to the marker, or call "
                    "grpo_step(SETUP) / `with gpu_memory.track(): ...` in the test")
#: steps the runner measures (the first builds optimizer states; the second is the steady state)
MEASURE_STEPS = 2


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


def _simulated_whole_step(setup: Any, predicted_estimate: Any, predicted: dict) -> dict:
    """simulate mode's ``predicted``: the simulated torch tensors plus the estimate's context, allocator slack,
    vLLM and generation (:func:`~pytest_gpumem.predict.analytic.whole_step.whole_step`), each labelled by
    origin; ``simulated_peak_bytes`` keeps the simulation's own (torch-only) peak."""
    simulated = importlib.import_module(mode.SIMULATE_MODULE).simulate(setup)
    whole = whole_step(simulated, predicted_estimate.breakdown)
    at_peak = [t for t in whole.largest_tensors if t.get("phase") == whole.peak_phase]
    if at_peak:
        top = max(at_peak, key=lambda t: t.get("bytes", 0))
        largest = (int(top["bytes"]), f"{top['name']} {tuple(top.get('shape', ()))} {top.get('dtype', '')}".strip()
                   + " (simulate)")
    else:
        largest = (predicted["largest_allocation_bytes"], f"{predicted['largest_allocation_name']} (estimate)")
    data = {**whole.to_dict(), "simulated_peak_bytes": simulated.peak_bytes,
            "assumptions": [origin_note(whole, simulated), *predicted["assumptions"]],
            "warnings": predicted["warnings"], "largest_allocation_bytes": largest[0],
            "largest_allocation_name": largest[1]}
    # a vLLM server's GPUs run no training step to simulate: their role stays the estimate's, judged as such
    server = predicted.get("roles", {}).get(Role.VLLM_SERVER.value)
    if server is not None:
        roles = data.get("roles") or {Role.RANK0.value: {key: data[key] for key in ("phases", "peak_phase",
                                                                                    "peak_bytes")}}
        data["roles"] = {**roles, Role.VLLM_SERVER.value: server}
        data.setdefault("worst_role", Role.RANK0.value)
    return data


def _tracker_reason(state: TestState) -> str:
    reasons = {why for tracker in state.trackers
               for why in (tracker.measurement.to_dict().get("reasons") or {}).values()}
    return "; ".join(sorted(reasons)) or "no track() block ran"


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


class Manager:
    """Everything the plugin does once ``--gpu-budget`` is on. Registered as a pytest plugin."""

    def __init__(self, config: pytest.Config, mode: str, mode_reason: str, defaults: Defaults):
        self.config = config
        self.mode = mode
        self.mode_reason = mode_reason
        self.defaults = defaults
        self.started_at = time.time()
        self.records: dict[str, dict] = {}  # nodeid -> record, in report order (xdist: from every worker)
        self.collection_errors: dict[str, str] = {}
        self.written: list[str] = []  # lines for the terminal summary from the writers
        self._device_gpu: Any = None
        # ---- per-test checks: each check(record, spec) -> failure message | None. Add new checks here. ----
        self.checks: list[Callable[[dict, BudgetSpec | None], str | None]] = list(DEFAULT_CHECKS)
        # ---- session-end writers: each writer(records: list[dict], manager) -> summary line | None. --------
        self.writers: list[Callable[[list, Manager], str | None]] = [
            _report_writer(WRITERS[name], path) for name, path in report_paths(config).items()]
        gate = BaselineGate(self)  # baselines: one more check, and a summary line
        self.checks.append(gate.check)
        self.writers.append(gate.summary)

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
            marker = item.get_closest_marker(MARKER)
            uses_fixture = bool({"grpo_step", "gpu_memory"} & set(getattr(item, "fixturenames", ())))
            if marker is None and not (uses_fixture and self.defaults.budget_bytes is not None):
                continue
            state = TestState()
            try:
                if marker is None:
                    state.spec = default_spec(self.defaults)
                else:
                    base_dirs = (Path(item.path).parent,) if getattr(item, "path", None) else ()
                    state.spec = spec_from_marker(marker.args, marker.kwargs, self.defaults, base_dirs)
            except Exception as exc:  # noqa: BLE001 - any failure to read a marker is that test's error
                state.error = describe_error(exc, marker.kwargs if marker is not None else None)
                self.collection_errors[item.nodeid] = state.error
            if state.spec is not None and state.spec.setup is None and not uses_fixture:
                state.error = NOTHING_TO_JUDGE  # it could only ever pass "not judged": an error, as a bad marker
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
        if judged_peak(record)[0] is None:  # grpo_step never called, gpu_memory measured nothing, no setup=
            state.error = NOTHING_TO_JUDGE + ("\n  (gpu_memory.track() measured nothing: "
                                              f"{_tracker_reason(state)})" if state.trackers else "")
            raise NothingToJudge(state.error)
        state.failures = [message for check in self.checks if (message := check(record, state.spec))]
        if state.failures:
            record["reason"] = state.failures[0]  # the whole failure text once the levers are known (below)
            # levers answer "too big", not "the prediction was off"
            if any(check(record, state.spec) for check in (check_peak_within_budget, check_roles_within_budget,
                                                            check_vllm_can_start,
                                                            check_run_completed)):
                state.levers = self._levers(state)
                state.wants_levers = True
            record["reason"] = self.failure_text(state, section_hint=False)
            raise GpuBudgetFailure(self.failure_text(state))

    def run_step(self, setup: Any, spec: BudgetSpec | None) -> StepResult:
        """One setup in this session's mode → a :class:`~pytest_gpumem.plugin.state.StepResult`."""
        gpu = spec.gpu if spec is not None else None
        if self.mode == "measure" and gpu is None:
            gpu = self.device_gpu()
        if gpu is None and spec is not None:
            gpu = spec.judge_gpu()
        predicted_estimate = estimate(setup, gpu=gpu)
        predicted = predicted_dict(predicted_estimate, spec if self.mode != "measure" else None)
        if self.mode == "simulate":
            predicted = _simulated_whole_step(setup, predicted_estimate, predicted)
        result = StepResult(self.mode, setup, predicted_estimate, predicted)
        if self.mode == "measure":
            runner = importlib.import_module(mode.RUNNER_MODULE)
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
        if spec is not None and spec.role_budgets:  # only a job with a vLLM server: other records are unchanged
            record["role_budgets"] = {role: {"budget_bytes": num_bytes, "budget_text": text}
                                      for role, (num_bytes, text) in spec.role_budgets}
        state.record = record
        return record

    def _levers(self, state: TestState) -> list[str]:
        """levers_for: the top three changes that bring the peak down."""
        step = max(state.steps, key=lambda s: s.peak_bytes or 0) if state.steps else None
        if step is None:
            return []
        try:
            record = state.record or {}
            if check_roles_within_budget(record, state.spec) and not check_peak_within_budget(record, state.spec):
                # only a vLLM server GPU is over: its own levers, judged on its card
                return [lever.line() for lever in server_levers(step.estimate)[:3]]
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
        elif state.wants_levers and state.steps:  # too big, and nothing worth listing: say so
            step = max(state.steps, key=lambda s: s.peak_bytes or 0)
            lines.append(no_lever_text(step.estimate.peak_bytes))
        if section_hint:
            lines.append(f"(mode {record.get('mode')}; the breakdown by phase is in the '{REPORT_SECTION}' section)")
        return "\n".join(lines)

    # -- the report ----------------------------------------------------------------------------------------
    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        outcome = yield
        state = item.stash.get(STATE_KEY, None)
        report: pytest.TestReport = outcome.get_result()
        if state is None:
            return
        if call.excinfo is not None and call.excinfo.errisinstance(StepSetupError):  # reported by plugin/__init__
            state.error = str(call.excinfo.value)
        if report.when == "setup" and call.excinfo is not None and call.excinfo.errisinstance(MarkerArgumentError):
            report.longrepr = state.error
        if report.when == "teardown" or (report.when == "setup" and report.passed):
            return
        record = state.record if state.record is not None else (self.make_record(item, state) if state.spec
                                                                 else self._error_record(item, state))
        if call.excinfo is not None and call.excinfo.errisinstance(NothingToJudge):
            report.longrepr = state.error
            report.gpumem_test_error = True  # an error of the test, not a failed budget
        budget_failure = call.excinfo is not None and call.excinfo.errisinstance(GpuBudgetFailure)
        if budget_failure:
            report.longrepr = self.failure_text(state)
            report.gpumem_budget_failure = True
        if hasattr(report, "wasxfail") and report.skipped:
            record["verdict"] = "xfailed"
        elif report.skipped:
            record["verdict"] = "skipped"
        elif report.failed:
            record["verdict"] = "error" if report.when == "setup" or state.error else "failed"
        else:
            record["verdict"] = "passed"
        if record["verdict"] != "passed" and record.get("reason") is None:
            record["reason"] = state.error or (state.failures[0] if state.failures else _crash_line(report))
        if record["verdict"] == "passed":
            record["reason"] = None
        if state.spec is not None:
            report.sections.append((REPORT_SECTION, test_section(record)))
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
        if self.config.option.collectonly and self.collection_errors and exitstatus == pytest.ExitCode.OK:
            # `pytest --collect-only --gpu-budget` as a CI lint step: an unreadable marker fails it with the code
            # pytest itself returns for --collect-only with a collection error (2, INTERRUPTED)
            session.exitstatus = pytest.ExitCode.INTERRUPTED
            exitstatus = session.exitstatus
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
            for line in summary_table(records):
                terminalreporter.write_line(line)
            # failures and errors are listed once, by pytest's own short summary (GPU BUDGET / ERROR nodeid - why);
            # an expected failure's text is shown nowhere else
            expected = [r for r in records if r.get("verdict") == "xfailed" and r.get("reason")]
            if expected:
                terminalreporter.write_line("")
                for record in expected:
                    lines = record["reason"].splitlines()
                    for line in wrapped(f"XFAILED {short_nodeid(record['nodeid'], 80)}: {lines[0]}"):
                        terminalreporter.write_line(line)
                    for line in lines[1:]:
                        for part in wrapped(f"    {line}", indent="        "):
                            terminalreporter.write_line(part)
        for line in self.written:
            terminalreporter.write_line(line)

    def report_session(self) -> ReportSession:
        """The session as the report files describe it (the JSON report's ``session``)."""
        config = self.config
        info = {
            "started_at": iso_utc(self.started_at),  # the format of finished_at and the baselines: +00:00
            "finished_at": now_iso(), "duration_s": round(time.time() - self.started_at, 3),
            "exitstatus": getattr(self, "exitstatus", None), "mode": self.mode, "mode_reason": self.mode_reason,
            "pytest_args": list(config.invocation_params.args), "rootdir": str(config.rootpath),
            "xdist_workers": getattr(config.option, "numprocesses", None),
            "plugin_version": PACKAGE_VERSION,
            "defaults": {"budget_bytes": self.defaults.budget_bytes, "budget_text": self.defaults.budget_text,
                         "gpu": self.defaults.gpu.to_dict() if self.defaults.gpu else None},
        }
        return ReportSession(info=info, environment=device.environment)


def _report_writer(fmt: ReportFormat, path: Path) -> Callable[[list, Manager], str]:
    def write(records: list, manager: Manager) -> str:
        return fmt.write(records, path, manager.report_session())

    return write
