"""What several subcommands share: ``--setup FILE|JSON`` with one flag per common setup key, and printing an
estimate or a simulation (table or JSON) with its exit status."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from .. import launch_config
from ..backends import BACKENDS
from ..distributed import FSDP_WRAPS, STRATEGIES
from ..errors import GpuMemError
from ..report.text import breakdown_table, roles_table
from ..spec import ATTN_IMPLEMENTATIONS, DTYPES, LOGITS_MODES, OPTIMIZERS, VLLM_MODES, GRPOSetup
from ..units import format_gib
from ..vllm_layout import role_gpu_counts

GPU_HELP = "card name (L4, A100-80GB, H100, ...; `gpumem gpus` lists them) or size (24GiB, 80GB)"
#: The setup table: every setup key with its own flag — (key, kind, allowed values or None, meaning). The flags,
#: their help lines (meaning, allowed values, each backend's default from backends.BACKENDS) and the parsing of
#: their values are all generated from it. Other keys go through --setup / --set.
SETUP_FLAGS: tuple[tuple[str, str, tuple | None, str], ...] = (
    ("model", "str", None, "registry name (see `gpumem models`), local model dir / config.json, or inline JSON "
                           "config"),
    ("backend", "str", tuple(BACKENDS), "training backend (its defaults apply to the other keys)"),
    ("trl_version", "str", None, "TRL version whose log-prob path applies (≥ 1.16: chunked)"),
    ("logits", "str", LOGITS_MODES, "log-prob path; overrides --trl-version"),
    ("dtype", "str", DTYPES, "weight dtype of the policy"),
    ("load_in_4bit", "bool", None, "4-bit (NF4) base weights: QLoRA"),
    ("lora_rank", "int", None, "LoRA rank (unset/null: full fine-tuning)"),
    ("per_device_train_batch_size", "int", None, "completions per micro-step (b)"),
    ("gradient_accumulation_steps", "int", None, "micro-steps per optimizer step (GA)"),
    ("steps_per_generation", "int", None, "micro-steps per generation batch (unset: = GA)"),
    ("num_generations", "int", None, "completions per prompt (G); the generation batch must divide by it"),
    ("max_prompt_length", "int", None, "prompt tokens (P)"),
    ("max_completion_length", "int", None, "completion tokens (C)"),
    ("max_seq_length", "int", None, "Unsloth style: completion = max_seq_length − max_prompt_length"),
    ("gradient_checkpointing", "str", ("true", "false", "unsloth"), "checkpoint every decoder layer "
                                                                     "(unsloth: offloaded to CPU)"),
    ("optim", "str", tuple(OPTIMIZERS), "optimizer (TRL/transformers name)"),
    ("beta", "float", None, "KL coefficient; ≠ 0 without LoRA loads a reference model"),
    ("use_vllm", "bool", None, "generate with vLLM"),
    ("vllm_mode", "str", VLLM_MODES, "colocate: vLLM on this GPU; server: on other GPUs"),
    ("vllm_gpu_memory_utilization", "float", None, "fraction of the card colocated vLLM reserves"),
    ("vllm_enable_sleep_mode", "bool", None, "vLLM releases its KV cache while training"),
    ("attn_implementation", "str", ATTN_IMPLEMENTATIONS, "attention kernel"),
    ("use_liger_kernel", "bool", None, "Liger's chunked loss (TRL)"),
    ("cast_lm_head_to_fp32", "bool", None, "lm_head in fp32"),
    ("world_size", "int", None, "training processes (GPUs) in all, accelerate's num_processes"),
    ("num_machines", "int", None, "nodes the processes run on"),
    ("distributed", "str", STRATEGIES, "sharding strategy (unset: none on one GPU, ddp on several)"),
    ("offload_optimizer", "bool", None, "DeepSpeed optimizer offload to the host (ZeRO-1/2/3)"),
    ("offload_params", "bool", None, "parameter offload to the host (ZeRO-3, FSDP CPU offload)"),
    ("reshard_after_forward", "bool", None, "FSDP: reshard each unit after its forward"),
    ("fsdp_wrap", "str", FSDP_WRAPS, "FSDP units: one per decoder layer, or the root only"),
    ("reduce_bucket_size", "int", None, "DeepSpeed reduce (IPG) bucket, elements"),
    ("allgather_bucket_size", "int", None, "DeepSpeed all-gather bucket, elements (ZeRO-1/2)"),
    ("stage3_prefetch_bucket_size", "int", None, "DeepSpeed ZeRO-3 prefetch bucket, elements"),
    ("overlap_comm", "bool", None, "DeepSpeed: overlap gradient reduction with the backward"),
    ("vllm_tensor_parallel_size", "int", None, "colocate: training ranks per vLLM tensor-parallel shard"),
    ("vllm_server_tensor_parallel_size", "int", None, "server: trl vllm-serve --tensor-parallel-size"),
    ("vllm_server_data_parallel_size", "int", None, "server: trl vllm-serve --data-parallel-size"),
    ("vllm_server_gpu", "str", None, "server: its card (" + GPU_HELP + ")"),
    ("vllm_server_gpu_memory_utilization", "float", None, "server: trl vllm-serve --gpu-memory-utilization"),
)
#: defaults that are not a backend's plain value
_DEFAULT_WORDS = {"model": "required", "trl_version": "the installed trl, else 1.16.0",
                  "logits": "from --trl-version", "steps_per_generation": "= gradient_accumulation_steps",
                  # the multi-GPU keys' defaults (pytest_gpumem.distributed: accelerate + DeepSpeed's own)
                  "world_size": "1", "num_machines": "1", "distributed": "none, or ddp when world_size > 1",
                  "offload_optimizer": "false", "offload_params": "false", "reshard_after_forward": "true",
                  "fsdp_wrap": "transformer_layer", "reduce_bucket_size": "5e8", "allgather_bucket_size": "5e8",
                  "stage3_prefetch_bucket_size": "5e7", "overlap_comm": "true for zero3, else false",
                  # the generation layout's (pytest_gpumem.vllm_layout)
                  "vllm_tensor_parallel_size": "1", "vllm_server_tensor_parallel_size": "1",
                  "vllm_server_data_parallel_size": "1", "vllm_server_gpu": "the training GPUs' card",
                  "vllm_server_gpu_memory_utilization": "0.9"}


def _default_text(name: str) -> str:
    if name in _DEFAULT_WORDS:
        return _DEFAULT_WORDS[name]
    if name == "backend":
        return "trl"

    def word(value) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return "unset" if value is None else str(value)

    values = {backend: word(profile.defaults.get(name)) for backend, profile in BACKENDS.items()}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return ", ".join(f"{value} ({backend})" for backend, value in values.items())


def flag_help(name: str, kind: str, allowed: tuple | None, meaning: str) -> str:
    """One help line from the setup table: meaning, allowed values, default."""
    if allowed is not None:
        values = ", ".join(str(v) for v in allowed)
    else:
        values = {"int": "a whole number", "float": "a number", "bool": None, "str": None}[kind]
    text = meaning + (f"; one of {values}" if allowed is not None else f"; {values}" if values else "")
    return (text + f"; default: {_default_text(name)}").replace("%", "%%")


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """--setup FILE|JSON plus one flag per key of :data:`SETUP_FLAGS` (shared by estimate/simulate/fit/table)."""
    parser.add_argument("--setup", help="setup file (.json / .toml) or inline JSON; the flags below override it; "
                                        "default: none (then --model is needed)")
    parser.add_argument("--accelerate-config", metavar="FILE",
                        help="the accelerate YAML (or DeepSpeed JSON) the job is launched with: its world size and "
                             "sharding strategy; --setup and the flags below win over it; default: none")
    group = parser.add_argument_group("setup keys (override the file; the same names as in a setup file, "
                                      "--a-b or --a_b)")
    for name, kind, allowed, meaning in SETUP_FLAGS:
        flag = "--" + name.replace("_", "-")
        if kind == "bool":
            group.add_argument(flag, dest=f"setup_{name}", default=None, action=argparse.BooleanOptionalAction,
                               help=flag_help(name, kind, allowed, meaning))
        else:
            metavar = {"int": "N", "float": "X", "str": "NAME"}[kind]
            if allowed is not None and len(allowed) <= 3:
                metavar = "{" + ",".join(str(v) for v in allowed) + "}"
            group.add_argument(flag, dest=f"setup_{name}", default=None, metavar=metavar,
                               help=flag_help(name, kind, allowed, meaning))
    group.add_argument("--set", dest="setup_extra", action="append", default=[], metavar="KEY=VALUE",
                       help="any other setup key, value as JSON (e.g. --set lora_target_modules='[\"q_proj\"]'); "
                            "repeatable; default: none")


def setup_from_args(args: argparse.Namespace) -> GRPOSetup:
    data: dict = {}
    if getattr(args, "accelerate_config", None):
        data.update(launch_config.read(args.accelerate_config))
    if args.setup:
        base = load_setup_arg(args.setup)
        data.update({name: getattr(base, name) for name in base.explicit_fields})
        data["model"] = base.model
    known = {f.name for f in fields(GRPOSetup)}
    for name, *_ in SETUP_FLAGS:
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


#: keys whose value is taken as written (the rest is read as JSON: numbers, true/false, null, lists)
_STRING_KEYS = {name for name, kind, allowed, _ in SETUP_FLAGS if kind == "str" and name != "gradient_checkpointing"}


def _parse_value(name: str, value):
    if not isinstance(value, str):
        return value
    if name == "gradient_checkpointing":
        return {"true": True, "false": False}.get(value, value)
    if name in _STRING_KEYS:
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
        if result.breakdown.roles:
            print()
            totals = result.role_totals() if hasattr(result, "role_totals") else {}
            print(roles_table(result.breakdown, total_bytes=result.total_bytes, budgets=totals,
                              gpus=role_gpu_counts(result.setup)))
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
