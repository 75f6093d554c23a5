"""Measure a multi-GPU setup for real: N processes of TRL's ``GRPOTrainer`` under ``accelerate launch``.

:func:`run_ranks` writes one request and an accelerate config for the strategy (``accelerate_config``: DDP =
``MULTI_GPU``, FSDP2 = ``FSDP`` with ``fsdp_version: 2``, TRL's ``accelerate_configs/fsdp2.yaml`` keys), starts
``accelerate launch --config_file … -m pytest_gpumem.measure.child`` (the launcher is accelerate's, which hands
it to ``torch.distributed.run``; the process handling — timeout, process-group kill, progress lines — is
``runner.run``'s), and merges the per-rank results (``result.rank<R>.json``, written by each child) into one
:class:`~pytest_gpumem.measure.protocol.RunResult`:

``status``  ``"ok"`` only when every rank completed; otherwise the first failing rank's status, ``reason``
    naming that rank (``"rank 1: out of memory in the generation phase: …"``); a rank that wrote nothing was
    stopped by the launcher after another failed, or died (its exit is in the output tail)
``data["ranks"]``  every rank's own result, in rank order; the top-level measured fields are rank 0's, with
    ``data["worst_rank"]`` the rank whose peak (GPU reserved, else host RSS) is largest

On a machine without CUDA the ranks run on CPU with gloo (accelerate falls back when ``use_cpu`` is false —
``use_cpu: true`` would start one process), which exercises the mechanics; on GPUs with NCCL.
accelerate 1.16 only turns FSDP on for GPU-type process groups (``AcceleratorState``: ``MULTI_CPU`` is not in
its list), so on CPU the child promotes ``MULTI_CPU`` to ``FSDP`` (``child/distributed.py``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from ..backends import run_label
from ..errors import GpuMemError
from ..spec import GRPOSetup
from .protocol import DEVICES, STATUSES, RunResult, rank_result_name
from .runner import DEFAULT_TIMEOUT_S, ProgressCallback, _child_environment, _run_child, skip_reason
from .runner import run as run_one

#: strategies a real multi-process run launches (ZeRO needs DeepSpeed, which is not a dependency)
LAUNCHED_STRATEGIES = ("ddp", "fsdp2")
#: the order in which a failed rank's status outranks another's when merging
FAILURE_ORDER = ("oom", "crashed", "timeout", "skipped")


def accelerate_config(strategy: str, num_processes: int, port: int, *, reshard_after_forward: bool = True,
                      mixed_precision: str = "no") -> str:
    """The accelerate YAML for ``strategy`` on one machine (keys as ``accelerate config`` writes them and
    TRL's ``accelerate_configs/multi_gpu.yaml`` / ``fsdp2.yaml`` set them)."""
    lines = ["compute_environment: LOCAL_MACHINE",
             f"distributed_type: {'FSDP' if strategy == 'fsdp2' else 'MULTI_GPU'}",
             "machine_rank: 0", "main_training_function: main", f"mixed_precision: '{mixed_precision}'",
             "num_machines: 1", f"num_processes: {num_processes}", "rdzv_backend: static", "same_network: true",
             # use_cpu: true would make accelerate start a single process (simple_launcher)
             "use_cpu: false", "gpu_ids: all", f"main_process_port: {port}"]
    if strategy == "fsdp2":
        lines += ["fsdp_config:", "  fsdp_version: 2", "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP",
                  f"  fsdp_reshard_after_forward: {'true' if reshard_after_forward else 'false'}",
                  "  fsdp_state_dict_type: SHARDED_STATE_DICT", "  fsdp_cpu_ram_efficient_loading: false",
                  "  fsdp_offload_params: false", "  fsdp_activation_checkpointing: false"]
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(setup: GRPOSetup | Mapping | str | Path, nproc: int, steps: int = 2, device: str = "auto",
              timeout_s: float = DEFAULT_TIMEOUT_S, progress: ProgressCallback | None = None, *,
              strategy: str | None = None, fault: str | None = None, fault_rank: int | None = None,
              keep_work_dir: bool = False) -> RunResult:
    """Run ``steps`` optimizer steps of ``setup`` as ``nproc`` processes under ``accelerate launch`` and merge
    the per-rank results. ``strategy`` (default: the setup's ``distributed``, else FSDP2) is ``"fsdp2"`` or
    ``"ddp"``. ``fault`` / ``fault_rank`` inject a failure on one rank (``protocol.FAULTS``; for testing).
    Never raises for what happens in a rank: an OOM, a crash or a hang are results."""
    setup = GRPOSetup.coerce(setup)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise GpuMemError("nproc", f"must be a whole number ≥ 1, got {nproc!r}", fix="e.g. --nproc 2")
    if device not in DEVICES:
        raise GpuMemError("device", f"{device!r} is not one of {', '.join(DEVICES)}", fix="use 'auto', 'cuda' or 'cpu'")
    chosen = strategy or getattr(setup, "distributed", None)
    if chosen in (None, "none"):
        chosen = "fsdp2"
    if chosen not in LAUNCHED_STRATEGIES:
        raise GpuMemError("distributed", f"a real multi-process run launches {' or '.join(LAUNCHED_STRATEGIES)}, "
                          f"not {chosen!r} (DeepSpeed is not a dependency of pytest-gpumem)",
                          fix="use distributed='fsdp2' or 'ddp', or `gpumem estimate` for ZeRO")
    base = {"setup": setup.to_dict(), "backend": run_label(setup), "steps_requested": steps, "steps_completed": 0,
            "device": {"requested": device}, "world_size": nproc, "distributed": chosen}
    reason = skip_reason(setup, device)
    if reason is None and setup.use_vllm:
        reason = "vLLM colocate across ranks is not launched by gpumem run --nproc yet"
    if reason is None and importlib.util.find_spec("accelerate") is None:
        reason = "accelerate not installed"
    if reason is not None:
        return RunResult("skipped", reason, {**base, "status": "skipped", "reason": reason})
    work_dir = Path(tempfile.mkdtemp(prefix="gpumem-ranks-"))
    try:
        request = {"setup": setup.to_dict(), "steps": steps, "device": device, "backend": run_label(setup),
                   "work_dir": str(work_dir), "fault": fault, "fault_rank": fault_rank, "world_size": nproc,
                   "distributed": chosen}
        request_path, result_path = work_dir / "request.json", work_dir / "result.json"
        request_path.write_text(json.dumps(request, default=str), encoding="utf-8")
        config_path = work_dir / "accelerate.yaml"
        config_path.write_text(accelerate_config(chosen, nproc, _free_port(),
                                                 reshard_after_forward=getattr(setup, "reshard_after_forward",
                                                                               None) is not False),
                               encoding="utf-8")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path),
                   "-m", "pytest_gpumem.measure.child", str(request_path), str(result_path)]
        outcome = _run_child(request_path, result_path, work_dir, _child_environment(None), timeout_s, progress,
                             command=command)
        outcome.pop("data", None)  # result.json itself is never written: the ranks write their own
        per_rank = [_read_rank(work_dir, rank) for rank in range(nproc)]
    finally:
        if not keep_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    return merge_ranks(per_rank, {**base, **outcome})


