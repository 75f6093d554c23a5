"""``@pytest.mark.gpu_budget``: reading its arguments into a :class:`BudgetSpec`, and the per-test checks.

Modelled on pytest-memray's ``marks.py`` (one plain function per check, returning failure information or
``None``) without its flaws (shared/docs/anchors.md): a bad argument is an error on *that* test — never an
INTERNALERROR — naming the argument, the value given and the accepted forms; a size string must carry an
explicit unit and nothing may trail it; "GB" is 10**9 bytes and every message prints both units.

Pure Python: nothing here imports torch.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import GpuMemError, MarkerError
from ..gpus import GPU, resolve_gpu
from ..spec import GRPOSetup
from ..units import UNIT_BYTES, Tolerance, budget_text, format_gib, read_size

MARKER = "gpu_budget"

#: the units a budget may be given in (lower case -> (as printed, bytes)), and the marker's number keywords
SIZE_UNITS: dict[str, tuple[str, int]] = {name.lower(): (name, UNIT_BYTES[name.lower()])
                                          for name in ("GB", "GiB", "MB", "MiB")}
SIZE_KEYWORDS: dict[str, int] = {keyword: num_bytes for keyword, (_, num_bytes) in SIZE_UNITS.items()}
OTHER_KEYWORDS = ("setup", "tolerance", "gpu", "baseline_tolerance")
ALL_KEYWORDS = tuple(SIZE_KEYWORDS) + ("size",) + OTHER_KEYWORDS

ACCEPTED_BUDGET_FORMS = ("exactly one of gb=17 (10^9 bytes), gib=20 (2^30 bytes), mb=1500, mib=512 or "
                         "size='17 GiB' (GB/GiB/MB/MiB, case-insensitive); or only gpu='L4' (that card's memory)")
MARKER_HELP = (f"{MARKER}(gb=|gib=|mb=|mib=|size='17 GiB', setup=None, tolerance=0.10, gpu=None): the test's "
               "GPU memory peak (predicted, simulated or measured; see --gpu-budget) must stay under the "
               "budget (with only gpu= given: that card's memory). setup: a GRPOSetup, dict or path to a "
               ".json/.toml setup file; tolerance: allowed prediction-vs-measurement gap (0.10 or '10%'); "
               "gpu: card to judge against ('L4', '24GiB'); "
               "baseline_tolerance: allowed growth over the saved baseline ('5%+256MiB').")

#: the largest budget we accept: anything above is a typo (1 PB)
MAX_BUDGET_BYTES = 10**15
#: the prediction-vs-measurement band when none is given; revisit once validation/ has enough GPU runs
DEFAULT_TOLERANCE = Tolerance(0.10, 0, "10%")


# -- sizes -------------------------------------------------------------------------------------------------
def parse_size_string(value: Any, field: str = "size") -> tuple[int, str]:
    """``"17 GiB"`` → (bytes, unit). Units GB/GiB/MB/MiB, case-insensitive; nothing may trail the unit."""
    if not isinstance(value, str):
        raise MarkerError(field, f"expected a string with a unit, got {value!r} ({type(value).__name__})",
                          fix=f"write {field}='17 GiB', or use the number keywords: {ACCEPTED_BUDGET_FORMS}")
    size = read_size(value)
    if size is None:
        raise MarkerError(field, f"cannot read {value!r} as a size (a number and a unit, nothing else)",
                          fix=f"write {field}='17 GiB' or {field}='24GB'; accepted: {ACCEPTED_BUDGET_FORMS}")
    number, written_unit = size
    unit = written_unit.lower()
    if unit not in SIZE_UNITS:
        raise MarkerError(field, f"unknown unit {written_unit!r} in {value!r}",
                          fix="use GB (10^9 bytes), GiB (2^30), MB (10^6) or MiB (2^20)")
    return _to_bytes(number, unit, field, value), unit


def parse_size_number(value: Any, keyword: str) -> int:
    """``gb=17`` → bytes: a positive, finite int or float (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = f"{keyword}={value.strip()}" if isinstance(value, str) and _is_number(value) else f"{keyword}=17"
        raise MarkerError(keyword, f"expected a number of {SIZE_UNITS[keyword][0]}, got {value!r} "
                                   f"({type(value).__name__})",
                          fix=f"write {hint} (a number) or size='17 GiB' (a string with a unit)")
    return _to_bytes(float(value), keyword, keyword, value)


def _to_bytes(number: float, unit: str, field: str, given: Any) -> int:
    if not math.isfinite(number) or number <= 0:
        raise MarkerError(field, f"must be a positive, finite size, got {given!r}", fix=ACCEPTED_BUDGET_FORMS)
    num_bytes = number * SIZE_UNITS[unit][1]
    if num_bytes > MAX_BUDGET_BYTES:
        raise MarkerError(field, f"{given!r} {SIZE_UNITS[unit][0]} is more than any GPU holds",
                          fix="check the unit: gb=17 means 17 × 10^9 bytes")
    if num_bytes < 1:
        raise MarkerError(field, f"{given!r} {SIZE_UNITS[unit][0]} is less than one byte", fix=ACCEPTED_BUDGET_FORMS)
    return int(round(num_bytes))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_budget(args: tuple, kwargs: Mapping[str, Any]) -> tuple[int, str] | None:
    """The budget of one marker: (bytes, text with both units), or ``None`` when it gives none.

    One positional string is read as ``size=`` (``gpu_budget("17 GiB")``, as with pytest-memray's marker)."""
    given = [key for key in (*SIZE_KEYWORDS, "size") if key in kwargs]
    if args:
        if len(args) > 1 or not isinstance(args[0], str):
            raise MarkerError("positional arguments", f"got {', '.join(repr(a) for a in args)}",
                              fix=f"use keywords: {ACCEPTED_BUDGET_FORMS}")
        if given:
            raise MarkerError(given[0], f"the budget is given twice: positionally ({args[0]!r}) and as "
                              f"{given[0]}={kwargs[given[0]]!r}", fix="keep one of them")
        num_bytes, unit = parse_size_string(args[0], "size")
        return num_bytes, budget_text(num_bytes, unit)
    if len(given) > 1:
        listed = ", ".join(f"{key}={kwargs[key]!r}" for key in given)
        raise MarkerError(given[1], f"the budget is given more than once ({listed})",
                          fix=f"keep one: {ACCEPTED_BUDGET_FORMS}")
    if not given:
        return None
    key = given[0]
    if key == "size":
        num_bytes, unit = parse_size_string(kwargs[key], "size")
    else:
        num_bytes, unit = parse_size_number(kwargs[key], key), key
    return num_bytes, budget_text(num_bytes, unit)


def parse_tolerance(value: Any, field: str = "tolerance") -> Tolerance:
    """The marker's ``tolerance=`` (prediction vs measurement): :meth:`~pytest_gpumem.units.Tolerance.parse`'s
    grammar, at most 100% (``tolerance=10`` is refused: it would mean 1000%)."""
    return Tolerance.parse(value, field=field, max_fraction=1.0, error=MarkerError)


def parse_setup(value: Any, base_dirs: tuple[Path, ...] = (), field: str = "setup") -> GRPOSetup:
    """A :class:`GRPOSetup`, a dict of GRPOConfig names, or a path to a ``.json``/``.toml`` setup file
    (a relative path is looked up next to the test file first, then in the current directory)."""
    if isinstance(value, GRPOSetup):
        return value
    if isinstance(value, Mapping):
        return GRPOSetup.from_dict(value)
    if isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes):
        text = os.fspath(value)
        if not text.strip():
            raise MarkerError(field, "is an empty path", fix="give a path to a .json/.toml setup, a dict or a GRPOSetup")
        path = Path(text)
        candidates = [path] if path.is_absolute() else [base / path for base in base_dirs] + [Path.cwd() / path]
        for candidate in candidates:
            if candidate.is_file():
                return GRPOSetup.from_file(candidate)
        looked = ", ".join(str(c.parent) for c in candidates)
        raise MarkerError(field, f"no setup file {text!r} (looked in {looked})",
                          fix="give a path relative to the test file, an absolute path, a dict or a GRPOSetup")
    raise MarkerError(field, f"expected a GRPOSetup, a dict or a path to a setup file, got {value!r} "
                             f"({type(value).__name__})",
                      fix="e.g. setup=dict(model='Qwen/Qwen2.5-0.5B', per_device_train_batch_size=8)")


