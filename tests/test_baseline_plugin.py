"""Baselines and CI reports through pytest itself: --gpu-budget-save / -baseline / -strict /
-baseline-tolerance, the marker's baseline_tolerance, --gpu-budget-md / -html, and xdist workers saving at once."""

from __future__ import annotations

import json
import re

import pytest

from pytest_gpumem.compare.baseline import BaselineStore

TEST_FILE = """
import pytest

LENGTH = {length}

@pytest.mark.gpu_budget(gb=80, setup=dict(model="Qwen/Qwen2.5-0.5B", max_completion_length=LENGTH))
def test_small():
    pass

@pytest.mark.gpu_budget(gb=80, setup=dict(model="Qwen/Qwen2.5-1.5B", max_completion_length=LENGTH),
                        baseline_tolerance="300%")
def test_loose():
    pass
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_budgets=TEST_FILE.format(length=512))
    return pytester


def _store(pytester: pytest.Pytester) -> BaselineStore:
    return BaselineStore(pytester.path / ".gpumem" / "baselines.json")


def test_save_then_compare_then_regression_fails_the_test(project: pytest.Pytester):
    saved = project.runpytest("--gpu-budget=estimate", "--gpu-budget-save")
    saved.assert_outcomes(passed=2)
    saved.stdout.fnmatch_lines(["gpu budget baselines saved to */.gpumem/baselines.json: 2 new"])
    store = _store(project)
    record = store.get("test_budgets.py::test_small", "estimate")
    assert record["setup"]["max_completion_length"] == 512 and record["versions"]["trl"]
    assert set(record["breakdown"]) == {"source", "phases", "peak_phase", "peak_bytes"}

    project.runpytest("--gpu-budget=estimate").assert_outcomes(passed=2)

    project.makepyfile(test_budgets=TEST_FILE.format(length=2048))  # a config change: 4x longer completions
    grown = project.runpytest("--gpu-budget=estimate")
    grown.assert_outcomes(failed=1, passed=1)  # test_loose allows 300%
    grown.stdout.fnmatch_lines([
        "GPU memory regression: estimated peak * vs baseline * beyond the tolerance 5%+256MiB*",
        "Grew: training/activations +*",
        "Changed since the baseline: setup.max_completion_length 512 -> 2048.",
    ])
    grown.stdout.fnmatch_lines(["*GREW test_budgets.py::test_small*"])
    assert "test_loose" not in "".join(line for line in grown.outlines if "GREW" in line)

    # accepting the change: re-record, which reports the growth without failing, then compare clean
    project.runpytest("--gpu-budget=estimate", "--gpu-budget-save").assert_outcomes(passed=2)
    assert store.get("test_budgets.py::test_small", "estimate")["setup"]["max_completion_length"] == 2048
    project.runpytest("--gpu-budget=estimate").assert_outcomes(passed=2)


def test_global_tolerance_option_and_ini(project: pytest.Pytester):
    project.runpytest("--gpu-budget=estimate", "--gpu-budget-save").assert_outcomes(passed=2)
    project.makepyfile(test_budgets=TEST_FILE.format(length=2048))
    project.runpytest("--gpu-budget=estimate", "--gpu-budget-baseline-tolerance=50%").assert_outcomes(passed=2)
    project.makeini("[pytest]\ngpu_budget_baseline_tolerance = 50%\n")
    project.runpytest("--gpu-budget=estimate").assert_outcomes(passed=2)
    # the command line wins over the ini
    project.runpytest("--gpu-budget=estimate", "--gpu-budget-baseline-tolerance=1GiB").assert_outcomes(failed=1,
                                                                                                      passed=1)


def test_missing_baseline_is_reported_and_fails_only_when_strict(project: pytest.Pytester):
    nothing = project.runpytest("--gpu-budget=estimate")
    nothing.assert_outcomes(passed=2)
    assert "baselines" not in nothing.stdout.str()  # no file, no save, no strict: baselines are not in use
    strict = project.runpytest("--gpu-budget=estimate", "--gpu-budget-strict")
    strict.assert_outcomes(failed=2)
    strict.stdout.fnmatch_lines(["*--gpu-budget-strict: no baseline for [[]estimate] in *baselines.json*"])

    project.runpytest("--gpu-budget=estimate", "--gpu-budget-save", "-k", "small").assert_outcomes(passed=1)
    partial = project.runpytest("--gpu-budget=estimate")
    partial.assert_outcomes(passed=2)
    partial.stdout.fnmatch_lines(["gpu budget baselines compared with *: 1 within tolerance, 1 without a baseline",
                                  "*record missing baselines with --gpu-budget-save*"])
    project.makeini("[pytest]\ngpu_budget_strict = true\n")
    project.runpytest("--gpu-budget=estimate").assert_outcomes(passed=1, failed=1)


def test_baseline_path_option_and_ini(project: pytest.Pytester):
    saved = project.runpytest("--gpu-budget=estimate", "--gpu-budget-save", "--gpu-budget-baseline=ci/base.json")
    saved.assert_outcomes(passed=2)
    assert BaselineStore(project.path / "ci" / "base.json").get("test_budgets.py::test_small", "estimate")
    assert not (project.path / ".gpumem").exists()
    project.makeini("[pytest]\ngpu_budget_baseline = ci/base.json\n")
    project.makepyfile(test_budgets=TEST_FILE.format(length=2048))
    project.runpytest("--gpu-budget=estimate").assert_outcomes(failed=1, passed=1)


def test_corrupt_store_stops_the_session_naming_the_file(project: pytest.Pytester):
    path = project.path / ".gpumem" / "baselines.json"
    path.parent.mkdir()
    path.write_text("{not json")
    result = project.runpytest("--gpu-budget=estimate", "--gpu-budget-save")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*pytest-gpumem: */.gpumem/baselines.json: not valid JSON (line 1, column 2*"])
    assert path.read_text() == "{not json"  # never silently replaced


def test_bad_tolerances_are_clear_errors(project: pytest.Pytester):
    result = project.runpytest("--gpu-budget=estimate", "--gpu-budget-baseline-tolerance=5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gpu-budget-baseline-tolerance: '5' in '5' has no unit*"])
    project.makepyfile(test_bad="""
        import pytest
        @pytest.mark.gpu_budget(gb=80, setup=dict(model="Qwen/Qwen2.5-0.5B"), baseline_tolerance="10 percent")
        def test_bad(): pass
    """)
    bad = project.runpytest("--gpu-budget=estimate", "test_bad.py")
    bad.assert_outcomes(errors=1)
    bad.stdout.fnmatch_lines(["*invalid @pytest.mark.gpu_budget argument baseline_tolerance*10 percent*"])


def test_markdown_and_html_reports(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    summary = project.path / "step_summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = project.runpytest("--gpu-budget=estimate", "--gpu-budget-md=out/gpumem.md",
                               "--gpu-budget-html=out/gpumem.html")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["gpu budget Markdown: */out/gpumem.md (and $GITHUB_STEP_SUMMARY)",
                                 "gpu budget HTML: */out/gpumem.html"])
    markdown = (project.path / "out" / "gpumem.md").read_text()
    assert "| `test_budgets.py::test_small` | estimate | 80 GB |" in markdown
    assert summary.read_text() == "earlier step\n\n" + markdown
    html = (project.path / "out" / "gpumem.html").read_text()
    assert html.count('<section class="test"') == 2 and "test_budgets.py::test_loose" in html


def test_xdist_workers_save_every_baseline(project: pytest.Pytester):
    pytest.importorskip("xdist", reason="pytest-xdist is in the 'test' extra")
    project.makepyfile(test_many="""
        import pytest
        @pytest.mark.parametrize("length", [
            pytest.param(128 * n, marks=pytest.mark.gpu_budget(
                gb=80, setup=dict(model="Qwen/Qwen2.5-0.5B", max_completion_length=128 * n)))
            for n in range(1, 17)])
        def test_length(length):
            pass
    """)
    result = project.runpytest_subprocess("-p", "xdist", "-n", "4", "--gpu-budget=estimate", "--gpu-budget-save",
                                          "--gpu-budget-md=out.md", "test_many.py", "test_budgets.py")
    result.assert_outcomes(passed=18)
    baselines = json.loads((project.path / ".gpumem" / "baselines.json").read_text())["baselines"]
    assert len(baselines) == 18
    peaks = [baselines[f"test_many.py::test_length[{128 * n}]"]["estimate"]["peak_bytes"] for n in range(1, 17)]
    assert peaks == sorted(peaks) and len(set(peaks)) > 8  # each worker saved its own test's numbers
    assert (project.path / "out.md").read_text().count("| `test_") == 18  # the controller saw every record


def test_summary_fits_120_columns_lists_each_failure_once_and_names_a_regression(pytester: pytest.Pytester,
                                                                                 monkeypatch: pytest.MonkeyPatch):
    """The terminal summary (issue 11): ≤ 120 columns even with long test ids and reasons, each failure once
    (pytest's short summary lists it; the plugin's table does not repeat its text), and a regression reads as a
    regression in the reason column, not as FAILED beside positive headroom."""
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    long_name = "test_" + "a_very_descriptive_name_" * 4
    source = TEST_FILE + f"""
