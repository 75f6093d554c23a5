"""`gpumem fit` / `gpumem table`: the best setup that fits, by a documented order, found without missing any."""

from __future__ import annotations

import itertools
import json

import pytest

from pytest_gpumem import GpuMemError, GRPOSetup, estimate
from pytest_gpumem.cli import main
from pytest_gpumem.diagnose.fit import DIMENSIONS, QUALITY_ORDER, _Search, build_setup, dimensions, fit, space_size
from pytest_gpumem.diagnose.levers import min_vllm_utilization
from pytest_gpumem.diagnose.table import TABLE_SIZES_GIB, table
from pytest_gpumem.errors import SetupError
from pytest_gpumem.gpus import resolve_gpu

CASES = [
    ({"model": "Qwen/Qwen2.5-0.5B"}, "8GiB"),
    ({"model": "Qwen/Qwen2.5-0.5B", "trl_version": "1.9.0", "per_device_train_batch_size": 16}, "12GiB"),
    ({"model": "Qwen/Qwen2.5-1.5B", "use_vllm": True, "max_completion_length": 1024}, "16GiB"),
    ({"model": "Qwen/Qwen2.5-7B", "backend": "unsloth", "max_seq_length": 2048, "max_prompt_length": 256}, "12GiB"),
    ({"model": "Qwen/Qwen2.5-7B", "per_device_train_batch_size": 4, "num_generations": 4,
      "gradient_accumulation_steps": 2, "steps_per_generation": 4}, "L4"),
    ({"model": "meta-llama/Llama-3.2-1B-Instruct", "gradient_checkpointing": False, "optim": "adamw_torch"}, "16GiB"),
]
IDS = ["0.5b-8g", "0.5b-materialized-12g", "1.5b-vllm-16g", "7b-unsloth-12g", "7b-explicit-spg-L4", "llama-1b-16g"]


@pytest.mark.parametrize("data, gpu", CASES, ids=IDS)
def test_fit_invariants(data, gpu):
    setup = GRPOSetup.from_dict(data)
    result = fit(setup, gpu, headroom=0.1)
    assert result.fits, result.to_dict().get("closest")
    best = result.setup
    # predicted to fit (re-estimated independently), vLLM included
    again = estimate(best, gpu)
    assert again.peak_bytes == result.peak_bytes
    assert again.fits(headroom=0.1)
    assert again.peak_bytes <= resolve_gpu(gpu).total_bytes * 0.9
    # effective batch kept, TRL's divisibility rule holds
    assert best.completions_per_optimizer_step == setup.completions_per_optimizer_step
    assert best.generation_batch_size % best.num_generations == 0
    # fit only pulls levers: nothing grows
    assert best.max_completion_length <= setup.max_completion_length
    assert best.num_generations <= setup.num_generations
    assert best.per_device_train_batch_size <= setup.per_device_train_batch_size
    # (vLLM's utilisation may only rise to the floor where vLLM can start at all)
    floor = min_vllm_utilization(setup, resolve_gpu(gpu).total_bytes) or 0
    assert best.vllm_gpu_memory_utilization <= max(setup.vllm_gpu_memory_utilization, floor)
    # alternatives: each keeps its dimension at the input's value, and fits
    for keeps, candidate in result.alternatives:
        assert keeps in DIMENSIONS
        assert candidate.choice[DIMENSIONS.index(keeps)] == 0
        assert candidate.fits and candidate.setup.completions_per_optimizer_step == setup.completions_per_optimizer_step


