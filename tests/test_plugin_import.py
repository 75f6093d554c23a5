"""The inert plugin (``--gpu-budget`` off) imports only its light modules: every pytest run of an environment
with pytest-gpumem installed pays for what it imports (goal: < 30 ms over plain pytest on a 200-test
``--collect-only``, benchmarks/bench_plugin.py). Before issue 11's fix it imported the Manager, setups,
records, the estimate and the report writers at module level (+49 ms)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

#: what the inert plugin may import of this package: the facade (names loaded on first use), errors, versions,
#: the compare/report package fronts (option defaults, WRITERS' rows) and the plugin's options, mode, state and
#: fixtures' registration
INERT_MODULES = {
    "pytest_gpumem", "pytest_gpumem.errors", "pytest_gpumem.versions", "pytest_gpumem.compare",
    "pytest_gpumem.report", "pytest_gpumem.report.json", "pytest_gpumem.plugin", "pytest_gpumem.plugin.options",
    "pytest_gpumem.plugin.mode", "pytest_gpumem.plugin.state", "pytest_gpumem.plugin.fixtures",
}
#: the heavy ones, named so a failure says which came back
HEAVY_MODULES = ("pytest_gpumem.spec", "pytest_gpumem.record", "pytest_gpumem.predict.analytic",
                 "pytest_gpumem.plugin.manager", "pytest_gpumem.plugin.marker", "pytest_gpumem.measure.block",
                 "pytest_gpumem.compare.baseline", "pytest_gpumem.report.html", "torch")

SCRIPT = """
import json, sys, pytest
code = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "pytest_gpumem.plugin", *sys.argv[2:]])
loaded = sorted(m for m in sys.modules if m.startswith("pytest_gpumem") or m == "torch")
open(sys.argv[1], "w").write(json.dumps({"code": int(code), "loaded": loaded}))
"""


def _loaded_by_a_pytest_run(tmp_path, *args: str) -> tuple[dict, str]:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_suite.py").write_text(textwrap.dedent("""
        import pytest
        @pytest.mark.gpu_budget(gib=40, setup=dict(model="Qwen/Qwen2.5-0.5B", dtype="bfloat16"))
        def test_budgeted(): pass
        def test_plain(): pass
    """))
    out = tmp_path / "loaded.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(out), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert out.exists(), result.stdout + result.stderr
    return json.loads(out.read_text()), result.stdout


def test_importing_the_plugin_loads_only_the_light_modules():
    code = "import json, sys, pytest_gpumem.plugin; print(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                           text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout))
    assert not [m for m in HEAVY_MODULES if m in loaded]
    assert {m for m in loaded if m.startswith("pytest_gpumem")} <= INERT_MODULES


def test_an_inert_collect_only_run_loads_only_the_light_modules(tmp_path):
    found, stdout = _loaded_by_a_pytest_run(tmp_path, "--collect-only")
    assert found["code"] == 0, stdout
    assert "gpumem: 1 budgeted test not judged — run with --gpu-budget" in stdout  # the inert path ran
    assert not [m for m in HEAVY_MODULES if m in found["loaded"]]
    assert set(found["loaded"]) <= INERT_MODULES


def test_the_fixtures_load_their_parts_on_first_use(tmp_path):
    """The check above is not vacuous: a run that uses grpo_step (inert) loads the estimate then, and a mode on
    loads the Manager."""
    (tmp_path / "test_step.py").write_text(textwrap.dedent("""
        def test_step(grpo_step):
            assert grpo_step(dict(model="Qwen/Qwen2.5-0.5B", dtype="bfloat16")).peak_bytes > 0
    """))
    found, stdout = _loaded_by_a_pytest_run(tmp_path, "test_step.py")
    assert found["code"] == 0, stdout
    assert {"pytest_gpumem.predict.analytic", "pytest_gpumem.plugin.marker"} <= set(found["loaded"])
    assert "pytest_gpumem.plugin.manager" not in found["loaded"]
    found, stdout = _loaded_by_a_pytest_run(tmp_path, "--collect-only", "--gpu-budget=estimate")
    assert found["code"] == 0, stdout
    assert "pytest_gpumem.plugin.manager" in found["loaded"] and "torch" not in found["loaded"]
