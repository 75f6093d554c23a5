"""Benchmark of the FakeTensor simulation, and the full-size estimate-vs-simulation table.

    python benchmarks/bench_simulate.py                 # timing + full-size matrix, printed
    python benchmarks/bench_simulate.py --timing-only   # only the Gemma-3-1B timing (goal: < 20 s on 2 cores)
    python benchmarks/bench_simulate.py --write-docs    # also rewrite docs/accuracy.md with the measured table

Timing: ``simulate()`` of a Gemma-3-1B GRPO step at b = 8, L = P + C = 1024 (TRL defaults otherwise: fp32
weights, bf16 autocast, gradient checkpointing, chunked log-probs, fused AdamW), cold (first call in the
process: imports torch/transformers/peft/trl) and warm (second call). The goal is < 20 s warm on 2 cores.

The table: every setup of ``pytest_gpumem.predict.faketensor.accuracy_matrix("full")`` — registry models with all their
layers and full-size batches — estimate vs simulation on the training phase and on the peak over the phases
the simulation produces, both without what a simulation cannot see (``comparable_total``: CUDA context,
allocator slack, vLLM, batch buffers).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pytest_gpumem.predict.analytic import estimate  # noqa: E402
from pytest_gpumem.predict.faketensor import accuracy_matrix, comparable_peak, comparable_total, run_simulation  # noqa: E402
from pytest_gpumem.units import GIB  # noqa: E402

GOAL_SECONDS = 20.0
TIMING_SETUP = {"model": "google/gemma-3-1b-it", "per_device_train_batch_size": 8, "num_generations": 8,
                "max_prompt_length": 512, "max_completion_length": 512}
COMMAND = "python benchmarks/bench_simulate.py --write-docs"


def timing() -> dict:
    started = time.perf_counter()
    run_simulation(TIMING_SETUP)
    cold_seconds = time.perf_counter() - started
    started = time.perf_counter()
    warm = run_simulation(TIMING_SETUP)
    warm_seconds = time.perf_counter() - started
    print(f"Gemma-3-1B, b=8, L=1024 (TRL defaults): cold {cold_seconds:.1f} s (with imports), warm "
          f"{warm_seconds:.1f} s, {warm.num_ops} aten ops — goal < {GOAL_SECONDS:.0f} s: "
          f"{'met' if warm_seconds < GOAL_SECONDS else 'MISSED'}")
    print(f"  simulated peak {warm.peak_bytes / GIB:.2f} GiB in {warm.peak_phase}; largest tensor "
          f"{warm.largest_allocation_name} = {warm.largest_allocation_bytes / GIB:.3f} GiB")
    return {"cold": cold_seconds, "warm": warm_seconds, "ops": warm.num_ops, "peak": warm.peak_bytes}


def matrix(scale: str) -> list[dict]:
    rows = []
    for name, setup in accuracy_matrix(scale):
        started = time.perf_counter()
        simulation = run_simulation(setup)
        seconds = time.perf_counter() - started
        predicted = estimate(setup)
        row = {"name": name, "seconds": seconds,
               "est_training": comparable_total(predicted.breakdown, "training"),
               "sim_training": comparable_total(simulation.breakdown, "training"),
               "est_peak": comparable_peak(predicted.breakdown),
               "sim_peak": comparable_peak(simulation.breakdown),
               "setup": setup}
        row["err_training"] = 100 * (row["est_training"] - row["sim_training"]) / row["sim_training"]
        row["err_peak"] = 100 * (row["est_peak"] - row["sim_peak"]) / row["sim_peak"]
        rows.append(row)
        print(f"{name:36s} {seconds:5.1f} s  training est {row['est_training'] / GIB:7.2f} sim "
              f"{row['sim_training'] / GIB:7.2f} GiB {row['err_training']:+5.1f}%   peak est "
              f"{row['est_peak'] / GIB:7.2f} sim {row['sim_peak'] / GIB:7.2f} GiB {row['err_peak']:+5.1f}%",
              flush=True)
    worst = max(max(abs(r["err_training"]), abs(r["err_peak"])) for r in rows)
    print(f"{len(rows)} setups, worst |error| {worst:.1f}% (CI asserts ≤ 5% on the reduced matrix)")
    return rows


def _shape(setup: dict) -> str:
    return (f"b={setup['per_device_train_batch_size']} P={setup['max_prompt_length']} "
            f"C={setup['max_completion_length']}")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| setup | model | shape | training: estimate | simulation | error | peak: estimate | simulation "
             "| error | sim time |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        setup = row["setup"]
        lines.append(f"| {row['name']} | {setup['model']} | {_shape(setup)} | {row['est_training'] / GIB:.2f} GiB "
                     f"| {row['sim_training'] / GIB:.2f} GiB | {row['err_training']:+.1f}% "
                     f"| {row['est_peak'] / GIB:.2f} GiB | {row['sim_peak'] / GIB:.2f} GiB | {row['err_peak']:+.1f}% "
                     f"| {row['seconds']:.1f} s |")
    return "\n".join(lines)


def write_docs(timings: dict, rows: list[dict]) -> None:
    """Replace the generated block of docs/accuracy.md (between its markers) with this run's figures."""
    path = ROOT / "docs" / "accuracy.md"
    text = path.read_text(encoding="utf-8")
    begin, end = "<!-- bench_simulate:begin -->", "<!-- bench_simulate:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{path} lacks the {begin} / {end} markers")
    import torch
    import transformers
    import trl

    worst = max(max(abs(r["err_training"]), abs(r["err_peak"])) for r in rows)
    block = "\n".join([
        begin,
        f"Measured {datetime.date.today().isoformat()} with `{COMMAND}` on {platform.machine()} "
        f"({os.cpu_count()} cores), torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}.",
        "",
        f"Simulation time, Gemma-3-1B at b = 8, L = 1024 (TRL defaults): **{timings['warm']:.1f} s** "
        f"({timings['cold']:.1f} s cold, imports included; {timings['ops']:,} aten ops traced; goal < 20 s).",
        "",
        f"Full-size matrix: {len(rows)} setups, worst |estimate − simulation| = **{worst:.1f}%** of the "
        "simulation (training phase and peak, both without the components a simulation cannot see).",
        "",
        markdown_table(rows),
        end,
    ])
    start, stop = text.index(begin), text.index(end) + len(end)
    path.write_text(text[:start] + block + text[stop:], encoding="utf-8")
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the generated part of docs/accuracy.md")
    parser.add_argument("--scale", choices=["full", "ci"], default="full")
    args = parser.parse_args()
    timings = timing()
    if args.timing_only:
        return 0
    rows = matrix(args.scale)
    if args.write_docs:
        write_docs(timings, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
