"""GpuMemCallback and explain_oom on a real GRPOTrainer (the tiny local Qwen2, CPU, no hub).

One 3-step LoRA run is shared by the assertions on the start-of-run block, the log keys and the live setup
(module fixture); the overrun and OOM tests build their own trainers but never generate.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("trl", reason="trl is in the test extra")
torch = pytest.importorskip("torch")

from pytest_gpumem.measure.child import tiny  # noqa: E402
from pytest_gpumem.trl import GpuMemCallback, PredictedOverrunError, explain_oom, live, ranks  # noqa: E402
from pytest_gpumem.trl.callback import NO_CUDA  # noqa: E402
from pytest_gpumem.trl.slope import SlopeWatch  # noqa: E402
from pytest_gpumem.units import GIB, MIB, format_gib  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
PROMPT_TOKENS, COMPLETION_TOKENS, BATCH = 12, 16, 4


class Recorder:
    """A reporting callback (wandb/tensorboard stand-in) that is ahead of GpuMemCallback in the list."""

    def __init__(self):
        self.logged: list[dict] = []

    def __getattr__(self, name):  # every other TrainerCallback event: do nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append(dict(logs))


def make_trainer(callbacks, *, lora: bool = True, steps: int = 3, device: str = "cpu"):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    model = tiny.build_model(tiny.build_config(tiny.TINY_QWEN2_CONFIG), device=device)
    tokenizer = tiny.build_tokenizer(tiny.TINY_QWEN2_CONFIG["vocab_size"])
    prompts = tiny.make_prompts(32, PROMPT_TOKENS, tiny.TINY_QWEN2_CONFIG["vocab_size"])
    args = GRPOConfig(output_dir="/tmp/gpumem-trl-test", max_steps=steps, per_device_train_batch_size=BATCH,
                      num_generations=4, max_completion_length=COMPLETION_TOKENS, report_to="none",
                      save_strategy="no", logging_steps=1, disable_tqdm=True, learning_rate=1e-6, seed=0,
                      use_cpu=device == "cpu", bf16=False, generation_kwargs={"min_new_tokens": COMPLETION_TOKENS})
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") \
        if lora else None
    return GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [float(len(c) % 7) for c in completions],
                       args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                       peft_config=peft_config, callbacks=callbacks)


@pytest.fixture(scope="module")
def run():
    stream, recorder = io.StringIO(), Recorder()
    callback = GpuMemCallback(gpu="24GiB", stream=stream)
    trainer = make_trainer([recorder, callback])
    trainer.train()
    return trainer, callback, recorder, stream.getvalue()


# -- the start of the run -----------------------------------------------------------------------------------
def test_the_start_block_gives_peak_phase_headroom_and_largest_allocation(run):
    _trainer, callback, _recorder, printed = run
    block = callback.block
    assert block.startswith("gpumem: predicted peak ") and block in printed
    assert f"in the {callback.estimate.peak_phase} phase" in block
    assert "card: 24GiB (24.00 GiB), headroom +23." in block
    assert f"largest single allocation: {callback.estimate.largest_allocation_name}" in block
    assert "WILL NOT FIT" not in block
    assert ("per step, not measured: no CUDA device: gpumem/peak_reserved_gib, gpumem/peak_allocated_gib, "
            "gpumem/nvml_used_gib left out of the logs") in block
    assert "measured per rank:" in printed  # the end-of-run summary (one rank here)


def test_the_setup_is_read_from_the_live_trainer(run):
    _trainer, callback, _recorder, _printed = run
    setup = callback.setup
    assert setup.lora_rank == 4 and tuple(setup.lora_target_modules) == ("q_proj", "v_proj")  # model.peft_config
    assert setup.max_prompt_length == PROMPT_TOKENS  # measured from the dataset: trl 1.16 has no max_prompt_length
    assert setup.dtype == "float32" and setup.attn_implementation == "sdpa"  # the model object's own
    assert setup.optim == "adamw_torch_fused"  # the optimizer built (accelerate's wrapper unwrapped)
    assert (setup.per_device_train_batch_size, setup.max_completion_length) == (BATCH, COMPLETION_TOKENS)
    assert any("longest of all 32 prompts" in note for note in callback.notes)


# -- every step ------------------------------------------------------------------------------------------------
def test_gpumem_keys_reach_the_log_history_and_the_reporters(run):
    trainer, callback, recorder, _printed = run
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("GpuMemCallback") == names.index("DefaultFlowCallback") + 1  # moved ahead of reporters
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(train_logs) == 3
    expected_tokens = BATCH * (PROMPT_TOKENS + COMPLETION_TOKENS)
    for entry in train_logs + [logs for logs in recorder.logged if "loss" in logs]:
        assert entry["gpumem/predicted_peak_gib"] == pytest.approx(callback.estimate.peak_bytes / GIB)
        assert entry["gpumem/card_gib"] == 24.0
        assert entry["gpumem/tokens_per_micro_batch"] == expected_tokens  # from TRL's completions/max_length
        assert not any(key in entry for key in ("gpumem/peak_reserved_gib", "gpumem/nvml_used_gib"))


def test_gpu_fields_say_why_they_are_missing_on_cpu(run):
    _trainer, callback, _recorder, _printed = run
    assert [step.step for step in callback.steps] == [1, 2, 3]
    for step in callback.steps:
        assert (step.peak_reserved_bytes, step.peak_allocated_bytes, step.nvml_used_bytes) == (None, None, None)
        assert step.reasons == {"peak_reserved_bytes": NO_CUDA, "peak_allocated_bytes": NO_CUDA,
                                "nvml_used_bytes": NO_CUDA}
        assert step.completion_max_tokens == COMPLETION_TOKENS
    row = callback.summary_row()
    assert row["steps"] == 3 and row["peak_reserved_bytes"] is None and row["reasons"]["peak_reserved_bytes"] == NO_CUDA
    assert callback.overhead_seconds > 0


# -- a setup that will not fit ----------------------------------------------------------------------------------
def test_on_overrun_raise_stops_before_any_generation():
    stream = io.StringIO()
    trainer = make_trainer([GpuMemCallback(gpu="256MiB", on_overrun="raise", stream=stream)], lora=False)
    generated = []
    original = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda *a, **k: generated.append(1) or original(*a, **k)
    with pytest.raises(PredictedOverrunError, match=r"does not fit 256MiB .*short by") as info:
        trainer.train()
    assert info.value.field == "setup" and "on_overrun='warn'" in str(info.value)
    assert generated == [] and trainer.state.global_step == 0
    printed = stream.getvalue()
    # the tiny model's peak is its CUDA context: no lever saves 1% of it (diagnose.levers.MIN_SAVING_FRACTION)
    assert "WILL NOT FIT" in printed and "no one-step lever saves" in printed


def test_on_overrun_warn_prints_the_shortfall_the_levers_and_trains_on(run):
    trainer, *_ = run
    seed = dict(model="google/gemma-3-1b-it", use_vllm=True, vllm_gpu_memory_utilization=0.5,
                per_device_train_batch_size=8, num_generations=8, max_completion_length=512)  # README's block
    block = GpuMemCallback(gpu="L4", setup=seed, stream=io.StringIO()).start(trainer)
    assert "gpumem: WILL NOT FIT: predicted peak 29.52 GiB does not fit NVIDIA L4 (24 GB) (22.03 GiB): short by " \
           "7.49 GiB" in block
    assert "gpumem: top levers (each re-estimated):\ngpumem:   1. LoRA instead of full fine-tuning" in block
    assert block.endswith("training anyway (on_overrun='warn'); GpuMemCallback(on_overrun='raise') stops here")


def test_a_setup_that_cannot_be_estimated_says_why_and_trains_on(run):
    trainer, *_ = run
    stream = io.StringIO()
    broken = {"max_completion_length": 0}
    callback = GpuMemCallback(setup_overrides=broken, stream=stream)
    assert callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model) is trainer.control
    assert stream.getvalue().startswith("gpumem: cannot estimate this run (SetupError: max_completion_length: must be")
    assert callback.setup is None and callback.on_log(trainer.args, trainer.state, None, logs={"loss": 1.0}) is None
    from pytest_gpumem.errors import SetupError

    with pytest.raises(SetupError, match="max_completion_length"):
        GpuMemCallback(setup_overrides=broken, on_overrun="raise", stream=io.StringIO()).on_train_begin(
            trainer.args, trainer.state, trainer.control, model=trainer.model)


def test_bad_arguments_name_the_field():
    from pytest_gpumem.errors import GpuMemError

    with pytest.raises(GpuMemError, match="on_overrun: 'stop' is not 'warn' or 'raise'"):
        GpuMemCallback(on_overrun="stop")
    with pytest.raises(GpuMemError, match="headroom: must be a fraction"):
        GpuMemCallback(headroom=10)
    with pytest.raises(GpuMemError, match="A100 comes as 40 GB and 80 GB"):
        GpuMemCallback(gpu="A100")
    with pytest.raises(GpuMemError, match="did you mean 'max_completion_length'"):
        GpuMemCallback(setup={"model": "Qwen/Qwen2.5-0.5B", "max_completion_lenght": 10})


def test_the_live_reader_handles_chat_prompts_optimizers_and_several_processes():
    from datasets import Dataset

    tokenizer = tiny.build_tokenizer(64)
    chats = Dataset.from_dict({"prompt": [[{"role": "user", "content": "w3 w4 w5"}],
                                          [{"role": "user", "content": "w6"}]]})
    assert live.longest_prompt_tokens(chats, tokenizer) == (3, "longest of all 2 prompts")
    assert live.longest_prompt_tokens(Dataset.from_dict({"text": ["a"]}), tokenizer)[0] is None
    weights = [torch.nn.Parameter(torch.zeros(2))]
    assert live.optimizer_name(torch.optim.AdamW(weights, fused=False)) == "adamw_torch"
    assert live.optimizer_name(SimpleNamespace(optimizer=torch.optim.SGD(weights, lr=0.1))) == "sgd"  # accelerate
    assert live.optimizer_name(torch.optim.Adagrad(weights)) is None
    # 4 processes: TRL needs b × world × steps_per_generation = 2 × 4 × 1 divisible by G = 8, not b × 1
    model = tiny.build_model(tiny.build_config(tiny.TINY_QWEN2_CONFIG))
    args = SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=1, steps_per_generation=1,
                           num_generations=8, max_prompt_length=64, max_completion_length=32, world_size=4)
    setup, notes = live.setup_from_trainer(None, args=args, model=model)
    assert setup.per_device_train_batch_size == 2
    if hasattr(setup, "world_size"):  # the setup models several processes (issue 13): no per-process stand-in
        assert setup.world_size == 4 and setup.num_generations == 8
    else:  # estimated per process, with the largest group size the per-process batch divides
        assert setup.num_generations == 2 and any("4 processes" in note for note in notes)


# -- the early warning ----------------------------------------------------------------------------------------
REAL_SETUP = dict(model="Qwen/Qwen2.5-1.5B", dtype="bfloat16", lora_rank=16, per_device_train_batch_size=8,
                  num_generations=8, max_prompt_length=256, max_completion_length=768)


def test_the_slope_warns_once_when_completions_will_not_fit(run):
    trainer, *_ = run
    stream = io.StringIO()
    callback = GpuMemCallback(gpu="L4", setup=REAL_SETUP, stream=stream)
    callback.start(trainer)
    assert callback.estimate.fits()  # the estimate alone says nothing is wrong
    b, prompt = 8, 256
    base = callback.estimate.peak_bytes + 15 * GIB  # measured well above the estimate, and growing faster
    slope = 400 * 1024  # bytes per micro-batch token (the estimate's prior: ~230 KiB)

    def peak(completion):
        return int(base + slope * b * completion)

    assert callback.observe_step(b * (prompt + 100), peak(100), peak(100) + 100 * MIB, None) is None  # 1 step only
    warning = callback.observe_step(b * (prompt + 200), peak(200), peak(200) + 100 * MIB, None)
    assert warning is not None and warning.startswith("gpumem: at the current slope this run reaches ")
    assert "of 22.03 GiB when completions reach " in warning and "(max_completion_length 768;" in warning
    assert "longest completions so far 200" in warning and "top levers" in warning
    assert "the estimate's 23" in warning and "as the prior (provisional)" in warning
    reach = int(warning.split("when completions reach ")[1].split()[0])
    assert 200 <= reach < 768
    assert callback.projected_peak_bytes() > 22.03 * GIB
    assert callback.observe_step(b * (prompt + 300), peak(300)) is None  # once


def test_the_slope_stays_quiet_while_the_projection_fits(run):
    trainer, *_ = run
    callback = GpuMemCallback(gpu="L4", setup=REAL_SETUP, stream=io.StringIO())
    callback.start(trainer)
    measured = int(callback.estimate.peak_bytes * 0.5)
    for completion in (100, 150, 200):
        assert callback.observe_step(8 * (256 + completion), measured, measured + 64 * MIB, measured + GIB) is None


def test_the_ridge_keeps_the_prior_until_the_tokens_spread():
    watch = SlopeWatch(prior_bytes_per_token=10_000)
    for _ in range(3):
        watch.observe(1000, 5 * GIB)
    fit = watch.fit()
    assert fit.slope_bytes_per_token == pytest.approx(10_000) and fit.at(1000) == pytest.approx(5 * GIB)
    # a 1.5B model's prior (~230 KiB per token, see the warning test) and completions spreading over 2k tokens × b=8
    spread = SlopeWatch(prior_bytes_per_token=230_000)
    for tokens in range(1000, 17001, 1000):
        spread.observe(tokens, GIB + 300_000 * tokens)
    assert spread.fit().slope_bytes_per_token == pytest.approx(300_000, rel=0.01)  # the data won
    assert spread.fit().tokens_reaching(GIB + 300_000 * 30000) == pytest.approx(30000, rel=0.01)


class FakeCuda:
    """torch.cuda as the callback reads it, with a settable peak: the per-step path without a GPU."""

    def __init__(self):
        self.peak_bytes, self.resets = 0, 0

    def is_available(self):
        return True

    def current_device(self):
        return 0

    def get_device_properties(self, index):
        return SimpleNamespace(name="Fake GPU", total_memory=24 * GIB, uuid=None)

    def mem_get_info(self, index):
        return 20 * GIB, 24 * GIB

    def memory_reserved(self, index):
        return 2 * GIB

    def reset_peak_memory_stats(self, index):
        self.resets += 1

    def max_memory_reserved(self, index):
        return self.peak_bytes + 256 * MIB

    def max_memory_allocated(self, index):
        return self.peak_bytes


def test_measured_steps_become_log_keys_and_feed_the_slope(run, monkeypatch):
    trainer, *_ = run
    cuda = FakeCuda()
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    stream = io.StringIO()
    callback = GpuMemCallback(setup=REAL_SETUP, stream=stream)
    args = SimpleNamespace(device=SimpleNamespace(type="cuda", index=0))
    callback.start(trainer, args=args)
    # 24 GiB card, 20 free, 2 reserved by us: 2 GiB outside PyTorch, 0.5 of it the CUDA context the estimate counts
    assert callback.gpu.total_bytes == 22.5 * GIB and "less 1536 MiB in use outside" in callback.gpu.name
    assert callback.reasons["nvml_used_bytes"].startswith("not measured: ")
    base = callback.estimate.peak_bytes + 15 * GIB
    for step, completion in ((1, 100), (2, 200)):
        state = SimpleNamespace(global_step=step, log_history=[{"loss": 0.0, "step": step}])
        callback.on_step_begin(args, state, None)
        cuda.peak_bytes = int(base + 400 * 1024 * 8 * completion)
        callback.on_step_end(args, state, None)
        logs = {"loss": 0.0, "completions/max_length": float(completion)}
        callback.on_log(args, state, None, logs=logs)
        assert logs["gpumem/peak_allocated_gib"] == pytest.approx(cuda.peak_bytes / GIB)
        assert logs["gpumem/peak_reserved_gib"] == pytest.approx(cuda.peak_bytes / GIB + 0.25)
        assert "gpumem/nvml_used_gib" not in logs and "gpumem/projected_peak_gib" in logs
        assert state.log_history[-1]["gpumem/tokens_per_micro_batch"] == 8 * (256 + completion)
    assert cuda.resets == 2 and len(callback.slope.points) == 2
    assert "at the current slope this run reaches" in stream.getvalue() and "of 22.50 GiB" in stream.getvalue()


# -- when it happens anyway ------------------------------------------------------------------------------------------
def _real_oom() -> str:
    record = next(r for r in json.loads((FIXTURES / "oom-messages.json").read_text()) if r["id"] == "torch-oom-014")
    return record["text"].split("OutOfMemoryError: ", 1)[1]


def test_explain_oom_diagnoses_the_real_message_and_reraises():
    trainer = make_trainer([], lora=False, steps=1)
    error = torch.OutOfMemoryError(_real_oom())

    def training_step(*args, **kwargs):
        raise error

    trainer.training_step = training_step
    stream = io.StringIO()
    with pytest.raises(torch.OutOfMemoryError) as info:
        with explain_oom(trainer, stream=stream):
            trainer.train()
    assert info.value is error
    printed = stream.getvalue()
    assert printed.startswith("gpumem: found: CUDA out of memory. Tried to allocate 550.00 MiB")
    assert "requested 550.00 MiB, free 319.38 MiB of 23.64 GiB" in printed
    assert "gpumem: predicted training phase: " in printed and "no one-step lever saves" in printed
    assert "observed need ≥ 23.42 GiB" in printed  # the message's own figures against the live setup's peak


def test_explain_oom_uses_the_callbacks_setup_and_is_silent_on_other_errors(run):
    trainer, callback, *_ = run
    stream = io.StringIO()
    with pytest.raises(torch.OutOfMemoryError):
        with explain_oom(trainer, stream=stream):
            raise torch.OutOfMemoryError(_real_oom())
    # judged on the callback's setup and card (gpu="24GiB"), not on the card the message prints
    assert f"predicted peak {format_gib(callback.estimate.peak_bytes)}" in stream.getvalue()
    assert "the estimate says this setup fits 24GiB (24.00 GiB)" in stream.getvalue()
    quiet = io.StringIO()
    with pytest.raises(KeyError):
        with explain_oom(trainer, stream=quiet):
            raise KeyError("not memory")
    assert quiet.getvalue() == ""


# -- several processes ---------------------------------------------------------------------------------------------
def test_rank_zero_prints_one_row_per_rank():
    rows = [{"rank": 0, "card": "NVIDIA L4 (cuda:0)", "total_bytes": 22 * GIB, "predicted_peak_bytes": 18 * GIB,
             "peak_reserved_bytes": 19 * GIB, "peak_allocated_bytes": 17 * GIB, "nvml_used_bytes": 20 * GIB},
            {"rank": 1, "card": "NVIDIA L4 (cuda:1)", "total_bytes": 22 * GIB, "predicted_peak_bytes": 18 * GIB,
             "peak_reserved_bytes": 23 * GIB, "peak_allocated_bytes": 21 * GIB, "nvml_used_bytes": None,
             "reasons": {"nvml_used_bytes": "not measured: no NVML"}}]
    lines = ranks.render(rows).splitlines()
    assert lines[0].split() == ["rank", "card", "predicted", "peak", "peak", "reserved", "peak", "allocated", "NVML",
                                "used", "headroom"]
    assert "19.00 GiB" in lines[1] and "+3.00 GiB" in lines[1]
    assert "23.00 GiB" in lines[2] and "-1.00 GiB" in lines[2]
    assert lines[3] == "(not measured: no NVML)"
    assert ranks.gather({"rank": 0}) == [{"rank": 0}]  # no process group: alone


def test_gather_collects_every_rank_over_a_real_process_group(tmp_path):
    """Two gloo processes: each sends its row, both receive both (what rank 0 renders)."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import sys, torch.distributed as dist\n"
        "from pytest_gpumem.trl import ranks\n"
        "rank = int(sys.argv[1])\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path}/rendezvous', rank=rank, world_size=2)\n"
        "print(ranks.rank_and_world(), [row['rank'] for row in ranks.gather({'rank': rank})])\n"
        "dist.destroy_process_group()\n")
    # this checkout's package, whatever is installed (an editable install of another tree would shadow it)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank)], stdout=subprocess.PIPE, text=True, env=env)
             for rank in (0, 1)]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert outputs == ["(0, 2) [0, 1]", "(1, 2) [0, 1]"]


# -- the CUDA path --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
def test_on_a_gpu_every_step_is_measured():
    callback = GpuMemCallback(stream=io.StringIO())
    trainer = make_trainer([callback], device="cuda", steps=2)
    trainer.train()
    assert "card: " in callback.block and "(cuda:" in callback.block
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in logs:
        assert entry["gpumem/peak_reserved_gib"] >= entry["gpumem/peak_allocated_gib"] > 0
    for step in callback.steps:
        assert step.peak_reserved_bytes > 0
        assert step.nvml_used_bytes is not None or "nvml_used_bytes" in step.reasons