def _read_rank(work_dir: Path, rank: int) -> dict[str, Any] | None:
    path = work_dir / rank_result_name(rank)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def merge_ranks(per_rank: list[dict[str, Any] | None], launch: dict[str, Any]) -> RunResult:
    """One result from every rank's: ok when all are, else the first failing rank's status and reason with
    its rank; rank 0's measured fields at the top, every rank under ``ranks``."""
    failures = []
    for rank, data in enumerate(per_rank):
        status = (data or {}).get("status")
        if status != "ok":
            failures.append((rank, status if status in STATUSES else None, data))
    first_ok = next((d for d in per_rank if d is not None), None)
    merged: dict[str, Any] = {**(per_rank[0] or first_ok or {}), **{k: v for k, v in launch.items()
                                                                     if k not in ("status", "reason")}}
    merged["ranks"] = [dict(d, rank=r) if d is not None else {"rank": r, "status": "crashed",
                                                              "reason": "wrote no result"}
                       for r, d in enumerate(per_rank)]
    merged["steps_completed"] = min((d or {}).get("steps_completed", 0) for d in per_rank) if per_rank else 0
    merged["worst_rank"] = _worst_rank(per_rank)
    if launch.get("status") == "timeout":
        merged.update(status="timeout", reason=launch.get("reason"))
        return RunResult("timeout", merged["reason"], merged)
    if not failures:
        merged.update(status="ok", reason=None)
        return RunResult("ok", None, merged)
    reported = [f for f in failures if f[1] is not None]
    if reported:
        rank, status, data = min(reported, key=lambda f: (FAILURE_ORDER.index(f[1]) if f[1] in FAILURE_ORDER
                                                         else len(FAILURE_ORDER), f[0]))
        reason = f"rank {rank}: {data.get('reason') or status}"
        silent = [f[0] for f in failures if f[1] is None]
        if silent:
            reason += f" (rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} wrote no result: " \
                      "stopped by the launcher after the failure)"
    else:
        status = launch.get("status") if launch.get("status") in STATUSES and launch.get("status") != "ok" \
            else "crashed"
        ranks = ", ".join(str(f[0]) for f in failures)
        why = launch.get("reason") or "the launcher exited"
        reason = f"rank{'s' if len(failures) > 1 else ''} {ranks} wrote no result ({why})"
    merged.update(status=status, reason=reason, failed_rank=failures[0][0] if not reported else rank)
    return RunResult(status, reason, merged)


def _worst_rank(per_rank: list[dict[str, Any] | None]) -> int | None:
    def peak(data):
        if not data:
            return -1
        gpu = data.get("gpu") or {}
        value = gpu.get("peak_reserved_bytes") or (data.get("host_memory") or {}).get("peak_rss_bytes")
        return value if isinstance(value, int) else -1

    peaks = [peak(d) for d in per_rank]
    if not peaks or max(peaks) < 0:
        return None
    return peaks.index(max(peaks))


def run_rank0(setup: GRPOSetup | Mapping | str | Path, world_size: int, steps: int = 2, device: str = "cuda",
              timeout_s: float = DEFAULT_TIMEOUT_S, progress: ProgressCallback | None = None) -> RunResult:
    """Measure rank 0 of a ``world_size``-GPU FSDP2 job on *one* device: the real TRL step in one measurement
    child that joins a fake process group of ``world_size`` ranks (``child/distributed.join_fake_group``), so
    accelerate shards the model ``1/world_size`` and every gather / reduce-scatter buffer is allocated as on
    the real job, measured by the allocator (``torch.cuda.max_memory_*``). NCCL's own buffers are not there
    (no communicator is made). ``device="cpu"`` runs the same on CPU (host memory only)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise GpuMemError("world_size", f"must be a whole number ≥ 1, got {world_size!r}", fix="e.g. 8")
    setup = GRPOSetup.coerce(setup)
    if setup.use_vllm:
        reason = "vLLM under a fake process group is not measured (its own workers would need a real group)"
        return RunResult("skipped", reason, {"status": "skipped", "reason": reason, "setup": setup.to_dict()})
    return run_one(setup, steps=steps, device=device, timeout_s=timeout_s, progress=progress,
                   fake_world_size=world_size)
