"""The pytest plugin, driven through pytester: marker forms, failures and their text, collection errors,
fixtures, inert mode, --strict-markers, and the torch-free import.

In-process ``pytester.runpytest`` wherever possible (fast); subprocesses only where a fresh interpreter is the
point (what gets imported).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap

import pytest

from pytest_gpumem import estimate
from pytest_gpumem.compare.checks import check_prediction_matches_measurement
from pytest_gpumem.errors import MarkerError
from pytest_gpumem.gpus import resolve_gpu
from pytest_gpumem.plugin.marker import parse_size_string, parse_tolerance, spec_from_marker
from pytest_gpumem.units import GB, GIB, MB, MIB, Tolerance, budget_text

# A small real setup: its estimate is pure arithmetic (< 1 ms) and has a clear peak.
SETUP = {"model": "Qwen/Qwen2.5-0.5B", "dtype": "bfloat16", "per_device_train_batch_size": 4,
         "num_generations": 4, "max_prompt_length": 128, "max_completion_length": 256}
VLLM_SETUP = {"model": "google/gemma-3-1b-it", "load_in_4bit": True, "lora_rank": 16, "use_vllm": True,
              "vllm_gpu_memory_utilization": 0.5, "per_device_train_batch_size": 2,
              "gradient_accumulation_steps": 2, "num_generations": 2, "max_completion_length": 256}


#: in-process runs skip the cache and pytest's end-of-session gc.collect() passes (0.2–2 s each in a big process)
FAST = ("-p", "no:cacheprovider", "-p", "no:unraisableexception", "-p", "no:hypothesispytest", "-p", "no:benchmark",
        "-p", "no:anyio")


def peak_gib(setup, gpu) -> float:
    return estimate(setup, gpu=gpu).peak_bytes / GIB


def header(**names) -> str:
    """Module source that defines the setups the generated tests refer to."""
    lines = ["import pytest"]
    for name, value in {"SETUP": SETUP, "VLLM_SETUP": VLLM_SETUP, **names}.items():
        lines.append(f"{name} = {value!r}")
    return "\n".join(lines) + "\n"


def write(pytester, source: str) -> None:
    """The test module, with a short name so that nodeids and summary lines stay short."""
    pytester.makepyfile(test_mod=textwrap.dedent(source))


def run_json(pytester, *args, path="gpumem.json"):
    result = pytester.runpytest("--gpu-budget=estimate", f"--gpu-budget-json={path}", *FAST, *args)
    report = json.loads((pytester.path / path).read_text())
    return result, report, {t["nodeid"].split("::")[-1]: t for t in report["tests"]}


# -- marker forms --------------------------------------------------------------------------------------------
def test_every_budget_form_is_read_with_both_units(pytester):
    write(pytester, header() + textwrap.dedent("""
        @pytest.mark.gpu_budget(gb=17, setup=SETUP)
        def test_gb(): pass
        @pytest.mark.gpu_budget(gib=20, setup=SETUP)
        def test_gib(): pass
        @pytest.mark.gpu_budget(mb=15000, setup=SETUP)
        def test_mb(): pass
        @pytest.mark.gpu_budget(mib=16384, setup=SETUP)
        def test_mib(): pass
        @pytest.mark.gpu_budget(size="17 GiB", setup=SETUP)
        def test_size(): pass
        @pytest.mark.gpu_budget(size="24gb", setup=SETUP)
        def test_size_lower(): pass
        @pytest.mark.gpu_budget("16.5 GiB", setup=SETUP)
        def test_positional(): pass
        @pytest.mark.gpu_budget(gpu="L4", setup=SETUP)
        def test_gpu_only(): pass
        @pytest.mark.gpu_budget(gb=17.5, setup=SETUP)
        def test_float(): pass
    """))
    result, report, tests = run_json(pytester)
    result.assert_outcomes(passed=9)
    expected = {"test_gb": (17 * GB, "17 GB = 15.83 GiB"), "test_gib": (20 * GIB, "20 GiB = 21.47 GB"),
                "test_mb": (15000 * MB, "15000 MB = 14305.11 MiB"),
                "test_mib": (16384 * MIB, "16384 MiB = 17179.87 MB"),
                "test_size": (17 * GIB, "17 GiB = 18.25 GB"), "test_size_lower": (24 * GB, "24 GB = 22.35 GiB"),
                "test_positional": (int(16.5 * GIB), "16.50 GiB = 17.72 GB"),
                "test_float": (int(17.5 * GB), "17.50 GB = 16.30 GiB")}
    for name, (num_bytes, text) in expected.items():
        assert tests[name]["budget_bytes"] == num_bytes, name
        assert tests[name]["budget_text"] == text, name
    l4 = resolve_gpu("L4")
    assert tests["test_gpu_only"]["budget_bytes"] == l4.total_bytes
    assert tests["test_gpu_only"]["gpu"] == {"name": l4.name, "total_bytes": l4.total_bytes}
    assert tests["test_gpu_only"]["budget_text"] == "22.03 GiB = 23.65 GB"


def test_budget_text_and_size_strings_unit_by_unit():
    assert budget_text(17 * GB, "gb") == "17 GB = 15.83 GiB"
    assert budget_text(20 * GIB, "gib") == "20 GiB = 21.47 GB"
    assert budget_text(512 * MIB, "mib") == "512 MiB = 536.87 MB"
    assert parse_size_string("17 GiB") == (17 * GIB, "gib")
    assert parse_size_string(" 24GB ") == (24 * GB, "gb")
    assert parse_size_string("1500 mb") == (1500 * MB, "mb")
    for bad in ("17", "17 GB of RAM", "17 TB", "GiB", "-1 GiB", "0 GB", "17 GiBs", "1e3 GB", "", "17 G"):
        with pytest.raises(MarkerError) as info:
            parse_size_string(bad)
        assert info.value.field == "size"


def test_tolerance_forms():
    assert parse_tolerance(0.1) == Tolerance(0.1, 0, "10%")
    assert parse_tolerance("15%").fraction == pytest.approx(0.15)
    assert parse_tolerance("5%+256MiB") == Tolerance(0.05, 256 * MIB, "5%+256MiB")
    assert parse_tolerance("256 MiB").absolute_bytes == 256 * MIB
    assert parse_tolerance("0").fraction == 0
    for bad in (10, -0.1, "abc", "10", "5%+6%", True, None, [0.1], "150%", float("nan")):
        with pytest.raises(MarkerError) as info:
            parse_tolerance(bad)
        assert info.value.field == "tolerance"
    with pytest.raises(MarkerError, match="did you mean '10%'"):
        parse_tolerance(10)


def test_prediction_vs_measurement_band():
    record = {"predicted": {"peak_bytes": 11 * GIB, "peak_phase": "training", "phases": {}},
              "measured": {"peak_reserved_bytes": 10 * GIB}}
    assert check_prediction_matches_measurement(record, tolerance=Tolerance(0.10, 0, "10%")) is None
    message = check_prediction_matches_measurement(record, tolerance=Tolerance(0.05, 0, "5%"))
    assert message.startswith("prediction and measurement disagree: predicted 11.00 GiB, measured peak "
                              "(torch reserved) 10.00 GiB — the prediction is 10.0% over (tolerance 5%)")
    assert check_prediction_matches_measurement(record, tolerance=Tolerance(0.05, GIB // 2, "5%+512MiB")) is None
    # NVML (device-level, the CUDA context included) is preferred over torch's reserved
    record["measured"]["nvml_peak_bytes"] = 11 * GIB
    assert check_prediction_matches_measurement(record, tolerance=Tolerance(0.0, 0, "0")) is None


def test_spec_from_marker_defaults_and_overrides():
    from pytest_gpumem.record import Defaults

    defaults = Defaults(budget_bytes=24 * GIB, budget_text="24 GiB = 25.77 GB", gpu=resolve_gpu("L4"))
    spec = spec_from_marker((), {"setup": SETUP}, defaults)
    assert (spec.budget_bytes, spec.budget_origin, spec.gpu.name) == (24 * GIB, "default", resolve_gpu("L4").name)
    spec = spec_from_marker((), {"gb": 10, "gpu": "24GiB"}, defaults)
    assert (spec.budget_bytes, spec.budget_origin, spec.gpu.total_bytes) == (10 * GB, "marker", 24 * GIB)
    with pytest.raises(MarkerError) as info:
        spec_from_marker((), {"setup": SETUP})
    assert info.value.field == "budget"


# -- passing and failing -------------------------------------------------------------------------------------
def test_failure_is_reported_on_the_test_with_one_line_reason_and_section(pytester):
    peak = peak_gib(SETUP, 3 * GB)
    assert 3 * GB / GIB < peak, "the setup must overrun a 3 GB budget for this test to mean anything"
    write(pytester, header() + textwrap.dedent("""
        @pytest.mark.gpu_budget(gb=3, setup=SETUP)
        def test_too_small(): pass

        @pytest.mark.gpu_budget(gb=40, setup=SETUP)
        def test_fits(): pass
    """))
    result = pytester.runpytest("--gpu-budget=estimate", *FAST, "-rA")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "test_mod.py G.*",
        "*_ test_too_small _*",
        f"predicted peak {peak:.2f} GiB in the * exceeds the 3 GB = 2.79 GiB budget by *: *, *, *",
        "largest single allocation: *",
        "top levers (each re-estimated):",
        "  1. *saves*",
        "(mode estimate; the breakdown by phase is in the 'gpu budget' section)",
        "*- gpu budget -*",
        "mode: estimate    budget: 3 GB = 2.79 GiB    card: a 3 GB = 2.79 GiB card (the budget)*",
        "predicted breakdown by phase:",
        "component*persistent*generation*training*optimizer_step",
        "*TOTAL*",
        "assumptions:",
        "*no gpu given: judged against the 3 GB = 2.79 GiB budget as the card size*",
    ])
    # the short summary uses the status word and the one-line reason
    result.stdout.fnmatch_lines(["GPU BUDGET *::test_too_small - predicted peak*"])
    # the terminal summary table: one row per budgeted test
    result.stdout.fnmatch_lines([
        "*= gpu budget (estimate) =*",
        "test*budget*peak (phase)*measured res/NVML*headroom*verdict*reason",
        "*::test_too_small*3 GB*GiB train*-*-*GiB*FAILED*over budget",
        "*::test_fits*40 GB*GiB train*-*+*GiB*PASSED",
    ])
    assert "INTERNALERROR" not in result.stdout.str()


def test_verbose_status_word_and_passing_section_on_demand(pytester):
    write(pytester, header() + textwrap.dedent("""
        @pytest.mark.gpu_budget(gb=3, setup=SETUP)
        def test_too_small(): pass
        @pytest.mark.gpu_budget(gb=40, setup=SETUP)
        def test_fits(): pass
    """))
    result = pytester.runpytest("--gpu-budget=estimate", "-v", "-rP", *FAST)
    result.stdout.fnmatch_lines(["*::test_too_small GPU BUDGET*", "*::test_fits PASSED*"])
    # -rP shows the section of a passing test: detail on demand
    result.stdout.fnmatch_lines(["*_ test_fits _*", "*- gpu budget -*", "mode: estimate    budget: 40 GB*"])


def test_xfail_keeps_the_reason_in_the_record_and_summary(pytester):
    write(pytester, header() + textwrap.dedent("""
        from pytest_gpumem.plugin import GpuBudgetFailure

        @pytest.mark.xfail(raises=GpuBudgetFailure, reason="shown on purpose")
        @pytest.mark.gpu_budget(gb=3, setup=SETUP)
        def test_expected(): pass
    """))
    result, report, tests = run_json(pytester, "-rx")
    result.assert_outcomes(xfailed=1)
    assert tests["test_expected"]["verdict"] == "xfailed"
    assert tests["test_expected"]["reason"].startswith("predicted peak")
    result.stdout.fnmatch_lines(["XFAILED *::test_expected: predicted peak * exceeds the 3 GB = *"])


def test_vllm_that_would_refuse_to_start_fails_even_under_budget(pytester):
    # colocated vLLM at 0.9 of an L4 next to an fp32 policy: free memory < 0.9 × total at start-up
    setup = {**VLLM_SETUP, "load_in_4bit": False, "lora_rank": None, "vllm_gpu_memory_utilization": 0.9}
    assert any(w.startswith("vLLM would refuse") for w in estimate(setup, gpu="L4").warnings)
    write(pytester, header(REFUSES=setup) + textwrap.dedent("""
        @pytest.mark.gpu_budget(gb=1000, gpu="L4", setup=REFUSES)
        def test_refuses(): pass
    """))
    result = pytester.runpytest("--gpu-budget=estimate", *FAST)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["GPU BUDGET *::test_refuses - vLLM would refuse to start*"])


def test_body_failure_is_a_plain_failure_with_a_record(pytester):
    write(pytester, header() + textwrap.dedent("""
        @pytest.mark.gpu_budget(gb=40, setup=SETUP)
        def test_body_fails(): assert 1 == 2, "my own assertion"
        @pytest.mark.skip(reason="not today")
        @pytest.mark.gpu_budget(gb=40, setup=SETUP)
        def test_skipped(): pass
    """))
    result, report, tests = run_json(pytester)
    result.assert_outcomes(failed=1, skipped=1)
    assert tests["test_body_fails"]["verdict"] == "failed"
    assert "my own assertion" in tests["test_body_fails"]["reason"]
    assert tests["test_skipped"]["verdict"] == "skipped"
    assert "GPU BUDGET" not in result.stdout.str()


# -- collection errors ------------------------------------------------------------------------------------------
BAD_MARKERS = [
    ('gb="17"', "gb", "'17' (str)"),
    ("gb=True", "gb", "True"),
    ("gb=-1", "gb", "-1"),
    ('gb=float("nan")', "gb", "nan"),
    ("gb=1e30", "gb", "1e+30"),
    ('size="17"', "size", "'17'"),
    ('size="17 GB of RAM"', "size", "'17 GB of RAM'"),
    ('size="17 TB"', "size", "'TB'"),
    ("size=17", "size", "17 (int)"),
    ("gb=17, gib=16", "gib", "gb=17, gib=16"),
    ("budget_gb=17", "budget_gb", "budget_gb=17"),
    ("17", "positional arguments", "17"),
    ('"17 GiB", "18 GiB"', "positional arguments", "'18 GiB'"),
    ('"17 GiB", gb=17', "gb", "'17 GiB'"),
    ("", "budget", "no budget"),
    ("gb=17, tolerance=10", "tolerance", "10"),
    ('gb=17, tolerance="lots"', "tolerance", "'lots'"),
    ('gb=17, gpu="A100"', "gpu", "'A100'"),
    ('gb=17, gpu="H999"', "gpu", "'H999'"),
    ("gb=17, setup=42", "setup", "42 (int)"),
    ('gb=17, setup="missing.json"', "setup", "'missing.json'"),
    ('gb=17, setup={"model": "Qwen/Qwen2.5-0.5B", "per_device_train_batch_size": 3, "num_generations": 2}',
     "per_device_train_batch_size", "must be divisible by num_generations"),
    ('gb=17, setup={"model": "Qwen/Qwen2.5-0.5B", "batch_size": 3}', "batch_size", "'batch_size'"),
    ('gb=17, setup={"model": "no-such/model-xyz"}', "model", "no-such/model-xyz"),
]


@pytest.mark.parametrize("arguments, field, given", BAD_MARKERS, ids=[b[1] + ":" + b[0][:30] for b in BAD_MARKERS])
def test_bad_marker_is_an_error_on_that_test_only(pytester, arguments, field, given):
    write(pytester, header() + textwrap.dedent(f"""
        @pytest.mark.gpu_budget({arguments})
        def test_bad(): pass

        @pytest.mark.gpu_budget(gb=40, setup=SETUP)
        def test_good(): pass

        def test_unmarked(): pass
    """))
    result = pytester.runpytest("--gpu-budget=estimate", *FAST)
    result.assert_outcomes(passed=2, errors=1)
    out = result.stdout.str()
    assert "INTERNALERROR" not in out and "Interrupted" not in out
    result.stdout.fnmatch_lines(["*ERROR at setup of test_bad*"])
    error_text = out.split("ERROR at setup of test_bad")[1].split("=====")[0]
    assert f" {field}:" in error_text or f"argument {field}" in error_text, error_text
    assert given in error_text, error_text
    assert "fix:" in error_text
    assert "Traceback" not in error_text and "plugin.py" not in error_text, error_text
    assert "pytest_gpumem/" not in error_text, error_text  # no frame of the plugin package either


def test_collect_only_lists_marker_errors(pytester):
    write(pytester, """
        import pytest
        @pytest.mark.gpu_budget(gb="lots")
        def test_bad(): pass
    """)
    result = pytester.runpytest("--gpu-budget=estimate", "--collect-only", *FAST)
    result.stdout.fnmatch_lines(["*= gpu budget marker errors =*",
                                 "*::test_bad: invalid @pytest.mark.gpu_budget argument gb: *'lots'*"])
    # a CI lint step catches it: pytest's own exit code for --collect-only with a collection error (issue 11)
    assert result.ret == pytest.ExitCode.INTERRUPTED == 2
    write(pytester, """
        import pytest
        @pytest.mark.gpu_budget(gb=17, setup=dict(model="Qwen/Qwen2.5-0.5B"))
        def test_good(): pass
    """)
    assert pytester.runpytest("--gpu-budget=estimate", "--collect-only", *FAST).ret == pytest.ExitCode.OK


# -- fixtures -------------------------------------------------------------------------------------------------------
def test_grpo_step_with_dict_setup_object_path_and_marker_setup(pytester):
    pytester.makefile(".json", **{"setups/small": json.dumps(SETUP)})
    write(pytester, header() + textwrap.dedent("""
        from pytest_gpumem import GRPOSetup

        @pytest.mark.gpu_budget(gib=20)
        def test_dict(grpo_step):
            result = grpo_step(SETUP)
            assert result.mode == "estimate" and result.peak_bytes == result.estimate.peak_bytes

        @pytest.mark.gpu_budget(gib=20)
        def test_object(grpo_step):
            grpo_step(GRPOSetup.from_dict(SETUP))

        @pytest.mark.gpu_budget(gib=20)
        def test_path(grpo_step):
            grpo_step("setups/small.json")

        @pytest.mark.gpu_budget(gib=20, setup="setups/small.json")
        def test_marker_path(): pass

        @pytest.mark.gpu_budget(gib=20, setup=SETUP)
        def test_no_argument(grpo_step):
            grpo_step()

        @pytest.mark.gpu_budget(gb=3)
        def test_worst_call_is_judged(grpo_step):
            small = dict(SETUP, max_completion_length=16, max_prompt_length=16)
            grpo_step(small)
            grpo_step(SETUP)

        @pytest.mark.gpu_budget(gib=20)
        def test_missing_setup(grpo_step):
            grpo_step()
    """))
    result, report, tests = run_json(pytester)
    result.assert_outcomes(passed=5, failed=1, errors=1)  # test_missing_setup: an error of the test
    peak = estimate(SETUP, gpu=20 * GIB).peak_bytes
    for name in ("test_dict", "test_object", "test_path", "test_marker_path", "test_no_argument"):
        assert tests[name]["predicted"]["peak_bytes"] == peak, name
        assert tests[name]["setup"]["model"] == "Qwen/Qwen2.5-0.5B"
    assert tests["test_worst_call_is_judged"]["setup"]["max_completion_length"] == 256
    result.stdout.fnmatch_lines(["*grpo_step() was called without a setup*"])


def test_grpo_step_without_gpu_budget_returns_the_estimate(pytester):
    write(pytester, header() + textwrap.dedent("""
        @pytest.mark.gpu_budget(gb=1)
        def test_inert(grpo_step):
            result = grpo_step(SETUP)
            assert result.estimate.peak_bytes > 10**9  # over the budget, but nothing is judged
    """))
    result = pytester.runpytest(*FAST)
    result.assert_outcomes(passed=1)
    assert "gpu budget" not in result.stdout.str()


def test_gpu_memory_without_cuda_falls_back_to_the_estimate(pytester):
    write(pytester, header() + textwrap.dedent("""
        @pytest.mark.gpu_budget(gb=3, setup=SETUP)
        def test_tracked_over(gpu_memory):
            with gpu_memory.track():
                pass
            assert gpu_memory.peak_reserved_bytes is None

        @pytest.mark.gpu_budget(gb=40)
        def test_tracked_no_setup(gpu_memory):
            with gpu_memory.track():
                pass
    """))
    result, report, tests = run_json(pytester)
    result.assert_outcomes(failed=1, errors=1)
    over = tests["test_tracked_over"]
    assert over["measured"]["reasons"]["peak_reserved_bytes"] == "not measured: no CUDA device"
    assert over["predicted"]["peak_bytes"] > 3 * GB
    assert over["reason"].startswith("predicted peak")
    alone = tests["test_tracked_no_setup"]  # nothing measured and no setup= to estimate: nothing to judge
    assert alone["verdict"] == "error" and alone["predicted"] is None
    assert alone["measured"]["peak_reserved_bytes"] is None
    assert alone["reason"].startswith("nothing to judge: give setup= or call grpo_step/gpu_memory")
    result.stdout.fnmatch_lines(["*::test_tracked_no_setup*-*not judged*ERROR*nothing to judge"])


def test_gpu_memory_measurement_is_judged(pytester, monkeypatch):
    """With a (faked) CUDA device the fixture's peaks are recorded and the budget is judged on them."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    @contextmanager
    def fake_profiling(device_index=0, use_torch=None):
        before = SimpleNamespace(nvml_used_bytes=1 * GIB)
        after = SimpleNamespace(torch_peak_reserved_bytes=5 * GIB, torch_peak_allocated_bytes=4 * GIB,
                                reason=lambda name: None)
        profile = SimpleNamespace(before=before, after=None, components={}, missing={})
        yield profile
        profile.after = after
        profile.components["nvml_peak_increase"] = 5 * GIB

    # the modules as sys.modules holds them: pytester's in-process runs drop modules first imported inside
    # them, which can leave a stale module object on the package attribute (pytest_gpumem.measure)
    monkeypatch.setattr(importlib.import_module("pytest_gpumem.measure.device"), "cuda_available", lambda: True)
    monkeypatch.setattr(importlib.import_module("pytest_gpumem.measure.profiling"), "memory_profiling", fake_profiling)
    write(pytester, """
        import pytest
        @pytest.mark.gpu_budget(gib=4)
        def test_over(gpu_memory):
            with gpu_memory.track():
                pass
            assert gpu_memory.nvml_peak_bytes == 6 * 2**30

        @pytest.mark.gpu_budget(gib=8)
        def test_under(gpu_memory):
            with gpu_memory.track():
                pass
    """)
    result, report, tests = run_json(pytester)
    result.assert_outcomes(passed=1, failed=1)
    assert tests["test_over"]["measured"]["peak_reserved_bytes"] == 5 * GIB
    assert tests["test_over"]["measured"]["nvml_peak_bytes"] == 6 * GIB
    assert tests["test_over"]["reason"] == ("measured peak (NVML, device) 6.00 GiB exceeds the 4 GiB = 4.29 GB "
                                            "budget by 2.00 GiB")  # no setup: no largest allocation, no levers
    result.stdout.fnmatch_lines(["*::test_over*5.00 GiB / 6.00 GiB*-2.00 GiB*FAILED*over budget"])


