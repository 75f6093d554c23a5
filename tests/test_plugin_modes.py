"""The plugin's options, ini keys, modes, JSON report and pytest-xdist merging (pytester)."""

from __future__ import annotations

import importlib
import json
import textwrap

import pytest

from pytest_gpumem import estimate
from pytest_gpumem.gpus import resolve_gpu
from pytest_gpumem.plugin import mode as plugin_mode
from pytest_gpumem.units import GB, GIB

FAST = ("-p", "no:cacheprovider", "-p", "no:unraisableexception", "-p", "no:hypothesispytest", "-p", "no:benchmark",
        "-p", "no:anyio")
SETUP = {"model": "Qwen/Qwen2.5-0.5B", "dtype": "bfloat16", "per_device_train_batch_size": 4,
         "num_generations": 4, "max_prompt_length": 128, "max_completion_length": 256}

MODULE = f"""
import pytest
SETUP = {SETUP!r}

@pytest.mark.gpu_budget(gb=40, setup=SETUP)
def test_fits(): pass

@pytest.mark.gpu_budget(setup=SETUP)
def test_default_budget(): pass
"""

#: a stand-in for pytest_gpumem.runner: what it "measures" depends on max_completion_length
FAKE_RUNNER = """
from types import SimpleNamespace
from pytest_gpumem import estimate

CALLS = []

def run(setup, steps=2, device="auto"):
    CALLS.append((setup.max_completion_length, steps, device))
    peak = estimate(setup).peak_bytes
    kind = {256: "agree", 200: "disagree", 100: "oom", 64: "skipped"}[setup.max_completion_length]
    status = {"oom": "oom", "skipped": "skipped"}.get(kind, "ok")
    nvml = {"agree": peak, "disagree": int(peak * 1.5)}.get(kind)
    reason = {"oom": "CUDA out of memory. Tried to allocate 2.00 GiB", "skipped": "no CUDA device"}.get(kind)
    return SimpleNamespace(status=status, reason=reason, breakdown=None, peak_reserved_bytes=nvml and nvml - 2**29,
                           peak_allocated_bytes=nvml and nvml - 2**30, nvml_peak_bytes=nvml, reasons={},
                           to_dict=lambda: {"status": status, "reason": reason, "steps": steps, "device": device})
"""

FAKE_SIMULATE = """
from pytest_gpumem import estimate
from pytest_gpumem.breakdown import Breakdown

def simulate(setup, gpu=None):
    phases = {phase: {name: int(num_bytes * 1.25) for name, num_bytes in parts.items()}
              for phase, parts in estimate(setup).breakdown.phases.items()}
    return Breakdown(phases=phases, source="simulate")
"""


def write(pytester, source: str = MODULE) -> None:
    pytester.makepyfile(test_mod=textwrap.dedent(source))


def records(pytester, path="out.json") -> dict:
    report = json.loads((pytester.path / path).read_text())
    return {t["nodeid"].split("::")[-1]: t for t in report["tests"]}


# -- ini keys -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, enabled", [("true", True), ("True", True), ("1", True), ("yes", True),
                                            ("false", False), ("0", False), ("no", False)])
def test_ini_gpu_budget_boolean_is_read(pytester, value, enabled):
    pytester.makeini(f"[pytest]\ngpu_budget = {value}\ngpu_budget_default = 3 GB\n")
    write(pytester)
    result = pytester.runpytest(*FAST)
    if enabled:
        result.stdout.fnmatch_lines(["gpumem: mode=estimate (auto: no CUDA device, so estimate), default budget "
                                     "3 GB = 2.79 GiB*"])
        result.assert_outcomes(passed=1, failed=1)
    else:
        assert "gpumem: mode" not in result.stdout.str()
        result.assert_outcomes(passed=2)


