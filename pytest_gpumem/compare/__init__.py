"""Stage 4: judgement on records — budget checks, baselines, and the estimate against committed GPU measurements."""

# The baseline file's defaults live here, not in baseline.py (which imports them): the plugin quotes them in its
# option help in every pytest run, and importing baseline.py (records, setups, breakdowns) would cost an inert
# run ≈ 15 ms (README "What the plugin costs").
DEFAULT_BASELINE_PATH = ".gpumem/baselines.json"
DEFAULT_TOLERANCE = "5%+256MiB"
