"""What users import stays put: the facade's names, the lazy ``simulate``, the plugin's entry point, and no
module hiding behind a function of the same name."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import pytest_gpumem

#: the facade's names before the layout step, plus simulate
PUBLIC = {"Breakdown", "Component", "Phase", "GpuMemError", "SetupError", "UnknownModelError", "Estimate", "estimate",
          "resolve_gpu", "ModelSpec", "resolve_model", "GRPOSetup", "format_both", "parse_size", "__version__",
          "simulate"}


def test_the_facade_exports_the_same_names_and_simulate():
    assert set(pytest_gpumem.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(pytest_gpumem, name) is not None, name
    from pytest_gpumem.predict.faketensor import simulate

    assert pytest_gpumem.simulate is simulate
    with pytest.raises(AttributeError, match="no attribute 'simulat'"):
        pytest_gpumem.simulat  # noqa: B018 - the facade's __getattr__ must still refuse unknown names


def _run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})


def test_simulate_is_loaded_on_first_use_only():
    _run("import sys, pytest_gpumem, pytest_gpumem.plugin; "
         "assert 'pytest_gpumem.predict.faketensor' not in sys.modules, 'the simulation was imported'; "
         "assert 'torch' not in sys.modules, 'torch imported'; "
         "from pytest_gpumem import simulate; "
         "assert 'pytest_gpumem.predict.faketensor' in sys.modules and 'torch' not in sys.modules")


def test_no_module_is_shadowed_by_a_function_of_its_name():
    """``import pytest_gpumem.estimate`` used to give the estimate function (estimate.py was shadowed by the
    facade's ``estimate``); now the function is the facade's and the module is predict.analytic."""
    assert callable(pytest_gpumem.estimate) and pytest_gpumem.estimate.__module__ == "pytest_gpumem.predict.analytic"
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("pytest_gpumem.estimate")
    for package in ("pytest_gpumem.predict.analytic", "pytest_gpumem.predict.faketensor", "pytest_gpumem.measure",
                    "pytest_gpumem.diagnose", "pytest_gpumem.compare", "pytest_gpumem.report", "pytest_gpumem.plugin",
                    "pytest_gpumem.cli"):
        module = importlib.import_module(package)
        leaf = package.rsplit(".", 1)[1]
        assert not callable(getattr(module, leaf, None)), f"{package}.{leaf} is a function"


def test_the_entry_points_resolve(capsys):
    try:
        import tomllib
    except ImportError:  # Python 3.10: the tomli backport is a dependency there
        import tomli as tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["entry-points"]["pytest11"] == {"gpumem": "pytest_gpumem.plugin"}
    assert project["scripts"] == {"gpumem": "pytest_gpumem.cli:main"}
    plugin = importlib.import_module("pytest_gpumem.plugin")
    assert {"pytest_addoption", "pytest_configure", "gpu_memory", "grpo_step", "GpuBudgetFailure"} <= set(dir(plugin))
    from pytest_gpumem.cli import main

    assert main(["models", "--json"]) == 0
    assert '"name": "Qwen/Qwen2.5-0.5B"' in capsys.readouterr().out