def test_pyproject_ini_options_boolean(pytester):
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\ngpu_budget = true\ngpu_budget_mode = "estimate"\n'
                               'gpu_budget_default = "3 GB"\n')
    write(pytester)
    result = pytester.runpytest(*FAST)
    result.stdout.fnmatch_lines(["gpumem: mode=estimate (ini gpu_budget_mode=estimate)*"])
    result.assert_outcomes(passed=1, failed=1)


def test_pyproject_native_toml_boolean(pytester):
    pytester.makepyprojecttoml('[tool.pytest]\ngpu_budget = true\ngpu_budget_default = "3 GB"\n')
    write(pytester)
    result = pytester.runpytest(*FAST)
    result.stdout.fnmatch_lines(["gpumem: mode=estimate*"])
    result.assert_outcomes(passed=1, failed=1)


@pytest.mark.parametrize("ini, message", [
    ("gpu_budget = maybe", "*pytest-gpumem: ini option gpu_budget: *maybe*"),
    ("gpu_budget = true\ngpu_budget_mode = fast", "*pytest-gpumem: ini gpu_budget_mode: unknown mode 'fast'*"),
    ("gpu_budget = true\ngpu_budget_default = lots", "*pytest-gpumem: gpu_budget_default: cannot read 'lots'*"),
    ("gpu_budget = true\ngpu_budget_gpu = H999", "*pytest-gpumem: gpu_budget_gpu: unknown GPU 'H999'*"),
])
def test_bad_ini_values_are_usage_errors(pytester, ini, message):
    pytester.makeini(f"[pytest]\n{ini}\n")
    write(pytester)
    result = pytester.runpytest(*FAST)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_cli_overrides_ini(pytester, monkeypatch):
    monkeypatch.setattr(plugin_mode, "SIMULATE_MODULE", "pytest_gpumem._not_installed_simulate")
    pytester.makeini("[pytest]\ngpu_budget = true\ngpu_budget_mode = simulate\ngpu_budget_default = 3 GB\n"
                     "gpu_budget_gpu = L4\n")
    write(pytester)
    # CLI mode wins over the ini mode (which would be a usage error here)
    result = pytester.runpytest("--gpu-budget=estimate", "--gpu-budget-default=40 GB", "--gpu-budget-gpu=24GiB",
                                "--gpu-budget-json=out.json", *FAST)
    result.stdout.fnmatch_lines(["gpumem: mode=estimate (--gpu-budget=estimate), default budget 40 GB = 37.25 GiB, "
                                 "judged on 24GiB"])
    result.assert_outcomes(passed=2)
    tests = records(pytester)
    assert tests["test_default_budget"]["budget_bytes"] == 40 * GB
    assert tests["test_default_budget"]["gpu"] == {"name": "24GiB", "total_bytes": 24 * GIB}
    # --gpu-budget=off switches an ini-enabled plugin off
    result = pytester.runpytest("--gpu-budget=off", *FAST)
    assert "gpumem: mode" not in result.stdout.str()
    result.assert_outcomes(passed=2)
    # the ini values apply when the CLI says nothing else (mode from ini → usage error, not a silent fallback)
    result = pytester.runpytest(*FAST)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gpu-budget=simulate is not available*pytest-gpumem[[]sim]*"])


def test_ini_gpu_and_default_apply(pytester):
    pytester.makeini("[pytest]\ngpu_budget_default = 3 GB\ngpu_budget_gpu = L4\n")
    write(pytester)
    pytester.runpytest("--gpu-budget=estimate", "--gpu-budget-json=out.json", *FAST).assert_outcomes(passed=1,
                                                                                                      failed=1)
    tests = records(pytester)
    l4 = resolve_gpu("L4")
    assert tests["test_default_budget"]["budget_text"] == "3 GB = 2.79 GiB"
    assert tests["test_fits"]["gpu"] == {"name": l4.name, "total_bytes": l4.total_bytes}


# -- the --gpu-budget option ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["--gpu-budget"], ["--gpu-budget", "{path}"], ["--gpu-budget", "auto", "{path}"],
                                  ["{path}", "--gpu-budget"], ["--gpu-budget", "-q", "{path}"]])
