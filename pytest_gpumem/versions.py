"""Installed versions: the one reader of package metadata, and this package's own version.

Versions decide numbers (the installed TRL picks the log-prob path the estimate models) and explain them
(a baseline names the upgrade since it was recorded; a report or a measurement says what it ran with). They
are read from ``*.dist-info`` metadata (``importlib.metadata``): milliseconds, where importing trl or torch
takes seconds.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _metadata_version
from typing import Iterable

#: this package's version (keep in step with pyproject.toml's [project] version)
PACKAGE_VERSION = "0.1.0"
PACKAGE_NAME = "pytest-gpumem"


def installed_version(package: str) -> str | None:
    """The installed version of ``package`` (a distribution name such as ``"trl"``), or None when it is not
    installed. For this package itself: the source tree's version when it runs from a checkout that is not
    pip-installed."""
    try:
        return _metadata_version(package)
    except PackageNotFoundError:
        return PACKAGE_VERSION if package == PACKAGE_NAME else None


@lru_cache(maxsize=None)
def installed_version_once(package: str) -> str | None:
    """:func:`installed_version`, read once per process (every GRPOSetup asks for trl's)."""
    return installed_version(package)


def installed_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """``{package: version or None}`` in the order given."""
    return {name: installed_version(name) for name in packages}


def parse_version(text: str) -> tuple[int, ...]:
    """``"1.16.0.dev0"`` → ``(1, 16, 0)``; ``(0,)`` when it does not start with a number. ASCII digits only:
    ``str.isdigit`` accepts ``"²"``, which ``int`` then refuses (found by the fuzz test)."""
    parts = []
    for piece in str(text).split("."):
        match = re.match(r"[0-9]+", piece)
        if not match:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts) or (0,)