def test_default_budget_applies_to_fixture_users_and_markers_override_it(pytester):
    write(pytester, header() + textwrap.dedent("""
        def test_unmarked_fixture(grpo_step):
            grpo_step(SETUP)

        @pytest.mark.gpu_budget(setup=SETUP)
        def test_marker_without_size(): pass

        @pytest.mark.gpu_budget(gb=40, setup=SETUP)
        def test_marker_overrides(): pass

        def test_plain(): pass
    """))
    result, report, tests = run_json(pytester, "--gpu-budget-default=3 GB")
    result.assert_outcomes(passed=2, failed=2)
    assert tests["test_unmarked_fixture"]["budget_text"] == "3 GB = 2.79 GiB"
    assert tests["test_marker_without_size"]["verdict"] == "failed"
    assert tests["test_marker_overrides"]["budget_bytes"] == 40 * GB
    assert "test_plain" not in tests


# -- inert mode, strict markers, imports ---------------------------------------------------------------------------
def test_inert_without_the_option(pytester):
    write(pytester, header() + textwrap.dedent("""
        @pytest.mark.gpu_budget(gb=1, setup=SETUP)      # would fail when judged
        def test_overrun(): pass
        @pytest.mark.gpu_budget(gb="not even valid")    # would be an error when judged
        def test_bad(): pass
    """))
    result = pytester.runpytest("--strict-markers", *FAST)
    result.assert_outcomes(passed=2)
    assert "gpu budget" not in result.stdout.str() and "gpumem: mode" not in result.stdout.str()
    # one line says the budgets were not judged, so "2 passed" cannot be read as "the budgets hold" (issue 11)
    lines = [line for line in result.stdout.lines if line.startswith("gpumem")]
    assert lines == ["gpumem: 2 budgeted tests not judged — run with --gpu-budget"]
    write(pytester, "def test_plain(): pass\n")
    assert "gpumem:" not in pytester.runpytest(*FAST).stdout.str()  # no budgeted tests: nothing printed