def test_bare_option_means_auto_and_never_eats_a_path(pytester, args):
    write(pytester)
    path = str(pytester.path / "test_mod.py")
    result = pytester.runpytest(*[a.format(path=path) for a in args], "--gpu-budget-default=40 GB", *FAST)
    result.assert_outcomes(passed=2)
    assert "auto: no CUDA device, so estimate" in result.stdout.str() or "-q" in args


def test_unknown_mode_is_a_usage_error(pytester):
    write(pytester)
    result = pytester.runpytest("--gpu-budget=fast", *FAST)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gpu-budget: unknown mode 'fast'; use one of auto, estimate, simulate, measure*"])


@pytest.mark.parametrize("mode, attribute, extra", [("simulate", "SIMULATE_MODULE", "pytest-gpumem[[]sim]"),
                                                   ("measure", "RUNNER_MODULE", "pytest-gpumem[[]trl]")])
def test_missing_backends_are_usage_errors(pytester, monkeypatch, mode, attribute, extra):
    monkeypatch.setattr(plugin_mode, attribute, "pytest_gpumem._not_installed")
    write(pytester)
    result = pytester.runpytest(f"--gpu-budget={mode}", *FAST)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--gpu-budget={mode} is not available*{extra}*"])


# -- simulate and measure with stand-in backends ------------------------------------------------------------------
def test_simulate_mode_judges_the_simulation(pytester, monkeypatch):
    pytester.makepyfile(fake_simulate=FAKE_SIMULATE)
    pytester.syspathinsert()
    monkeypatch.setattr(plugin_mode, "SIMULATE_MODULE", "fake_simulate")
    peak = estimate(SETUP).peak_bytes
    budget_gb = round(peak * 1.12 / GB, 2)  # between the estimate and the (stand-in) simulation, 1.25 × it
    write(pytester, MODULE.replace("gb=40", f"gb={budget_gb}"))
    result = pytester.runpytest("--gpu-budget=simulate", "--gpu-budget-default=40 GB", "--gpu-budget-json=out.json",
                                *FAST)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([f"simulated + estimated peak * exceeds the {budget_gb:g} GB = * budget*",
                                 "top levers (re-estimated by the analytic model, which predicts *"])
    assert records(pytester)["test_fits"]["predicted"]["source"] == "simulate"


def test_measure_without_a_cuda_device_is_a_usage_error(pytester, monkeypatch):
    """Not "every test skipped, exit 0": a CI job that meant to measure cannot go green by measuring nothing,
    with or without --gpu-budget-strict, from the command line or the ini file (issue 11)."""
    monkeypatch.setattr(importlib.import_module("pytest_gpumem.measure.device"), "cuda_available", lambda: False)
    write(pytester)
    for args in (("--gpu-budget=measure",), ("--gpu-budget=measure", "--gpu-budget-strict")):
        result = pytester.runpytest(*args, *FAST)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*--gpu-budget=measure needs a CUDA device and this machine has none visible*"
                                     "--gpu-budget=estimate*"])
    pytester.makeini("[pytest]\ngpu_budget = true\ngpu_budget_mode = measure\n")
    result = pytester.runpytest(*FAST)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini gpu_budget_mode=measure needs a CUDA device*"])


