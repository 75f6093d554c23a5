"""The runner, for real: a TRL GRPOTrainer in a fresh subprocess on a tiny locally built model.

CPU: two real child runs (a clean 2-step run and one whose generation phase raises a real
``torch.OutOfMemoryError`` carrying a real OOM text), plus cheap children that die, segfault, hang or raise
before importing TRL. GPU tests carry ``@pytest.mark.gpu`` and skip cleanly without CUDA.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_gpumem import Breakdown, GpuMemError
from pytest_gpumem.breakdown import Component, Phase
from pytest_gpumem.measure.child import tiny
from pytest_gpumem.measure.child.tiny import TINY_QWEN2_CONFIG
from pytest_gpumem.measure.protocol import RunResult, measured_breakdown
from pytest_gpumem.measure.runner import assign_cuda_device, describe_exit, run, skip_reason
from pytest_gpumem.report.text import compare_table, format_result
from pytest_gpumem.spec import GRPOSetup
from pytest_gpumem.units import GIB, MIB

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = json.loads((ROOT / "tests" / "fixtures" / "oom-messages.json").read_text(encoding="utf-8"))
PROMPT, COMPLETION = 24, 12
TINY = {"model": dict(TINY_QWEN2_CONFIG), "per_device_train_batch_size": 4, "num_generations": 4,
        "max_prompt_length": PROMPT, "max_completion_length": COMPLETION, "dtype": "float32"}


def _fixture(fixture_id: str) -> dict:
    return next(item for item in FIXTURES if item["id"] == fixture_id)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# -- a real 2-step run on CPU, through the command line ----------------------------------------------------
EXAMPLE = ROOT / "examples" / "setups" / "tiny-qwen2-cpu.json"
EXAMPLE_SETUP = json.loads(EXAMPLE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cpu_run() -> tuple[RunResult, list[str]]:
    """``gpumem run --setup examples/setups/tiny-qwen2-cpu.json --device cpu --json``, as a user would."""
    completed = subprocess.run([sys.executable, "-m", "pytest_gpumem.cli", "run", "--setup", str(EXAMPLE),
                                "--device", "cpu", "--steps", "2", "--json"], cwd=ROOT, capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return RunResult.from_dict(json.loads(completed.stdout)), completed.stderr.splitlines()


def test_cpu_run_completes_two_real_steps(cpu_run):
    result, _ = cpu_run
    assert result.status == "ok", result.reason + "\n" + result.data.get("output_tail", "")
    assert result.steps_completed == 2
    assert result.device_type == "cpu"
    assert result.data["backend"] == "trl-hf-generate"
    assert result.data["exit_code"] == 0


def test_cpu_run_measures_the_worst_case_lengths(cpu_run):
    """Prompts of exactly max_prompt_length tokens, completions forced to max_completion_length."""
    tokens = cpu_run[0].data["tokens"]
    assert tokens["prompt_min"] == tokens["prompt_max"] == EXAMPLE_SETUP["max_prompt_length"]
    assert tokens["completion_min"] == tokens["completion_max"] == EXAMPLE_SETUP["max_completion_length"]
    # one generation batch of b completions per optimizer step
    assert tokens["completions_generated"] == 2 * EXAMPLE_SETUP["per_device_train_batch_size"]


def test_cpu_run_reports_phases_timings_and_host_memory(cpu_run):
    result, _ = cpu_run
    phases = result.phases
    # GA = 1: each optimizer step generates once, scores once, trains once, steps once
    for phase in ("generation", "scoring", "training", "optimizer_step"):
        assert phases[phase]["occurrences"] == 2, phase
        assert phases[phase]["seconds"] > 0
        assert phases[phase]["peak_rss_bytes"] > 50 * MIB  # torch + transformers are resident
    timings = result.data["timings_s"]
    assert len(timings["steps"]) == 2 and all(s > 0 for s in timings["steps"])
    assert timings["total"] >= timings["train"] > 0
    host = result.data["host_memory"]
    assert host["peak_rss_bytes"] >= max(p["peak_rss_bytes"] for p in phases.values() if p.get("peak_rss_bytes"))
    assert host["persistent_tensors"]["weights_bytes"] > 0


def test_cpu_run_gpu_fields_are_missing_with_reasons(cpu_run):
    result, _ = cpu_run
    assert result.breakdown is None
    for name in ("peak_reserved_bytes", "peak_allocated_bytes", "nvml_peak_bytes", "breakdown"):
        assert getattr(result, name) is None
        assert result.reason_for(name).startswith("not measured"), name
    data = result.to_dict()
    json.dumps(data)  # the whole result is JSON
    assert RunResult.from_dict(data).to_dict()["reasons"] == data["reasons"]


def test_cpu_run_streams_progress_lines(cpu_run):
    _, lines = cpu_run
    text = "\n".join(lines)
    assert re.search(r"\[gpumem +[0-9.]+s\] child started", text)
    assert "model ready" in text and "trainer ready" in text
    assert "step 1/2 done" in text and "step 2/2 done" in text
    assert "ok: 2 steps on cpu" in format_result(cpu_run[0])


# -- models and tokenizers built locally ------------------------------------------------------------------
def test_every_registry_architecture_up_to_8b_builds_with_its_exact_parameter_count():
    torch = pytest.importorskip("torch")
    from pytest_gpumem.models import registry

    checked = 0
    for name, spec in registry().items():
        if spec.num_params > 9e9:
            continue
        source = tiny.model_source(name)
        assert source["kind"] == "config"
        model = tiny.build_model(tiny.build_config(source["config"]), dtype="bfloat16", device="meta")
        assert sum(p.numel() for p in model.parameters()) == spec.num_params, name
        assert next(model.parameters()).dtype == torch.bfloat16
        checked += 1
    assert checked >= 15


def test_tokenizer_covers_the_vocabulary_and_prompts_are_exact():
    tokenizer = tiny.build_tokenizer(1000)
    assert len(tokenizer) == 1000
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.padding_side) == (0, 1, "left")
    for prompt in tiny.make_prompts(5, 37, 1000, seed=3):
        ids = tokenizer(prompt)["input_ids"]
        assert len(ids) == 37 and 2 not in ids  # no <unk>
    assert tokenizer.decode([5, 999]) == "w5 w999"  # every id the model can sample decodes
    assert tiny.exact_length_ids([1, 2, 3], 2, 0) == [2, 3]  # left truncation keeps the end
    assert tiny.exact_length_ids([1, 2], 5, 0) == [2, 1, 2, 1, 2]
    assert tiny.exact_length_ids([], 3, 9) == [9, 9, 9]


def test_local_weights_directory_is_loaded_not_rebuilt(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_QWEN2_CONFIG), encoding="utf-8")
    assert tiny.model_source(str(tmp_path))["kind"] == "config"
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert tiny.model_source(str(tmp_path)) == {"kind": "local-weights", "path": str(tmp_path),
                                                "spec": str(tmp_path)}


# -- children that fail ---------------------------------------------------------------------------------
def test_oom_in_the_child_is_a_structured_result():
    """A real torch.OutOfMemoryError raised inside the trainer's generation phase, with a torch 2.x text."""
    fixture = _fixture("torch-oom-008")
    result = run(TINY, steps=2, device="cpu", timeout_s=300, fault="oom-in-generation",
                 fault_message=fixture["text"])
    assert result.status == "oom", result.reason
    oom = result.oom
    assert oom["phase"] == "generation"
    assert oom["type"] == "OutOfMemoryError"
    assert "generation phase" in result.reason
    parsed = oom["parsed"]
    assert parsed is not None, oom["parse_reason"]
    for key in ("requested_bytes", "total_bytes", "free_bytes", "process_in_use_bytes", "torch_allocated_bytes"):
        assert parsed[key] == fixture["expected"][key], key
    assert result.steps_completed == 0


