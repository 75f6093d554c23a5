"""Issue 11's "Small" list: the JSON report's mode, one timestamp format, the missing-setup-file message, an empty
setup file, and what ``optim="adamw"`` suggests."""

from __future__ import annotations

import json
import re
import stat

import pytest

from pytest_gpumem.errors import GpuMemError
from pytest_gpumem.spec import GRPOSetup

FAST = ("-p", "no:cacheprovider", "-p", "no:randomly")
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")


def test_json_report_is_0644_and_every_timestamp_is_utc_plus_00_00(pytester):
    pytester.makepyfile(test_a="""
        import pytest
        @pytest.mark.gpu_budget(gb=24, setup=dict(model="Qwen/Qwen2.5-0.5B", dtype="bfloat16"))
        def test_a(): pass
    """)
    result = pytester.runpytest("--gpu-budget=estimate", "--gpu-budget-json=out.json", "--gpu-budget-md=out.md", *FAST)
    result.assert_outcomes(passed=1)
    path = pytester.path / "out.json"
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((pytester.path / "out.md").stat().st_mode) == 0o644
    session = json.loads(path.read_text())["session"]
    assert ISO_UTC.match(session["started_at"]) and ISO_UTC.match(session["finished_at"]), session


def test_missing_setup_file_lists_each_folder_once(pytester):
    pytester.makepyfile(test_a="""
        import pytest
        @pytest.mark.gpu_budget(gb=24, setup="nope.json")
        def test_a(): pass
    """)
    result = pytester.runpytest("--gpu-budget=estimate", *FAST)
    line = next(line for line in result.stdout.lines if "no setup file 'nope.json'" in line)
    looked = line.split("(looked in ", 1)[1].rstrip(")").split(", ")
    assert looked == [str(pytester.path)], line


def test_an_empty_setup_file_says_so(tmp_path):
    path = tmp_path / "setup.json"
    path.write_text("")
    with pytest.raises(GpuMemError, match=r"setup\.json is an empty file"):
        GRPOSetup.from_file(path)


def test_optim_adamw_suggests_adamw_torch():
    with pytest.raises(GpuMemError) as info:
        GRPOSetup.from_dict({"model": "Qwen/Qwen2.5-0.5B", "optim": "adamw"})
    assert "did you mean 'adamw_torch'?" in str(info.value)


# -- levers: a visible threshold, and "none helps" ---------------------------------------------------------------
SETUP_05B = {"model": "Qwen/Qwen2.5-0.5B", "dtype": "bfloat16", "per_device_train_batch_size": 4,
             "num_generations": 4, "max_prompt_length": 128, "max_completion_length": 256}


def test_levers_below_one_percent_of_the_peak_are_dropped():
    from pytest_gpumem import estimate
    from pytest_gpumem.diagnose.levers import MIN_SAVING_FRACTION, rank_levers

    before = estimate(SETUP_05B)
    levers = rank_levers(SETUP_05B)
    assert levers and all(lever.saves_bytes >= before.peak_bytes * MIN_SAVING_FRACTION for lever in levers)
    # the lever the issue saw ("completion length −25% ... saves 0.006 MiB") is gone
    assert not any(lever.name.startswith("completion length") for lever in levers)


def test_a_failure_says_when_no_lever_helps(pytester):
    tiny = json.loads((__import__("pathlib").Path(__file__).parents[1] / "examples" / "setups" /
                       "tiny-qwen2-cpu.json").read_text())
    pytester.makepyfile(test_a=f"""
        import pytest
        @pytest.mark.gpu_budget(mib=100, setup={tiny!r})   # the CUDA context alone is 512 MiB
        def test_a(): pass
    """)
    result = pytester.runpytest("--gpu-budget=estimate", *FAST)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["no one-step lever saves * or more (1% of the predicted peak): none helps enough "
                                 "to list"])
    assert "saves 0.0" not in result.stdout.str()