def test_marker_is_registered_for_strict_markers(pytester):
    result = pytester.runpytest("--markers", *FAST)
    result.stdout.fnmatch_lines(["@pytest.mark.gpu_budget(gb=|gib=|mb=|mib=|size='17 GiB'*"])
    write(pytester, """
        import pytest
        @pytest.mark.gpu_budget(gb=17, setup=dict(model="Qwen/Qwen2.5-0.5B", dtype="bfloat16"))
        def test_marked(): pass
    """)
    pytester.runpytest("--strict-markers", "--gpu-budget=estimate", *FAST).assert_outcomes(passed=1)


def test_importing_the_plugin_pulls_no_torch():
    code = "import pytest_gpumem.plugin, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})


def test_pytest_runs_do_not_import_torch(pytester):
    write(pytester, header() + textwrap.dedent("""
        import sys
        @pytest.mark.gpu_budget(gb=40, setup=SETUP)
        def test_budgeted(grpo_step, gpu_memory):
            grpo_step(SETUP)
            with gpu_memory.track():
                pass
            assert "torch" not in sys.modules
    """))
    pytester.runpytest_subprocess(*FAST).assert_outcomes(passed=1)
    pytester.runpytest_subprocess("--gpu-budget", *FAST).assert_outcomes(passed=1)