@pytest.mark.parametrize("fault, expected", [
    ("exit-early", "exit code 137 (128 + SIGKILL"),
    ("segv-early", "SIGSEGV"),
])
def test_a_child_that_dies_is_reported_not_propagated(fault, expected):
    result = run(TINY, device="cpu", timeout_s=60, fault=fault)
    assert result.status == "crashed"
    assert expected in result.reason
    assert "before writing a result" in result.reason
    assert result.peak_reserved_bytes is None and result.reason_for("peak_reserved_bytes")


def test_a_child_that_raises_is_reported_with_its_traceback():
    result = run(TINY, device="cpu", timeout_s=60, fault="raise-early")
    assert result.status == "crashed"
    assert result.reason.startswith("RuntimeError in stage start")
    assert "injected failure" in result.data["exception"]["traceback_tail"]


def test_a_hanging_child_times_out_and_is_killed():
    result = run(TINY, device="cpu", timeout_s=3, fault="hang-early")
    assert result.status == "timeout"
    assert "no result after 3 s" in result.reason
    pid = int(re.search(r"pid (\d+)", result.data["progress"][0]).group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.skipif(_cuda_available(), reason="this machine has CUDA: the run would really happen")
def test_cuda_requested_without_a_device_is_a_skip():
    result = run(TINY, device="cuda", timeout_s=120)
    assert result.status == "skipped"
    assert result.reason.startswith("no CUDA device")


# -- no child needed --------------------------------------------------------------------------------------
def test_backends_that_cannot_run_are_skips_with_reasons():
    vllm = GRPOSetup.from_dict({**TINY, "use_vllm": True})
    result = run(vllm, device="cpu")
    assert result.status == "skipped"
    assert result.reason in ("vllm not installed", "vLLM colocate needs a CUDA device (device='cpu' was asked for)")
    server = GRPOSetup.from_dict({**TINY, "use_vllm": True, "vllm_mode": "server"})
    assert "server" in skip_reason(server, "auto")
    qlora = GRPOSetup.from_dict({**TINY, "lora_rank": 8, "load_in_4bit": True})
    assert skip_reason(qlora, "cpu") == "load_in_4bit needs a CUDA device (bitsandbytes)"


def test_run_rejects_bad_arguments_with_the_field_named():
    with pytest.raises(GpuMemError, match="steps"):
        run(TINY, steps=0)
    with pytest.raises(GpuMemError, match="device"):
        run(TINY, device="tpu")
    with pytest.raises(GpuMemError, match="timeout_s"):
        run(TINY, timeout_s=-1)
    with pytest.raises(GpuMemError, match="fault"):
        run(TINY, fault="meteor")


def test_xdist_workers_are_spread_over_gpus():
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert assign_cuda_device(env, "gw5")[0] == {"CUDA_VISIBLE_DEVICES": "1"}
    assert assign_cuda_device(env, "gw4")[0] == {"CUDA_VISIBLE_DEVICES": "0"}
    uuids = {"CUDA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb"}
    assert assign_cuda_device(uuids, "gw3")[0] == {"CUDA_VISIBLE_DEVICES": "GPU-bbb"}
    assert assign_cuda_device(env, "")[0] == {}  # not under xdist: the child sees what the parent sees
    assert assign_cuda_device(env, "master")[0] == {}
    updates, note = assign_cuda_device({"CUDA_VISIBLE_DEVICES": ""}, "gw1")
    assert updates == {} and "hides every device" in note


def test_exit_codes_are_described():
    assert describe_exit(-11) == "SIGSEGV"
    assert "out-of-memory killer" in describe_exit(-9)
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(139).startswith("exit code 139 (128 + SIGSEGV")


def _cuda_result(**gpu_extra) -> dict:
    """The raw figures a CUDA child reports (the shapes _child writes), for the breakdown arithmetic."""
    phase = lambda alloc, res, non_torch, ctx: {  # noqa: E731
        "occurrences": 2, "seconds": 1.0, "peak_allocated_bytes": alloc, "peak_reserved_bytes": res,
        "non_torch_bytes": non_torch, "context_at_peak": ctx}
    states = {"optimizer_state_bytes": 8 * GIB, "gradient_bytes": 0}
    return {
        "device": {"type": "cuda"},
        "gpu": {"persistent_tensors": {"weights_bytes": 4 * GIB, "lora_bytes": 0, "reference_bytes": 0},
                "persistent_sample": {"allocated_bytes": 12 * GIB + 10 * MIB, "reserved_bytes": 13 * GIB,
                                      "non_torch_bytes": 600 * MIB, "context": states},
                **gpu_extra},
        "phases": {"generation": phase(6 * GIB, 7 * GIB, 550 * MIB, {"optimizer_state_bytes": 0}),
                   "training": phase(20 * GIB, 22 * GIB, 600 * MIB, states),
                   "optimizer_step": phase(21 * GIB, 22 * GIB, 600 * MIB,
                                           {"optimizer_state_bytes": 8 * GIB, "gradient_bytes": 4 * GIB}),
                   "outside_phases": phase(1, 1, 1, {})},
    }


def test_measured_breakdown_totals_are_reserved_plus_non_torch():
    breakdown, notes = measured_breakdown(_cuda_result())
    assert breakdown.source == "measure"
    assert set(breakdown.phases) == {"generation", "training", "optimizer_step", "persistent"}
    assert breakdown.total("training") == 22 * GIB + 600 * MIB
    assert breakdown.total("generation") == 7 * GIB + 550 * MIB
    training = breakdown.components("training")
    assert training[Component.WEIGHTS.value] == 4 * GIB
    assert training[Component.OPTIMIZER_STATES.value] == 8 * GIB
    assert training[Component.OTHER.value] == 8 * GIB  # 20 − 4 − 8
    assert training[Component.ALLOCATOR_SLACK.value] == 2 * GIB
    assert training[Component.CUDA_CONTEXT.value] == 600 * MIB
    assert Component.OPTIMIZER_STATES.value not in breakdown.components("generation")  # first step: none yet
    assert breakdown.components("optimizer_step")[Component.GRADIENTS.value] == 4 * GIB
    assert breakdown.peak_phase == "training"
    assert notes == []


def test_measured_breakdown_subtracts_other_processes_and_counts_vllm():
    result = _cuda_result(other_processes_bytes_at_start=100 * MIB,
                          vllm_init={"allocated_delta_bytes": 3 * GIB, "sleep_mode": False})
    breakdown, notes = measured_breakdown(result)
    training = breakdown.components("training")
    assert training["vllm_total"] == 3 * GIB
    assert training[Component.OTHER.value] == 5 * GIB
    assert training[Component.CUDA_CONTEXT.value] == 500 * MIB
    assert any("other processes" in note for note in notes)
    asleep = _cuda_result(vllm_init={"allocated_delta_bytes": 3 * GIB, "sleep_mode": True})
    assert "vllm_total" not in measured_breakdown(asleep)[0].components("training")


def test_measured_breakdown_without_cuda_is_none_with_a_reason():
    breakdown, notes = measured_breakdown({"device": {"type": "cpu"}, "phases": {}, "gpu": {}})
    assert breakdown is None and "no CUDA" in notes[0]


def test_compare_table_shows_each_component_and_the_totals():
    predicted = Breakdown({"training": {"weights": 4 * GIB, "logits": 3 * GIB}}, source="estimate")
    measured, _ = measured_breakdown(_cuda_result())
    table = compare_table(predicted, measured)
    assert "TOTAL" in table and "logits" in table and "optimizer_states" in table
    assert "+" in table.splitlines()[-1]  # measured above predicted


# -- GPU ------------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")


@pytest.mark.gpu
@gpu
def test_gpu_run_measures_every_phase():
    setup = {**TINY, "dtype": "bfloat16", "max_prompt_length": 128, "max_completion_length": 64}
    result = run(setup, steps=2, device="cuda", timeout_s=600)
    assert result.status == "ok", result.reason
    assert result.device_type == "cuda"
    breakdown = result.breakdown
    for phase in (Phase.GENERATION, Phase.SCORING, Phase.TRAINING, Phase.OPTIMIZER, Phase.PERSISTENT):
        assert breakdown.total(phase) > 0, phase
    assert result.peak_reserved_bytes >= result.peak_allocated_bytes > 0
    assert result.peak_total_bytes >= result.peak_reserved_bytes
    stats = result.phases["training"]
    assert breakdown.total("training") == stats["peak_reserved_bytes"] + breakdown.components("training").get(
        "cuda_context", 0)
    if result.nvml_peak_bytes is None:
        assert result.reason_for("nvml_peak_bytes")
    else:
        assert result.nvml_peak_bytes >= result.peak_reserved_bytes


@pytest.mark.gpu
@gpu
def test_gpu_oom_is_caught_in_its_phase():
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    # full fine-tuning in fp32 of a 2-layer model whose MLPs hold 30 % of the card: weights + gradients +
    # AdamW states need 120 % of it, so the child must OOM by the optimizer step — and the session survive
    intermediate = int(0.30 * total / (4 * 3 * 1024 * 2))
    model = {**TINY_QWEN2_CONFIG, "hidden_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 8,
             "intermediate_size": intermediate}
    setup = {**TINY, "model": model, "dtype": "float32", "max_prompt_length": 16, "max_completion_length": 8}
    result = run(setup, steps=1, device="cuda", timeout_s=600)
    assert result.status == "oom", f"{result.status}: {result.reason} (GPU total {total / GIB:.1f} GiB)"
    assert result.oom["phase"] in ("training", "optimizer_step"), result.oom
    assert result.oom["parsed"] is not None, result.oom["parse_reason"]
    assert result.oom["parsed"]["total_bytes"] > 0.9 * total