def parse_gpu(value: Any, field: str = "gpu") -> GPU:
    """A card name (``"L4"``, ``"A100-80GB"``) or a size (``"24GiB"``, bytes) → :class:`GPU`."""
    if isinstance(value, float) and not math.isfinite(value):  # resolve_gpu would overflow on int(inf)
        raise MarkerError(field, f"expected a card name or a size, got {value!r}", fix="e.g. gpu='L4' or gpu='24GiB'")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_BUDGET_BYTES:
        raise MarkerError(field, f"{value!r} bytes is more than any GPU holds", fix="e.g. gpu='L4' or gpu='24GiB'")
    return resolve_gpu(value, field=field)


# -- the spec ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Defaults:
    """Session-wide values a marker may override (ini ``gpu_budget_default``, ``gpu_budget_gpu``, ...)."""

    budget_bytes: int | None = None
    budget_text: str | None = None
    gpu: GPU | None = None
    tolerance: Tolerance = DEFAULT_TOLERANCE


@dataclass(frozen=True)
class BudgetSpec:
    """What one test is held to."""

    budget_bytes: int | None
    budget_text: str | None
    setup: GRPOSetup | None
    tolerance: Tolerance  # prediction vs measurement band (the marker's tolerance=, else 10%)
    gpu: GPU | None  # the card given by the marker / option / ini; None: the budget is the card size
    budget_origin: str  # "marker", "gpu" (the marker's card) or "default" (gpu_budget_default)

    def judge_gpu(self) -> GPU | None:
        """The card a prediction is made for: the given one, else a card the size of the budget."""
        if self.gpu is not None:
            return self.gpu
        if self.budget_bytes is not None:
            return GPU(f"a {self.budget_text} card (the budget)", self.budget_bytes, "budget")
        return None


