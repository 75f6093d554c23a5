"""What the plugin adds to a pytest run: ``pytest --collect-only`` on a generated 200-test suite.

    python benchmarks/bench_plugin.py [--tests 200] [--repeat 9]

Prints the wall time (best and median of ``--repeat`` fresh subprocesses) of

* pytest without the plugin (the reference),
* the plugin loaded, ``--gpu-budget`` off (inert: the goal is < 30 ms over the reference),
* ``--gpu-budget=estimate`` with ``--collect-only`` (every marker read and its setup validated),
* ``--gpu-budget=estimate`` running the suite (an estimate per budgeted test, and the summary table),

and the differences to the reference. Half of the suite's tests carry ``@pytest.mark.gpu_budget`` with a setup,
half are plain. Other installed plugins are kept out (``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``; hypothesis' alone
costs 0.5 s of imports) and this one is loaded with ``-p pytest_gpumem.plugin``, so the differences are ours.
Subprocess start-up noise is a few ms: compare the best times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE_HEADER = """
import pytest

SETUPS = [
    dict(model="Qwen/Qwen2.5-0.5B", dtype="bfloat16", per_device_train_batch_size=4, num_generations=4),
    dict(model="google/gemma-3-1b-it", load_in_4bit=True, lora_rank=16, use_vllm=True,
         vllm_gpu_memory_utilization=0.5, per_device_train_batch_size=2, gradient_accumulation_steps=2,
         num_generations=2, max_completion_length=256),
    dict(model="Qwen/Qwen2.5-1.5B-Instruct", dtype="bfloat16", lora_rank=16, use_vllm=True,
         per_device_train_batch_size=8, num_generations=8, max_completion_length=1024),
]
"""


def write_suite(directory: Path, num_tests: int) -> None:
    body = [SUITE_HEADER]
    for index in range(num_tests):
        if index % 2 == 0:
            body.append(f"@pytest.mark.gpu_budget(gib=40, setup=SETUPS[{index // 2 % 3}])\n"
                        f"def test_budgeted_{index}(): pass\n")
        else:
            body.append(f"def test_plain_{index}(): assert {index} + 1 == {index + 1}\n")
    (directory / "test_suite.py").write_text("\n".join(body))
    # an empty ini file pins the rootdir here, away from the project's own pytest settings
    (directory / "pytest.ini").write_text("[pytest]\n")


def time_run(directory: Path, args: list[str], repeat: int) -> list[float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    # as on a user's machine: pytest caches the assertion-rewritten plugin modules as .pyc (rewriting them on
    # every start costs ~20 ms; some CI images set PYTHONDONTWRITEBYTECODE=1)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    times = []
    subprocess.run(command, cwd=directory, env=env, capture_output=True)  # warm the OS caches
    for _ in range(repeat):
        started = time.perf_counter()
        result = subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if result.returncode not in (0, 1):
            raise SystemExit(f"pytest {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpumem-bench-") as tmp:
        directory = Path(tmp)
        write_suite(directory, args.tests)
        plugin = ["-p", "pytest_gpumem.plugin"]
        cases = [
            ("--collect-only, plugin not loaded", ["--collect-only"]),
            ("--collect-only, --gpu-budget off", ["--collect-only", *plugin]),
            ("--collect-only --gpu-budget=estimate", ["--collect-only", *plugin, "--gpu-budget=estimate"]),
            ("run, plugin not loaded", []),
            ("run, --gpu-budget off", [*plugin]),
            ("run, --gpu-budget=estimate", [*plugin, "--gpu-budget=estimate"]),
        ]
        results = {name: time_run(directory, case_args, args.repeat) for name, case_args in cases}
    print(f"pytest on a {args.tests}-test suite ({args.tests // 2 + args.tests % 2} with gpu_budget), "
          f"{args.repeat} runs each, Python {sys.version.split()[0]}")
    print(f"{'case':40s} {'best':>9s} {'median':>9s} {'best − reference':>18s}")
    for index, (name, times) in enumerate(results.items()):
        reference = min(results[cases[0 if index < 3 else 3][0]])
        best = min(times)
        print(f"{name:40s} {best * 1000:7.0f} ms {statistics.median(times) * 1000:7.0f} ms "
              f"{(best - reference) * 1000:+15.0f} ms")
    inert = min(results[cases[1][0]]) - min(results[cases[0][0]])
    print(f"\nadded with --gpu-budget off: {inert * 1000:+.0f} ms (goal < 30 ms): {'OK' if inert < 0.030 else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
