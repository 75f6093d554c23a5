"""GPU truth in the repository: the estimator against every committed ``validation/*.json``.

Each committed file becomes one test (``test_committed_validation_file[<file>]``): its schema is checked
and every GPU measurement in it (status ok or oom) is compared with what the *current* estimator predicts
for that setup on that GPU, within the file's tolerance. The rest of this module checks the machinery that
produces and reads those files, for real: a tiny setup measured on CPU through the whole pipeline, the
checker passing and failing on measurements placed around the estimate, and the GPU-sized matrix.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_gpumem.compare.validation import (
    DEFAULT_TOLERANCE,
    MIN_SETUPS,
    SCHEMA,
    SMOKE,
    build_matrix,
    check_file,
    load_validation,
    markdown_table,
    new_document,
    output_path,
    run_matrix,
    schema_problems,
    write_validation,
)
from pytest_gpumem.predict.analytic import estimate
from pytest_gpumem.spec import GRPOSetup
from pytest_gpumem.units import GIB

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = sorted((ROOT / "validation").glob("*.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_validation_file(path):
    document = load_validation(path)  # raises with every schema problem listed
    checks = check_file(document)
    failures = [c for c in checks if c.checked and not c.ok]
    report = "\n".join(f"{c.name}: {c.message}" for c in failures)
    assert not failures, f"{path.name}: the estimator misses {len(failures)} GPU measurement(s):\n{report}"


def test_committed_files_have_markdown_tables():
    for path in COMMITTED:
        assert path.with_suffix(".md").exists(), f"{path.name} has no Markdown table next to it"


# -- the pipeline, for real, on CPU ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_document(tmp_path_factory):
    out = tmp_path_factory.mktemp("validation")
    entries = build_matrix(80 * GIB, only=[SMOKE[0]])
    gpu = {"name": "cpu", "total_bytes": 80 * GIB, "source": "nominal"}
    path = output_path(out, gpu["name"])
    document = run_matrix(entries, path, gpu, device="cpu", steps=2, timeout_s=300)
    return path, document


def test_writer_output_passes_the_schema_and_reads_back(smoke_document):
    path, document = smoke_document
    assert path.name.startswith("cpu-") and path.suffix == ".json"
    loaded = load_validation(path)
    assert loaded == json.loads(json.dumps(document, default=str))
    assert loaded["schema"] == SCHEMA
    (entry,) = loaded["entries"]
    assert entry["name"] == SMOKE[0]
    assert entry["status"] == "ok", entry["measured"]["reason"]
    assert entry["measured"]["steps_completed"] == 2
    assert entry["estimate"]["peak_bytes"] > 0
    assert loaded["versions"]["trl"] and loaded["versions"]["torch"]
    assert "tiny-qwen2-smoke | ok" in path.with_suffix(".md").read_text(encoding="utf-8")
    (check,) = check_file(loaded)
    assert not check.checked and "measured on cpu" in check.message


def test_resume_skips_entries_already_measured(smoke_document):
    path, document = smoke_document
    calls = []
    entries = build_matrix(80 * GIB, only=[SMOKE[0]])
    again = run_matrix(entries, path, document["gpu"], device="cpu",
                       runner=lambda *args, **kwargs: calls.append(args))
    assert calls == [] and len(again["entries"]) == 1


# -- the checker against measurements placed around the estimate ----------------------------------------
def _gpu_entry(name: str, setup: dict, measured_total: int | None, status: str = "ok") -> dict:
    breakdown = None
    if measured_total is not None:
        breakdown = {"source": "measure", "phases": {"training": {"other": measured_total}},
                     "peak_phase": "training", "peak_bytes": measured_total}
    return {"name": name, "setup": GRPOSetup.from_dict(setup).to_dict(), "estimate": {}, "status": status,
            "measured": {"status": status, "reason": None, "steps_completed": 2 if status == "ok" else 0,
                         "peak_reserved_bytes": measured_total, "peak_total_bytes": measured_total,
                         "breakdown": breakdown, "phases": {}, "reasons": {}, "device": {"type": "cuda"}}}


SETUP = {"model": "Qwen/Qwen2.5-0.5B", "dtype": "bfloat16", "max_prompt_length": 256,
         "max_completion_length": 256}
H100 = 79 * GIB


def test_checker_passes_within_tolerance_and_fails_outside(tmp_path):
    predicted = estimate(SETUP, gpu=H100).peak_bytes
    document = new_document({"name": "Fake H100", "total_bytes": H100}, steps=2)
    document["entries"] = [
        _gpu_entry("close", SETUP, int(predicted / 1.05)),
        _gpu_entry("far-above", SETUP, int(predicted * 1.6)),
        _gpu_entry("far-below", SETUP, int(predicted * 0.5)),
        _gpu_entry("oom-predicted-to-fit", SETUP, None, status="oom"),
        _gpu_entry("crashed", SETUP, None, status="crashed"),
    ]
    path = tmp_path / "fake.json"
    write_validation(path, document)
    checks = {c.name: c for c in check_file(load_validation(path))}
    assert checks["close"].checked and checks["close"].ok
    assert abs(checks["close"].relative_error - 0.05) < 0.001
    assert not checks["far-above"].ok and not checks["far-below"].ok
    assert "tolerance ±15%" in checks["far-above"].message
    assert checks["oom-predicted-to-fit"].checked and not checks["oom-predicted-to-fit"].ok
    assert not checks["crashed"].checked and checks["crashed"].ok
    assert "far-above" in markdown_table(document)


def test_an_oom_the_estimate_foresaw_passes():
    big = {**SETUP, "model": "Qwen/Qwen2.5-7B"}  # full fine-tuning of 7B in bf16 on 24 GiB
    document = new_document({"name": "Fake 24GiB", "total_bytes": 24 * GIB}, steps=2)
    document["entries"] = [_gpu_entry("oom", big, None, status="oom")]
    (check,) = check_file(document)
    assert check.checked and check.ok


def test_schema_problems_are_all_listed(tmp_path):
    assert schema_problems([]) == ["the document is a list, not an object"]
    document = new_document({"name": "x", "total_bytes": 1}, steps=2)
    document["entries"] = [{"name": "a", "status": "weird", "setup": {"model": "no-such-model-xyz"},
                            "estimate": {}, "measured": {}}, {"name": "a"}]
    del document["tolerance"]
    problems = schema_problems(document)
    text = "\n".join(problems)
    assert "missing top-level key 'tolerance'" in text
    assert "unknown status 'weird'" in text
    assert "not a valid setup" in text
    assert "duplicate name 'a'" in text
    assert "missing 'peak_total_bytes'" in text
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(ValueError, match="duplicate name"):
        load_validation(path)


# -- the matrix ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gib", [80, 22])
def test_matrix_is_sized_to_the_gpu(gib):
    total = gib * GIB
    entries = build_matrix(total, extras={"vllm": False, "bitsandbytes": False})
    assert len(entries) >= MIN_SETUPS
    assert len({e.name for e in entries}) == len(entries)
    for entry in entries:
        assert entry.predicted_peak_bytes <= 0.85 * total, entry.name
    sizes = {e.setup.model_spec.num_params for e in entries}
    assert min(sizes) < 0.7e9 and max(sizes) > 6e9  # 0.5B–8B
    kinds = {(e.setup.is_lora, e.setup.gradient_checkpointing) for e in entries}
    assert {(True, True), (False, True), (False, False)} <= kinds
    assert not any(e.setup.use_vllm or e.setup.load_in_4bit for e in entries)


def test_matrix_adds_qlora_and_vllm_when_installed():
    entries = build_matrix(80 * GIB, extras={"vllm": True, "bitsandbytes": True})
    assert any(e.setup.load_in_4bit for e in entries)
    vllm = [e for e in entries if e.setup.use_vllm]
    assert {e.setup.vllm_enable_sleep_mode for e in vllm} == {True, False}


def test_default_tolerance_is_what_new_files_carry():
    assert new_document({"name": "x", "total_bytes": 1}, steps=2)["tolerance"] == DEFAULT_TOLERANCE
