"""Baselines: the store (schema, corruption, migration, locking under concurrency), tolerances, comparison
and the plugin-facing check_against_baseline()."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_gpumem.compare import baseline as baseline_module
from pytest_gpumem.compare.baseline import (
    DEFAULT_TOLERANCE,
    SCHEMA_VERSION,
    BaselineStore,
    BaselineStoreError,
    check_against_baseline,
    compare,
    hardware_key,
    headline_peak_bytes,
    record_from_result,
)
from pytest_gpumem.errors import GpuMemError
from pytest_gpumem.predict.analytic import estimate
from pytest_gpumem.units import GIB, MIB, Tolerance

REPO_ROOT = Path(__file__).resolve().parents[1]
VERSIONS = {"python": "3.11.7", "torch": "2.8.0", "transformers": "4.57.1", "trl": "0.24.0", "vllm": "0.11.0",
            "unsloth": None, "pytest-gpumem": "0.1.0"}


def estimate_result(test_id="tests/test_grpo.py::test_fits", **setup_changes) -> dict:
    """A per-test result record as the plugin produces it in estimate mode, from a real estimate."""
    setup = {"model": "Qwen/Qwen2.5-0.5B", "max_completion_length": 512, **setup_changes}
    est = estimate(setup, gpu="L4")
    return {"nodeid": test_id, "mode": "estimate", "budget_bytes": 20 * GIB, "budget_text": "20 GiB = 21.47 GB",
            "setup": est.setup.to_dict(), "predicted": est.breakdown.to_dict(), "measured": None, "baseline": None,
            "gpu": {"name": "NVIDIA L4", "total_bytes": est.gpu.total_bytes}, "verdict": "passed", "reason": None}


def measure_result(nvml_peak_bytes, *, logits_bytes=2 * GIB) -> dict:
    """measure mode: NVML's device peak is the headline; torch's reserved peak is 600 MiB below it."""
    peak_reserved_bytes = nvml_peak_bytes - 600 * MIB
    phases = {"persistent": {"weights": 4 * GIB, "optimizer_states": 8 * GIB},
              "training": {"weights": 4 * GIB, "optimizer_states": 8 * GIB, "logits": logits_bytes,
                           "activations": GIB}}
    return {"nodeid": "tests/test_grpo.py::test_measured", "mode": "measure", "budget_bytes": 20 * GIB,
            "budget_text": "20 GiB", "setup": {"model": "Qwen/Qwen2.5-7B", "max_completion_length": 1024},
            "predicted": {"source": "estimate", "phases": phases, "peak_phase": "training", "peak_bytes": 15 * GIB},
            "measured": {"breakdown": {"source": "measure", "phases": phases},
                         "peak_reserved_bytes": peak_reserved_bytes,
                         "peak_allocated_bytes": peak_reserved_bytes - 100 * MIB,
                         "nvml_peak_bytes": nvml_peak_bytes, "reasons": {}},
            "baseline": None, "gpu": {"name": "NVIDIA H100 80GB HBM3", "total_bytes": 85_520_809_984},
            "verdict": "passed", "reason": None}


# -- hardware key --------------------------------------------------------------------------------
def test_hardware_key_measure_names_the_gpu_and_its_memory():
    assert hardware_key("measure", "NVIDIA H100 80GB HBM3", 85_520_809_984) == "NVIDIA H100 80GB HBM3 (81559 MiB)"
    # a MIG slice of the same card has a different total: a different baseline
    assert (hardware_key("measure", "NVIDIA H100 80GB HBM3", 10 * GIB)
            != hardware_key("measure", "NVIDIA H100 80GB HBM3", 80 * GIB))


def test_hardware_key_estimate_and_simulate_do_not_depend_on_the_runner():
    assert hardware_key("estimate", "NVIDIA L4", 24 * GIB) == "estimate"
    assert hardware_key("simulate") == "simulate"


@pytest.mark.parametrize("args", [("measure", None, None), ("measure", "NVIDIA L4", 0), ("benchmark", "x", 1)])
def test_hardware_key_rejects_incomplete_input(args):
    with pytest.raises(GpuMemError):
        hardware_key(*args)


# -- tolerance -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, percent, absolute_bytes", [
    ("5%+256MiB", 5.0, 256 * MIB),
    ("256 MiB + 5%", 5.0, 256 * MIB),
    ("5%", 5.0, 0),
    ("2.5%", 2.5, 0),
    ("1GB", 0.0, 10**9),
    ("512 MiB", 0.0, 512 * MIB),
    ("0", 0.0, 0),
    ("0%", 0.0, 0),
])
def test_tolerance_forms(text, percent, absolute_bytes):
    tolerance = Tolerance.parse(text)
    assert (tolerance.percent, tolerance.absolute_bytes) == (percent, absolute_bytes)
    assert Tolerance.parse(str(tolerance)) == Tolerance(percent / 100, absolute_bytes, str(tolerance))


def test_tolerance_allows_percent_of_the_baseline_plus_absolute():
    tolerance = Tolerance.parse("5%+256MiB")
    assert tolerance.allowed_bytes(14 * GIB) == int(14 * GIB * 0.05) + 256 * MIB
    assert Tolerance.parse("0").allowed_bytes(14 * GIB) == 0


@pytest.mark.parametrize("text, expected_in_message", [
    ("5", "no unit"),
    ("5 %%", "percentage"),
    ("-5%", "percentage"),
    ("5%+", "empty term"),
    ("5%+6%", "percentage twice"),
    ("1GiB+2GiB", "absolute size twice"),
    ("256 MiB of slack", "256 MiB of slack"),
    ("", "empty"),
    (5, "expected a string"),
])
def test_tolerance_rejects_bad_input_clearly(text, expected_in_message):
    with pytest.raises(GpuMemError) as info:
        Tolerance.parse(text, field="gpu_budget_tolerance")
    assert info.value.field == "gpu_budget_tolerance"
    assert expected_in_message in str(info.value)
    assert info.value.fix


# -- versions and records ------------------------------------------------------------------------
def test_software_versions_reads_metadata_without_importing_torch():
    code = ("import sys, json; from pytest_gpumem.compare.baseline import software_versions; v = software_versions(); "
            "print(json.dumps([v, 'torch' in sys.modules, 'transformers' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    versions, torch_imported, transformers_imported = json.loads(out.stdout)
    assert not torch_imported and not transformers_imported
    for package in ("torch", "transformers", "trl", "vllm", "unsloth", "pytest-gpumem", "python"):
        assert package in versions
    import torch  # the test environment has it; the metadata must agree with the module

    assert versions["torch"] == torch.__version__
    assert versions["pytest-gpumem"]


def test_record_from_estimate_result_gates_on_the_predicted_peak():
    result = estimate_result()
    record = record_from_result(result, versions=VERSIONS, recorded_at="2025-01-01T00:00:00+00:00")
    assert record["breakdown"] == result["predicted"]
    assert record["predicted_peak_bytes"] == result["predicted"]["peak_bytes"]
    assert headline_peak_bytes(record) == ("breakdown_peak_bytes", result["predicted"]["peak_bytes"])
    assert record["peak_bytes"] == result["predicted"]["peak_bytes"]
    assert record["versions"] == VERSIONS and record["setup"]["max_completion_length"] == 512
    assert record["recorded_at"] == "2025-01-01T00:00:00+00:00"


def test_record_from_measure_result_gates_on_the_nvml_peak_like_the_budget_check():
    from pytest_gpumem.record import judged_peak

    result = measure_result(14 * GIB)
    record = record_from_result(result, versions=VERSIONS)
    assert headline_peak_bytes(record) == ("nvml_peak_bytes", 14 * GIB) and judged_peak(result)[0] == 14 * GIB
    assert record["peak_reserved_bytes"] == 14 * GIB - 600 * MIB
    assert record["breakdown"]["source"] == "measure"  # the measured breakdown, not the prediction
    assert record["predicted_peak_bytes"] == 15 * GIB
    assert record["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "total_bytes": 85_520_809_984}


# -- store: basics -------------------------------------------------------------------------------
def test_put_then_get_round_trips_and_creates_the_directory(tmp_path):
    store = BaselineStore(tmp_path / ".gpumem" / "baselines.json")
    assert store.get("t::a", "estimate") is None  # no file yet: nothing, no error
    record = record_from_result(estimate_result(), versions=VERSIONS)
    store.put("t::a", "estimate", record)
    assert store.get("t::a", "estimate") == record
    document = json.loads(store.path.read_text())
    assert document["schema"] == "pytest-gpumem-baselines" and document["schema_version"] == SCHEMA_VERSION
    assert document["written_by"].startswith("pytest-gpumem ")
    # stable, reviewable output: sorted keys, trailing newline, normal permissions, no temp files left
    text = store.path.read_text()
    assert text.endswith("}\n") and text == json.dumps(document, indent=2, sort_keys=True) + "\n"
    assert store.path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in store.path.parent.iterdir() if p.suffix == ".tmp") == []


def test_put_updates_one_entry_and_keeps_the_others(tmp_path):
    store = BaselineStore(tmp_path / "b.json")
    first = record_from_result(measure_result(14 * GIB), versions=VERSIONS)
    second = record_from_result(measure_result(15 * GIB), versions=VERSIONS)
    store.put("t::a", "H100 (81559 MiB)", first)
    store.put("t::a", "estimate", record_from_result(estimate_result(), versions=VERSIONS))
    store.put("t::b", "H100 (81559 MiB)", first)
    store.put("t::a", "H100 (81559 MiB)", second)
    assert store.get("t::a", "H100 (81559 MiB)")["nvml_peak_bytes"] == 15 * GIB
    assert store.get("t::b", "H100 (81559 MiB)")["nvml_peak_bytes"] == 14 * GIB
    assert store.keys_for("t::a") == ["H100 (81559 MiB)", "estimate"]


def test_put_rejects_a_record_without_a_peak(tmp_path):
    store = BaselineStore(tmp_path / "b.json")
    with pytest.raises(BaselineStoreError, match="no peak to compare"):
        store.put("t::a", "estimate", {"mode": "estimate", "versions": {}})
    with pytest.raises(BaselineStoreError, match="non-negative integer"):
        store.put("t::a", "estimate", {"mode": "estimate", "predicted_peak_bytes": "12 GiB"})
    assert not store.path.exists()


# -- store: corrupt, foreign, newer and older files ----------------------------------------------
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_corrupt_json_is_a_clear_error_naming_the_file_and_is_never_replaced(tmp_path):
    path = _write(tmp_path / "baselines.json", '{"schema": "pytest-gpumem-baselines",\n "schema_version": 1,,}')
    store = BaselineStore(path)
    with pytest.raises(BaselineStoreError) as info:
        store.get("t::a", "estimate")
    message = str(info.value)
    assert str(path) in message and "not valid JSON" in message and "line 2" in message
    assert "git checkout" in message
    with pytest.raises(BaselineStoreError):
        store.put("t::a", "estimate", record_from_result(estimate_result(), versions=VERSIONS))
    assert path.read_text() == '{"schema": "pytest-gpumem-baselines",\n "schema_version": 1,,}'


@pytest.mark.parametrize("content, expected", [
    ('[1, 2]', "not a pytest-gpumem baseline file"),
    ('{"benchmarks": []}', "not a pytest-gpumem baseline file"),
    ('{"schema": "pytest-gpumem-baselines", "schema_version": "1", "baselines": {}}', "expected an integer"),
    ('{"schema": "pytest-gpumem-baselines", "schema_version": 1, "baselines": []}', "expected an object"),
    ('{"schema": "pytest-gpumem-baselines", "schema_version": 1, "baselines": {"t::a": 3}}', "keyed by hardware"),
    ('{"schema": "pytest-gpumem-baselines", "schema_version": 1, "baselines": {"t::a": {"estimate": '
     '{"mode": "estimate", "predicted_peak_bytes": -1}}}}', "predicted_peak_bytes"),
    ('{"schema": "pytest-gpumem-baselines", "schema_version": 1, "baselines": {"t::a": {"estimate": '
     '{"mode": "estimate", "breakdown": {"phases": {"training": {"logits": "big"}}}}}}}', "breakdown.phases"),
])
def test_wrong_schema_is_a_clear_error_naming_the_file(tmp_path, content, expected):
    path = _write(tmp_path / "baselines.json", content)
    with pytest.raises(BaselineStoreError) as info:
        BaselineStore(path).load()
    assert str(path) in str(info.value) and expected in str(info.value)
    assert path.read_text() == content


def test_newer_schema_asks_to_upgrade(tmp_path):
    path = _write(tmp_path / "b.json", json.dumps({"schema": "pytest-gpumem-baselines",
                                                   "schema_version": SCHEMA_VERSION + 1,
                                                    "written_by": "pytest-gpumem 9.0.0", "baselines": {}}))
    with pytest.raises(BaselineStoreError, match="newer pytest-gpumem.*9.0.0.*upgrade pytest-gpumem"):
        BaselineStore(path).load()


def test_older_schema_without_a_migration_is_refused_with_instructions(tmp_path):
    content = json.dumps({"schema": "pytest-gpumem-baselines", "schema_version": 0, "written_by": "pytest-gpumem 0.0.1",
                          "baselines": {"t::a": {"estimate": {"peak": 1}}}})
    path = _write(tmp_path / "b.json", content)
    with pytest.raises(BaselineStoreError) as info:
        BaselineStore(path).load()
    message = str(info.value)
    assert "schema 0" in message and "cannot be migrated" in message and "--gpu-budget-save" in message
    assert path.read_text() == content


def test_older_schema_with_a_migration_is_migrated_and_rewritten_on_save(tmp_path, monkeypatch):
    """The migration chain: a version-0 document (flat 'entries' list) turned into the current schema."""

    def migrate_0_to_1(document):
        baselines = {}
        for entry in document["entries"]:
            baselines.setdefault(entry["test"], {})[entry["hardware"]] = {
                "mode": "estimate", "predicted_peak_bytes": entry["peak"], "versions": {}}
        return {"schema": document["schema"], "schema_version": 1, "baselines": baselines}

    monkeypatch.setitem(baseline_module.MIGRATIONS, 0, migrate_0_to_1)
    path = _write(tmp_path / "b.json", json.dumps({"schema": "pytest-gpumem-baselines", "schema_version": 0,
                                                   "entries": [
        {"test": "t::a", "hardware": "estimate", "peak": 3 * GIB}]}))
    store = BaselineStore(path)
    assert store.get("t::a", "estimate")["predicted_peak_bytes"] == 3 * GIB
    store.put("t::b", "estimate", {"mode": "estimate", "predicted_peak_bytes": GIB, "versions": {}})
    document = json.loads(path.read_text())
    assert document["schema_version"] == SCHEMA_VERSION and set(document["baselines"]) == {"t::a", "t::b"}


def test_lock_held_elsewhere_times_out_with_an_explanation(tmp_path):
    from filelock import FileLock

    store = BaselineStore(tmp_path / "b.json", lock_timeout_s=0.2)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from filelock import FileLock
        with FileLock({str(store.lock_path)!r}):
            print("locked", flush=True)
            time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BaselineStoreError, match="could not take the lock.*delete the .lock file"):
            store.put("t::a", "estimate", {"mode": "estimate", "predicted_peak_bytes": GIB})
    finally:
        holder.kill()
        holder.wait()
    assert FileLock(str(store.lock_path), timeout=5).acquire()  # released with its process


# -- store: concurrency ----------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from pytest_gpumem.compare.baseline import BaselineStore

    path, worker, writes, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    store = BaselineStore(path)
    while not go.exists():  # start together, so the writes really interleave
        time.sleep(0.005)
    for i in range(writes):
        # a distinct entry per write, and one shared test that every worker updates under its own key
        store.put(f"tests/test_w.py::test_{worker}_{i}", "estimate",
                  {"mode": "estimate", "predicted_peak_bytes": worker * 1000 + i, "versions": {}})
        store.put("tests/test_w.py::shared", f"worker-{worker}",
                  {"mode": "estimate", "predicted_peak_bytes": i, "versions": {}})
        if i % 10 == 0:
            store.get("tests/test_w.py::shared", "worker-0")  # lock-free reads never see a partial file
""")


