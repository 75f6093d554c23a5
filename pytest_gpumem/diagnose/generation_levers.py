"""Levers for a vLLM server GPU that ran out: the server's own knobs, each re-estimated on the server role (the
training GPUs' generation lever, a wider colocated TP group, is in :mod:`.strategy_levers`)."""

from __future__ import annotations

from typing import Any

from ..breakdown import Role
from ..errors import SetupError
from ..gpus import resolve_gpu
from ..predict.analytic import Estimate, estimate
from ..vllm_layout import server_batch_defaults
from .levers import Lever
from .strategy_levers import MAX_TENSOR_PARALLEL


def server_candidates(s: Any) -> list[tuple[str, dict[str, Any], str]]:
    """Levers for one vLLM server GPU."""
    out: list[tuple[str, dict[str, Any], str]] = []
    tp = s.vllm_server_tensor_parallel_size
    if 2 * tp <= MAX_TENSOR_PARALLEL:
        out.append(("server tensor parallel ×2", {"vllm_server_tensor_parallel_size": 2 * tp},
                    f"{tp * s.vllm_server_data_parallel_size} more server GPU(s): weights and KV heads split "
                    "over twice the ranks"))
    util = round(s.vllm_server_gpu_memory_utilization - 0.05, 2)
    if util > 0:
        out.append(("server utilisation −0.05", {"vllm_server_gpu_memory_utilization": util},
                    "a smaller KV pool: fewer sequences decoded at once"))
    if s.vllm_server_max_num_seqs is None or s.vllm_server_max_num_seqs >= 16:
        current = s.vllm_server_max_num_seqs
        if current is None:
            current = server_batch_defaults(resolve_gpu(s.vllm_server_gpu))[0]
        out.append(("server max_num_seqs halved", {"vllm_server_max_num_seqs": current // 2},
                    "a smaller profiling / sampler peak: fewer sequences scheduled at once"))
    return out


def server_levers(result: Estimate, gpu: Any = None, headroom: float = 0.0) -> list[Lever]:
    """The server levers, re-estimated, ranked by what they save on one server GPU."""
    role = Role.VLLM_SERVER.value
    before = result.breakdown.role(role).peak_bytes
    levers = []
    for name, changes, trade_off in server_candidates(result.setup):
        try:
            after_setup = result.setup.replace(**changes)
        except SetupError:
            continue
        after = estimate(after_setup, gpu)
        peak = after.breakdown.role(role).peak_bytes
        if peak >= before:
            continue
        total = after.role_totals().get(role)
        fits = None if total is None else peak <= total * (1 - headroom)
        actual = {key: (getattr(result.setup, key), getattr(after_setup, key)) for key in changes}
        levers.append(Lever(name, actual, before - peak, peak, fits, trade_off, after_setup))
    levers.sort(key=lambda lever: (-lever.saves_bytes, lever.name))
    return levers