def spec_from_marker(args: tuple, kwargs: Mapping[str, Any], defaults: Defaults = Defaults(),
                     base_dirs: tuple[Path, ...] = ()) -> BudgetSpec:
    """Validate one marker's arguments. Raises :class:`~pytest_gpumem.errors.GpuMemError` naming the field."""
    unknown = [key for key in kwargs if key not in ALL_KEYWORDS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), ALL_KEYWORDS, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}=? " if close else ""
        raise MarkerError(str(key), f"unknown argument {key}={kwargs[key]!r}",
                          fix=f"{hint}accepted: {', '.join(ALL_KEYWORDS)}")
    budget = parse_budget(tuple(args), kwargs)
    origin = "marker"
    tolerance = parse_tolerance(kwargs["tolerance"]) if kwargs.get("tolerance") is not None else defaults.tolerance
    if kwargs.get("baseline_tolerance") is not None:  # validated here (a collection error); applied by baseline_plugin
        Tolerance.parse(kwargs["baseline_tolerance"], field="baseline_tolerance")
    marker_gpu = parse_gpu(kwargs["gpu"]) if kwargs.get("gpu") is not None else None
    gpu = marker_gpu or defaults.gpu
    if budget is None and marker_gpu is not None:
        # gpu_budget(gpu="A100-40GB"): "must fit that card" — the budget is the total torch reports on it
        budget, origin = (marker_gpu.total_bytes, budget_text(marker_gpu.total_bytes, 'gib')), "gpu"
    if budget is None:
        if defaults.budget_bytes is None:
            raise MarkerError("budget", "the marker gives no budget and there is no gpu_budget_default",
                              fix=f"give {ACCEPTED_BUDGET_FORMS}, or set "
                                  "gpu_budget_default = '24 GiB' in [tool.pytest.ini_options]")
        budget, origin = (defaults.budget_bytes, defaults.budget_text or budget_text(defaults.budget_bytes)), "default"
    setup = parse_setup(kwargs["setup"], base_dirs) if kwargs.get("setup") is not None else None
    return BudgetSpec(budget_bytes=budget[0], budget_text=budget[1], setup=setup, tolerance=tolerance, gpu=gpu,
                      budget_origin=origin)


