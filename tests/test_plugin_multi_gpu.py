"""The plugin on multi-GPU setups: a budget is per GPU and judged on the worst training rank, the section shows
every role, and the ini keys launch the whole suite the way an accelerate config does."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

from pytest_gpumem import estimate
from pytest_gpumem.units import GIB

FAST = ("-p", "no:cacheprovider", "-p", "no:unraisableexception", "-p", "no:hypothesispytest", "-p", "no:benchmark",
        "-p", "no:anyio")
CONFIGS = Path(__file__).parent / "fixtures" / "accelerate_configs"
SETUP = {"model": "Qwen/Qwen2.5-7B", "dtype": "bfloat16", "per_device_train_batch_size": 8,
         "max_prompt_length": 256, "max_completion_length": 256}


def run(pytester, source, *args):
    pytester.makepyfile(test_mod=f"import pytest\nSETUP = {SETUP!r}\n" + textwrap.dedent(source))
    result = pytester.runpytest("--gpu-budget=estimate", "--gpu-budget-json=out.json", *FAST, "-rA", *args)
    report = json.loads((pytester.path / "out.json").read_text())
    return result, {t["nodeid"].split("::")[-1]: t for t in report["tests"]}


def test_multi_gpu_marker_is_judged_on_the_worst_rank(pytester):
    zero3 = estimate({**SETUP, "world_size": 8, "distributed": "zero3"})
    worst = zero3.breakdown.role(zero3.breakdown.worst_role).peak_bytes
    assert worst == zero3.peak_bytes
    one_gpu = estimate(SETUP).peak_bytes
    budget_gib = (worst + one_gpu) / 2 / GIB  # fits per rank on 8 GPUs, not on one
    result, tests = run(pytester, f"""
        @pytest.mark.gpu_budget(gib={budget_gib:.3f}, setup={{**SETUP, "world_size": 8, "distributed": "zero3"}})
        def test_eight(): pass

        @pytest.mark.gpu_budget(gib={budget_gib:.3f}, setup=SETUP)
        def test_one(): pass
    """)
    result.assert_outcomes(passed=1, failed=1)
    assert tests["test_eight"]["verdict"] == "passed" and tests["test_one"]["verdict"] == "failed"
    predicted = tests["test_eight"]["predicted"]
    assert predicted["peak_bytes"] == worst and predicted["worst_role"] == "rank0"
    assert set(predicted["roles"]) == {"rank0", "rank1+"}
    assert "roles" not in tests["test_one"]["predicted"]
    result.stdout.fnmatch_lines(["*(the worst training GPU: rank0)*", "role*peak*phase*top components*",
                                 "rank0*← worst training GPU", "rank1+*",
                                 "per GPU, each role against its own budget*"])


def test_ini_accelerate_config_launches_every_setup(pytester):
    shutil.copy(CONFIGS / "zero3.yaml", pytester.path / "zero3.yaml")
    pytester.makeini("[pytest]\ngpu_budget_accelerate_config = zero3.yaml\n")
    result, tests = run(pytester, """
        @pytest.mark.gpu_budget(gib=80, setup=SETUP)
        def test_suite_strategy(): pass

        @pytest.mark.gpu_budget(gib=80, setup={**SETUP, "world_size": 2, "distributed": "fsdp2"})
        def test_own_strategy(): pass
    """)
    result.assert_outcomes(passed=2)
    suite, own = tests["test_suite_strategy"]["setup"], tests["test_own_strategy"]["setup"]
    assert (suite["world_size"], suite["distributed"], suite["overlap_comm"]) == (8, "zero3", True)
    assert (own["world_size"], own["distributed"], own["reshard_after_forward"]) == (2, "fsdp2", True)


def test_bad_ini_world_size_names_the_key(pytester):
    pytester.makeini("[pytest]\ngpu_budget_world_size = eight\n")
    pytester.makepyfile(test_mod="def test_x(): pass\n")
    result = pytester.runpytest("--gpu-budget=estimate", *FAST)
    assert "gpu_budget_world_size" in result.stderr.str() + result.stdout.str()
    assert "INTERNALERROR" not in result.stdout.str()