@pytest.mark.parametrize("data, gpu", CASES, ids=IDS)
def test_pruned_search_finds_the_same_best_as_brute_force(data, gpu):
    """The first fitting candidate of the full product in quality order is the one the pruned search returns."""
    setup = GRPOSetup.from_dict(data)
    dims = dimensions(setup, resolve_gpu(gpu))
    # shrink the space so brute force stays fast: keep every dimension but at most 3 options each
    dims = [type(d)(d.name, d.options[:2] + d.options[-1:] if len(d.options) > 3 else d.options) for d in dims]
    assert space_size(dims) <= 3 ** len(dims)
    search = _Search(setup, resolve_gpu(gpu), 0.1, dims)
    expected = None
    for choice in itertools.product(*(range(len(d.options)) for d in dims)):
        candidate = search.evaluate(choice)
        if candidate is not None and candidate.fits:
            expected = candidate
            break
    found = _Search(setup, resolve_gpu(gpu), 0.1, dims).best()
    assert (found.choice if found else None) == (expected.choice if expected else None)


@pytest.mark.parametrize("data, gpu", CASES, ids=IDS)
def test_each_dimensions_last_option_saves_the_most(data, gpu):
    """The premise of the pruning: moving a monotone dimension to its last option never raises the peak;
    for the others (the batch split) the bound tries every option, so it is still a lower bound."""
    setup = GRPOSetup.from_dict(data)
    card = resolve_gpu(gpu)
    dims = dimensions(setup, card)
    search = _Search(setup, card, 0.1, dims)
    start = tuple(0 for _ in dims)
    base = search.evaluate(start)
    for level, dim in enumerate(dims):
        peaks = []
        for index in range(len(dim.options)):
            candidate = search.evaluate(start[:level] + (index,) + start[level + 1:])
            if candidate is not None:
                peaks.append(candidate.peak_bytes)
        assert peaks[0] == base.peak_bytes
        if dim.monotone:
            assert peaks[-1] == min(peaks), (dim.name, peaks)
        else:
            bound = search._lowest(start[:level], {i: 0 for i in range(level + 1, len(dims))})
            assert bound.peak_bytes <= min(peaks), (dim.name, bound.peak_bytes, peaks)


def test_batch_split_is_not_monotone_for_full_fine_tuning():
    """Why the batch dimension is flagged: halving b and doubling GA raises the peak of a full fine-tune
    (gradients stay live from the second micro-step on) — the pruned search must still find fits."""
    base = estimate({"model": "Qwen/Qwen2.5-0.5B"}, gpu="8GiB").peak_bytes
    split = estimate({"model": "Qwen/Qwen2.5-0.5B", "per_device_train_batch_size": 4,
                      "gradient_accumulation_steps": 2}, gpu="8GiB").peak_bytes
    assert split > base
    assert not dimensions(GRPOSetup.from_dict({"model": "Qwen/Qwen2.5-0.5B"}), resolve_gpu("8GiB"))[
        DIMENSIONS.index("batch")].monotone


def test_fit_keeps_what_it_is_told_to_keep():
    setup = GRPOSetup.from_dict({"model": "Qwen/Qwen2.5-7B"})
    free = fit(setup, "8GiB")
    assert free.fits and free.setup.max_completion_length < 512
    kept = fit(setup, "8GiB", keep=("completions_per_optimizer_step", "max_completion_length"))
    if kept.fits:
        assert kept.setup.max_completion_length == 512
    else:
        assert kept.closest.setup.max_completion_length == 512


def test_an_input_that_fits_is_returned_unchanged():
    setup = GRPOSetup.from_dict({"model": "Qwen/Qwen2.5-0.5B"})
    result = fit(setup, "80GiB")
    assert result.fits and result.changes() == [] and result.setup == setup


def test_nothing_fits():
    setup = GRPOSetup.from_dict({"model": "Qwen/Qwen3-32B"})
    result = fit(setup, "8GiB")
    assert not result.fits and result.setup is None
    data = result.to_dict()
    assert data["setup"] is None and data["closest"]["short_by_bytes"] > 0
    assert result.closest.peak_bytes > result.budget_bytes


def test_invalid_arguments_are_gpumem_errors():
    with pytest.raises(GpuMemError, match="gpu"):
        fit({"model": "Qwen/Qwen2.5-0.5B"}, None)
    with pytest.raises(GpuMemError, match="headroom"):
        fit({"model": "Qwen/Qwen2.5-0.5B"}, "24GiB", headroom=1.5)
    with pytest.raises(GpuMemError, match="keep"):
        fit({"model": "Qwen/Qwen2.5-0.5B"}, "24GiB", keep=("completion",))


