"""explain, the levers and fit know the multi-GPU strategies: each strategy lever is re-estimated, an OOM of a
DeepSpeed bucket is recognised, and ``fit --gpus`` picks the launch that keeps the setup."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pytest_gpumem import estimate
from pytest_gpumem.diagnose.explain import diagnose
from pytest_gpumem.diagnose.fit_gpus import fit_gpus
from pytest_gpumem.diagnose.levers import rank_levers
from pytest_gpumem.errors import GpuMemError
from pytest_gpumem.units import MIB

BASE = {"model": "Qwen/Qwen2.5-7B", "dtype": "bfloat16", "per_device_train_batch_size": 8}


def levers_by_name(setup, gpu="H100"):
    return {lever.name: lever for lever in rank_levers(setup, gpu)}


def test_strategy_levers_are_re_estimated():
    zero2 = {**BASE, "world_size": 8, "distributed": "zero2"}
    levers = levers_by_name(zero2)
    offload = levers["optimizer offload"]
    assert offload.setup.offload_optimizer and offload.setup.distributed == "zero2"
    assert offload.saves_bytes == estimate(zero2, "H100").peak_bytes - estimate(offload.setup, "H100").peak_bytes
    assert levers["twice the GPUs"].setup.world_size == 16
    zero3 = levers["ZeRO-3"]
    assert zero3.setup.distributed == "zero3"
    # ZeRO-3's own peak is TRL's HF generate, which gathers the whole 16-bit model on every rank
    assert estimate(zero3.setup, "H100").peak_phase == "generation"
    zero1 = levers_by_name({**BASE, "world_size": 8, "distributed": "zero1", "overlap_comm": True})
    assert zero1["ZeRO-2"].setup.distributed == "zero2" and zero1["ZeRO-2"].setup.overlap_comm is False
    fsdp = levers_by_name({**BASE, "world_size": 8, "distributed": "fsdp2", "reshard_after_forward": False})
    assert fsdp["reshard after forward"].setup.reshard_after_forward is True
    assert fsdp["FSDP CPU offload"].setup.offload_params is True


def test_smaller_bucket_lever_where_the_bucket_is_the_peak():
    small = {"model": "Qwen/Qwen2.5-0.5B", "dtype": "bfloat16", "per_device_train_batch_size": 4,
             "num_generations": 4, "world_size": 8, "distributed": "zero2", "overlap_comm": True}
    lever = levers_by_name(small, "L4")["smaller reduce bucket"]
    assert lever.setup.reduce_bucket_size == 50_000_000
    before = estimate(small, "L4").breakdown.components("training")["reduce_buckets"]
    after = estimate(lever.setup, "L4").breakdown.components("training")["reduce_buckets"]
    assert before - after == 2 * 2 * (500_000_000 - 50_000_000)


def test_explain_recognises_the_deepspeed_bucket():
    message = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 953.67 MiB. GPU 3 has a total "
               "capacity of 79.11 GiB of which 120.00 MiB is free.")
    found = diagnose(message, setup={**BASE, "world_size": 8, "distributed": "zero2"}, gpu="H100")
    assert found.tensor["name"] == "DeepSpeed's IPG reduce bucket"
    assert round(found.tensor["bytes"] / MIB, 2) == 953.67
    one_gpu = diagnose(message, setup=BASE, gpu="H100").tensor  # no DeepSpeed on one GPU
    assert one_gpu is None or "DeepSpeed" not in one_gpu["name"]


def test_fit_gpus_keeps_full_fine_tuning_by_choosing_the_launch():
    found = fit_gpus(BASE, "A100-40GB", 4)
    by_label = {f.label: f for f in found.launches}
    assert by_label["DDP"].result.setup.is_lora  # DDP only fits with LoRA
    assert found.fits and not found.chosen.setup.is_lora and not found.chosen.result.changes()
    assert found.chosen.setup.world_size == 4
    # quality first, then the cheapest launch: every cheaper launch needed LoRA (or did not fit)
    for launch in found.launches[:found.launches.index(found.chosen)]:
        assert not launch.result.fits or launch.result.setup.is_lora


def test_fit_gpus_prefers_the_cheapest_launch_when_all_fit():
    small = {"model": "Qwen/Qwen2.5-0.5B", "dtype": "bfloat16", "per_device_train_batch_size": 4,
             "num_generations": 4}
    found = fit_gpus(small, "H100", 8)
    assert found.chosen.label == "DDP" and found.chosen.setup.distributed == "ddp"
    with pytest.raises(GpuMemError):
        fit_gpus(small, "H100", 0)


def test_cli_fit_gpus_json():
    out = subprocess.run([sys.executable, "-m", "pytest_gpumem.cli", "fit", "--model", "Qwen/Qwen2.5-7B",
                          "--dtype", "bfloat16", "--per-device-train-batch-size", "8", "--gpu", "A100-40GB",
                          "--gpus", "4", "--json"], capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    chosen = fit_gpus(BASE, "A100-40GB", 4).chosen
    assert data["launch"] == chosen.label and data["fits"]
    assert {"field": "distributed", "from": "none", "to": chosen.setup.distributed} in data["changes"]
    assert len(data["launches"]) == 7
