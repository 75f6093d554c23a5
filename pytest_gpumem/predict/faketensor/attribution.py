"""Attribution: which component each storage alive at a phase's peak belongs to, and a readable name for it.

Identity first (parameters, ``.grad``s and optimizer state, known only at the end of the run), then what
created it (an autocast weight cast, the 4-D attention mask), then the region of the step it was born in. A
new memory component the simulation can see is attributed here (or listed in ``scope.NOT_SIMULATED_COMPONENTS``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...breakdown import PHASE_ORDER, Breakdown, Component
from .ranks import ALL_GATHER_REGION, REDUCE_SCATTER_REGION, WEIGHT_SYNC_REGION

if TYPE_CHECKING:  # the state of a run; replay.py imports torch
    from .replay import Replay


def tensor_name(record, grad_ids: dict, state_ids: dict) -> str:
    """A readable name: the parameter / gradient / optimizer state it is, else the module that created it
    (in backward: the region, and the last module entered — recomputation enters the layer's modules)."""
    if record.kind == "registered":
        return record.op
    if record.alloc_id in grad_ids:
        return grad_ids[record.alloc_id]
    if record.alloc_id in state_ids:
        return "optimizer state " + state_ids[record.alloc_id]
    if record.region.startswith("backward"):
        return f"{record.region} (after {record.module})" if record.module else record.region
    if record.kind == "weight_cast":
        return f"autocast copy in {record.module}"
    return record.module or record.region


def component(state: Replay, record, grad_ids: dict, state_ids: dict) -> str:
    """Which Component a live storage belongs to: identity first (parameters, gradients, optimizer state),
    then what created it (an autocast weight cast, the 4-D attention mask), then the region it was born in."""
    if record.category is not None:
        return record.category
    if record.alloc_id in grad_ids:
        return Component.GRADIENTS.value
    if record.alloc_id in state_ids:
        return Component.OPTIMIZER_STATES.value
    if record.kind == "weight_cast":
        return Component.WEIGHT_CASTS.value
    region = record.region
    if record.alloc_id in state.unsharded_grad_ids or region == REDUCE_SCATTER_REGION:
        return Component.REDUCE_BUCKETS.value  # a unit's unsharded gradients, the reduce-scatter's buffers
    if region == ALL_GATHER_REGION:
        return Component.GATHERED_PARAMS.value
    if region == WEIGHT_SYNC_REGION:
        return Component.WEIGHT_SYNC.value
    shape = record.shape
    if len(shape) == 4 and shape[1] == 1 and shape[-1] == shape[-2] == state.setup.seq_len:
        return Component.ATTENTION_MASK.value
    if region == "inputs":
        return Component.BATCH_BUFFERS.value
    if region in ("head", "backward_head"):
        return Component.LOGITS.value
    if region == "backward_layers":
        if shape and shape[-1] == state.spec.vocab_size:
            return Component.LOGITS.value
        return Component.RECOMPUTED_LAYER.value if state.setup.gradient_checkpointing else Component.ACTIVATIONS.value
    if region in ("optimizer", "optimizer_warmup"):
        return Component.OPTIMIZER_TEMP.value
    return Component.ACTIVATIONS.value


def breakdown(state: Replay, grad_ids: dict, state_ids: dict) -> Breakdown:
    """The tracker's live set at each phase's peak, by component, with the largest tensors of each phase."""
    tracker = state.tracker
    marks = list(tracker.phases.values())
    live = tracker.live_sets([mark.peak_event for mark in marks])
    phases: dict[str, dict[str, int]] = {}
    largest: list[dict] = []
    for mark in marks:
        components: dict[str, int] = {}
        records = [tracker.records[i] for i in live[mark.peak_event]]
        for record in records:
            name = component(state, record, grad_ids, state_ids)
            components[name] = components.get(name, 0) + record.num_bytes
        phases[mark.name] = components
        for record in sorted(records, key=lambda r: -r.num_bytes)[:state.top_tensors]:
            largest.append({"phase": mark.name, "name": tensor_name(record, grad_ids, state_ids),
                            "op": "parameter" if record.kind == "registered" else record.op,
                            "shape": list(record.shape), "dtype": record.dtype, "bytes": record.num_bytes,
                            "component": component(state, record, grad_ids, state_ids)})
    # SIMULATED_PHASES, and a sharded run's generation phase (its weight sync to vLLM)
    ordered = {p: phases[p] for p in PHASE_ORDER if p in phases}
    return Breakdown(phases=ordered, source="simulate", largest_tensors=tuple(largest))