def test_measure_mode_records_and_judges_the_run(pytester, monkeypatch):
    pytester.makepyfile(fake_runner=FAKE_RUNNER)
    pytester.syspathinsert()
    monkeypatch.setattr(plugin_mode, "RUNNER_MODULE", "fake_runner")
    monkeypatch.setattr(importlib.import_module("pytest_gpumem.measure.device"), "cuda_available", lambda: True)
    setups = {name: {**SETUP, "max_completion_length": length}
              for name, length in (("AGREE", 256), ("DISAGREE", 200), ("OOM", 100), ("SKIP", 64))}
    write(pytester, "import pytest\n" + "".join(f"{k} = {v!r}\n" for k, v in setups.items()) + textwrap.dedent("""
        @pytest.mark.gpu_budget(gb=40, setup=AGREE)
        def test_agree(): pass
        @pytest.mark.gpu_budget(gb=40, setup=DISAGREE)
        def test_disagree(): pass
        @pytest.mark.gpu_budget(gb=40, setup=DISAGREE, tolerance="60%")
        def test_disagree_tolerated(): pass
        @pytest.mark.gpu_budget(gb=40, setup=OOM)
        def test_oom(): pass
        @pytest.mark.gpu_budget(gb=40, setup=SKIP)
        def test_skip(): pass
        @pytest.mark.gpu_budget(gb=2, setup=AGREE)
        def test_over(grpo_step):
            result = grpo_step()
            assert result.run.status == "ok" and result.peak_bytes == result.measured["nvml_peak_bytes"]
        def test_unbudgeted_step_is_measured_too(grpo_step):
            assert grpo_step(AGREE).run.status == "ok"
    """))
    result = pytester.runpytest("--gpu-budget=measure", "--gpu-budget-json=out.json", "-rs", *FAST)
    result.assert_outcomes(passed=3, failed=3, skipped=1)
    tests = records(pytester)
    agree = tests["test_agree"]
    assert agree["mode"] == "measure" and agree["verdict"] == "passed"
    assert agree["measured"]["nvml_peak_bytes"] == agree["predicted"]["peak_bytes"]
    assert agree["measured"]["run"] == {"status": "ok", "reason": None, "steps": 2, "device": "cuda"}
    assert tests["test_disagree"]["reason"].startswith("prediction and measurement disagree: predicted ")
    assert "(tolerance 10%)" in tests["test_disagree"]["reason"]
    assert tests["test_disagree_tolerated"]["verdict"] == "passed"
    assert tests["test_oom"]["reason"].splitlines()[0] == (
        "the measured GRPO run ran out of GPU memory against the 40 GB = 37.25 GiB budget: CUDA out of memory. "
        "Tried to allocate 2.00 GiB")
    assert tests["test_skip"]["verdict"] == "skipped"
    assert tests["test_over"]["reason"].startswith("measured peak (NVML, device)")
    assert "test_unbudgeted_step_is_measured_too" not in tests
    result.stdout.fnmatch_lines(["*gpu budget: the measured run was skipped: no CUDA device*"])
    result.stdout.fnmatch_lines(["*::test_agree*40 GB*GiB train*GiB / *GiB*PASSED"])


def test_auto_measures_on_a_cuda_machine(pytester, monkeypatch):
    pytester.makepyfile(fake_runner=FAKE_RUNNER)
    pytester.syspathinsert()
    monkeypatch.setattr(plugin_mode, "RUNNER_MODULE", "fake_runner")
    monkeypatch.setattr(importlib.import_module("pytest_gpumem.measure.device"), "cuda_available", lambda: True)
    write(pytester)
    result = pytester.runpytest("--gpu-budget", "--gpu-budget-default=40 GB", *FAST)
    result.stdout.fnmatch_lines(["gpumem: mode=measure (auto: a CUDA device is present, so measure)*"])
    result.assert_outcomes(passed=2)


# -- JSON report and xdist ----------------------------------------------------------------------------------------
RECORD_KEYS = {"nodeid", "mode", "budget_bytes", "budget_text", "setup", "predicted", "measured", "baseline", "gpu",
               "verdict", "reason"}


