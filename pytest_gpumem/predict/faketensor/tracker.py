"""Live-storage accounting for FakeTensor runs: a light ``TorchDispatchMode``.

Every aten op's outputs are inspected; a storage seen for the first time is an allocation (views share their
base's storage and cost nothing). A weak reference on the storage object reports its release — torch keeps
one Python object per live storage (PyObject preservation), which is also what
``torch.distributed._tools.mem_tracker.MemTracker`` relies on. Sizes are rounded up to the CUDA caching
allocator's 512-byte granularity (``c10/cuda/CUDACachingAllocator.cpp``: ``kMinBlockSize = 512``).

Compared with MemTracker this does no per-module bookkeeping and no category inference while running: it
keeps an event log (allocation / release) and a record per allocation (region, module, op, shape, dtype),
and reconstructs the live set at any phase's peak afterwards. That makes it faster (MemTracker took 30–90 s per
full fine-tuning scenario where a tracker like this one took 5–10 s, docs/cpu-simulation.md) and lets the
caller attribute tensors to components with knowledge that only exists at the end of the run (which storages
became ``.grad``, which ones the optimizer holds).

FSDP2 (``torch.distributed.fsdp.fully_shard``) needs three more things, found by comparing this tracker with the
real CPU allocator under a fake process group (docs/distributed-simulation.md §2: 1.34× / 2.85× / 3.80×
over-count at N = 1 / 4 / 8 without them, equal with them; ``tests/test_simulate_rank.py`` holds it there):

* a DTensor's ``untyped_storage()`` reports the *global* size: its local tensor is what a rank holds, so
  wrapper subclasses are unwrapped to their inner tensors (as ``torch.distributed._tools.mem_tracker`` does);
* FSDP2 frees and re-gathers unsharded parameters with ``UntypedStorage.resize_(0)`` / ``resize_(n)``
  (``_fsdp_param.free_storage`` / ``alloc_storage``), which no TorchDispatchMode sees: while the tracker is
  active ``resize_`` is wrapped, and a resize is a release of the old size plus an allocation of the new one;
* ``_c10d_functional.wait_tensor`` returns its input in eager mode, but under FakeTensorMode on a new storage:
  it is an alias, not an allocation.

This module imports torch; the simulation's ``replay`` imports it, and the package imports ``replay`` only
when a simulation runs.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

#: CUDA caching allocator: every block is a multiple of 512 bytes (kMinBlockSize).
CUDA_BLOCK_BYTES = 512


def plain_tensors(tensor):
    """The plain tensors behind ``tensor``: itself, or a wrapper subclass's (DTensor: its local shard) inner
    tensors, recursively."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            inner = getattr(tensor, name)
            if isinstance(inner, torch.Tensor):
                yield from plain_tensors(inner)
    elif isinstance(tensor, torch.Tensor):
        yield tensor


def _wait_tensor_ops() -> tuple:
    ops = []
    for namespace in ("_c10d_functional", "c10d_functional"):
        packet = getattr(getattr(torch.ops, namespace, None), "wait_tensor", None)
        if packet is not None:
            try:
                ops.append(packet.default)
            except AttributeError:  # pragma: no cover - a torch build without the overload
                pass
    return tuple(ops)


