"""What the plugin adds to a pytest run: ``pytest`` on a generated 200-test suite, measured in pairs.

    python benchmarks/bench_plugin.py [--tests 200] [--pairs 15]

Each case is compared with its reference (pytest without the plugin, the same ``--collect-only`` or run) in
*paired* runs: reference and case alternate (A, B, A, B, ...; which goes first alternates too), so a slow spell of
a shared machine hits both sides of a pair. It prints, per case, the median of the per-pair ratios B/A and of the
per-pair differences B − A — unpaired best-of-N times moved by more than the effect between two runs
(+349 ms, then −188 ms; issue 11). The cases:

* the plugin loaded, ``--gpu-budget`` off (inert: the goal is < 30 ms over the reference),
* ``--gpu-budget=estimate`` with ``--collect-only`` (every marker read and its setup validated),
* ``--gpu-budget=estimate`` running the suite (an estimate per budgeted test, and the summary table).

Half of the suite's tests carry ``@pytest.mark.gpu_budget`` with a setup, half are plain. Other installed plugins
are kept out (``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``; hypothesis' alone costs 0.5 s of imports) and this one is
loaded with ``-p pytest_gpumem.plugin``, so the differences are ours.
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


def _command(args: list[str]) -> tuple[list[str], dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    # as on a user's machine: pytest caches the assertion-rewritten plugin modules as .pyc (rewriting them on
    # every start costs ~20 ms; some CI images set PYTHONDONTWRITEBYTECODE=1)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], env


def time_once(directory: Path, args: list[str]) -> float:
    command, env = _command(args)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode not in (0, 1):
        raise SystemExit(f"pytest {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return elapsed


def paired(directory: Path, reference: list[str], case: list[str], pairs: int) -> list[tuple[float, float]]:
    """``pairs`` (reference, case) wall times, run back to back, the order alternating from pair to pair."""
    time_once(directory, reference)  # warm the OS caches and the .pyc files
    time_once(directory, case)
    results = []
    for index in range(pairs):
        if index % 2 == 0:
            a = time_once(directory, reference)
            b = time_once(directory, case)
        else:
            b = time_once(directory, case)
            a = time_once(directory, reference)
        results.append((a, b))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=15)
    args = parser.parse_args(argv)
    plugin = ["-p", "pytest_gpumem.plugin"]
    cases = [
        ("--collect-only, --gpu-budget off", ["--collect-only"], ["--collect-only", *plugin]),
        ("--collect-only --gpu-budget=estimate", ["--collect-only"], ["--collect-only", *plugin,
                                                                       "--gpu-budget=estimate"]),
        ("run, --gpu-budget off", [], [*plugin]),
        ("run, --gpu-budget=estimate", [], [*plugin, "--gpu-budget=estimate"]),
    ]
    with tempfile.TemporaryDirectory(prefix="gpumem-bench-") as tmp:
        directory = Path(tmp)
        write_suite(directory, args.tests)
        results = {name: paired(directory, reference, case, args.pairs) for name, reference, case in cases}
    print(f"pytest on a {args.tests}-test suite ({args.tests // 2 + args.tests % 2} with gpu_budget), "
          f"{args.pairs} alternating pairs (reference A: pytest without the plugin; B: the case), "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"{'case B':38s} {'median A':>9s} {'median B':>9s} {'median B/A':>11s} {'median B − A':>13s}")
    summary = {}
    for name, pairs in results.items():
        ratio = statistics.median(b / a for a, b in pairs)
        delta = statistics.median(b - a for a, b in pairs)
        summary[name] = delta
        print(f"{name:38s} {statistics.median(a for a, _ in pairs) * 1000:6.0f} ms "
              f"{statistics.median(b for _, b in pairs) * 1000:6.0f} ms {ratio:10.3f}× {delta * 1000:+10.0f} ms")
    inert = summary[cases[0][0]]
    print(f"\nadded with --gpu-budget off (--collect-only, median of paired differences): {inert * 1000:+.0f} ms "
          f"(goal < 30 ms): {'OK' if inert < 0.030 else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
