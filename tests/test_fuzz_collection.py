"""Fuzzing the marker: generated ``gpu_budget`` arguments and setup dicts, thrown at the parser directly and at a
real pytest collection. Zero INTERNALERRORs; every rejection is a GpuMemError that names the field it is about.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from dataclasses import fields

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from pytest_gpumem import estimate
from pytest_gpumem.errors import GpuMemError
from pytest_gpumem.plugin.marker import describe_error, spec_from_marker
from pytest_gpumem.record import BudgetSpec
from pytest_gpumem.spec import ALIASES, GRPOSetup

FAST = ("-p", "no:cacheprovider", "-p", "no:unraisableexception", "-p", "no:hypothesispytest", "-p", "no:benchmark",
        "-p", "no:anyio")
#: fields a rejection may name besides the keys the case itself used
GENERIC_FIELDS = {"budget", "positional arguments", "size", "setup"}
SETUP_FIELDS = {f.name for f in fields(GRPOSetup)} | set(ALIASES)

numbers = st.one_of(st.integers(-5, 10**7), st.floats(allow_nan=True, allow_infinity=True, width=64),
                    st.floats(min_value=0.001, max_value=200))
size_strings = st.builds(lambda n, space, unit, trail: f"{n}{space}{unit}{trail}",
                         st.one_of(st.integers(-3, 5000).map(str), st.floats(0, 100).map(lambda f: f"{f:.3g}"),
                                   st.sampled_from(["", ".", "1e3", "x", "nan"])),
                         st.sampled_from(["", " ", "  "]),
                         st.sampled_from(["GB", "GiB", "gb", "gib", "MB", "MiB", "mib", "TB", "G", "", "gigs", "KB"]),
                         st.sampled_from(["", "", "", " ", " of RAM", "x", "!"]))
junk = st.one_of(st.none(), st.booleans(), st.text(max_size=8), st.lists(st.integers(), max_size=2),
                 st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def mostly(good, bad):
    """About three draws in four from ``good``: most cases get deep enough to exercise the later checks.
    (Hypothesis leans towards the simplest draw — 0, the first element — so the rare branch sits on a middle
    value.)"""
    return st.integers(0, 3).flatmap(lambda pick: bad if pick == 2 else good)


models = st.sampled_from(["Qwen/Qwen2.5-0.5B", "google/gemma-3-1b-it", "Qwen/Qwen3-0.6B", "no-such/model", "",
                          "qwen2.5-0.5b", "meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-7B-Instruct"])
setup_values = {
    "per_device_train_batch_size": mostly(st.sampled_from([1, 2, 4, 8, 16]),
                                          st.one_of(st.integers(-2, 17), junk, numbers)),
    "num_generations": mostly(st.sampled_from([2, 4, 8]), st.one_of(st.integers(-1, 17), junk)),
    "gradient_accumulation_steps": mostly(st.integers(1, 4), st.one_of(st.integers(-1, 9), junk)),
    "steps_per_generation": mostly(st.integers(1, 4), st.one_of(st.integers(-1, 9), junk)),
    "max_prompt_length": mostly(st.integers(1, 2048), st.one_of(st.integers(-1, 0), junk)),
    "max_completion_length": mostly(st.integers(1, 2048), st.one_of(st.integers(-1, 0), junk)),
    "max_seq_length": mostly(st.integers(2, 4096), st.one_of(st.integers(-1, 1), junk)),
    "lora_rank": mostly(st.sampled_from([None, 8, 16, 64]), st.one_of(st.integers(-1, 0), junk)),
    "load_in_4bit": mostly(st.booleans(), junk),
    "use_vllm": mostly(st.booleans(), junk),
    "vllm_gpu_memory_utilization": mostly(st.floats(0.05, 1.0), st.one_of(st.floats(-1, 2), junk)),
    "vllm_mode": mostly(st.sampled_from(["colocate", "server"]), st.one_of(st.just("colo"), junk)),
    "dtype": mostly(st.sampled_from(["bfloat16", "bf16", "float32", "float16"]), st.one_of(st.just("fp8"), junk)),
    "beta": mostly(st.floats(0, 0.1), st.one_of(st.floats(-1, -0.01), st.just(float("nan")), junk)),
    "optim": mostly(st.sampled_from(["adamw_torch", "adamw_8bit", "sgd", "adamw_torch_fused"]),
                    st.one_of(st.just("lion"), junk)),
    "gradient_checkpointing": mostly(st.sampled_from([True, False, "unsloth"]), st.one_of(st.just("yes"), junk)),
    "backend": mostly(st.sampled_from(["trl", "unsloth"]), st.one_of(st.just("axolotl"), junk)),
    "attn_implementation": mostly(st.sampled_from(["sdpa", "eager", "flash_attention_2"]),
                                  st.one_of(st.just("flash"), junk)),
    "lora_target_modules": mostly(st.sampled_from(["all-linear", ["q_proj", "v_proj"]]),
                                  st.one_of(st.just("q_proj"), st.just([1]), junk)),
    "trl_version": mostly(st.sampled_from(["1.16.0", "0.19.1", "1.9"]), st.one_of(st.sampled_from(["abc", ""]), junk)),
    "use_liger_kernel": mostly(st.booleans(), junk),
    "batch_size": st.integers(1, 8),  # an unknown key
    "r": st.integers(1, 64),  # an alias of lora_rank
}


@st.composite
def setup_dicts(draw):
    setup = {"model": draw(mostly(models, junk))} if draw(st.integers(0, 15)) != 7 else {}
    names = draw(st.lists(st.sampled_from(sorted(setup_values)), max_size=6, unique=True))
    for name in names:
        if name in ("batch_size", "r") and draw(st.integers(0, 3)) != 2:
            continue  # keep the unknown key and the alias rare
        setup[name] = draw(setup_values[name])
    return setup


good_numbers = st.one_of(st.integers(1, 200), st.floats(0.5, 200))
good_sizes = st.builds(lambda n, unit: f"{n} {unit}", st.integers(1, 100), st.sampled_from(["GB", "GiB", "gib", "MB"]))
SIZE_KEYS = ("gb", "gib", "mb", "mib", "size")


@st.composite
def marker_kwargs(draw):
    kwargs = {}
    count = draw(st.sampled_from([1] * 10 + [0, 2]))
    for key in draw(st.lists(st.sampled_from(SIZE_KEYS), min_size=count, max_size=count, unique=True)):
        if key == "size":
            kwargs[key] = draw(mostly(good_sizes, st.one_of(size_strings, numbers, junk)))
        else:
            kwargs[key] = draw(mostly(good_numbers, st.one_of(numbers, junk, size_strings)))
    if draw(st.integers(0, 4)) != 2:
        kwargs["setup"] = draw(mostly(setup_dicts(), junk))
    if draw(st.integers(0, 4)) == 2:
        kwargs["tolerance"] = draw(mostly(st.sampled_from([0.1, 0.05, "10%", "5%+256MiB", 0]),
                                          st.one_of(st.floats(-1, 20), st.just(float("nan")),
                                                    st.sampled_from(["x", "200%"]), junk)))
    if draw(st.integers(0, 3)) == 2:
        kwargs["gpu"] = draw(mostly(st.sampled_from(["L4", "A100-80GB", "24GiB", "4090", "H100"]),
                                    st.one_of(st.sampled_from(["A100", "H999", ""]), junk, numbers)))
    if draw(st.integers(0, 19)) == 11:
        kwargs[draw(st.sampled_from(["budget_gb", "Gb", "setups", "gpus"]))] = draw(numbers)
    return kwargs


marker_args = st.integers(0, 9).flatmap(
    lambda pick: st.lists(st.one_of(good_sizes, size_strings, numbers), min_size=1, max_size=2) if pick == 6
    else st.just([]))


def allowed_fields(args: list, kwargs: dict) -> set[str]:
    names = set(kwargs) | GENERIC_FIELDS
    setup = kwargs.get("setup")
    if isinstance(setup, dict):
        names |= SETUP_FIELDS | {str(key) for key in setup}
    return names


def check_rejection(exc: BaseException, args: list, kwargs: dict) -> str:
    assert isinstance(exc, GpuMemError), f"{type(exc).__name__}: {exc} for args={args!r} kwargs={kwargs!r}"
    assert exc.field in allowed_fields(args, kwargs), (exc.field, args, kwargs)
    text = describe_error(exc, kwargs)
    assert exc.shown_field in text
    return exc.shown_field


@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(args=marker_args, kwargs=marker_kwargs())
# cases the fuzzer found once (spec.py validation raised TypeError instead of naming the field): kept for good
@example(args=[], kwargs={"gb": 1, "setup": {"model": "Qwen/Qwen2.5-0.5B", "lora_target_modules": False}})
@example(args=[], kwargs={"gb": 1, "setup": {"model": "Qwen/Qwen2.5-0.5B", "max_seq_length": 418,
                                             "max_prompt_length": "x"}})
@example(args=[], kwargs={"gb": 80, "gpu": float("inf")})
@example(args=[], kwargs={"gb": 1, "setup": {"model": "Qwen/Qwen2.5-0.5B", "trl_version": "M²^¡"}})
# an absurd batch that breaks the divisibility rule: the error message once listed every divisor up to it (a hang)
@example(args=[], kwargs={"gb": 1, "setup": {"model": "Qwen/Qwen2.5-0.5B", "per_device_train_batch_size": 10**15 + 1,
                                             "num_generations": 2}})
def test_parser_accepts_or_names_the_field(args, kwargs):
    try:
        spec = spec_from_marker(tuple(args), kwargs)
    except Exception as exc:  # noqa: BLE001 - the property under test is *which* exception
        check_rejection(exc, args, kwargs)
    else:
        assert isinstance(spec, BudgetSpec) and 0 < spec.budget_bytes <= 10**15
        if spec.setup is not None:  # what collection accepts, the test run can estimate
            assert estimate(spec.setup, gpu=spec.judge_gpu()).peak_bytes > 0


TEST_MODULE = """
import json, pathlib, pytest