def default_spec(defaults: Defaults) -> BudgetSpec:
    """The spec of an unmarked test that uses ``grpo_step``/``gpu_memory`` while gpu_budget_default is set."""
    return BudgetSpec(budget_bytes=defaults.budget_bytes, budget_text=defaults.budget_text, setup=None,
                      tolerance=defaults.tolerance, gpu=defaults.gpu, budget_origin="default")


def describe_error(exc: BaseException, kwargs: Mapping[str, Any] | None = None) -> str:
    """The collection-error text: which argument, what was given, what is accepted."""
    if isinstance(exc, GpuMemError):
        field = exc.shown_field
        # a marker argument (MarkerError, or a check named after one: gpu=) or a key inside setup=
        is_argument = isinstance(exc, MarkerError) or field in ALL_KEYWORDS + ("budget", "positional arguments")
        where = field if is_argument else "setup"
        text = f"invalid @pytest.mark.{MARKER} argument {field}: {exc.problem}"
        if where == "setup" and field != "setup":
            text = f"invalid setup given to @pytest.mark.{MARKER} — {field}: {exc.problem}"
        if exc.fix:
            text += f"\n  fix: {exc.fix}"
        if (where in SIZE_KEYWORDS or where in ("size", "budget", "positional arguments")) and \
                ACCEPTED_BUDGET_FORMS not in (exc.fix or ""):
            text += f"\n  accepted budget forms: {ACCEPTED_BUDGET_FORMS}"
        return text
    # a bug of ours (a validator that raised something else): still an error on this test only
    return (f"invalid @pytest.mark.{MARKER} arguments {dict(kwargs or {})!r}: {type(exc).__name__}: {exc}"
            "\n  (pytest-gpumem raised an unexpected error here; please report it)")


# -- checks: each returns a failure message or None ------------------------------------------------------------
PHASE_WORDS = {"persistent": "between phases", "generation": "generation (rollouts)", "scoring": "scoring pass",
               "training": "training micro-step", "optimizer_step": "optimizer step"}


def judged_peak(record: Mapping[str, Any]) -> tuple[int | None, str]:
    """The peak a budget is judged on, and what it is: a measurement when there is one (NVML's device-level
    peak, else torch's reserved peak, else the measured breakdown), otherwise the prediction."""
    measured = record.get("measured") or {}
    for key, what in (("nvml_peak_bytes", "measured peak (NVML, device)"),
                      ("peak_reserved_bytes", "measured peak (torch reserved)")):
        if measured.get(key):
            return int(measured[key]), what
    if measured.get("breakdown"):
        return int(measured["breakdown"]["peak_bytes"]), "measured peak"
    predicted = record.get("predicted")
    if predicted:
        word = "simulated" if predicted.get("source") == "simulate" else "predicted"
        return int(predicted["peak_bytes"]), f"{word} peak"
    return None, "nothing to judge"