def test_concurrent_writers_lose_nothing(tmp_path):
    """pytest-xdist workers saving baselines at once: 8 processes x 100 puts (x2 entries) into one file."""
    workers, writes = 8, 100
    path, go = tmp_path / ".gpumem" / "baselines.json", tmp_path / "go"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    processes = [subprocess.Popen([sys.executable, str(script), str(path), str(w), str(writes), str(go)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(workers)]
    time.sleep(0.5)
    go.touch()
    started = time.perf_counter()
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
    elapsed = time.perf_counter() - started
    baselines = BaselineStore(path).load()["baselines"]
    expected = {f"tests/test_w.py::test_{w}_{i}" for w in range(workers) for i in range(writes)}
    assert expected <= set(baselines) and len(baselines) == workers * writes + 1
    for w in range(workers):
        for i in range(writes):
            assert baselines[f"tests/test_w.py::test_{w}_{i}"]["estimate"]["predicted_peak_bytes"] == w * 1000 + i
    assert {key: r["predicted_peak_bytes"] for key, r in baselines["tests/test_w.py::shared"].items()} == {
        f"worker-{w}": writes - 1 for w in range(workers)}
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]
    print(f"{workers} processes x {2 * writes} puts: {elapsed:.1f} s")


# -- compare ---------------------------------------------------------------------------------------
def test_growth_beyond_tolerance_names_the_components_and_what_changed():
    """The headline case: a config change (longer completions) and a trl upgrade grow the estimate."""
    before = record_from_result(estimate_result(), versions=VERSIONS)
    after = record_from_result(estimate_result(max_completion_length=2048),
                               versions={**VERSIONS, "trl": "0.25.0", "vllm": None})
    comparison = compare(before, after, "5%+256MiB")
    assert comparison.status == "grew" and comparison.regressed
    assert comparison.delta_bytes == after["peak_bytes"] - before["peak_bytes"] > comparison.allowed_growth_bytes
    grown = {(phase, name) for phase, name, _ in comparison.grown_components}
    assert ("training", "activations") in grown
    assert comparison.grown_components[0][0] == comparison.current_peak_phase  # peak phase first
    assert dict(comparison.changed_versions) == {"trl": ("0.24.0", "0.25.0"), "vllm": ("0.11.0", None)}
    assert dict(comparison.changed_setup)["max_completion_length"] == (512, 2048)
    message = comparison.message()
    assert "GPU memory regression" in message and "5%+256MiB" in message
    assert "training/activations +" in message
    assert "trl 0.24.0 -> 0.25.0" in message and "vllm 0.11.0 -> (not installed)" in message
    assert "setup.max_completion_length 512 -> 2048" in message
    assert "--gpu-budget-save" in message


def test_fourteen_to_seventeen_gib_fails_and_names_logits():
    """The design card's example: 14 GiB -> 17 GiB in measure mode, the logits grew by 3 GiB."""
    before = record_from_result(measure_result(14 * GIB, logits_bytes=2 * GIB), versions=VERSIONS)
    after = record_from_result(measure_result(17 * GIB, logits_bytes=5 * GIB),
                               versions={**VERSIONS, "transformers": "5.0.0"})
    comparison = compare(before, after, DEFAULT_TOLERANCE)
    assert comparison.metric == "nvml_peak_bytes" and comparison.status == "grew"
    assert comparison.grown_components == (("training", "logits", 3 * GIB),)
    message = comparison.message()
    assert "NVML device peak 17.00 GiB vs baseline 14.00 GiB (+3.00 GiB, +21.4%)" in message
    assert "training/logits +3.00 GiB" in message and "transformers 4.57.1 -> 5.0.0" in message
    assert "peak reserved: 16.41 GiB vs baseline 13.41 GiB (+3.00 GiB)" in message


@pytest.mark.parametrize("tolerance", ["5%+256MiB", "5%", "256MiB", "0"])
def test_tolerance_boundary_is_inclusive(tolerance):
    base = 14 * GIB
    allowed = Tolerance.parse(tolerance).allowed_bytes(base)
    before = record_from_result(measure_result(base), versions=VERSIONS)
    at_limit = record_from_result(measure_result(base + allowed), versions=VERSIONS)
    over = record_from_result(measure_result(base + allowed + 1), versions=VERSIONS)
    assert compare(before, at_limit, tolerance).status == "same"
    assert compare(before, over, tolerance).status == "grew"


def test_shrinking_never_fails_and_is_reported():
    before = record_from_result(measure_result(17 * GIB, logits_bytes=5 * GIB), versions=VERSIONS)
    after = record_from_result(measure_result(14 * GIB, logits_bytes=2 * GIB), versions=VERSIONS)
    comparison = compare(before, after, "0")
    assert comparison.status == "shrank" and not comparison.regressed
    assert comparison.shrunk_components == (("training", "logits", -3 * GIB),)
    assert "shrank" in comparison.message() and "training/logits -3.00 GiB" in comparison.message()
    small = compare(before, record_from_result(measure_result(17 * GIB - MIB), versions=VERSIONS), "5%")
    assert small.status == "same" and small.delta_bytes == -MIB


def test_measure_compares_the_same_metric_even_when_one_is_missing():
    before = record_from_result(measure_result(14 * GIB), versions=VERSIONS)
    current = measure_result(16 * GIB)
    current["measured"]["nvml_peak_bytes"] = None  # e.g. NVML unavailable in this container: only torch's peak
    after = record_from_result(current, versions=VERSIONS)
    comparison = compare(before, after, "0")
    assert comparison.metric == "peak_reserved_bytes"
    assert (comparison.baseline_bytes, comparison.current_bytes) == (14 * GIB - 600 * MIB, 16 * GIB - 600 * MIB)


# -- check_against_baseline: what the plugin calls ---------------------------------------------------
def test_missing_baseline_is_reported_and_fails_only_when_strict(tmp_path):
    store = BaselineStore(tmp_path / "b.json")
    current = record_from_result(estimate_result(), versions=VERSIONS)
    outcome = check_against_baseline(store, "t::a", "estimate", current, "5%")
    assert not outcome.failed and outcome.result["status"] == "missing"
    assert "--gpu-budget-save" in outcome.result["message"] and str(store.path) in outcome.result["message"]
    strict = check_against_baseline(store, "t::a", "estimate", current, "5%", strict=True)
    assert strict.failed and "--gpu-budget-strict" in strict.failure_message
    assert not store.path.exists()  # checking never writes


def test_missing_baseline_mentions_other_hardware(tmp_path):
    store = BaselineStore(tmp_path / "b.json")
    current = record_from_result(measure_result(14 * GIB), versions=VERSIONS)
    store.put("t::a", "NVIDIA A100-SXM4-80GB (81038 MiB)", current)
    outcome = check_against_baseline(store, "t::a", "NVIDIA H100 80GB HBM3 (81559 MiB)", current, "5%")
    assert outcome.result["status"] == "missing" and "NVIDIA A100-SXM4-80GB (81038 MiB)" in outcome.result["message"]


def test_save_then_compare_then_resave(tmp_path):
    store = BaselineStore(tmp_path / ".gpumem" / "baselines.json")
    first = record_from_result(measure_result(14 * GIB), versions=VERSIONS)
    saved = check_against_baseline(store, "t::a", "H100", first, "5%+256MiB", save=True)
    assert saved.saved and not saved.failed and saved.result["status"] == "missing"
    assert "baseline recorded" in saved.result["message"]
    assert store.get("t::a", "H100") == first

    same = check_against_baseline(store, "t::a", "H100", first, "5%+256MiB")
    assert not same.failed
    assert same.result == {**same.result, "status": "same", "delta_bytes": 0, "peak_bytes": 14 * GIB}

    grown = record_from_result(measure_result(17 * GIB, logits_bytes=5 * GIB), versions=VERSIONS)
    failing = check_against_baseline(store, "t::a", "H100", grown, "5%+256MiB", strict=True)
    assert failing.failed and failing.result["status"] == "grew" and failing.result["delta_bytes"] == 3 * GIB
    assert "training/logits +3.00 GiB" in failing.failure_message
    assert check_against_baseline(store, "t::a", "H100", grown, "25%").result["status"] == "same"  # per-test tolerance

    # re-recording accepts the growth (no failure), reports it, and the next run compares with the new numbers
    resaved = check_against_baseline(store, "t::a", "H100", grown, "5%+256MiB", save=True)
    assert not resaved.failed and resaved.result["status"] == "grew" and "baseline updated" in resaved.result["message"]
    assert check_against_baseline(store, "t::a", "H100", grown, "0").result["status"] == "same"


def test_result_without_any_peak_is_not_compared(tmp_path):
    store = BaselineStore(tmp_path / "b.json")
    outcome = check_against_baseline(store, "t::a", "estimate", {"mode": "measure", "breakdown": None}, "5%",
                                     strict=True)
    assert outcome.result is None and not outcome.failed
