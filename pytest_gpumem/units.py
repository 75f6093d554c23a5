"""Byte sizes: parsing user-given sizes and printing them unambiguously.

GB means 10**9 bytes and GiB 2**30 bytes, always. pytest-memray reads "GB" as GiB without saying so;
we never do, and every message prints both units ("17 GB = 15.83 GiB") so nobody has to guess.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

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

#: The one size grammar: a number and a unit, with nothing before or after (pytest-memray reads "17 GB of RAM"
#: as 17 GB; we refuse it). Budgets, ``parse_size`` and tolerances all read sizes through :func:`read_size`.
SIZE_RE = re.compile(r"^\s*(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]+)\s*$")

ACCEPTED_SIZE_FORMS = "a number with an explicit unit: '17 GiB', '24GB', '512 MiB', '1500 MB'"


def read_size(text: str) -> tuple[float, str] | None:
    """``"17 GiB"`` → ``(17.0, "GiB")``: the number and the unit as written, or None when ``text`` is not a number
    followed by a unit. Which units a size may use is the caller's (:data:`UNIT_BYTES` here, GB/GiB/MB/MiB for a
    marker's budget)."""
    match = SIZE_RE.match(text)
    return (float(match.group("number")), match.group("unit")) if match else None


def parse_size(text: str, *, field: str = "size") -> int:
    """Parse ``"17 GiB"`` / ``"24GB"`` / ``"512 mib"`` into bytes.

    The unit is required and nothing may trail it: ``"17 GB of RAM"`` is rejected rather than read as
    17 GB (pytest-memray silently accepts trailing text).
    """
    if not isinstance(text, str):
        raise GpuMemError(field, f"expected a string like '17 GiB', got {text!r} ({type(text).__name__})",
                          fix=ACCEPTED_SIZE_FORMS)
    size = read_size(text)
    if size is None:
        raise GpuMemError(field, f"cannot read {text!r} as a size", fix=ACCEPTED_SIZE_FORMS)
    number, unit = size
    if unit.lower() not in UNIT_BYTES:
        raise GpuMemError(field, f"unknown unit {unit!r} in {text!r}",
                          fix="use one of GB, GiB, MB, MiB (or B, KB, KiB, TB, TiB)")
    if number <= 0:
        raise GpuMemError(field, f"size must be positive, got {text!r}", fix=ACCEPTED_SIZE_FORMS)
    return int(round(number * UNIT_BYTES[unit.lower()]))


def exact_size_text(num_bytes: int) -> str:
    """The largest unit that divides ``num_bytes`` exactly, so the text parses back to the same bytes."""
    for unit, size in (("GiB", 2**30), ("GB", 10**9), ("MiB", 2**20), ("MB", 10**6), ("KiB", 2**10), ("KB", 10**3)):
        if num_bytes % size == 0:
            return f"{num_bytes // size}{unit}"
    return f"{num_bytes}B"


# -- printing ------------------------------------------------------------------------------------------
def gib(num_bytes: float) -> float:
    return num_bytes / GIB


def format_gib(num_bytes: float, digits: int = 2) -> str:
    """``12.34 GiB`` (or MiB below 1 GiB, so small components are not printed as 0.00 GiB)."""
    if abs(num_bytes) < GIB:
        return f"{num_bytes / MIB:.{digits if abs(num_bytes) >= MIB else 3}f} MiB"
    return f"{num_bytes / GIB:.{digits}f} GiB"


def _number(value: float) -> str:
    text = f"{value:.2f}"
    return text[:-3] if text.endswith(".00") else text


def _both(num_bytes: float, first: tuple[str, int], second: tuple[str, int]) -> str:
    return " = ".join(f"{_number(num_bytes / size)} {name}" for name, size in (first, second))


def format_both(num_bytes: float, given_unit: str | None = None) -> str:
    """Both units, the user's first: ``17 GB = 15.83 GiB`` or ``20 GiB = 21.47 GB``."""
    if given_unit is not None and given_unit.lower() in ("gib", "mib"):
        return _both(num_bytes, ("GiB", GIB), ("GB", GB))
    return _both(num_bytes, ("GB", GB), ("GiB", GIB))


def budget_text(num_bytes: int, unit: str = "gb") -> str:
    """``17 GB = 15.83 GiB`` / ``20 GiB = 21.47 GB`` / ``512 MiB = 536.87 MB``: :func:`format_both` in MB/MiB for
    sizes given in them or under half a GB, so nobody has to guess which unit was meant."""
    unit = unit.lower()
    pair = (("MiB", MIB), ("MB", MB)) if unit in ("mb", "mib") or num_bytes < GB // 2 else (("GiB", GIB), ("GB", GB))
    return _both(num_bytes, *(pair if unit in ("gib", "mib") else pair[::-1]))