CASES = json.loads(pathlib.Path(__file__).with_name("cases.json").read_text())
for index, case in enumerate(CASES):
    def test_case(): pass
    test_case.__name__ = f"test_case_{index}"
    globals()[f"test_case_{index}"] = pytest.mark.gpu_budget(*case["args"], **case["kwargs"])(test_case)
del test_case
"""
ERROR_LINE = re.compile(r"^test_mod\.py::test_case_(\d+): (.*)$")


def test_collection_never_breaks_and_names_the_field(pytester):
    """≥ 1,000 generated markers through a real pytest collection (--collect-only, where they are read)."""
    pytester.makepyfile(test_mod=textwrap.dedent(TEST_MODULE))
    seen: list[int] = []

    # no shrinking: each example is a pytest run; a failure reports the whole batch and the failing case
    @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=(Phase.explicit, Phase.generate))
    @given(cases=st.lists(st.fixed_dictionaries({"args": marker_args, "kwargs": marker_kwargs()}),
                          min_size=50, max_size=50))
    def collect(cases):
        (pytester.path / "cases.json").write_text(json.dumps(cases))
        result = pytester.runpytest("--gpu-budget=estimate", "--collect-only", "-q", *FAST)
        output = result.stdout.str() + result.stderr.str()
        assert "INTERNALERROR" not in output, output[-3000:]
        assert f"{len(cases)} tests collected" in output
        errors = {int(m.group(1)): m.group(2) for m in map(ERROR_LINE.match, result.stdout.lines) if m}
        # any marker error fails the collect-only run (a CI lint step), with pytest's collection-error code
        assert result.ret == (pytest.ExitCode.INTERRUPTED if errors else pytest.ExitCode.OK), output[-3000:]
        for index, case in enumerate(cases):
            try:
                spec = spec_from_marker(tuple(case["args"]), case["kwargs"])
            except Exception as exc:  # noqa: BLE001
                field = check_rejection(exc, case["args"], case["kwargs"])
                assert index in errors, (index, case)
                assert field in errors[index], (field, errors[index])
            else:
                if spec.setup is None:  # the test body calls no fixture: nothing could ever be judged
                    assert errors.get(index, "").startswith("nothing to judge"), (case, errors.get(index))
                else:
                    assert index not in errors, (case, errors[index])
        seen.append(len(cases))

    collect()
    assert sum(seen) >= 1000


def test_json_round_trip_of_generated_values_keeps_nan():
    # the collection fuzz ships cases through JSON: NaN and infinities must survive the trip
    data = json.loads(json.dumps({"gb": float("nan"), "mb": float("inf")}))
    assert math.isnan(data["gb"]) and math.isinf(data["mb"])
