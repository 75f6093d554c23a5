"""Which rank of which multi-GPU job a simulation replays: the plan (world size, strategy, FSDP2's knobs) and the
setups it refuses. Torch-free: the CLI and the plugin read it without starting a simulation.

A simulation of rank ``r`` of ``N`` runs in one CPU process under a *fake* process group
(``torch.testing._internal.distributed.fake_pg``: every collective returns at once, every buffer it needs is
still allocated), so the rank's tensors — its shards, the all-gathered units, the reduce-scatter inputs — are
exactly those of the real job (docs/distributed-simulation.md §2). Only FSDP2 is traced: ZeRO lives in
DeepSpeed's own engine (its flat buffers and bucket allocations happen in DeepSpeed, not in the step we replay)
and DDP's reducer allocates its buckets in C++ outside any dispatch mode; both are estimated analytically.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...breakdown import Component
from .scope import SimulationError

#: the strategies this module knows, as ``GRPOSetup.distributed`` spells them
TRACED_STRATEGIES = ("fsdp2",)
ANALYTIC_STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp1")
FSDP_WRAPS = ("transformer_layer", "none")

#: Components of a sharded rank that a single GPU does not have (names in the breakdown; bytes of this rank),
#: the per-rank estimate's own names so that the two compare by name:
#: FSDP2's all-gathered units in ``param_dtype`` with their all-gather buffers (the root-only reference model
#: gathers all of itself at once) ...
GATHERED_PARAMS = Component.GATHERED_PARAMS.value
#: ... a unit's full-size gradients before its reduce-scatter (accumulated across micro-steps under no_sync)
#: and the reduce-scatter's input/output buffers ...
UNSHARDED_GRADIENTS = Component.REDUCE_BUCKETS.value
#: ... and the full parameter TRL's FSDP2 weight sync to vLLM gathers (``full_tensor()``, one at a time).
WEIGHT_SYNC = Component.WEIGHT_SYNC.value
#: the tracker regions fsdp.py sets while FSDP2 gathers / reduces, and replay.py while TRL syncs vLLM
ALL_GATHER_REGION = "fsdp_all_gather"
REDUCE_SCATTER_REGION = "fsdp_reduce_scatter"
WEIGHT_SYNC_REGION = "weight_sync"


@dataclass(frozen=True)
class ShardingPlan:
    """Rank ``rank`` of a ``world_size``-process ``strategy`` job (FSDP2: accelerate's wrap and TRL's
    reference-model wrap, see ``fsdp.py``)."""

    world_size: int
    strategy: str = "fsdp2"
    reshard_after_forward: bool = True
    fsdp_wrap: str = "transformer_layer"
    rank: int = 0
    #: where the fake process group's tensors live: "cpu" (the simulation) or "cuda" (a real measurement of
    #: one rank on one GPU, ``measure.rank``)
    device: str = "cpu"

    def describe(self) -> str:
        knobs = "" if self.reshard_after_forward else ", reshard_after_forward=False"
        wrap = "" if self.fsdp_wrap == "transformer_layer" else ", fsdp_wrap='none'"
        return f"rank {self.rank} of {self.world_size} ({self.strategy}{knobs}{wrap})"


def plan_for(setup, world_size: int | None = None, strategy: str | None = None,
             reshard_after_forward: bool | None = None, fsdp_wrap: str | None = None,
             rank: int = 0) -> ShardingPlan | None:
    """The plan for ``setup`` (its ``world_size`` / ``distributed`` / ``reshard_after_forward`` / ``fsdp_wrap``
    keys), each overridable; ``None`` for a single-GPU setup. Raises :class:`SimulationError` for what the
    simulation does not trace, naming the field and the fix."""
    world = world_size if world_size is not None else getattr(setup, "world_size", None) or 1
    chosen = strategy if strategy is not None else getattr(setup, "distributed", None)
    if chosen in (None, "none"):
        chosen = "none" if world == 1 else "ddp"
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise SimulationError("world_size", f"must be a whole number ≥ 1, got {world!r}", fix="e.g. world_size=8")
    if chosen == "none":
        return None
    if chosen in ANALYTIC_STRATEGIES:
        why = {"ddp": "DDP's reducer allocates its gradient buckets in C++, outside what a dispatch mode sees",
               "fsdp1": "FSDP1's flat parameters are not traced (accelerate and TRL default to FSDP2 for new "
                        "configs)"}.get(chosen, "ZeRO's partitions and buckets live in DeepSpeed's engine, not in "
                                                "the step the simulation replays")
        raise SimulationError("distributed", f"distributed={chosen!r} is not simulated: {why}",
                              fix="use `gpumem estimate` (its per-rank breakdown models it), or simulate "
                                  "distributed='fsdp2'")
    if chosen not in TRACED_STRATEGIES:
        raise SimulationError("distributed", f"{chosen!r} is not a strategy the simulation knows",
                              fix="use 'fsdp2', or `gpumem estimate` for ddp / zero1-3 / fsdp1")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise SimulationError("rank", f"must be in 0..{world - 1}, got {rank!r}", fix="e.g. rank=0")
    reshard = reshard_after_forward if reshard_after_forward is not None else getattr(
        setup, "reshard_after_forward", None)
    wrap = fsdp_wrap if fsdp_wrap is not None else getattr(setup, "fsdp_wrap", None) or "transformer_layer"
    if wrap not in FSDP_WRAPS:
        raise SimulationError("fsdp_wrap", f"{wrap!r} is not one of {', '.join(FSDP_WRAPS)}",
                              fix="'transformer_layer' (one unit per decoder layer) or 'none' (the root only)")
    if getattr(setup, "offload_params", False):
        raise SimulationError("offload_params", "FSDP2's CPUOffloadPolicy is not simulated (the shards would "
                              "live in host memory)", fix="use `gpumem estimate`, or offload_params=false")
    if getattr(setup, "load_in_4bit", False):
        raise SimulationError("load_in_4bit", "a 4-bit base under FSDP2 is not simulated",
                              fix="use `gpumem estimate`")
    return ShardingPlan(world_size=world, strategy=chosen,
                        reshard_after_forward=True if reshard is None else bool(reshard), fsdp_wrap=wrap, rank=rank)