def check_run_completed(record: Mapping[str, Any], item: Any = None) -> str | None:
    """measure mode: the GRPO steps must have run (an OOM, a crash or a timeout fails the test)."""
    run = (record.get("measured") or {}).get("run") if isinstance(record.get("measured"), Mapping) else None
    if not run or run.get("status") in (None, "ok", "skipped"):
        return None
    reason = run.get("reason") or ""
    status = {"oom": "ran out of GPU memory", "crashed": "crashed", "timeout": "timed out"}.get(run["status"],
                                                                                                run["status"])
    message = f"the measured GRPO run {status} against the {record.get('budget_text')} budget" + (
        f": {reason}" if reason else "")
    if run["status"] == "oom" and record.get("setup"):
        # explain it: the shortfall, the phase and which predicted tensor the failed allocation is (the levers
        # follow in the failure text); an unreadable message only loses the explanation
        from ..errors import GpuMemError, MarkerError
        from ..diagnose.explain import diagnose

        text = (run.get("oom") or {}).get("message") or reason
        try:
            message += "\n" + diagnose(text, setup=record["setup"]).short(n=0)
        except GpuMemError:
            pass
    return message


def check_peak_within_budget(record: Mapping[str, Any], item: Any = None) -> str | None:
    """The judged peak must not exceed the budget."""
    budget = record.get("budget_bytes")
    peak, what = judged_peak(record)
    if budget is None or peak is None or peak <= budget:
        return None
    source = record.get("measured", {}).get("breakdown") if what.startswith("measured") and record.get("measured") \
        else record.get("predicted")
    phase, parts = None, ""
    if source:
        phase = source.get("peak_phase")
        components = source.get("phases", {}).get(phase, {})
        top = sorted(components.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        parts = ", ".join(f"{name} {format_gib(num_bytes)}" for name, num_bytes in top)
    where = f" in the {PHASE_WORDS.get(phase, phase)}" if phase else ""
    gpu = record.get("gpu") or {}
    spec = spec_of(item) if item is not None else None
    limit = (f"the {record.get('budget_text')} of the {gpu['name']}"
             if spec is not None and spec.budget_origin == "gpu" and gpu.get("name")
             else f"the {record.get('budget_text')} budget")
    return (f"{what} {format_gib(peak)}{where} exceeds {limit} by {format_gib(peak - budget)}"
            + (f": {parts}" if parts else ""))


def check_vllm_can_start(record: Mapping[str, Any], item: Any = None) -> str | None:
    """A colocated vLLM that would refuse to start fails the test even when the peak would fit."""
    if record.get("measured") and (record["measured"].get("breakdown") or record["measured"].get("run")):
        return None  # a real run says what happened
    for warning in (record.get("predicted") or {}).get("warnings", ()):
        if warning.startswith("vLLM would refuse"):
            return warning
    return None


def check_prediction_matches_measurement(record: Mapping[str, Any], item: Any = None,
                                         tolerance: Tolerance | None = None) -> str | None:
    """With both a prediction and a measurement, they must agree within the tolerance (relative to the
    measurement)."""
    predicted = record.get("predicted")
    measured = record.get("measured") or {}
    measured_peak, what = judged_peak({"measured": measured})
    if not predicted or measured_peak is None or not what.startswith("measured"):
        return None
    if tolerance is None:
        spec = spec_of(item) if item is not None else None
        tolerance = spec.tolerance if spec is not None else DEFAULT_TOLERANCE
    predicted_peak = int(predicted["peak_bytes"])
    gap = abs(predicted_peak - measured_peak)
    if gap <= tolerance.allowed_bytes(measured_peak):
        return None
    word = "over" if predicted_peak > measured_peak else "under"
    return (f"prediction and measurement disagree: predicted {format_gib(predicted_peak)}, {what} "
            f"{format_gib(measured_peak)} — the prediction is {gap / max(measured_peak, 1):.1%} {word} "
            f"(tolerance {tolerance.text})")


#: the checks run on every budgeted test, in order; the Manager copies this list (add yours there)
DEFAULT_CHECKS: tuple[Callable[..., str | None], ...] = (
    check_run_completed, check_vllm_can_start, check_peak_within_budget, check_prediction_matches_measurement)


def spec_of(item: Any) -> BudgetSpec | None:
    """The spec the plugin attached to ``item`` at collection (None for unbudgeted tests)."""
    from . import STATE_KEY  # the stash key lives with the state it indexes

    state = item.stash.get(STATE_KEY, None)
    return state.spec if state is not None else None
