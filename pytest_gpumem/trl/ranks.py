"""Several processes: each rank measures itself; rank 0 prints one summary with a row per rank.

The rows are gathered with ``torch.distributed.all_gather_object`` when a process group is initialised
(accelerate initialises one for every multi-GPU launch: ``accelerate launch`` / ``torchrun``), else the
process is alone. Every rank calls the same callbacks at the same points, so the collective cannot hang on a
rank that skipped it.
"""

from __future__ import annotations

import sys
from typing import Any

from ..units import format_gib


def _distributed() -> Any:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def rank_and_world() -> tuple[int, int]:
    dist = _distributed()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def gather(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``row``, in rank order (``[row]`` without a process group)."""
    dist = _distributed()
    if dist is None:
        return [row]
    rows: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    return rows


def _size(value: Any) -> str:
    return format_gib(value) if isinstance(value, (int, float)) else "-"


def render(rows: list[dict[str, Any]]) -> str:
    """The per-rank table: card, predicted peak, measured peak reserved / allocated / NVML, headroom."""
    header = ("rank", "card", "predicted peak", "peak reserved", "peak allocated", "NVML used", "headroom")
    table = [header]
    for row in rows:
        total, measured = row.get("total_bytes"), row.get("peak_reserved_bytes")
        worst = measured if measured is not None else row.get("predicted_peak_bytes")
        headroom = total - worst if total is not None and worst is not None else None
        table.append((str(row.get("rank", "?")), str(row.get("card") or "-"), _size(row.get("predicted_peak_bytes")),
                      _size(measured), _size(row.get("peak_allocated_bytes")), _size(row.get("nvml_used_bytes")),
                      ("+" if headroom is not None and headroom >= 0 else "") + _size(headroom)))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    reasons = sorted({reason for row in rows for reason in (row.get("reasons") or {}).values()})
    return "\n".join(lines + [f"({reason})" for reason in reasons])
