"""``fit --gpus N``: the best launch of a setup on N GPUs — which sharding strategy (and offload) — with the
one-GPU :func:`~.fit.fit` search run under each.

Every launch uses all N GPUs (more ranks never need more memory per rank: every shard shrinks, the rest is per
process). :data:`LAUNCHES` lists them cheapest communication first. The launch is a dimension of its own, placed
between the quality dimensions of :data:`~.fit.QUALITY_ORDER` (completion length … optimizer) and its speed
dimensions (batch split, generation rounds, checkpointing, ...): training quality is kept first, then the
cheapest launch, then speed — so a setup that needs LoRA under DDP but trains fully under ZeRO-3 gets ZeRO-3,
and a batch split is preferred to offloading the optimizer (a CPU step is far slower than two micro-steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import GpuMemError, SetupError
from ..spec import GRPOSetup
from .fit import DEFAULT_KEEP, DIMENSIONS, FitResult, fit

#: how many of fit's dimensions are about training quality (the rest are about speed)
QUALITY_DIMENSIONS = DIMENSIONS.index("optim") + 1

#: (label, distributed, knobs): cheapest communication first
LAUNCHES: tuple[tuple[str, str, dict], ...] = (
    ("DDP", "ddp", {}),
    ("ZeRO-2", "zero2", {}),
    ("FSDP2", "fsdp2", {}),
    ("ZeRO-3", "zero3", {}),
    ("ZeRO-2 + optimizer offload", "zero2", {"offload_optimizer": True}),
    ("ZeRO-3 + optimizer offload", "zero3", {"offload_optimizer": True}),
    ("ZeRO-3 + optimizer and parameter offload", "zero3", {"offload_optimizer": True, "offload_params": True}),
)


@dataclass(frozen=True)
class LaunchFit:
    label: str
    setup: Any  # the input launched this way
    result: FitResult


@dataclass(frozen=True)
class GpusFitResult:
    """Every launch tried on ``gpus`` GPUs and the chosen one (None when none fits)."""

    input_setup: Any
    gpus: int
    launches: tuple
    chosen: LaunchFit | None

    @property
    def fits(self) -> bool:
        return self.chosen is not None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"gpus": self.gpus, "fits": self.fits,
                                "launch": self.chosen.label if self.chosen else None}
        if self.chosen:
            data.update(self.chosen.result.to_dict())
            data["changes"] = launch_changes(self.input_setup, self.chosen.setup) + data["changes"]
        data["launches"] = [{"launch": f.label, "fits": f.result.fits, "peak_bytes": f.result.peak_bytes,
                             "changes": len(f.result.changes()) if f.result.fits else None} for f in self.launches]
        return data


def launch_changes(before: Any, after: Any) -> list[dict[str, Any]]:
    """The multi-GPU keys the launch changed (the fit's own changes exclude them)."""
    keys = ("world_size", "distributed", "offload_optimizer", "offload_params")
    return [{"field": k, "from": getattr(before, k), "to": getattr(after, k)} for k in keys
            if getattr(before, k) != getattr(after, k)]


def fit_gpus(setup: Any, gpu: Any, gpus: int, headroom: float = 0.1,
             keep: Iterable[str] = DEFAULT_KEEP) -> GpusFitResult:
    """The best launch of ``setup`` on ``gpus`` GPUs of kind ``gpu`` (see the module docstring)."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise GpuMemError("gpus", f"must be a whole number ≥ 1, got {gpus!r}", fix="e.g. --gpus 8")
    base = GRPOSetup.coerce(setup)
    keep = tuple(keep)
    tried: list[LaunchFit] = []
    for label, distributed, knobs in LAUNCHES:
        try:
            launched = base.with_strategy(distributed, world_size=gpus, **knobs)
        except SetupError:
            continue  # e.g. a 4-bit base cannot be sharded by ZeRO-3 / FSDP
        tried.append(LaunchFit(label, launched, fit(launched, gpu, headroom=headroom, keep=keep,
                                                    alternatives=False)))
    fitting = [f for f in tried if f.result.fits]
    def rank(f: LaunchFit) -> tuple:
        choice = f.result.best.choice
        return choice[:QUALITY_DIMENSIONS], tried.index(f), choice[QUALITY_DIMENSIONS:]

    chosen = min(fitting, key=rank) if fitting else None
    return GpusFitResult(base, gpus, tuple(tried), chosen)
