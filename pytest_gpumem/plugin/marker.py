"""``@pytest.mark.gpu_budget``: reading its arguments into a :class:`~pytest_gpumem.record.BudgetSpec`.

Unlike pytest-memray's marker (docs/anchors.md), a bad argument is an error on *that* test — never an
INTERNALERROR — naming the argument, the value given and the accepted forms; a size string must carry an
explicit unit and nothing may trail it; "GB" is 10**9 bytes and every message prints both units. The checks a
budgeted test runs are ``compare/checks.py``. Nothing here imports torch, and pytest only through options.py,
where the marker's name and its ``pytest --markers`` line are (the inert plugin registers them without this
module).
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any, Mapping

from ..breakdown import Role
from ..distributed import STRATEGY_FIELDS
from ..errors import GpuMemError, MarkerError
from ..gpus import GPU, resolve_gpu
from ..record import BudgetSpec, Defaults
from ..spec import GRPOSetup
from ..units import UNIT_BYTES, Tolerance, budget_text, read_size
from .options import MARKER

#: the units a budget may be given in (lower case -> (as printed, bytes)), and the marker's number keywords
SIZE_UNITS: dict[str, tuple[str, int]] = {name.lower(): (name, UNIT_BYTES[name.lower()])
                                          for name in ("GB", "GiB", "MB", "MiB")}
SIZE_KEYWORDS: dict[str, int] = {keyword: num_bytes for keyword, (_, num_bytes) in SIZE_UNITS.items()}
OTHER_KEYWORDS = ("setup", "tolerance", "gpu", "baseline_tolerance")
#: a budget per role beside the training GPUs' (gb= & co.): ``vllm_gb=80`` budgets each GPU of the setup's
#: `trl vllm-serve` server (the vllm_server role); prefix -> role
ROLE_PREFIXES = {"vllm_": Role.VLLM_SERVER.value}
ROLE_KEYWORDS = tuple(f"{prefix}{unit}" for prefix in ROLE_PREFIXES for unit in (*SIZE_KEYWORDS, "size"))
ALL_KEYWORDS = tuple(SIZE_KEYWORDS) + ("size",) + OTHER_KEYWORDS + ROLE_KEYWORDS

ACCEPTED_BUDGET_FORMS = ("exactly one of gb=17 (10^9 bytes), gib=20 (2^30 bytes), mb=1500, mib=512 or "
                         "size='17 GiB' (GB/GiB/MB/MiB, case-insensitive); or only gpu='L4' (that card's memory)")

#: the largest budget we accept: anything above is a typo (1 PB)
MAX_BUDGET_BYTES = 10**15


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


def parse_role_budgets(kwargs: Mapping[str, Any]) -> dict[str, tuple[int, str]]:
    """``vllm_gb=80`` & co. → {role: (bytes, text)}: the same forms as the training budget, prefixed."""
    budgets = {}
    for prefix, role in ROLE_PREFIXES.items():
        given = {key[len(prefix):]: value for key, value in kwargs.items() if key.startswith(prefix)
                 and key in ROLE_KEYWORDS}
        if not given:
            continue
        if len(given) > 1:
            listed = ", ".join(f"{prefix}{key}={value!r}" for key, value in given.items())
            raise MarkerError(f"{prefix}{list(given)[1]}", f"the {role} budget is given more than once ({listed})",
                              fix=f"keep one of {prefix}gb=, {prefix}gib=, {prefix}mb=, {prefix}mib=, {prefix}size=")
        key, value = next(iter(given.items()))
        try:
            budget = parse_budget((), {key: value})
        except MarkerError as exc:
            raise MarkerError(f"{prefix}{key}", exc.problem, fix=exc.fix) from None
        budgets[role] = budget
    return budgets


def role_budgets_for(setup: GRPOSetup | None, given: Mapping[str, tuple[int, str]],
                     budget: tuple[int, str]) -> dict[str, tuple[int, str]]:
    """Every non-training GPU role of the setup with its budget: the marker's ``vllm_gb=``, else the server's
    card (``vllm_server_gpu``), else the training GPUs' budget (the same cards)."""
    server = setup is not None and setup.use_vllm and setup.vllm_mode == "server"
    for role in given:
        if role == Role.VLLM_SERVER.value and not server:
            key = next(k for k, r in ROLE_PREFIXES.items() if r == role)
            raise MarkerError(f"{key}gb", "budgets a vLLM server GPU, but the setup runs no server "
                              "(vllm_mode='server' with use_vllm=true)",
                              fix="drop the vllm_ budget, or give a setup with use_vllm=True, vllm_mode='server'")
    budgets = dict(given)
    if server and Role.VLLM_SERVER.value not in budgets:
        card = resolve_gpu(setup.vllm_server_gpu) if setup.vllm_server_gpu is not None else None
        budgets[Role.VLLM_SERVER.value] = ((card.total_bytes, budget_text(card.total_bytes, "gib") + f" ({card.name})")
                                           if card is not None else budget)
    return budgets


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
            raise MarkerError(field, "is an empty path",
                              fix="give a path to a .json/.toml setup, a dict or a GRPOSetup")
        path = Path(text)
        candidates = [path] if path.is_absolute() else [base / path for base in base_dirs] + [Path.cwd() / path]
        for candidate in candidates:
            if candidate.is_file():
                return GRPOSetup.from_file(candidate)
        looked = ", ".join(dict.fromkeys(str(c.parent) for c in candidates))  # the test's folder may be the cwd
        raise MarkerError(field, f"no setup file {text!r} (looked in {looked})",
                          fix="give a path relative to the test file, an absolute path, a dict or a GRPOSetup")
    raise MarkerError(field, f"expected a GRPOSetup, a dict or a path to a setup file, got {value!r} "
                             f"({type(value).__name__})",
                      fix="e.g. setup=dict(model='Qwen/Qwen2.5-0.5B', per_device_train_batch_size=8)")