@pytest.mark.gpu_budget(gb=3, setup=dict(model="Qwen/Qwen2.5-0.5B", max_completion_length=LENGTH))
def {long_name}():
    pass
"""
    pytester.makepyfile(test_budgets=source.format(length=512))
    pytester.runpytest("--gpu-budget=estimate", "--gpu-budget-save")
    pytester.makepyfile(test_budgets=source.format(length=2048))
    result = pytester.runpytest("--gpu-budget=estimate", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=2, passed=1)
    lines = result.stdout.lines
    start = next(i for i, line in enumerate(lines) if "gpu budget (estimate)" in line)
    table = lines[start:next(i for i, line in enumerate(lines) if "short test summary info" in line)]
    table = [line for line in table if str(pytester.path) not in line]  # a path is printed whole
    assert all(len(line) <= 120 for line in table), max(table, key=len)
    row = next(line for line in table if "::test_small" in line)
    # positive headroom, FAILED, and why: the regression
    assert re.search(r"\+\d+\.\d\d GiB\s+FAILED\s+regression \+\d+\.\d\d GiB$", row.rstrip()), row
    long_row = next(line for line in table if "descriptive_name" in line and "FAILED" in line)
    assert long_row.rstrip().endswith("over budget")
    # each failure's text once: in pytest's short summary, not again in the plugin's
    assert sum("GPU memory regression:" in line and "test_small" in line for line in lines) == 1
    assert not any(line.startswith("FAILED ") and ": GPU memory regression" in line for line in lines)
