"""``gpumem fit``: the best setup that fits a GPU, what changed, and the alternatives that keep one more thing."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..diagnose.fit import DIMENSIONS, EFFECTIVE_BATCH, fit
from ..diagnose.fit_gpus import fit_gpus, launch_changes
from ..units import format_gib
from ._setup_args import GPU_HELP, add_setup_arguments, setup_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setup_arguments(parser)
    parser.add_argument("--gpu", required=True, help=GPU_HELP + "; required")
    parser.add_argument("--headroom", type=float, default=0.1,
                        help="fraction of the GPU kept free, 0 to 1 (default: 0.1)")
    parser.add_argument("--keep", action="append", default=None, metavar="NAME",
                        help=f"a dimension that must not change: one of {', '.join(DIMENSIONS)}, lora_rank; "
                             "repeatable; default: none")
    parser.add_argument("--allow-batch-change", action="store_true",
                        help="allow fewer completions per optimizer step (default: b × GA is kept)")
    parser.add_argument("--gpus", type=int, default=None, metavar="N",
                        help="search the launch on N GPUs too: DDP, ZeRO-2/3, FSDP2, optimizer/parameter offload "
                             "(per-GPU budget; training quality kept first, then the cheapest launch); "
                             "default: none (the setup's own launch)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _keep_from_args(args: argparse.Namespace) -> tuple:
    keep = list(args.keep or [])
    if not args.allow_batch_change:
        keep.append(EFFECTIVE_BATCH)
    return tuple(keep)


def run(args: argparse.Namespace) -> int:
    setup = setup_from_args(args)
    if args.gpus is not None:
        return _run_gpus(args, setup)
    result = fit(setup, args.gpu, headroom=args.headroom, keep=_keep_from_args(args))
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0 if result.fits else 1
    gpu = result.gpu
    budget = f"{format_gib(result.budget_bytes)} = {format_gib(gpu.total_bytes)} − {result.headroom:.0%} headroom"
    if not result.fits:
        closest = result.closest
        print(f"nothing in the lever space fits {gpu.name} ({budget}): the most-saving setup still peaks at "
              f"{format_gib(closest.peak_bytes)} ({closest.estimate.peak_phase} phase)")
        for change in result.changes(closest):
            print(f"  {change['field']}: {_fmt(change['from'])} → {_fmt(change['to'])}")
        return 1
    print(f"fits {gpu.name} ({budget}): predicted peak {format_gib(result.peak_bytes)} "
          f"in the {result.best.estimate.peak_phase} phase")
    changes = result.changes()
    if changes:
        print("changes:")
        for change in changes:
            note = f" ({change['note']})" if change.get("note") else ""
            print(f"  {change['field']}: {_fmt(change['from'])} → {_fmt(change['to'])}{note}")
    else:
        print("no change needed")
    labels = {"batch": "per_device_train_batch_size", "capacity": "full fine-tuning / LoRA rank"}
    for keeps, candidate in result.alternatives:
        keeps = labels.get(keeps, keeps)
        listed = ", ".join(f"{c['field']} → {_fmt(c['to'])}" for c in result.changes(candidate))
        print(f"alternative keeping {keeps}: {listed or 'no change'} (peak {format_gib(candidate.peak_bytes)})")
    print(f"searched {result.space_size} candidates, estimated {result.evaluated} in {result.seconds * 1000:.0f} ms")
    return 0


def _run_gpus(args: argparse.Namespace, setup: Any) -> int:
    found = fit_gpus(setup, args.gpu, args.gpus, headroom=args.headroom, keep=_keep_from_args(args))
    if args.json:
        json.dump(found.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0 if found.fits else 1
    for launch in found.launches:
        verdict = (f"fits with {len(launch.result.changes())} change(s), peak {format_gib(launch.result.peak_bytes)}"
                   if launch.result.fits else f"does not fit (closest {format_gib(launch.result.closest.peak_bytes)})")
        print(f"  {launch.label:<42} {verdict}")
    if not found.fits:
        print(f"nothing fits {args.gpus} × {args.gpu}")
        return 1
    chosen = found.chosen
    print(f"launch: {chosen.label} on {args.gpus} GPUs — per-GPU peak {format_gib(chosen.result.peak_bytes)} "
          f"({chosen.result.best.estimate.breakdown.worst_role}, {chosen.result.best.estimate.peak_phase} phase)")
    roles = chosen.gpus_per_role
    print("GPUs per role: " + ", ".join(f"{role} {count}" for role, count in roles.items()))
    breakdown = chosen.result.best.estimate.breakdown
    if "vllm_server" in breakdown.roles:
        print(f"  vllm_server per-GPU peak {format_gib(breakdown.role('vllm_server').peak_bytes)}")
    changes = launch_changes(found.input_setup, chosen.setup) + chosen.result.changes()
    for change in changes:
        print(f"  {change['field']}: {_fmt(change['from'])} → {_fmt(change['to'])}")
    return 0


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)