def with_suite_keys(setup: GRPOSetup, suite: Mapping[str, Any]) -> GRPOSetup:
    """``setup`` launched the way the whole suite is (the ini's accelerate config / world size): the suite's keys
    fill what the marker's setup does not give; a setup naming its own strategy keeps its own knobs."""
    own = {name: getattr(setup, name) for name in setup.explicit_fields}
    if "distributed" in own:
        suite = {k: v for k, v in suite.items() if k not in STRATEGY_FIELDS}
    return GRPOSetup.from_dict({**suite, **own, "model": setup.model})


def parse_gpu(value: Any, field: str = "gpu") -> GPU:
    """A card name (``"L4"``, ``"A100-80GB"``) or a size (``"24GiB"``, bytes) → :class:`GPU`."""
    if isinstance(value, float) and not math.isfinite(value):  # resolve_gpu would overflow on int(inf)
        raise MarkerError(field, f"expected a card name or a size, got {value!r}", fix="e.g. gpu='L4' or gpu='24GiB'")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_BUDGET_BYTES:
        raise MarkerError(field, f"{value!r} bytes is more than any GPU holds", fix="e.g. gpu='L4' or gpu='24GiB'")
    return resolve_gpu(value, field=field)


# -- the spec ---------------------------------------------------------------------------------------------
#: no session-wide budget, card or tolerance
NO_DEFAULTS = Defaults()


def spec_from_marker(args: tuple, kwargs: Mapping[str, Any], defaults: Defaults = NO_DEFAULTS,
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
    baseline_tolerance = None
    if kwargs.get("baseline_tolerance") is not None:  # read here (a collection error); applied by baseline_gate
        baseline_tolerance = Tolerance.parse(kwargs["baseline_tolerance"], field="baseline_tolerance")
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
    given_roles = parse_role_budgets(kwargs)
    setup = parse_setup(kwargs["setup"], base_dirs) if kwargs.get("setup") is not None else None
    if setup is not None and defaults.setup_keys:
        setup = with_suite_keys(setup, dict(defaults.setup_keys))
    roles = role_budgets_for(setup, given_roles, budget)
    return BudgetSpec(budget_bytes=budget[0], budget_text=budget[1], setup=setup, tolerance=tolerance, gpu=gpu,
                      budget_origin=origin, baseline_tolerance=baseline_tolerance,
                      role_budgets=tuple(sorted(roles.items())))


def default_spec(defaults: Defaults) -> BudgetSpec:
    """The spec of an unmarked test that uses ``grpo_step``/``gpu_memory`` while gpu_budget_default is set."""
    return BudgetSpec(budget_bytes=defaults.budget_bytes, budget_text=defaults.budget_text, setup=None,
                      tolerance=defaults.tolerance, gpu=defaults.gpu, budget_origin="default")


def describe_error(exc: BaseException, kwargs: Mapping[str, Any] | None = None,
                   given_to: str = f"@pytest.mark.{MARKER}") -> str:
    """The collection-error text: which argument, what was given, what is accepted. ``given_to`` names what
    received the setup (the marker, or ``grpo_step()``: the same text for the same mistake)."""
    if isinstance(exc, GpuMemError):
        field = exc.shown_field
        # a marker argument (MarkerError, or a check named after one: gpu=) or a key inside setup=
        is_argument = isinstance(exc, MarkerError) or field in ALL_KEYWORDS + ("budget", "positional arguments")
        where = field if is_argument else "setup"
        text = f"invalid {given_to} argument {field}: {exc.problem}"
        if where == "setup" and field != "setup":
            text = f"invalid setup given to {given_to} — {field}: {exc.problem}"
        if exc.fix:
            text += f"\n  fix: {exc.fix}"
        if (where in SIZE_KEYWORDS or where in ("size", "budget", "positional arguments")) and \
                ACCEPTED_BUDGET_FORMS not in (exc.fix or ""):
            text += f"\n  accepted budget forms: {ACCEPTED_BUDGET_FORMS}"
        return text
    # a bug of ours (a validator that raised something else): still an error on this test only
    return (f"invalid @pytest.mark.{MARKER} arguments {dict(kwargs or {})!r}: {type(exc).__name__}: {exc}"
            "\n  (pytest-gpumem raised an unexpected error here; please report it)")
