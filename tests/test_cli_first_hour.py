"""The command line as a new user meets it (issue 11, "The first hour"): help lines with defaults and allowed
values generated from the setup table, setup-file spellings as flags, `gpumem gpus`, card names in "did you
mean", and `gpumem explain` at a terminal."""

from __future__ import annotations

import argparse
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_gpumem.cli import build_parser
from pytest_gpumem.cli._setup_args import SETUP_FLAGS
from pytest_gpumem.spec import OPTIMIZERS

ROOT = Path(__file__).resolve().parents[1]
OOM = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.32 GiB. GPU 0 has a total capacity of "
       "22.05 GiB of which 1.10 GiB is free. Including non-PyTorch memory, this process has 20.94 GiB memory in use. "
       "Of the allocated memory 19.80 GiB is allocated by PyTorch, and 0.70 GiB is reserved by PyTorch but "
       "unallocated.")


def gpumem(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest_gpumem.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, **kwargs)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["estimate", "fit", "table", "simulate"])
def test_every_option_says_its_default_and_the_allowed_values(command):
    sub = _subcommands()[command]
    for action in sub._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
            continue
        assert action.help, action.option_strings
        takes_value = action.nargs != 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if takes_value or isinstance(action, argparse.BooleanOptionalAction):
            assert "default" in action.help or "required" in action.help, (command, action.option_strings)
    helps = {action.dest: action.help for action in sub._actions}
    for name, _, allowed, _ in SETUP_FLAGS:  # one source: the setup table
        assert f"setup_{name}" in helps, name
        for value in allowed or ():
            assert str(value) in helps[f"setup_{name}"], (name, value)
    assert "default: 8 (trl), 4 (unsloth)" in helps["setup_per_device_train_batch_size"]
    assert all(name in helps["setup_optim"] for name in OPTIMIZERS)


def test_underscore_flags_are_accepted():
    dashes = gpumem("estimate", "--model", "Qwen/Qwen2.5-0.5B", "--lora-rank", "16", "--json")
    underscores = gpumem("estimate", "--model", "Qwen/Qwen2.5-0.5B", "--lora_rank", "16", "--json")
    assert underscores.returncode == 0, underscores.stderr
    assert json.loads(underscores.stdout)["setup"]["lora_rank"] == 16
    assert json.loads(underscores.stdout) == json.loads(dashes.stdout)


def test_gpus_lists_card_names_and_sizes():
    result = gpumem("gpus")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    t4 = next(line for line in lines if line.startswith("NVIDIA Tesla T4"))
    assert "14.74 GiB" in t4 and t4.rstrip().endswith("t4")
    assert any(line.startswith("NVIDIA L4") and "22.03 GiB" in line for line in lines)


def test_did_you_mean_shows_the_names_people_read():
    result = gpumem("estimate", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "V100-16")
    assert result.returncode == 2
    assert "did you mean 'NVIDIA Tesla V100 16GB'" in result.stderr and "v10016gb" not in result.stderr
    # and the name it suggests works as it is printed
    assert gpumem("estimate", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "NVIDIA Tesla V100 16GB").returncode in (0, 1)


def test_explain_without_setup_says_what_setup_adds():
    result = gpumem("explain", input=OOM)
    assert result.returncode == 0, result.stderr
    assert "add --setup" in result.stdout and "ranked levers" in result.stdout


def _read_until(fd: int, needle: bytes, timeout: float = 60) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


def _explain_at_a_terminal():
    controller, terminal = pty.openpty()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "pytest_gpumem.cli", "explain"], stdin=terminal,
                               stdout=subprocess.PIPE, stderr=terminal, env=env)
    os.close(terminal)
    return process, controller


def test_explain_at_a_terminal_prompts_and_reads_until_ctrl_d():
    process, controller = _explain_at_a_terminal()
    try:
        assert b"paste the error or log, then press Ctrl-D" in _read_until(controller, b"Ctrl-D")
        os.write(controller, OOM.encode() + b"\n\x04")
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0 and "short by" in out.decode()
    finally:
        process.kill()
        os.close(controller)


def test_explain_ctrl_c_at_the_prompt_exits_quietly():
    process, controller = _explain_at_a_terminal()
    try:
        _read_until(controller, b"Ctrl-D")
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=60)
        rest = _read_until(controller, b"Traceback", timeout=1)
        assert process.returncode == 130 and b"Traceback" not in rest and b"KeyboardInterrupt" not in rest
    finally:
        process.kill()
        os.close(controller)
