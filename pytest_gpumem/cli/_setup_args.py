"""What several subcommands share: ``--setup FILE|JSON`` with one flag per common setup key, and printing an
estimate or a simulation (table or JSON) with its exit status."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from ..errors import GpuMemError
from ..report.text import breakdown_table
from ..spec import GRPOSetup
from ..units import format_gib

#: setup keys with their own flag (--per-device-train-batch-size ...); the rest go through --setup / --set
_FLAG_FIELDS = ("model", "backend", "trl_version", "logits", "dtype", "lora_rank", "per_device_train_batch_size",
                "gradient_accumulation_steps", "steps_per_generation", "num_generations", "max_prompt_length",
                "max_completion_length", "max_seq_length", "optim", "beta", "vllm_mode",
                "vllm_gpu_memory_utilization", "attn_implementation")
_BOOL_FIELDS = ("load_in_4bit", "use_vllm", "vllm_enable_sleep_mode", "use_liger_kernel", "cast_lm_head_to_fp32")


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """--setup FILE|JSON plus one flag per common GRPOSetup key (shared by estimate/simulate/fit/run)."""
    parser.add_argument("--setup", help="setup file (.json / .toml) or inline JSON")
    group = parser.add_argument_group("setup keys (override the file)")
    for name in _FLAG_FIELDS:
        group.add_argument("--" + name.replace("_", "-"), dest=f"setup_{name}", default=None)
    for name in _BOOL_FIELDS:
        group.add_argument("--" + name.replace("_", "-"), dest=f"setup_{name}", default=None,
                           action=argparse.BooleanOptionalAction)
    group.add_argument("--gradient-checkpointing", dest="setup_gradient_checkpointing", default=None,
                       choices=["true", "false", "unsloth"])
    group.add_argument("--set", dest="setup_extra", action="append", default=[], metavar="KEY=VALUE",
                       help="any other setup key, value as JSON (e.g. --set lora_target_modules='[\"q_proj\"]')")


def setup_from_args(args: argparse.Namespace) -> GRPOSetup:
    data: dict = {}
    if args.setup:
        base = load_setup_arg(args.setup)
        data = {name: getattr(base, name) for name in base.explicit_fields}
        data["model"] = base.model
    known = {f.name for f in fields(GRPOSetup)}
    for name in _FLAG_FIELDS + _BOOL_FIELDS + ("gradient_checkpointing",):
        value = getattr(args, f"setup_{name}", None)
        if value is None:
            continue
        data[name] = _parse_value(name, value)
    for item in args.setup_extra:
        if "=" not in item:
            raise GpuMemError("--set", f"expected KEY=VALUE, got {item!r}", fix="e.g. --set beta=0.04")
        key, value = item.split("=", 1)
        data[key.strip()] = _parse_value(key.strip(), value)
    if "model" not in data:
        raise GpuMemError("--setup", "no setup given", fix="pass --setup FILE or at least --model NAME")
    del known
    return GRPOSetup.from_dict(data)


def load_setup_arg(value: str) -> GRPOSetup:
    """``--setup`` accepts a file path or inline JSON."""
    if value.lstrip().startswith("{"):
        try:
            return GRPOSetup.from_dict(json.loads(value))
        except json.JSONDecodeError as exc:
            raise GpuMemError("--setup", f"inline JSON is invalid: {exc}", fix="quote the JSON or use a file") from None
    return GRPOSetup.from_file(value)


def _parse_value(name: str, value):
    if not isinstance(value, str):
        return value
    if name == "gradient_checkpointing":
        return {"true": True, "false": False}.get(value, value)
    if name in ("model", "backend", "trl_version", "logits", "dtype", "optim", "vllm_mode", "attn_implementation"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def print_result(result, as_json: bool, header: str, details: list[str], verdict_note: str = "",
                 show_verdict: bool = True) -> int:
    """Print an estimate or a simulation (JSON, or a table with its verdict, warnings and assumptions) and
    return the exit status: 0 fits or no GPU given, 1 does not fit."""
    if as_json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(header)
        print()
        print(breakdown_table(result.breakdown, total_bytes=result.total_bytes))
        for line in details:
            print(line)
        if result.gpu and show_verdict:
            verdict = "FITS" if result.fits() else "DOES NOT FIT"
            print(f"{verdict} on {result.gpu.name} ({format_gib(result.gpu.total_bytes)}{verdict_note})")
        for warning in result.warnings:
            print(f"warning: {warning}")
        if result.assumptions:
            print("assumptions:")
            for assumption in result.assumptions:
                print(f"  - {assumption}")
    if result.gpu is None:
        return 0
    return 0 if result.fits() else 1
