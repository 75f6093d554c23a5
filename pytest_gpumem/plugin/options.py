"""Reading the plugin's ini keys with errors that name the key.

Boolean keys are declared ``type="bool"`` (so TOML's native ``[tool.pytest]`` table may give real bools) and
read through :func:`ini_bool`: pytest-memray's boolean ini keys were silently ignored, and pytest's own
parsing words a bad value differently across versions (pytest 9.2: a bare "invalid truth value 'maybe'"
usage error that names no key) — every such error is re-raised naming the key.
"""

from __future__ import annotations

from typing import Any

import pytest

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0", "")


def ini_value(config: pytest.Config, name: str) -> Any:
    """``config.getini`` with a usage error that names the key (pytest raises a bare ValueError/TypeError)."""
    try:
        return config.getini(name)
    except (ValueError, TypeError, pytest.UsageError) as exc:
        raise pytest.UsageError(f"pytest-gpumem: ini option {name}: {exc}") from None


def ini_bool(config: pytest.Config, name: str) -> bool:
    value = ini_value(config, name)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise pytest.UsageError(f"pytest-gpumem: ini option {name}: {value!r} is not a boolean "
                            f"(use {name} = true or {name} = false)")
