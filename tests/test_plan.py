"""``gpumem validate --plan`` and ``--max-minutes``: the order by what each run teaches, the expected times,
and a time budget that holds with every finished run written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from pytest_gpumem.compare.plan import FAMILIES, expected_seconds, family, order, plan_text
from pytest_gpumem.compare.validation import CANDIDATES, SMOKE, build_matrix, run_matrix
from pytest_gpumem.units import GIB

ROOT = Path(__file__).parent.parent
ALL = {"vllm": True, "bitsandbytes": True}


def test_every_candidate_has_a_family():
    assert {name for name, _, _ in CANDIDATES + [SMOKE]} <= set(FAMILIES)


def test_one_run_per_family_comes_before_any_second_one():
    entries = order(build_matrix(80 * GIB, extras=ALL), steps=2)
    families = [family(entry.name) for entry in entries]
    distinct = len(set(families))
    assert len(set(families[:distinct])) == distinct  # the first `distinct` runs cover every family once
    firsts = [expected_seconds(entry.setup, 2) for entry in entries[:distinct]]
    assert firsts == sorted(firsts)


def test_expected_time_grows_with_the_work():
    entries = {e.name: e for e in build_matrix(80 * GIB, extras=ALL)}
    short = expected_seconds(entries["qwen2.5-0.5b-full-bf16-gc"].setup, 2)
    assert expected_seconds(entries["qwen2.5-0.5b-full-bf16-gc-long"].setup, 2) > short
    assert expected_seconds(entries["qwen2.5-0.5b-vllm-lora16"].setup, 2) > short  # vLLM's start-up
    assert expected_seconds(entries["qwen2.5-0.5b-full-bf16-gc"].setup, 10) > short


def test_plan_lists_peak_time_and_total():
    entries = order(build_matrix(80 * GIB, extras=ALL), steps=2)
    text = plan_text(entries, "Fake", 80 * GIB, 2)
    assert text.count(" GiB ") >= len(entries) and "total expected:" in text
    total = sum(expected_seconds(e.setup, 2) for e in entries) / 60
    assert f"total expected: {total:.1f} min" in text


def test_max_minutes_skips_what_would_not_finish_and_cuts_timeouts(tmp_path, monkeypatch):
    """A fake clock: each run takes exactly its expected time. Room for the first two runs plus a little."""
    entries = order(build_matrix(80 * GIB, extras=ALL), steps=2)
    first, second = (expected_seconds(e.setup, 2) for e in entries[:2])
    budget = first + second + 1
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr("pytest_gpumem.compare.validation.time.monotonic", lambda: clock.now)
    calls = []

    def runner(setup, steps, device, timeout_s, progress):
        calls.append(timeout_s)
        clock.now += expected_seconds(setup, steps)
        return SimpleNamespace(status="ok", data={}, reason=None, steps_completed=2, peak_reserved_bytes=1,
                               peak_allocated_bytes=1, non_torch_bytes=0, nvml_peak_bytes=None, peak_total_bytes=1,
                               reasons={}, to_dict=lambda: {}, summary=lambda: "ok")

    path = tmp_path / "v.json"
    document = run_matrix(entries, path, {"name": "Fake", "total_bytes": 80 * GIB}, device="cpu",
                          max_seconds=budget, timeout_s=900, runner=runner)
    assert calls == [budget, budget - first]  # each run's timeout is what is left of the budget
    written = [e["name"] for e in json.loads(path.read_text())["entries"]]
    assert written == [e.name for e in entries[:2]] == [e["name"] for e in document["entries"]]


def test_cli_plan_runs_without_a_gpu():
    result = subprocess.run([sys.executable, "-m", "pytest_gpumem.cli", "validate", "--plan", "--gpu", "L4"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "one per component family first" in result.stdout and "total expected" in result.stdout


def test_without_a_gpu_the_error_says_how_to_plan_for_a_named_card(monkeypatch):
    # a CPU machine asking for the plan must learn that --gpu NAME makes --plan work here
    import pytest

    from pytest_gpumem.compare import validation
    from pytest_gpumem.errors import GpuMemError

    monkeypatch.setattr(validation, "nvml_handle", lambda index: (None, None, "NVML library not found"))
    with pytest.raises(GpuMemError) as raised:
        validation.gpu_at_hand()
    assert "--gpu H200 --plan" in str(raised.value) and "NVML library not found" in str(raised.value)
