"""`gpumem explain`: parsing real OOM texts, telling the phase, matching the tensor, ranking the levers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from pytest_gpumem import GpuMemError, GRPOSetup, estimate
from pytest_gpumem.cli import main
from pytest_gpumem.diagnose.explain import diagnose, match_tensor
from pytest_gpumem.diagnose.levers import levers_for, rank_levers
from pytest_gpumem.measure.oom_message import CORE_FIELDS, detect_phase, parse, parse_frames, parse_oom
from pytest_gpumem.units import GIB, MIB

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "oom-messages.json").read_text(encoding="utf-8"))
BY_ID = {entry["id"]: entry for entry in FIXTURES}

# fixture kind -> the parser's kinds
KIND_FAMILY = {"torch-oom": {"torch_oom"}, "torch-oom-memory-fraction": {"torch_memory_fraction"},
               "cuda-error-oom": {"cuda_error"},
               "vllm-startup": {"vllm_free_memory", "vllm_kv_cache", "vllm_no_cache_blocks", "vllm_sampler_warmup",
                                "vllm_memory_profiling"}}

# the phase each annotated fixture failed in (the fixture's free-text "phase" read by hand)
FIXTURE_PHASES = {
    "torch-oom-016": "persistent",  # Module._apply -> convert -> t.to (model load)
    "torch-oom-018": "training",  # per_token_logps = gather(logits.log_softmax(-1)) under grad
    "torch-oom-025": "generation",  # vllm/v1/sample/sampler.py forward
    "torch-oom-026": "optimizer_step",  # torch/optim/adamw.py _multi_tensor_adamw
    "torch-oom-027": "training",  # Variable._execution_engine.run_backward
    "torch-oom-028": "persistent",  # Module._apply -> convert -> t.to
    "torch-oom-037": "training",  # loss.backward()
    "torch-oom-009": None,  # only F.linear: a forward of anything
    "torch-oom-011": None,  # grid_sampler: not a GRPO frame
}


@pytest.mark.parametrize("entry", FIXTURES, ids=[entry["id"] for entry in FIXTURES])
def test_every_real_message_parses_exactly(entry):
    parsed = parse_oom(entry["text"])
    assert parsed is not None, "no message found"
    assert parsed.kind in KIND_FAMILY[entry["kind"]]
    data = parsed.to_dict()
    for name in CORE_FIELDS:
        assert name in data
    mismatches = {name: (data.get(name, "<missing>"), expected) for name, expected in entry["expected"].items()
                  if data.get(name, "<missing>") != expected}
    assert not mismatches, mismatches


@pytest.mark.parametrize("entry", FIXTURES, ids=[entry["id"] for entry in FIXTURES])
def test_every_real_message_is_found_inside_a_longer_log(entry):
    noise_before = ("2026-11-25 10:00:01 INFO trainer started\n{'loss': 0.12, 'reward': 0.5, 'step': 3}\n"
                    "Some weights of the model checkpoint were not used: 12.00 GiB total capacity is a lie\n")
    noise_after = "\nwandb: Run summary:\nwandb:   train/loss 0.1\nExiting with code 1\n"
    alone, inside = parse_oom(entry["text"]), parse_oom(noise_before + entry["text"] + noise_after)
    assert inside is not None and inside.kind == alone.kind
    for name in entry["expected"]:
        assert inside.to_dict().get(name) == alone.to_dict().get(name), name


@pytest.mark.parametrize("entry", FIXTURES, ids=[entry["id"] for entry in FIXTURES])
def test_phase_of_every_real_message(entry):
    _, phase = parse(entry["text"])
    if entry["kind"] == "vllm-startup":
        assert phase.phase == "vllm_startup"
    elif entry["id"] in FIXTURE_PHASES:
        assert phase.phase == FIXTURE_PHASES[entry["id"]], phase
    else:  # a bare message without frames: no phase is claimed
        assert phase.phase is None, phase


def test_derived_figures_of_a_real_message():
    parsed = parse_oom(BY_ID["torch-oom-014"]["text"])
    # 22.88 GiB in use − 19.75 GiB allocated − 999.90 MiB reserved-but-unallocated
    assert parsed.non_torch_bytes == round(22.88 * GIB) - round(19.75 * GIB) - round(999.90 * MIB)
    assert parsed.shortfall_bytes == round(550 * MIB) - round(319.38 * MIB)
    # NVML's impossible 2^64 B figure is kept as printed but not used for arithmetic
    assert parse_oom(BY_ID["torch-oom-012"]["text"]).non_torch_bytes is None
    # vLLM's KV refusal: needed − available
    kv = parse_oom(BY_ID["vllm-009"]["text"])
    assert kv.shortfall_bytes == round(36.0 * GIB) - round(6.94 * GIB)


def test_when_a_log_holds_several_messages_the_torch_figures_win():
    log = BY_ID["vllm-007"]["text"] + "\n" + BY_ID["torch-oom-014"]["text"]
    parsed = parse_oom(log)
    assert parsed.kind == "torch_oom" and parsed.count == 2
    assert parsed.requested_bytes == BY_ID["torch-oom-014"]["expected"]["requested_bytes"]


GARBAGE = [
    "",
    "   \n\n",
    "hello world",
    "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\nValueError: bad value\n",
    "RuntimeError: [enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: not enough memory: you tried to "
    "allocate 1073741824 bytes.",  # host RAM, not the GPU
    "MemoryError",
    "out of memory",  # no allocator figures, no known wording
    "{'loss': 0.0, 'grad_norm': 1.2, 'learning_rate': 1e-06, 'epoch': 0.01}\n" * 50,
    "\x00\x01\x02 binary \xff junk " * 20,
]


@pytest.mark.parametrize("text", GARBAGE, ids=[f"garbage-{i}" for i in range(len(GARBAGE))])
def test_garbage_says_no_oom_message_found(text):
    assert parse_oom(text) is None
    with pytest.raises(GpuMemError, match="no OOM message found"):
        diagnose(text)


def test_cli_garbage_exits_2_with_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("all good, loss went down\n"))
    assert main(["explain"]) == 2
    err = capsys.readouterr().err
    assert "no OOM message found" in err and "Traceback" not in err


# -- phases from TRL 1.16 / transformers / vLLM frames -------------------------------------------------------
# Synthetic tracebacks built from the real function names and files of trl 1.16.0 (trl/trainer/grpo_trainer.py:
# training_step -> _prepare_inputs -> _generate_and_score_completions -> _generate / _get_per_token_logps_and_
# entropies; compute_loss -> _compute_loss), transformers (generation/utils.py generate/_sample), accelerate
# (accelerator.py backward), torch (optim/adamw.py) and vLLM v1 (worker/gpu_worker.py determine_available_memory).
SP = "/usr/lib/python3.11/site-packages"
OOM_LINE = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.32 GiB. GPU 0 has a total capacity of "
            "22.03 GiB of which 1.10 GiB is free. Including non-PyTorch memory, this process has 20.91 GiB memory in "
            "use. Of the allocated memory 20.20 GiB is allocated by PyTorch, and 250.00 MiB is reserved by PyTorch but "
            "unallocated.")


def _traceback(*frames: tuple[str, str, str]) -> str:
    lines = ["Traceback (most recent call last):"]
    for path, function, code in frames:
        lines.append(f'  File "{path}", line 100, in {function}')
        lines.append(f"    {code}")
    return "\n".join(lines) + "\n" + OOM_LINE


OUTER = [(f"{SP}/transformers/trainer.py", "_inner_training_loop", "tr_loss_step = self.training_step(model, inputs)"),
         (f"{SP}/trl/trainer/grpo_trainer.py", "training_step", "output = super().training_step(model, inputs)")]
SCORING = OUTER + [
    (f"{SP}/transformers/trainer.py", "training_step", "inputs = self._prepare_inputs(inputs)"),
    (f"{SP}/trl/trainer/grpo_trainer.py", "_prepare_inputs",
     "generation_batch = self._generate_and_score_completions(generation_batch)"),
    (f"{SP}/trl/trainer/grpo_trainer.py", "_generate_and_score_completions",
     "old_per_token_logps, _, _ = self._get_per_token_logps_and_entropies("),
    (f"{SP}/trl/trainer/grpo_trainer.py", "_get_per_token_logps_and_entropies",
     "logits = model(**model_inputs).logits"),
    (f"{SP}/torch/nn/modules/module.py", "_call_impl", "return forward_call(*args, **kwargs)"),
]
GENERATION = OUTER + [
    (f"{SP}/trl/trainer/grpo_trainer.py", "_prepare_inputs",
     "generation_batch = self._generate_and_score_completions(generation_batch)"),
    (f"{SP}/trl/trainer/grpo_trainer.py", "_generate_and_score_completions",
     "completion_ids_list = self._generate(prompts)"),
    (f"{SP}/trl/trainer/grpo_trainer.py", "_generate",
     "self._generate_single_turn(prompt_ids, images, multimodal_fields)"),
    (f"{SP}/trl/trainer/grpo_trainer.py", "_generate_single_turn", "prompt_completion_ids = unwrapped_model.generate("),
    (f"{SP}/transformers/generation/utils.py", "generate", "result = self._sample("),
    (f"{SP}/transformers/generation/utils.py", "_sample",
     "next_token_logits = outputs.logits[:, -1, :].to(copy=True, dtype=torch.float32)"),
]
TRAINING = OUTER + [
    (f"{SP}/transformers/trainer.py", "training_step", "loss = self.compute_loss(model, inputs)"),
    (f"{SP}/trl/trainer/grpo_trainer.py", "compute_loss", "return self._compute_loss(model, inputs)"),
    (f"{SP}/trl/trainer/grpo_trainer.py", "_compute_loss",
     "per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies("),
    (f"{SP}/trl/trainer/grpo_trainer.py", "_get_per_token_logps_and_entropies",
     "logits = model(**model_inputs).logits"),
]
BACKWARD = OUTER + [
    (f"{SP}/transformers/trainer.py", "training_step", "self.accelerator.backward(loss, **kwargs)"),
    (f"{SP}/accelerate/accelerator.py", "backward", "loss.backward(**kwargs)"),
    (f"{SP}/torch/_tensor.py", "backward", "torch.autograd.backward("),
    (f"{SP}/torch/autograd/graph.py", "_engine_run_backward", "return Variable._execution_engine.run_backward("),
]
OPTIMIZER = [
    (f"{SP}/transformers/trainer.py", "_inner_training_loop", "self.optimizer.step()"),
    (f"{SP}/accelerate/optimizer.py", "step", "self.optimizer.step(closure)"),
    (f"{SP}/torch/optim/adamw.py", "step", "adamw("),
    (f"{SP}/torch/optim/adamw.py", "_multi_tensor_adamw", "exp_avg_sq_sqrt = torch._foreach_sqrt(device_exp_avg_sqs)"),
]
VLLM_STARTUP = [
    (f"{SP}/trl/trainer/grpo_trainer.py", "__init__", "self.vllm_generation = VLLMGeneration("),
    (f"{SP}/vllm/entrypoints/llm.py", "__init__", "self.llm_engine = LLMEngine.from_engine_args("),
    (f"{SP}/vllm/v1/engine/core.py", "_initialize_kv_caches",
     "available_gpu_memory = self.model_executor.determine_available_memory()"),
    (f"{SP}/vllm/v1/worker/gpu_worker.py", "determine_available_memory", "self.model_runner.profile_run()"),
    (f"{SP}/vllm/v1/worker/gpu_model_runner.py", "profile_run", "hidden_states = self._dummy_run("),
]
VLLM_GENERATION = OUTER + [
    (f"{SP}/trl/trainer/grpo_trainer.py", "_generate_single_turn",
     "_, completion_ids, logprobs, _ = self.vllm_generation.generate("),
    (f"{SP}/trl/generation/vllm_generation.py", "generate", "all_outputs = self.llm.generate("),
    (f"{SP}/vllm/entrypoints/llm.py", "generate", "outputs = self._run_engine(use_tqdm=use_tqdm)"),
    (f"{SP}/vllm/v1/worker/gpu_model_runner.py", "execute_model",
     "logits = self.model.compute_logits(sample_hidden_states)"),
]


@pytest.mark.parametrize("frames, phase", [
    (SCORING, "scoring"), (GENERATION, "generation"), (TRAINING, "training"), (BACKWARD, "training"),
    (OPTIMIZER, "optimizer_step"), (VLLM_STARTUP, "vllm_startup"), (VLLM_GENERATION, "generation"),
], ids=["scoring", "hf-generate", "training-forward", "backward", "optimizer", "vllm-startup", "vllm-generate"])
def test_phase_from_grpo_frames(frames, phase):
    message, guess = parse(_traceback(*frames))
    assert message.kind == "torch_oom"
    assert guess.phase == phase, guess
    assert guess.evidence


def test_frames_are_those_of_the_last_traceback_before_the_message():
    text = _traceback(*OPTIMIZER).replace(OOM_LINE, "RuntimeError: earlier, unrelated") + "\n" + _traceback(*SCORING)
    message, guess = parse(text)
    assert guess.phase == "scoring"
    frames = parse_frames(text)
    assert frames[-1].function == "_call_impl"


def test_detect_phase_without_frames_claims_nothing():
    assert detect_phase([]).phase is None


# -- with a setup: the tensor, the breakdown, the levers -----------------------------------------------------
MATERIALIZED = {"model": "Qwen/Qwen2.5-0.5B", "trl_version": "1.9.0", "per_device_train_batch_size": 8,
                "max_prompt_length": 512, "max_completion_length": 512}


def _oom_text(requested_bytes: int, total_gib: float = 22.03) -> str:
    return (f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {requested_bytes / GIB:.2f} GiB. "
            "GPU 0 has a "
            f"total capacity of {total_gib:.2f} GiB of which 1.00 GiB is free. Including non-PyTorch memory, this "
            "process has 20.00 GiB memory in use. Of the allocated memory 19.00 GiB is allocated by PyTorch, and "
            "500.00 MiB is reserved by PyTorch but unallocated.")


def test_requested_allocation_is_matched_to_the_logits():
    setup = GRPOSetup.from_dict(MATERIALIZED)
    logits = 8 * 513 * setup.model_spec.vocab_size * 4  # rows × (C+1) × V × 4 B
    found = match_tensor(logits, setup)
    assert found["name"] == "the logits"
    assert "rows × (C+1) × V × 4 B" in found["text"] and "8 × 513 × 151936 × 4 B" in found["text"]
    # what torch prints (two decimals of GiB) still matches
    printed = parse_oom(_oom_text(logits)).requested_bytes
    assert match_tensor(printed, setup)["name"] == "the logits"
    assert match_tensor(123, setup) is None  # nothing of that size


def test_diagnose_json_with_a_setup(tmp_path):
    setup = GRPOSetup.from_dict(MATERIALIZED)
    text = _traceback(*BACKWARD).replace(OOM_LINE, _oom_text(8 * 513 * 151936 * 4))
    result = diagnose(text, setup).to_dict()
    for key in ("requested_bytes", "total_bytes", "free_bytes", "process_in_use_bytes", "torch_allocated_bytes",
                "torch_reserved_unallocated_bytes", "non_torch_bytes", "shortfall_bytes", "phase", "predicted",
                "requested_tensor", "levers"):
        assert key in result, key
    assert result["phase"] == "training"
    assert result["shortfall_bytes"] == result["requested_bytes"] - result["free_bytes"]
    assert result["predicted"]["phase"] == "training"
    predicted = estimate(setup, result["total_bytes"]).breakdown
    assert result["predicted"]["components"] == predicted.components("training")
    assert result["requested_tensor"]["name"] == "the logits"
    assert result["levers"] and result["levers"][0]["name"] == "chunked log-probs (Liger)"
    for lever in result["levers"]:
        assert set(lever) >= {"name", "change", "saves_bytes", "fits_after", "trade_off"}


def test_diagnose_vllm_refusal_with_a_setup_ranks_the_utilisation_lever():
    setup = {"model": "Qwen/Qwen2.5-1.5B", "use_vllm": True, "vllm_gpu_memory_utilization": 0.9,
             "dtype": "bfloat16", "lora_rank": 16}
    result = diagnose(BY_ID["vllm-012"]["text"], setup)
    assert result.phase.phase == "vllm_startup"
    names = [lever.name for lever in result.levers]
    assert "vLLM utilisation −0.1" in names
    assert result.tensor is None  # a refusal's request is vLLM's whole reservation, not a tensor
    assert any("lower gpu_memory_utilization to ≤ 0.89" in note for note in result.notes)


LEVER_SETUPS = [
    MATERIALIZED,
    {"model": "Qwen/Qwen2.5-1.5B", "use_vllm": True, "dtype": "bfloat16", "lora_rank": 32,
     "per_device_train_batch_size": 16, "gradient_accumulation_steps": 2, "optim": "adamw_torch"},
    {"model": "Qwen/Qwen2.5-7B", "backend": "unsloth", "gradient_checkpointing": True},
    {"model": "Qwen/Qwen2.5-0.5B", "gradient_checkpointing": False, "beta": 0.04, "attn_implementation": "eager",
     "per_device_train_batch_size": 4, "num_generations": 4, "steps_per_generation": 4,
     "gradient_accumulation_steps": 4},
]


@pytest.mark.parametrize("data", LEVER_SETUPS, ids=["trl-materialized", "trl-vllm-lora", "unsloth-7b", "trl-beta"])
def test_lever_invariants(data):
    setup = GRPOSetup.from_dict(data)
    gpu = "24GiB"
    before = estimate(setup, gpu)
    levers = rank_levers(setup, gpu)
    assert levers, "no lever at all"
    savings = [lever.saves_bytes for lever in levers]
    assert all(saving > 0 for saving in savings)
    assert savings == sorted(savings, reverse=True)
    for lever in levers:
        after = estimate(lever.setup, gpu)  # re-estimated, not a rule of thumb
        assert lever.saves_bytes == before.peak_bytes - after.peak_bytes
        assert lever.peak_after_bytes == after.peak_bytes
        assert lever.fits_after == after.fits()
        assert lever.trade_off
        assert lever.setup.generation_batch_size % lever.setup.num_generations == 0  # TRL's rule
        if lever.name.startswith("batch halved"):
            assert lever.setup.completions_per_optimizer_step == setup.completions_per_optimizer_step
            assert lever.setup.generation_batch_size == setup.generation_batch_size
        if lever.name.startswith("vLLM utilisation"):
            assert not any("cannot hold one sequence" in w for w in after.warnings)
        for name, (old, new) in lever.changes.items():
            assert getattr(setup, name) == old and getattr(lever.setup, name) == new


def test_levers_for_a_budget_lists_the_fitting_ones_first():
    result = estimate(MATERIALIZED)
    budget = result.peak_bytes - 3 * GIB  # needs a big lever
    levers = levers_for(result, budget, n=3)
    assert len(levers) == 3
    assert levers[0].fits_after is True and levers[0].peak_after_bytes <= budget
    flags = [lever.fits_after for lever in levers]
    assert flags == sorted(flags, key=lambda fits: not fits)


def test_short_explanation_for_the_plugin():
    text = _traceback(*TRAINING).replace(OOM_LINE, _oom_text(8 * 513 * 151936 * 4))
    short = diagnose(text, MATERIALIZED).short()
    lines = short.splitlines()
    assert "short by" in lines[0] and "training" in lines[0]
    assert "the logits" in lines[1]
    assert sum(line.startswith("lever:") for line in lines) == 3


# -- the command line ------------------------------------------------------------------------------------------
def test_cli_explain_json_from_a_file(tmp_path, capsys):
    log = tmp_path / "train.log"
    log.write_text("step 1\n" + BY_ID["torch-oom-018"]["text"] + "\nbye\n", encoding="utf-8")
    assert main(["explain", str(log), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["requested_bytes"] == BY_ID["torch-oom-018"]["expected"]["requested_bytes"]
    assert data["phase"] == "training"
    assert "levers" not in data  # no setup given


def test_cli_explain_with_setup_from_stdin(tmp_path, monkeypatch, capsys):
    setup_file = tmp_path / "setup.json"
    setup_file.write_text(json.dumps(MATERIALIZED), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.StringIO(_traceback(*SCORING)))
    assert main(["explain", "--setup", str(setup_file), "--levers", "2"]) == 0
    out = capsys.readouterr().out
    assert "phase: scoring" in out and "levers" in out and "  3." not in out


def test_diagnose_a_caught_exception_for_the_plugin():
    from pytest_gpumem.diagnose.explain import diagnose_exception

    def _get_per_token_logps_and_entropies():
        raise RuntimeError(_oom_text(8 * 513 * 151936 * 4).split(": ", 1)[1])

    def _generate_and_score_completions():
        _get_per_token_logps_and_entropies()

    try:
        _generate_and_score_completions()
    except RuntimeError as exc:
        result = diagnose_exception(exc, MATERIALIZED)
    assert result.phase.phase == "scoring"
    assert result.tensor["name"] == "the logits" and result.levers
    assert diagnose_exception(ValueError("not memory")) is None


def test_a_message_without_figures_still_explains_with_a_setup():
    result = diagnose(BY_ID["torch-oom-037"]["text"], MATERIALIZED)
    assert result.message.kind == "cuda_error" and result.phase.phase == "training"
    assert result.estimate.gpu is None  # no total printed and none given: levers are not judged
    assert result.levers and all(lever.fits_after is None for lever in result.levers)
    assert "no figures are printed" in result.render()


def test_a_reward_model_inside_generate_and_score_is_scoring():
    frames = OUTER + [
        (f"{SP}/trl/trainer/grpo_trainer.py", "_generate_and_score_completions",
         "rewards_per_func = self._calculate_rewards("),
        (f"{SP}/trl/trainer/grpo_trainer.py", "_calculate_rewards",
         "rewards = reward_func(**reward_inputs).logits[:, 0]"),
        (f"{SP}/torch/nn/modules/linear.py", "forward", "return F.linear(input, self.weight, self.bias)"),
    ]
    assert parse(_traceback(*frames))[1].phase == "scoring"


def test_a_measured_oom_fails_with_its_explanation():
    """Issue 7, in the plugin: a measured step that OOMs fails its test with the shortfall and the phase (the
    levers follow in the failure text)."""
    from pytest_gpumem.compare.checks import check_run_completed

    text = next(m["text"] for m in FIXTURES if m["id"] == "torch-oom-018")
    record = {"budget_text": "40 GB = 37.25 GiB",
              "setup": {"model": "Qwen/Qwen2.5-7B", "lora_rank": 16, "dtype": "bfloat16"},
              "measured": {"run": {"status": "oom", "reason": "CUDA out of memory. Tried to allocate 8.36 GiB",
                                   "oom": {"message": text, "phase": "training"}}}}
    message = check_run_completed(record)
    first, explanation = message.splitlines()[:2]
    assert first.startswith("the measured GRPO run ran out of GPU memory against the 40 GB = 37.25 GiB budget")
    assert "short by 6.84 GiB in the training phase" in explanation
    assert check_run_completed({**record, "measured": {"run": {"status": "ok"}}}) is None