def cuda_rounded(num_bytes: int) -> int:
    """Bytes the CUDA caching allocator hands out for a request of ``num_bytes`` (0 stays 0)."""
    if num_bytes <= 0:
        return 0
    return -(-num_bytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES


class AllocationRecord:
    """One storage: its rounded size and where it was created."""

    __slots__ = ("alloc_id", "num_bytes", "region", "module", "op", "shape", "dtype", "kind", "category", "key")

    def __init__(self, alloc_id, num_bytes, region, module, op, shape, dtype, kind, category, key):
        self.alloc_id = alloc_id
        self.num_bytes = num_bytes
        self.region = region  # the driver's label at allocation time ("forward", "head", "backward_layers", ...)
        self.module = module  # qualified name of the innermost module whose forward was running
        self.op = op  # aten overload that produced it ("mm.default"), or "registered"
        self.shape = shape  # of the first tensor seen on this storage
        self.dtype = dtype
        self.kind = kind  # "op", "registered" or "weight_cast" (an autocast copy of a registered parameter)
        self.category = category  # fixed category for registered storages, else None
        self.key = key

    def describe(self) -> str:
        where = self.module or self.region
        return f"{where}: {self.op} {tuple(self.shape)} {self.dtype}"


@dataclass
class PhaseMark:
    """Event-log positions of one phase: where it started and where its peak was reached."""

    name: str
    start_event: int
    peak_bytes: int
    peak_event: int  # number of events applied when the peak was reached
    end_event: int = -1


class LiveStorageTracker(TorchDispatchMode):
    """Counts live storages under a ``FakeTensorMode`` (enter the fake mode first, then this one)."""

    def __init__(self, round_bytes: bool = True):
        super().__init__()
        self.round_bytes = round_bytes
        self.records: list[AllocationRecord] = []
        self.events: list[int] = []  # alloc_id for an allocation, ~alloc_id for a release
        self.current_bytes = 0
        self.max_bytes = 0  # the largest current_bytes since the tracker was made (phases or not)
        self.region = "setup"
        self.module = ""
        self.num_ops = 0
        self._alloc_of_key: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._registered_keys: set[int] = set()
        self._phase: PhaseMark | None = None
        self.phases: dict[str, PhaseMark] = {}
        self._wait_ops = _wait_tensor_ops()
        self._saved_resize = None

    # -- bookkeeping ----------------------------------------------------------------------------
    def _track(self, storage, op: str, tensor, kind: str = "op", category: str | None = None) -> int:
        existing = self._alloc_of_key.get(storage._cdata)
        if existing is not None:
            return existing
        return self._new_record(storage, storage.nbytes(), op, tuple(tensor.shape),
                                str(tensor.dtype).replace("torch.", ""), kind, category)

    def _new_record(self, storage, raw_bytes: int, op, shape, dtype, kind, category, region=None,
                    module=None) -> int:
        num_bytes = cuda_rounded(raw_bytes) if self.round_bytes else raw_bytes
        alloc_id = len(self.records)
        key = storage._cdata
        self.records.append(AllocationRecord(alloc_id, num_bytes, self.region if region is None else region,
                                             self.module if module is None else module, op, shape, dtype,
                                             kind, category, key))
        self._alloc_of_key[key] = alloc_id
        self._refs[alloc_id] = weakref.ref(storage, lambda _ref, alloc_id=alloc_id: self._release(alloc_id))
        self.events.append(alloc_id)
        self.current_bytes += num_bytes
        if self.current_bytes > self.max_bytes:
            self.max_bytes = self.current_bytes
        phase = self._phase
        if phase is not None and self.current_bytes > phase.peak_bytes:
            phase.peak_bytes = self.current_bytes
            phase.peak_event = len(self.events)
        return alloc_id

    def _release(self, alloc_id: int) -> None:
        record = self.records[alloc_id]
        if self._alloc_of_key.get(record.key) == alloc_id:
            del self._alloc_of_key[record.key]
        self._refs.pop(alloc_id, None)
        self._registered_keys.discard(record.key)
        self.events.append(~alloc_id)
        self.current_bytes -= record.num_bytes

    def resized(self, storage) -> None:
        """``storage`` was just resized in place (FSDP2 frees an unsharded parameter with ``resize_(0)`` and
        re-gathers into it with ``resize_(n)``): the old size is released and the new one is a new allocation
        that keeps the old record's identity (op, shape, region, category). A storage the tracker never saw
        that grows from nothing is a new allocation of the current region."""
        key = storage._cdata
        old_id = self._alloc_of_key.get(key)
        raw_bytes = storage.nbytes()
        if old_id is None:
            if raw_bytes > 0:
                self._new_record(storage, raw_bytes, "resize_", (raw_bytes,), "uint8", "op", None)
            return
        old = self.records[old_id]
        registered = key in self._registered_keys
        self._release(old_id)
        if raw_bytes > 0:
            self._new_record(storage, raw_bytes, old.op, old.shape, old.dtype, old.kind, old.category,
                             region=old.region, module=old.module)
            if registered:
                self._registered_keys.add(key)

    def register(self, tensor: torch.Tensor, category: str, name: str) -> int:
        """Account a tensor created outside the mode (parameters, buffers) under a fixed category; a DTensor
        counts as its local shard."""
        alloc_id = -1
        for leaf in plain_tensors(tensor):
            storage = leaf.untyped_storage()
            alloc_id = self._track(storage, name, leaf, kind="registered", category=category)
            self._registered_keys.add(storage._cdata)
        return alloc_id

    def alloc_id(self, tensor: torch.Tensor) -> int | None:
        """The allocation that holds ``tensor``'s storage (a DTensor's: its local shard's), if it is live
        and tracked."""
        for leaf in plain_tensors(tensor):
            return self._alloc_of_key.get(leaf.untyped_storage()._cdata)
        return None

    # -- the dispatch hook ----------------------------------------------------------------------
    def __enter__(self):
        # FSDP2's resize_ is a method call on the storage, below any dispatch mode: wrap it while active
        tracker, original = self, torch.UntypedStorage.resize_
        self._saved_resize = original

        def resize_(storage, size):
            result = original(storage, size)
            tracker.resized(storage)
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        if self._saved_resize is not None:
            torch.UntypedStorage.resize_ = self._saved_resize
            self._saved_resize = None
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.num_ops += 1
        if func in self._wait_ops:
            return out  # an alias of its input (which was accounted when the collective produced it)
        kind = "op"
        # an autocast cast of a parameter (CPU and CUDA autocast both cast through aten._to_copy)
        if (func is torch.ops.aten._to_copy.default and args and isinstance(args[0], torch.Tensor)
                and not is_traceable_wrapper_subclass(args[0])
                and args[0].untyped_storage()._cdata in self._registered_keys):
            kind = "weight_cast"
        if type(out) is torch.Tensor or (isinstance(out, torch.Tensor) and not is_traceable_wrapper_subclass(out)):
            self._track(out.untyped_storage(), func.__name__, out, kind)
        else:
            for item in tree_flatten(out)[0]:
                if isinstance(item, torch.Tensor):
                    for leaf in plain_tensors(item):
                        self._track(leaf.untyped_storage(), func.__name__, leaf, kind)
        return out

    # -- phases ---------------------------------------------------------------------------------
    def begin_phase(self, name: str) -> None:
        """Start watching for ``name``'s peak; the bytes live right now count as its floor."""
        self._phase = PhaseMark(name, len(self.events), self.current_bytes, len(self.events))

    def end_phase(self) -> PhaseMark:
        phase = self._phase
        if phase is None:
            raise RuntimeError("end_phase() without begin_phase()")
        phase.end_event = len(self.events)
        self.phases[phase.name] = phase
        self._phase = None
        return phase

    def live_sets(self, event_positions: list[int]) -> dict[int, list[int]]:
        """The live allocation ids after the first ``n`` events, for each ``n`` in ``event_positions``
        (one replay of the log for all of them)."""
        wanted = sorted(set(event_positions))
        result: dict[int, list[int]] = {}
        live: dict[int, None] = {}
        applied = 0
        for position in wanted:
            for event in self.events[applied:position]:
                if event >= 0:
                    live[event] = None
                else:
                    live.pop(~event, None)
            applied = position
            result[position] = list(live)
        return result

    def close(self) -> None:
        """Drop the weak references (their callbacks would keep reporting after the run)."""
        self._refs.clear()
        self._alloc_of_key.clear()
        self._registered_keys.clear()


class ModuleNamer:
    """Global forward hooks that tell the tracker which module is running, and call ``on_pre(name, module)``
    for every module entered (the simulation uses it to notice recomputation during backward)."""

    def __init__(self, tracker: LiveStorageTracker, named_modules, on_pre=None):
        self.tracker = tracker
        self.names = {id(module): name for name, module in named_modules}
        self.on_pre = on_pre
        self._handles = []

    def __enter__(self):
        names, tracker, on_pre = self.names, self.tracker, self.on_pre

        def pre_hook(module, args):
            name = names.get(id(module))
            if name is not None:
                tracker.module = name
                if on_pre is not None:
                    on_pre(name, module)

        def post_hook(module, args, output):
            name = names.get(id(module))
            if name is not None:
                tracker.module = name.rpartition(".")[0]

        self._handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre_hook),
                         torch.nn.modules.module.register_module_forward_hook(post_hook)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False
