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
