"""The one size grammar and the one Tolerance: everything the two old grammars accepted (the marker's
``tolerance=`` of plugin/marker.py and the baselines' tolerance of compare/baseline.py) reads the same."""

from __future__ import annotations

import pytest

from pytest_gpumem.errors import GpuMemError, MarkerError
from pytest_gpumem.plugin.marker import parse_size_string, parse_tolerance
from pytest_gpumem.units import GB, GIB, KIB, MIB, Tolerance, parse_size, read_size

#: the forms the marker's old parse_tolerance accepted, with (fraction, absolute bytes)
MARKER_FORMS = [
    (0.1, 0.1, 0), (0, 0.0, 0), (1, 1.0, 0), ("15%", 0.15, 0), ("5 %", 0.05, 0), ("5%+256MiB", 0.05, 256 * MIB),
    ("256 MiB", 0.0, 256 * MIB), ("0", 0.0, 0), ("0.1", 0.1, 0), (" 0.25 ", 0.25, 0), ("0MiB", 0.0, 0),
    ("100%", 1.0, 0), ("1GB+10%", 0.1, GB),
]
#: the forms the baselines' old Tolerance.parse accepted, with (percent, absolute bytes)
BASELINE_FORMS = [
    ("5%+256MiB", 5.0, 256 * MIB), ("256 MiB + 5%", 5.0, 256 * MIB), ("5%", 5.0, 0), ("2.5%", 2.5, 0),
    ("1GB", 0.0, GB), ("512 MiB", 0.0, 512 * MIB), ("0", 0.0, 0), ("0%", 0.0, 0), ("300%", 300.0, 0),
    ("1TB", 0.0, 10**12), ("4 KiB", 0.0, 4 * KIB), ("2GiB+50%", 50.0, 2 * GIB),
]


@pytest.mark.parametrize("value, fraction, absolute_bytes", MARKER_FORMS)
def test_the_marker_grammar_still_reads(value, fraction, absolute_bytes):
    for tolerance in (Tolerance.parse(value), parse_tolerance(value)):
        assert tolerance.fraction == pytest.approx(fraction)
        assert tolerance.absolute_bytes == absolute_bytes
        assert Tolerance.parse(str(tolerance)).allowed_bytes(10 * GIB) == tolerance.allowed_bytes(10 * GIB)


@pytest.mark.parametrize("value, percent, absolute_bytes", BASELINE_FORMS)
def test_the_baseline_grammar_still_reads(value, percent, absolute_bytes):
    tolerance = Tolerance.parse(value, field="gpu_budget_baseline_tolerance")
    assert (tolerance.percent, tolerance.absolute_bytes) == (pytest.approx(percent), absolute_bytes)
    assert tolerance.allowed_bytes(14 * GIB) == int(14 * GIB * percent / 100) + absolute_bytes
    assert Tolerance.parse(str(tolerance)) == Tolerance(tolerance.fraction, absolute_bytes, str(tolerance))


def test_only_the_marker_caps_the_percentage():
    assert Tolerance.parse("150%").fraction == 1.5  # a baseline may grow by more than 100%
    with pytest.raises(MarkerError, match="more than 100%") as info:
        parse_tolerance("150%")  # a prediction cannot be more than 100% off
    assert info.value.field == "tolerance"


REFUSED = [
    (10, "did you mean '10%'"), (5, "expected a string"), ("5", "no unit"), ("10", "no unit"), (-0.1, "≥ 0"),
    (float("nan"), "≥ 0"), (True, "expected a string"), (None, "expected a string"), ([0.1], "expected a string"),
    ("", "empty"), ("5%+", "empty term"), ("5%+6%", "percentage twice"), ("1GiB+2GiB", "absolute size twice"),
    ("-5%", "percentage"), ("5 %%", "percentage"), ("10 percent", "unknown unit 'percent'"), ("abc", "'abc'"),
    ("0.5+1GiB", "no unit"),
]


def test_both_grammars_still_refuse():
    """What either old grammar refused with a message, the one grammar refuses the same way (the marker's
    wrapper as a MarkerError naming its own field)."""
    for value, words in REFUSED:
        for parse, error, field in ((lambda v: Tolerance.parse(v, field="x"), GpuMemError, "x"),
                                    (parse_tolerance, MarkerError, "tolerance")):
            with pytest.raises(error) as info:
                parse(value)
            assert (info.value.field, words in str(info.value), bool(info.value.fix)) == (field, True, True), value


def test_one_size_grammar_for_sizes_budgets_and_tolerances():
    assert read_size(" 17 GiB ") == (17.0, "GiB")
    assert read_size("17 GB of RAM") is None and read_size("GiB") is None and read_size("1e3 GB") is None
    assert parse_size("1.5 GB") == parse_size_string("1.5 GB")[0] == Tolerance.parse("1.5GB").absolute_bytes
    assert parse_size("2 TB") == 2 * 10**12  # parse_size takes every unit ...
    with pytest.raises(MarkerError, match="unknown unit 'TB'"):
        parse_size_string("2 TB")  # ... a budget only GB/GiB/MB/MiB
