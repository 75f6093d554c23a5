"""Real multi-process runs: ``gpumem run --nproc N`` under ``accelerate launch`` (one 2-process FSDP2 run of the
tiny model on CPU/gloo, as a user would start it), the accelerate config it writes, and how per-rank results
are merged — a failed rank reported with its rank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_gpumem.errors import GpuMemError
from pytest_gpumem.measure.launch import accelerate_config, merge_ranks, run_rank0, run_ranks
from pytest_gpumem.measure.protocol import RunResult

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "setups" / "tiny-qwen2-cpu.json"


def _rank(status: str, reason: str | None = None, rss: int = 100, steps: int = 2) -> dict:
    return {"status": status, "reason": reason, "steps_completed": steps, "host_memory": {"peak_rss_bytes": rss},
            "gpu": {"reasons": {}}}


def test_merge_all_ok_keeps_every_rank_and_names_the_worst():
    merged = merge_ranks([_rank("ok", rss=100), _rank("ok", rss=300)], {"status": "crashed", "exit_code": 0})
    assert merged.status == "ok" and merged.reason is None
    assert [r["rank"] for r in merged.data["ranks"]] == [0, 1]
    assert merged.data["worst_rank"] == 1
    assert merged.data["steps_completed"] == 2


def test_merge_reports_the_failing_rank_oom_before_the_crash_it_caused():
    merged = merge_ranks([_rank("crashed", "RuntimeError: Connection reset by peer", steps=0),
                          _rank("oom", "out of memory in the training phase: CUDA out of memory", steps=0)],
                         {"status": "crashed", "exit_code": 1})
    assert merged.status == "oom"
    assert merged.reason.startswith("rank 1: out of memory in the training phase")
    assert merged.data["failed_rank"] == 1


def test_merge_names_ranks_that_wrote_nothing():
    merged = merge_ranks([_rank("ok"), None], {"status": "crashed", "reason": "the child died with SIGKILL"})
    assert merged.status == "crashed"
    assert merged.reason == "rank 1 wrote no result (the child died with SIGKILL)"
    merged = merge_ranks([None, _rank("oom", "out of memory in the generation phase")], {"status": "crashed"})
    assert merged.reason.startswith("rank 1: out of memory") and "rank 0 wrote no result" in merged.reason


def test_accelerate_config_is_trls_fsdp2_layout_and_never_single_process():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(accelerate_config("fsdp2", 4, 29511, reshard_after_forward=False))
    assert config["distributed_type"] == "FSDP" and config["num_processes"] == 4
    assert config["use_cpu"] is False  # use_cpu: true → accelerate's simple_launcher, one process
    assert config["fsdp_config"]["fsdp_version"] == 2
    assert config["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert config["fsdp_config"]["fsdp_reshard_after_forward"] is False
    assert yaml.safe_load(accelerate_config("ddp", 2, 29511))["distributed_type"] == "MULTI_GPU"


def test_zero_is_not_launched():
    with pytest.raises(GpuMemError) as info:
        run_ranks(json.loads(EXAMPLE.read_text(encoding="utf-8")), 2, strategy="zero3")
    assert info.value.field == "distributed" and "gpumem estimate" in str(info.value)


@pytest.mark.slow
def test_two_process_fsdp2_grpo_step_on_cpu():
    """``gpumem run --setup examples/setups/tiny-qwen2-cpu.json --device cpu --nproc 2 --json``: two ranks of
    TRL's GRPOTrainer under accelerate launch, each with half of the model (FSDP2 DTensors), 2 steps each."""
    pytest.importorskip("accelerate")
    pytest.importorskip("trl")
    completed = subprocess.run([sys.executable, "-m", "pytest_gpumem.cli", "run", "--setup", str(EXAMPLE),
                                "--device", "cpu", "--steps", "2", "--nproc", "2", "--json"], cwd=ROOT,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = RunResult.from_dict(json.loads(completed.stdout))
    assert result.status == "ok", result.reason
    ranks = result.data["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        info = rank["rank_info"]
        assert rank["steps_completed"] == 2
        assert (info["world_size"], info["distributed_type"], info["backend"]) == (2, "FSDP", "gloo")
        assert info["local_params"] * 2 >= info["global_params"] > info["local_params"]  # a half, padded
        assert rank["host_memory"]["peak_rss_bytes"] > 0
    assert result.data["worst_rank"] in (0, 1)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_rank0_of_eight_in_one_process_under_a_fake_group_on_cpu():
    """The single-device path (``gpumem run --rank0-of 8``) on CPU: TRL's real step, accelerate wrapping the
    model with FSDP2 over a fake group of 8, rank 0 holding an eighth of it."""
    pytest.importorskip("accelerate")
    pytest.importorskip("trl")
    result = run_rank0(json.loads(EXAMPLE.read_text(encoding="utf-8")), 8, steps=1, device="cpu", timeout_s=300)
    assert result.status == "ok", (result.reason, result.data.get("output_tail", "")[-2000:])
    info = result.data["rank_info"]
    assert (info["world_size"], info["backend"], info["distributed_type"]) == (8, "fake", "FSDP")
    assert info["local_params"] * 8 >= info["global_params"] > info["local_params"] * 7


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
def test_rank0_of_eight_measured_on_one_gpu():
    """Rank 0 of an 8-GPU FSDP2 job, measured for real on this one GPU: the allocator's peak of a rank that
    holds an eighth of the model states, and the gathered units on top."""
    setup = {**json.loads(EXAMPLE.read_text(encoding="utf-8")), "dtype": "bfloat16"}
    one = run_rank0(setup, 1, steps=2, device="cuda", timeout_s=600)
    eight = run_rank0(setup, 8, steps=2, device="cuda", timeout_s=600)
    for result in (one, eight):
        assert result.status == "ok", (result.reason, result.data.get("output_tail", "")[-2000:])
        assert result.peak_allocated_bytes and result.peak_allocated_bytes > 0
    assert eight.data["rank_info"]["local_params"] * 8 >= eight.data["rank_info"]["global_params"]
    assert eight.peak_allocated_bytes < one.peak_allocated_bytes  # 1/8 of params, grads and Adam states


def test_a_launched_rank_sees_only_its_gpu_and_writes_its_own_result(monkeypatch):
    from pytest_gpumem.measure.child import distributed

    request = {"world_size": 2, "device": "auto"}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert distributed.rank_of(request) == 1
    assert distributed.result_path_for(request, Path("/w/result.json")) == Path("/w/result.rank1.json")
    distributed.isolate_gpu(request)
    import os

    assert (os.environ["CUDA_VISIBLE_DEVICES"], os.environ["LOCAL_RANK"]) == ("5", "0")
    assert distributed.rank_of({"device": "cpu"}) is None  # a one-process request has no world_size
    assert distributed.result_path_for({}, Path("/w/result.json")) == Path("/w/result.json")
