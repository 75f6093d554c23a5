"""``fit --gpus N``: the best launch of a setup on N GPUs — which sharding strategy (and offload) — with the
one-GPU :func:`~.fit.fit` search run under each.

Every launch uses all N GPUs (more ranks never need more memory per rank: every shard shrinks, the rest is per
process). A vLLM setup also tries where generation runs (:func:`generation_layouts`): colocated with T = 1 or 2,
or a `trl vllm-serve` server of T × D of the N GPUs beside N − T·D training ranks — the input's layout first, so
it is kept when it fits as well as another; each launch says how many GPUs each role needs.
:data:`LAUNCHES` lists them cheapest communication first. The launch is a dimension of its own, placed
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
from ..vllm_layout import server_gpus
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


#: server layouts fit tries, (T, D): vLLM's own GPUs taken from the N
SERVER_LAYOUTS = ((1, 1), (2, 1), (1, 2), (2, 2), (4, 1))
#: the layout keys a generation layout sets (the rest of the setup is the input's)
LAYOUT_KEYS = ("vllm_mode", "vllm_tensor_parallel_size", "vllm_server_tensor_parallel_size",
               "vllm_server_data_parallel_size")


@dataclass(frozen=True)
class LaunchFit:
    label: str
    setup: Any  # the input launched this way
    result: FitResult

    @property
    def gpus_per_role(self) -> dict[str, int]:
        """Training GPUs and vLLM server GPUs of this launch."""
        roles = {"training": self.setup.world_size}
        if self.setup.use_vllm and self.setup.vllm_mode == "server":
            roles["vllm_server"] = server_gpus(self.setup)
        return roles


def generation_layouts(setup: Any, gpus: int) -> list[tuple[str, dict[str, Any], int]]:
    """(label, layout changes, vLLM server GPUs) for a vLLM setup on ``gpus`` GPUs: the input's layout first, then
    colocate (T = 1, 2) on all of them, then a `trl vllm-serve` server of T × D GPUs beside the rest."""
    if not setup.use_vllm or not setup.backend_profile.vllm.server_mode:
        return [("", {}, server_gpus(setup))]
    none = {"vllm_server_tensor_parallel_size": None, "vllm_server_data_parallel_size": None,
            "vllm_server_gpu_memory_utilization": None, "vllm_server_gpu": None, "vllm_server_max_num_seqs": None,
            "vllm_server_max_num_batched_tokens": None}
    out = [("", {}, server_gpus(setup))]
    for tp in (1, 2):
        out.append((f"colocated vLLM T={tp}", {**none, "vllm_mode": "colocate", "vllm_tensor_parallel_size": tp}, 0))
    for tp, dp in SERVER_LAYOUTS:
        if tp * dp < gpus:
            out.append((f"vLLM server T={tp} D={dp}", {"vllm_mode": "server", "vllm_tensor_parallel_size": 1,
                                                      "vllm_server_tensor_parallel_size": tp,
                                                      "vllm_server_data_parallel_size": dp}, tp * dp))
    seen, unique = set(), []
    for label, changes, server in out:  # drop a layout equal to the input's
        values = {k: changes.get(k, getattr(setup, k)) for k in LAYOUT_KEYS}
        if values["vllm_mode"] == "colocate":
            values = {k: v for k, v in values.items() if not k.startswith("vllm_server")}
        key = tuple(sorted(values.items()))
        if key not in seen:
            seen.add(key)
            unique.append((label, changes, server))
    return unique


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
            data["gpus_per_role"] = self.chosen.gpus_per_role
        data["launches"] = [{"launch": f.label, "fits": f.result.fits, "peak_bytes": f.result.peak_bytes,
                             "gpus_per_role": f.gpus_per_role,
                             "changes": len(f.result.changes()) if f.result.fits else None} for f in self.launches]
        return data


def launch_changes(before: Any, after: Any) -> list[dict[str, Any]]:
    """The multi-GPU keys the launch changed (the fit's own changes exclude them)."""
    keys = ("world_size", "distributed", "offload_optimizer", "offload_params") + LAYOUT_KEYS
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
    for layout, changes, server in generation_layouts(base, gpus):
        # the input's own server takes its GPUs too; the training ranks get the rest
        training = gpus - server
        if training < 1:
            continue
        for label, distributed, knobs in LAUNCHES:
            try:
                launched = base.with_strategy(distributed, world_size=training, **knobs, **changes)
            except SetupError:
                continue  # e.g. a 4-bit base cannot be sharded by ZeRO-3 / FSDP, T does not divide the ranks
            name = f"{label} + {layout}" if layout else label
            result = fit(launched, gpu, headroom=headroom, keep=keep, alternatives=False)
            if result.closest is not None:  # no valid setup at all under this launch: not a launch
                tried.append(LaunchFit(name, launched, result))
    fitting = [f for f in tried if f.result.fits]
    def rank(f: LaunchFit) -> tuple:
        choice = f.result.best.choice
        return choice[:QUALITY_DIMENSIONS], tried.index(f), choice[QUALITY_DIMENSIONS:]

    chosen = min(fitting, key=rank) if fitting else None
    return GpusFitResult(base, gpus, tuple(tried), chosen)
