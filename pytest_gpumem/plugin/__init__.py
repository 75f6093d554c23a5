"""The pytest plugin (entry point ``pytest11: gpumem = "pytest_gpumem.plugin"``): ``@pytest.mark.gpu_budget``,
``pytest --gpu-budget``, the fixtures, the summary and the report files. The only folder that imports pytest.

Thin glue in pytest-memray's shape (docs/anchors.md): the module-level hooks only register options, the marker
and the fixtures; when ``--gpu-budget`` (or ini ``gpu_budget = true``) is on, ``pytest_configure`` registers
one :class:`~pytest_gpumem.plugin.manager.Manager` that does the work. Without it the plugin is inert: marked
tests run as plain tests and nothing heavy is imported (no torch, ever, from this package) — nor the Manager,
setups, records or the estimate: the modules imported here are the light ones (options, mode, state, the
fixtures' registration), because every pytest run of an environment with the plugin installed pays for them
(goal: < 30 ms over plain pytest, benchmarks/bench_plugin.py; tests/test_plugin_import.py keeps it so).

- ``options.py`` every option and ini key, the marker's name and help; ``mode.py`` the session's mode;
  ``marker.py`` the marker's grammar; ``defaults.py`` the session-wide defaults;
- ``state.py`` per-test state, the stash keys, the exceptions; ``manager.py`` the Manager;
- ``baseline_gate.py`` baselines in a session; ``fixtures.py`` ``gpu_memory`` and ``grpo_step``.
"""

from __future__ import annotations

from typing import Any

import pytest

from . import options
from .fixtures import gpu_memory, grpo_step  # noqa: F401 - registers the fixtures with pytest
from .mode import MODES, OFF, resolve_mode
from .options import MARKER, MARKER_HELP
from .state import MANAGER_KEY, GpuBudgetFailure, StepSetupError

__all__ = ["GpuBudgetFailure", "gpu_memory", "grpo_step"]


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    """``pytest --gpu-budget examples/``: argparse would read ``examples/`` as the mode (``nargs="?"``); a
    value that is not a mode is left as a path, and ``--gpu-budget`` means "on, mode from ini or auto"."""
    for index, arg in enumerate(args[:-1]):
        if arg == "--gpu-budget":
            following = args[index + 1]
            if not following.startswith("-") and following.lower() not in MODES + (OFF,):
                args[index] = "--gpu-budget="


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    mode, reason = resolve_mode(config)
    if mode is None:
        return
    # a mode is on: only now the Manager (checks, records, reports, the estimate) and the defaults' readers
    from .defaults import read_defaults
    from .manager import Manager

    manager = Manager(config, mode, reason, read_defaults(config))
    config.stash[MANAGER_KEY] = manager
    config.pluginmanager.register(manager, "gpumem-manager")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """``grpo_step(bad setup)`` reads as a bad marker does — the field, the value, the fix — with or without
    ``--gpu-budget``, never a traceback through spec.py."""
    outcome = yield
    if call.excinfo is not None and call.excinfo.errisinstance(StepSetupError):
        report = outcome.get_result()
        report.longrepr = str(call.excinfo.value)
        report.gpumem_test_error = True


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config):
    """A test the plugin could not read (a bad grpo_step setup, nothing to judge) is an error, not a failure."""
    if report.when == "call" and report.failed and getattr(report, "gpumem_test_error", False):
        return "error", "E", ("ERROR", {"red": True})
    return None


def pytest_report_collectionfinish(config: pytest.Config, start_path: Any, items: list[pytest.Item]) -> list[str]:
    """Inert (no ``--gpu-budget``), one line when budgets exist, so a suite never reads as "all passed" while
    its budgets were silently off."""
    if config.stash.get(MANAGER_KEY, None) is not None:
        return []
    count = sum(1 for item in items if item.get_closest_marker(MARKER) is not None)
    if not count:
        return []
    return [f"gpumem: {count} budgeted test{'s' if count != 1 else ''} not judged — run with --gpu-budget"]


def pytest_unconfigure(config: pytest.Config) -> None:
    manager = config.stash.get(MANAGER_KEY, None)
    if manager is not None:
        config.pluginmanager.unregister(manager)
        del config.stash[MANAGER_KEY]