def test_build_setup_refuses_an_invalid_split():
    setup = GRPOSetup.from_dict({"model": "Qwen/Qwen2.5-0.5B"})
    dims = dimensions(setup, resolve_gpu("24GiB"))
    batch = DIMENSIONS.index("batch")
    generations = DIMENSIONS.index("num_generations")
    assert dims[generations].options == (8, 4, 2)
    # the generation batch of 8 rows cannot be split into 2 rounds of 4 when groups are 8 (TRL's rule)
    assert dims[DIMENSIONS.index("steps_per_generation")].options == (1,)
    choice = [0] * len(dims)
    choice[batch] = len(dims[batch].options) - 1  # b = 1, GA = 8
    built = build_setup(setup, dims, tuple(choice))
    assert (built.per_device_train_batch_size, built.gradient_accumulation_steps,
            built.steps_per_generation) == (1, 8, 8)
    with pytest.raises(SetupError):
        GRPOSetup.from_dict({"model": "Qwen/Qwen2.5-0.5B", "per_device_train_batch_size": 4,
                             "steps_per_generation": 1})


def test_fit_json_and_exit_codes(capsys):
    assert main(["fit", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "8GiB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"setup", "peak_bytes", "changes", "alternatives"} <= set(data)
    assert data["setup"]["model"] == "Qwen/Qwen2.5-0.5B"
    assert [entry["dimension"] for entry in data["order"]] == [name for name, _ in QUALITY_ORDER]
    assert main(["fit", "--model", "Qwen/Qwen3-32B", "--gpu", "8GiB"]) == 1
    assert "nothing in the lever space fits" in capsys.readouterr().out


def test_table_is_generated_by_fit(capsys):
    assert main(["table", "--model", "Qwen/Qwen2.5-0.5B", "--use-vllm", "--max-completion-length", "1024"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "GiB |" in line]
    assert len(rows) == len(TABLE_SIZES_GIB)
    setup = GRPOSetup.from_dict({"model": "Qwen/Qwen2.5-0.5B", "use_vllm": True, "max_completion_length": 1024})
    for size, row in zip(TABLE_SIZES_GIB, rows):
        assert row.startswith(f"| {size:g} GiB |")
        result = fit(setup, f"{size}GiB", alternatives=False)
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        # each row says its method and its base precision apart (issue 11: fp32 LoRA beside bf16 LoRA)
        assert cells[1] == (f"LoRA r={result.setup.lora_rank}" if result.setup.is_lora and not
                            result.setup.load_in_4bit else cells[1])
        assert cells[2] == ("NF4" if result.setup.load_in_4bit else
                            {"float32": "fp32", "bfloat16": "bf16"}[result.setup.dtype])
        assert cells[3] == f"{result.setup.per_device_train_batch_size} × {result.setup.gradient_accumulation_steps}"
        assert cells[5] == str(result.setup.max_completion_length)
    assert "| method | base precision |" in out
    assert table(setup, [24]) == table(setup, [24])  # deterministic


def test_allowing_a_smaller_effective_batch_only_adds_options():
    setup = GRPOSetup.from_dict({"model": "Qwen/Qwen2.5-7B", "per_device_train_batch_size": 8})
    kept = dimensions(setup, resolve_gpu("L4"))
    free = dimensions(setup, resolve_gpu("L4"), keep=())
    batch = DIMENSIONS.index("batch")
    assert free[batch].options[:len(kept[batch].options)] == kept[batch].options
    assert (1, 1) in free[batch].options  # b = 1 without more accumulation: 1 completion per step
    result = fit(setup, "L4", keep=())
    assert result.fits
    assert result.setup.completions_per_optimizer_step <= setup.completions_per_optimizer_step
