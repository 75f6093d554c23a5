"""The pytest plugin (entry point ``pytest11: gpumem = "pytest_gpumem.plugin"``): ``@pytest.mark.gpu_budget``,
``pytest --gpu-budget``, the fixtures, the summary and the report files. The only folder that imports pytest.

Thin glue in pytest-memray's shape (docs/anchors.md): the module-level hooks only register options, the marker
and the fixtures; when ``--gpu-budget`` (or ini ``gpu_budget = true``) is on, ``pytest_configure`` registers
one :class:`~pytest_gpumem.plugin.manager.Manager` that does the work. Without it the plugin is inert: marked
tests run as plain tests and nothing heavy is imported (no torch, ever, from this package).

- ``options.py`` every option and ini key; ``mode.py`` the session's mode; ``marker.py`` the marker's grammar;
- ``state.py`` per-test state, the stash keys, the exceptions; ``manager.py`` the Manager;
- ``baseline_gate.py`` baselines in a session; ``fixtures.py`` ``gpu_memory`` and ``grpo_step``.
"""

from __future__ import annotations

import pytest

from . import options
from .fixtures import gpu_memory, grpo_step  # noqa: F401 - registers the fixtures with pytest
from .manager import Manager
from .marker import MARKER_HELP
from .mode import MODES, OFF, resolve_mode
from .state import MANAGER_KEY, GpuBudgetFailure

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
    manager = Manager(config, mode, reason, options.read_defaults(config))
    config.stash[MANAGER_KEY] = manager
    config.pluginmanager.register(manager, "gpumem-manager")


def pytest_unconfigure(config: pytest.Config) -> None:
    manager = config.stash.get(MANAGER_KEY, None)
    if manager is not None:
        config.pluginmanager.unregister(manager)
        del config.stash[MANAGER_KEY]