# -- the README's main job ---------------------------------------------------------------------------------------
def test_examples_run_on_cpu_with_one_command(pytester):
    """`pytest examples/ --gpu-budget`: passes, two expected failures whose messages show, the summary table."""
    import shutil
    from pathlib import Path

    shutil.copytree(Path(__file__).parent.parent / "examples", pytester.path / "examples")
    result = pytester.runpytest("examples", "--gpu-budget", *FAST)
    result.assert_outcomes(passed=13, xfailed=2)
    result.stdout.fnmatch_lines([
        "gpumem: mode=estimate (auto: no CUDA device, so estimate)*",
        "*= gpu budget (estimate) =*",
        "test_full_ft*_cannot_fit_a100_40gb*XFAILED*over budget",
        "test_full_ft*_fits_a100_40gb*PASSED",
    ])
    result.stdout.fnmatch_lines([
        "XFAILED examples/test_l4_story.py::test_seed_config_overruns_the_l4: predicted peak *",
        "    top levers (each re-estimated):",
        "      1. *",
    ])
    # without --gpu-budget the same suite is inert: the expected failures pass (non-strict xfail)
    pytester.runpytest("examples", *FAST).assert_outcomes(passed=13, xpassed=2)


def test_grpo_step_with_a_bad_setup_is_the_markers_clean_error(pytester):
    """A misspelled key given to grpo_step() reads as it does in a marker — field, value, fix — an error of the
    test, with or without --gpu-budget; no traceback through marker.py / spec.py (issue 11)."""
    write(pytester, """
        import pytest

        @pytest.mark.gpu_budget(gb=24)
        def test_typo(grpo_step):
            grpo_step(dict(model="Qwen/Qwen2.5-0.5B", lora_rnak=16))

        def test_typo_unbudgeted(grpo_step):
            grpo_step(dict(model="Qwen/Qwen2.5-0.5B", lora_rnak=16))
    """)
    for args in (("--gpu-budget=estimate",), ()):
        result = pytester.runpytest(*args, *FAST)
        result.assert_outcomes(errors=2)
        text = result.stdout.str()
        result.stdout.fnmatch_lines(["invalid setup given to grpo_step() — lora_rnak: *",
                                     "*fix: *lora_rank*"])
        assert "Traceback" not in text and "spec.py" not in text and "marker.py" not in text, text
