"""Byte sizes: parsing user-given sizes and printing them unambiguously.

GB means 10**9 bytes and GiB 2**30 bytes, always. pytest-memray reads "GB" as GiB without saying so;
we never do, and every message prints both units ("17 GB = 15.83 GiB") so nobody has to guess.
"""

from __future__ import annotations

import re

from .errors import GpuMemError

KB = 10**3
MB = 10**6
GB = 10**9
KIB = 2**10
MIB = 2**20
GIB = 2**30

#: unit name (lower case) -> bytes per unit. Only explicit units: a bare number is ambiguous.
UNIT_BYTES = {
    "b": 1,
    "kb": KB,
    "mb": MB,
    "gb": GB,
    "tb": 10**12,
    "kib": KIB,
    "mib": MIB,
    "gib": GIB,
    "tib": 2**40,
}

_SIZE_RE = re.compile(r"^\s*(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]+)\s*$")

ACCEPTED_SIZE_FORMS = "a number with an explicit unit: '17 GiB', '24GB', '512 MiB', '1500 MB'"


def parse_size(text: str, *, field: str = "size") -> int:
    """Parse ``"17 GiB"`` / ``"24GB"`` / ``"512 mib"`` into bytes.

    The unit is required and nothing may trail it: ``"17 GB of RAM"`` is rejected rather than read as
    17 GB (pytest-memray silently accepts trailing text).
    """
    if not isinstance(text, str):
        raise GpuMemError(field, f"expected a string like '17 GiB', got {text!r} ({type(text).__name__})",
                          fix=ACCEPTED_SIZE_FORMS)
    match = _SIZE_RE.match(text)
    if not match:
        raise GpuMemError(field, f"cannot read {text!r} as a size", fix=ACCEPTED_SIZE_FORMS)
    unit = match.group("unit").lower()
    if unit not in UNIT_BYTES:
        raise GpuMemError(field, f"unknown unit {match.group('unit')!r} in {text!r}",
                          fix="use one of GB, GiB, MB, MiB (or B, KB, KiB, TB, TiB)")
    number = float(match.group("number"))
    if number <= 0:
        raise GpuMemError(field, f"size must be positive, got {text!r}", fix=ACCEPTED_SIZE_FORMS)
    return int(round(number * UNIT_BYTES[unit]))


def gib(num_bytes: float) -> float:
    return num_bytes / GIB


def format_gib(num_bytes: float, digits: int = 2) -> str:
    """``12.34 GiB`` (or MiB below 1 GiB, so small components are not printed as 0.00 GiB)."""
    if abs(num_bytes) < GIB:
        return f"{num_bytes / MIB:.{digits if abs(num_bytes) >= MIB else 3}f} MiB"
    return f"{num_bytes / GIB:.{digits}f} GiB"


def format_both(num_bytes: float, given_unit: str | None = None) -> str:
    """Both units, the user's first: ``17 GB = 15.83 GiB`` or ``20 GiB = 21.47 GB``."""
    decimal = f"{num_bytes / GB:.2f} GB".replace(".00 GB", " GB")
    binary = f"{num_bytes / GIB:.2f} GiB".replace(".00 GiB", " GiB")
    if given_unit is not None and given_unit.lower() in ("gib", "mib"):
        return f"{binary} = {decimal}"
    return f"{decimal} = {binary}"