# -- tolerances ----------------------------------------------------------------------------------------
TOLERANCE_FORMS = ("a fraction such as 0.10, or a string: '10%', '256MiB' or '5%+256MiB' (a percentage of the "
                   "reference plus an absolute size), or '0'")
_PERCENT_RE = re.compile(r"^(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*%$")


@dataclass(frozen=True)
class Tolerance:
    """A band around a reference: ``fraction`` of it plus ``absolute_bytes``; ``text`` is how it was written.

    One grammar for every tolerance — the marker's prediction-vs-measurement ``tolerance=``, a baseline's
    allowed growth (``--gpu-budget-baseline-tolerance``, the marker's ``baseline_tolerance=``): a fraction
    (``0.10``, ``"0.1"``), a percentage (``"10%"``), a size with a unit (``"256MiB"``, any unit of
    :data:`UNIT_BYTES`), or a percentage plus a size (``"5%+256MiB"``, ``"256 MiB + 5%"``). A value exceeds
    the band when ``value > reference + allowed_bytes(reference)`` (pytest-torch's rule is
    ``new > base × 1.10 + 1 MB``; both parts are configurable here)."""

    fraction: float = 0.0
    absolute_bytes: int = 0
    text: str = "0"

    @property
    def percent(self) -> float:
        return self.fraction * 100

    def allowed_bytes(self, reference_bytes: int) -> int:
        return int(reference_bytes * self.fraction) + self.absolute_bytes

    def __str__(self) -> str:
        """The normalised form (``"5%+256MiB"``), which parses back to the same band."""
        parts = []
        if self.fraction:
            parts.append(f"{self.percent:g}%")
        if self.absolute_bytes:
            parts.append(exact_size_text(self.absolute_bytes))
        return "+".join(parts) or "0"

    @classmethod
    def parse(cls, value: Any, *, field: str = "tolerance", max_fraction: float | None = None,
              error: type[GpuMemError] = GpuMemError) -> "Tolerance":
        """Read ``value`` in the grammar above. ``max_fraction`` caps the percentage (a prediction may be 100%
        off at most; a baseline may grow by more); a bare number must be a fraction in [0, 1] — ``10`` would
        mean 1000% — and is refused otherwise. Problems are raised as ``error`` naming ``field``."""
        fix = f"write it as {TOLERANCE_FORMS}"
        if isinstance(value, Tolerance):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise error(field, f"expected a string like '5%+256MiB' or a fraction such as 0.10, got {value!r} "
                               f"({type(value).__name__})", fix=fix)
        if not isinstance(value, str):
            number = float(value)
            if not math.isfinite(number) or number < 0:
                raise error(field, f"must be a fraction ≥ 0, got {value!r}", fix=fix)
            if number > 1:
                raise error(field, f"{value!r} is more than 100% (a bare number is a fraction; expected a string "
                                   "such as '10%' or a fraction ≤ 1)", fix=f"did you mean '{_number(number)}%'? {fix}")
            return cls(number, 0, f"{number:.0%}" if round(number * 100, 6).is_integer() else f"{number:.2%}")
        text = value.strip()
        if not text:
            raise error(field, "empty tolerance", fix=fix)
        fraction: float | None = None
        absolute: int | None = None
        for term in (piece.strip() for piece in text.split("+")):
            if not term:
                raise error(field, f"cannot read {value!r}: empty term around '+'", fix=fix)
            if term.endswith("%"):
                match = _PERCENT_RE.match(term)
                if not match:
                    raise error(field, f"cannot read {term!r} in {value!r} as a percentage", fix=fix)
                if fraction is not None:
                    raise error(field, f"{value!r} gives a percentage twice", fix=fix)
                fraction = float(match.group("number")) / 100
                if not math.isfinite(fraction):
                    raise error(field, f"the percentage in {value!r} is not finite", fix=fix)
                if max_fraction is not None and fraction > max_fraction:
                    raise error(field, f"{term!r} in {value!r} is more than {max_fraction:.0%}", fix=fix)
                continue
            number = _float(term)
            if number is not None:
                if "+" not in text and math.isfinite(number) and 0 <= number <= 1:
                    return cls(number, 0, text)  # a fraction written as a string: "0.1"
                raise error(field, f"{term!r} in {value!r} has no unit: a bare number is ambiguous",
                            fix=f"write '{term}%' or '{term}MiB' ({TOLERANCE_FORMS})")
            size = read_size(term)
            if size is None or size[1].lower() not in UNIT_BYTES:
                why = f": unknown unit {size[1]!r}" if size is not None else ""
                raise error(field, f"cannot read {term!r} in {value!r}{why}",
                            fix=f"{fix}; sizes need a unit (GB, GiB, MB, MiB)")
            if absolute is not None:
                raise error(field, f"{value!r} gives an absolute size twice", fix=fix)
            absolute = int(round(size[0] * UNIT_BYTES[size[1].lower()]))
        return cls(fraction or 0.0, absolute or 0, text)


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