def test_json_report_schema(pytester):
    write(pytester, MODULE + textwrap.dedent("""
        @pytest.mark.gpu_budget(gb="x")
        def test_error(): pass
        @pytest.mark.xfail(reason="over")
        @pytest.mark.gpu_budget(gb=1, setup=SETUP)
        def test_xfail(): pass
    """))
    pytester.runpytest("--gpu-budget=estimate", "--gpu-budget-default=3 GB", "--gpu-budget-json=reports/out.json",
                       *FAST).assert_outcomes(passed=1, failed=1, errors=1, xfailed=1)
    document = json.loads((pytester.path / "reports/out.json").read_text())
    assert document["schema"] == "pytest-gpumem-report" and document["schema_version"] == 1
    assert document["session"]["mode"] == "estimate" and document["session"]["exitstatus"] == 1
    assert document["session"]["defaults"]["budget_text"] == "3 GB = 2.79 GiB"
    assert document["environment"]["packages"]["pytest-gpumem"]
    assert "gpus" in document["environment"] and "python" in document["environment"]
    assert document["summary"] == {"tests": 4, "passed": 1, "failed": 1, "error": 1, "xfailed": 1, "skipped": 0}
    for record in document["tests"]:
        assert set(record) == RECORD_KEYS, record["nodeid"]
    fits = {t["nodeid"].split("::")[-1]: t for t in document["tests"]}["test_fits"]
    assert set(fits["predicted"]) >= {"phases", "peak_phase", "peak_bytes", "source", "assumptions", "warnings",
                                      "largest_allocation_bytes"}
    assert fits["setup"]["model"] == "Qwen/Qwen2.5-0.5B"


def test_xdist_workers_merge_into_one_summary_and_one_json(pytester):
    pytest.importorskip("xdist")
    body = "".join(textwrap.dedent(f"""
        @pytest.mark.gpu_budget(gb={3 if i % 3 == 0 else 40}, setup=SETUP)
        def test_{i}(): pass
    """) for i in range(12))
    write(pytester, f"import pytest\nSETUP = {SETUP!r}\n" + body)
    result = pytester.runpytest_subprocess("-n", "2", "--gpu-budget=estimate", "--gpu-budget-json=out.json", *FAST)
    result.assert_outcomes(passed=8, failed=4)
    out = result.stdout.str()
    assert out.count("= gpu budget (estimate) =") == 1
    tests = records(pytester)
    assert len(tests) == 12 and sum(t["verdict"] == "failed" for t in tests.values()) == 4
    for i in range(12):
        assert f"test_mod.py::test_{i} " in out
    document = json.loads((pytester.path / "out.json").read_text())
    assert document["session"]["xdist_workers"] == 2


# -- nothing to judge ---------------------------------------------------------------------------------------------
def test_a_budgeted_test_with_nothing_to_judge_is_an_error(pytester):
    """No setup=, no default setup, no fixture call: an error of that test, never PASSED "not judged" (issue 11).
    Known at collection (no fixture requested): an error at setup, listed by --collect-only; known only after
    the body (a fixture requested but never used): the test errors after its body."""
    write(pytester, """
        import pytest

        @pytest.mark.gpu_budget(gb=24)
        def test_bare(): pass

        @pytest.mark.gpu_budget(gb=24)
        def test_fixture_unused(grpo_step): pass

        @pytest.mark.gpu_budget(gb=24)
        def test_tracked_nothing(gpu_memory):
            with gpu_memory.track():
                pass

        @pytest.mark.gpu_budget(gb=24)
        def test_called(grpo_step):
            grpo_step(dict(model="Qwen/Qwen2.5-0.5B", dtype="bfloat16"))
    """)
    result = pytester.runpytest("--gpu-budget=estimate", "--gpu-budget-json=out.json", *FAST)
    result.assert_outcomes(passed=1, errors=3)
    result.stdout.fnmatch_lines(["*ERROR at setup of test_bare*", "nothing to judge: give setup= or call "
                                 "grpo_step/gpu_memory*"])
    tests = records(pytester)
    assert {name: tests[name]["verdict"] for name in tests} == {
        "test_bare": "error", "test_fixture_unused": "error", "test_tracked_nothing": "error", "test_called": "passed"}
    assert tests["test_tracked_nothing"]["reason"].startswith("nothing to judge")
    assert "not measured: no CUDA device" in tests["test_tracked_nothing"]["reason"]
