"""``GpuMemCallback``: the worst step predicted before the first one, every step measured against it.

Where each part hooks into transformers 5.25 / trl 1.16 (read in their source):

- **before the first generation**: ``on_train_begin`` is the last callback event before the loop
  (``Trainer._inner_training_loop`` calls it after building the optimizer); GRPO generates inside
  ``training_step`` (``_prepare_inputs`` → ``_generate_and_score_completions``), so raising there is the only way
  to stop before any generation.
- **the trainer**: callbacks receive the model, optimizer and dataloaders, not the trainer. The callback finds it
  on the call stack (the ``Trainer`` whose ``callback_handler`` holds this callback), or is told:
  ``GpuMemCallback().bind(trainer)``.
- **per step**: ``on_step_begin`` / ``on_step_end`` bracket one optimizer step (all its micro-steps and, for GRPO,
  its generation); the peaks are reset at the start (``torch.cuda.reset_peak_memory_stats``).
- **log keys**: ``Trainer.log`` appends ``{**logs, "step": …}`` to ``state.log_history`` and then calls
  ``on_log(logs)`` on every callback in list order; the reporting callbacks (wandb, tensorboard, trackio, …) come
  before user callbacks (``default_callbacks + callbacks``). So the callback moves itself right after
  ``DefaultFlowCallback`` in the handler's list and writes its ``gpumem/*`` keys into both ``logs`` and
  ``state.log_history[-1]``: every reporter after it plots them with no extra code.

Values are logged in GiB (``gpumem/peak_reserved_gib``); a value that is not measured (no CUDA device, no NVML)
is left out of the logs — tensorboard's ``add_scalar`` rejects ``None`` — and its reason is in ``reasons`` and in
the per-step records (:attr:`GpuMemCallback.steps`).
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, TextIO

from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from ..diagnose.levers import levers_for, no_lever_text
from ..errors import GpuMemError
from ..gpus import resolve_gpu
from ..measure.nvml import nvml_handle, nvml_memory
from ..measure.snapshot import torch_device_uuid
from ..predict.analytic import Estimate, estimate
from ..predict.analytic.constants import CUDA_CONTEXT_BYTES
from ..spec import GRPOSetup
from ..units import GIB, format_gib
from . import live, ranks
from .slope import MIN_STEPS, SlopeWatch, prior_slope

PREFIX = "gpumem: "
NO_CUDA = "not measured: no CUDA device"
#: TRL's per-step completion-length metric (trl 1.16 ``_generate_and_score_completions``: the longest completion of
#: the generation batch, averaged over the steps of a logging interval)
COMPLETION_MAX_KEY = "completions/max_length"
_MEASURED = ("peak_reserved_bytes", "peak_allocated_bytes", "nvml_used_bytes")


class PredictedOverrunError(GpuMemError):
    """``on_overrun="raise"``: the predicted peak does not fit the card; raised before any generation."""


@dataclass
class StepMemory:
    """What one logging interval measured (the largest of its steps), and why a field is missing."""

    step: int
    peak_reserved_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    #: NVML's device ``used`` at the end of the step: the caching allocator keeps the step's peak reserved, so
    #: this is the device-level figure (CUDA context, non-PyTorch memory and other processes included)
    nvml_used_bytes: int | None = None
    completion_max_tokens: float | None = None
    tokens_per_micro_batch: float | None = None
    reasons: dict = field(default_factory=dict)

    def merge(self, other: "StepMemory") -> None:
        for name in _MEASURED:
            value = getattr(other, name)
            if value is not None:
                setattr(self, name, max(value, getattr(self, name) or 0))
        self.reasons.update({k: v for k, v in other.reasons.items() if getattr(self, k) is None})
        self.step = other.step


class GpuMemCallback(TrainerCallback):
    """``GRPOTrainer(..., callbacks=[GpuMemCallback()])``: see the module docstring and README "In your training
    script".

    ``gpu``: judge against this card instead of the one the process is on (a name such as ``"L4"`` or a size such
    as ``"24GiB"``: "would this run fit an L4?"). ``on_overrun``: ``"warn"`` (default) or ``"raise"`` (stop in
    ``on_train_begin``, before any generation). ``setup``: a GRPOSetup / dict / file to estimate instead of the
    one read from the trainer; ``setup_overrides``: fields that win over the live ones (e.g. a
    ``max_prompt_length`` the dataset does not show). ``headroom``: the fraction of the card kept free when judging
    the fit and the levers. ``levers``: how many levers to print. ``stream``: where rank 0 prints (stdout).
    """

    def __init__(self, gpu: Any = None, *, on_overrun: str = "warn", setup: Any = None,
                 setup_overrides: Mapping[str, Any] | None = None, headroom: float = 0.0, levers: int = 3,
                 stream: TextIO | None = None):
        if on_overrun not in ("warn", "raise"):
            raise GpuMemError("on_overrun", f"{on_overrun!r} is not 'warn' or 'raise'",
                              fix="on_overrun='warn' prints and trains on; 'raise' stops before the first step")
        if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 0 <= headroom < 1:
            raise GpuMemError("headroom", f"must be a fraction in [0, 1), got {headroom!r}", fix="e.g. headroom=0.1")
        # user errors in the arguments surface here, in the user's own line, not at the start of training
        self.gpu_argument = resolve_gpu(gpu) if gpu is not None else None
        self.setup_argument = GRPOSetup.coerce(setup) if setup is not None else None
        self.on_overrun, self.headroom, self.num_levers = on_overrun, headroom, levers
        self.setup_overrides = dict(setup_overrides or {})
        self.stream = stream
        self.setup: GRPOSetup | None = None
        self.estimate: Estimate | None = None
        self.gpu = None  # the judged GPU (None: no card to judge against)
        self.notes: list[str] = []
        self.reasons: dict[str, str] = {}
        self.block: str | None = None
        self.steps: list[StepMemory] = []
        self.slope: SlopeWatch | None = None
        self.warning: str | None = None
        self.rank, self.world = 0, 1
        #: seconds spent in the per-step hooks (on_step_begin/end, on_log) and once in on_train_begin
        self.overhead_seconds = 0.0
        self.start_seconds = 0.0
        self._trainer: Any = None
        self._torch: Any = None
        self._device_index = 0
        self._nvml_handle: Any = None
        self._pending: StepMemory | None = None
        self._overhead_gap_bytes = 0
        self._overrun_line = ""
        self._any_rank_overruns = False

    # -- finding the trainer -------------------------------------------------------------------------------
    def bind(self, trainer: Any) -> "GpuMemCallback":
        """Use ``trainer`` (rather than finding it on the call stack); adds the callback to it if missing."""
        self._trainer = trainer
        handler = getattr(trainer, "callback_handler", None)
        if handler is not None and self not in handler.callbacks:
            trainer.add_callback(self)
        return self

    def _find_trainer(self) -> tuple[Any, Any]:
        """``(trainer, callback handler)`` holding this callback, from the bound trainer or the call stack."""
        trainer, handler = self._trainer, getattr(self._trainer, "callback_handler", None)
        frame = inspect.currentframe()
        while frame is not None and trainer is None:
            owner = frame.f_locals.get("self")
            callbacks = getattr(owner, "callbacks", None)
            if handler is None and isinstance(callbacks, list) and any(cb is self for cb in callbacks):
                handler = owner
            found = getattr(owner, "callback_handler", None)
            if found is not None and any(cb is self for cb in getattr(found, "callbacks", ())):
                trainer, handler = owner, found
            frame = frame.f_back
        del frame
        return trainer, handler

    def _move_after_default_flow(self, handler: Any) -> None:
        """Put this callback right after DefaultFlowCallback, so reporters after it log its keys (module docstring).
        Called during the handler's loop over the list: moving an element from i to j < i keeps the loop's next
        index pointing at the element after i, so no callback is skipped or called twice."""
        callbacks = getattr(handler, "callbacks", None)
        if not isinstance(callbacks, list) or self not in callbacks:
            return
        flow = next((i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), -1)
        if callbacks.index(self) > flow + 1:
            callbacks.remove(self)
            callbacks.insert(flow + 1, self)

    # -- before the first step -----------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        started = time.perf_counter()
        trainer, handler = self._find_trainer()
        self._move_after_default_flow(handler)
        try:
            self.start(trainer, args=args, model=model, optimizer=optimizer)
        except Exception as exc:
            if self.on_overrun == "raise":  # asked to stop unless the run is known to fit: it is not known
                raise
            # a guard must not be what kills the run: say why there is no estimate, and train on unmeasured
            self.setup, self.estimate, self._torch = None, None, None
            self._print(f"{PREFIX}cannot estimate this run ({type(exc).__name__}: {exc}); training continues "
                        "without GpuMemCallback (on_overrun='raise' stops instead)")
            return control
        self.start_seconds = time.perf_counter() - started
        if self.on_overrun == "raise" and self._any_rank_overruns:
            raise PredictedOverrunError("setup", self._overrun_line, fix="apply a lever above (each is re-estimated), "
                                        "or pass GpuMemCallback(on_overrun='warn') to train anyway")
        return control

    def start(self, trainer: Any = None, *, args: Any = None, model: Any = None, optimizer: Any = None) -> str:
        """Build the setup, judge it against the card and print the start-of-run block (rank 0); returns the block.
        Called by ``on_train_begin``; callable alone to see the block without training."""
        trainer = trainer if trainer is not None else self._trainer
        self._trainer = trainer
        args = args if args is not None else getattr(trainer, "args", None)
        self.rank, self.world = ranks.rank_and_world()
        if self.setup_argument is not None:
            self.setup = GRPOSetup.coerce(self.setup_argument)
            if self.setup_overrides:
                self.setup = self.setup.replace(**self.setup_overrides)
            self.notes = ["setup given to the callback (not read from the trainer)"]
        else:
            self.setup, self.notes = live.setup_from_trainer(trainer, args=args, model=model, optimizer=optimizer,
                                                             overrides=self.setup_overrides)
        device = getattr(args, "device", None)
        self._init_device(device)
        self.gpu, seen = live.judged_gpu(self.gpu_argument, device)
        if self.gpu is None:
            self.notes.append(f"no card to judge against ({seen.get('reason')}): pass GpuMemCallback(gpu='L4') "
                              "or a size such as gpu='24GiB'")
        self.estimate = estimate(self.setup, self.gpu)
        self.slope = SlopeWatch(prior_slope(self._peak_at, self.setup.max_completion_length,
                                            self.setup.per_device_train_batch_size))
        own = self._start_lines(seen)
        rows = ranks.gather({"rank": self.rank, "card": self.gpu.name if self.gpu else None,
                             "total_bytes": self.gpu.total_bytes if self.gpu else None,
                             "predicted_peak_bytes": self.estimate.peak_bytes, "fits": self._fits()})
        self._any_rank_overruns = any(row["fits"] is False for row in rows)
        if len(rows) > 1:
            own.append("per rank (predicted):")
            own.extend("  " + line for line in ranks.render(rows).splitlines())
        self.block = "\n".join(PREFIX + line for line in own)
        self._print(self.block)
        return self.block

    def _peak_at(self, completion_length: int) -> int:
        return estimate(self.setup.replace(max_completion_length=completion_length), self.gpu).peak_bytes

    def _fits(self) -> bool | None:
        return None if self.gpu is None else self.estimate.fits(headroom=self.headroom)

    def _start_lines(self, seen: Mapping[str, Any]) -> list[str]:
        est, setup = self.estimate, self.setup
        lines = [f"predicted peak {format_gib(est.peak_bytes)} in the {est.peak_phase} phase (the worst step: "
                 f"completions of max_completion_length {setup.max_completion_length} tokens, prompts of "
                 f"{setup.max_prompt_length})"]
        if self.gpu is not None:
            headroom = self.gpu.total_bytes - est.peak_bytes
            sign = "+" if headroom >= 0 else ""
            lines.append(f"card: {self.gpu.name} ({format_gib(self.gpu.total_bytes)}), headroom {sign}"
                         f"{format_gib(headroom)}" + (f", free now {format_gib(seen['free_bytes'])}"
                                                      if "free_bytes" in seen else ""))
        lines.append(f"largest single allocation: {est.largest_allocation_name} = "
                     f"{format_gib(est.largest_allocation_bytes)}")
        top = ", ".join(f"{name} {format_gib(num)}" for name, num in est.breakdown.top_components(est.peak_phase, 4))
        lines.append(f"{est.peak_phase} phase: {top}")
        lines.extend(f"note: {note}" for note in self.notes + list(est.warnings))
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.reasons.items():
            by_reason.setdefault(reason, []).append(f"gpumem/{name.replace('_bytes', '_gib')}")
        lines.extend(f"per step, {reason}: {', '.join(keys)} left out of the logs"
                     for reason, keys in by_reason.items())
        if self._fits() is False:
            self._overrun_line = (f"predicted peak {format_gib(est.peak_bytes)} does not fit {self.gpu.name} "
                                  f"({format_gib(self.gpu.total_bytes)}"
                                  + (f" less {self.headroom:.0%} headroom" if self.headroom else "")
                                  + f"): short by {format_gib(est.peak_bytes - self._budget_bytes())}")
            lines.append(f"WILL NOT FIT: {self._overrun_line}")
            lines.extend(self._lever_lines(self._budget_bytes()))
            if self.on_overrun == "warn":
                lines.append("training anyway (on_overrun='warn'); GpuMemCallback(on_overrun='raise') stops here")
        return lines

    def _budget_bytes(self) -> float:
        return self.gpu.total_bytes * (1 - self.headroom)

    def _lever_lines(self, budget_bytes: float, excess_bytes: float = 0.0) -> list[str]:
        levers = levers_for(self.estimate, budget_bytes=int(budget_bytes - excess_bytes), n=self.num_levers)
        if not levers:
            return [no_lever_text(self.estimate.peak_bytes)]
        head = "top levers (each re-estimated" + (f"; 'fits' counts the measured {format_gib(excess_bytes)} above the "
                                                  "estimate" if excess_bytes else "") + "):"
        return [head] + [f"  {i}. {lever.line()}" for i, lever in enumerate(levers, 1)]

    # -- every step ----------------------------------------------------------------------------------------
    def _init_device(self, device: Any) -> None:
        torch = sys.modules.get("torch")
        cuda = torch is not None and getattr(device, "type", None) == "cuda" and torch.cuda.is_available()
        self._torch = torch if cuda else None
        if not cuda:
            self.reasons = {name: NO_CUDA for name in _MEASURED}
            return
        self._device_index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = torch_device_uuid(torch, self._device_index)
        handle, _, reason = nvml_handle(self._device_index, uuid=uuid)
        if handle is None and uuid is not None:  # e.g. a MIG UUID this driver cannot look up: match by index
            handle, _, reason = nvml_handle(self._device_index)
        self._nvml_handle = handle
        self.reasons = {} if handle is not None else {"nvml_used_bytes": f"not measured: {reason or 'no NVML'}"}

    def on_step_begin(self, args, state, control, **kwargs):
        if self._torch is not None:
            started = time.perf_counter()
            self._torch.cuda.reset_peak_memory_stats(self._device_index)
            self.overhead_seconds += time.perf_counter() - started

    def on_step_end(self, args, state, control, **kwargs):
        started = time.perf_counter()
        record = StepMemory(state.global_step, reasons=dict(self.reasons))
        torch = self._torch
        if torch is not None:
            record.peak_reserved_bytes = int(torch.cuda.max_memory_reserved(self._device_index))
            record.peak_allocated_bytes = int(torch.cuda.max_memory_allocated(self._device_index))
            if self._nvml_handle is not None:
                info, reason = nvml_memory(self._nvml_handle)
                if info is not None:
                    record.nvml_used_bytes = int(info["used"])
                else:
                    record.reasons["nvml_used_bytes"] = f"not measured: {reason}"
        if self._pending is None:
            self._pending = record
        else:
            self._pending.merge(record)
        self.overhead_seconds += time.perf_counter() - started

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.setup is None or (self._pending is None and COMPLETION_MAX_KEY not in logs):
            return
        started = time.perf_counter()
        record, self._pending = self._pending or StepMemory(state.global_step, reasons=dict(self.reasons)), None
        completion = logs.get(COMPLETION_MAX_KEY)
        if isinstance(completion, (int, float)) and not math.isnan(completion):
            record.completion_max_tokens = float(completion)
            record.tokens_per_micro_batch = self.setup.per_device_train_batch_size * (
                self.setup.max_prompt_length + float(completion))
        self.steps.append(record)
        warning = None
        if record.peak_allocated_bytes is not None and record.tokens_per_micro_batch is not None:
            warning = self.observe_step(record.tokens_per_micro_batch, record.peak_allocated_bytes,
                                        record.peak_reserved_bytes, record.nvml_used_bytes)
        keys = self.log_keys(record)
        logs.update(keys)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step and not any(k in history[-1] for k in keys):
            history[-1].update(keys)
        self.overhead_seconds += time.perf_counter() - started
        if warning:
            self._print(warning)

    def log_keys(self, record: StepMemory) -> dict[str, float]:
        """The ``gpumem/*`` values of one logging interval (GiB floats; unmeasured values left out)."""
        keys: dict[str, float] = {"gpumem/predicted_peak_gib": self.estimate.peak_bytes / GIB}
        if self.gpu is not None:
            keys["gpumem/card_gib"] = self.gpu.total_bytes / GIB
        for name in _MEASURED:
            value = getattr(record, name)
            if value is not None:
                keys[f"gpumem/{name.replace('_bytes', '_gib')}"] = value / GIB
        if record.tokens_per_micro_batch is not None:
            keys["gpumem/tokens_per_micro_batch"] = record.tokens_per_micro_batch
        projected = self.projected_peak_bytes()
        if projected is not None:
            keys["gpumem/projected_peak_gib"] = projected / GIB
        return keys

    # -- the early warning ---------------------------------------------------------------------------------
    def observe_step(self, tokens_per_micro_batch: float, peak_allocated_bytes: int,
                     peak_reserved_bytes: int | None = None, nvml_used_bytes: int | None = None) -> str | None:
        """Add one measured step to the slope (:mod:`pytest_gpumem.trl.slope`); returns the warning the first time
        the projected peak at ``max_completion_length`` crosses the card, else None."""
        self.slope.observe(tokens_per_micro_batch, peak_allocated_bytes)
        if peak_reserved_bytes is not None:
            gap = peak_reserved_bytes - peak_allocated_bytes  # cached but unallocated: fragmentation
            # the device figure beyond PyTorch's reservation (CUDA context, other processes); the estimate's
            # CUDA context when NVML cannot say
            outside = nvml_used_bytes - peak_reserved_bytes if nvml_used_bytes is not None else CUDA_CONTEXT_BYTES
            gap += max(outside, 0)
        else:
            gap = CUDA_CONTEXT_BYTES
        self._overhead_gap_bytes = max(self._overhead_gap_bytes, gap)
        if self.warning is not None or self.gpu is None or len(self.slope.points) < MIN_STEPS:
            return None
        projected, limit = self.projected_peak_bytes(), self.gpu.total_bytes
        if projected is None or projected <= limit:
            return None
        self.warning = "\n".join(PREFIX + line for line in self._warning_lines(projected, limit))
        return self.warning

    def projected_peak_bytes(self) -> float | None:
        """The device peak the measured slope reaches at ``max_completion_length`` (None before a measurement)."""
        fit = self.slope.fit() if self.slope is not None else None
        if fit is None:
            return None
        return fit.at(self._max_tokens()) + self._overhead_gap_bytes

    def _max_tokens(self) -> int:
        s = self.setup
        return s.per_device_train_batch_size * (s.max_prompt_length + s.max_completion_length)

    def _warning_lines(self, projected: float, limit: int) -> list[str]:
        s, fit = self.setup, self.slope.fit()
        b, prompt = s.per_device_train_batch_size, s.max_prompt_length
        reach = fit.tokens_reaching(limit - self._overhead_gap_bytes)
        now = max(x for x, _ in self.slope.points) / b - prompt
        where = (f"when completions reach {max(math.ceil(reach / b - prompt), math.ceil(now))} tokens"
                 if reach is not None else "at any completion length")
        lines = [f"at the current slope this run reaches {projected / GIB:.2f} of {limit / GIB:.2f} GiB {where} "
                 f"(max_completion_length {s.max_completion_length}; longest completions so far {now:.0f})",
                 f"slope {fit.slope_bytes_per_token / 1024:.1f} KiB per micro-batch token over {fit.steps} steps, "
                 f"the estimate's {self.slope.prior_bytes_per_token / 1024:.1f} KiB as the prior (provisional)"]
        excess = max(0.0, projected - self.estimate.peak_bytes)
        return lines + self._lever_lines(limit * (1 - self.headroom), excess)

    # -- the end -------------------------------------------------------------------------------------------
    def on_train_end(self, args, state, control, **kwargs):
        if self.setup is None:
            return
        rows = ranks.gather(self.summary_row())
        if self.rank == 0:
            self._print(PREFIX + "measured per rank:\n" + "\n".join("  " + line
                                                                    for line in ranks.render(rows).splitlines()))

    def summary_row(self) -> dict[str, Any]:
        """This rank's largest measured values (what rank 0's summary lists)."""
        row: dict[str, Any] = {"rank": self.rank, "card": self.gpu.name if self.gpu else None,
                               "total_bytes": self.gpu.total_bytes if self.gpu else None,
                               "predicted_peak_bytes": self.estimate.peak_bytes if self.estimate else None,
                               "steps": len(self.steps), "reasons": dict(self.reasons)}
        for name in _MEASURED:
            values = [getattr(step, name) for step in self.steps if getattr(step, name) is not None]
            row[name] = max(values) if values else None
        return row

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block, "warning": self.warning, "steps": [asdict(step) for step in self.steps],
                "reasons": dict(self.reasons), "overhead_seconds": self.overhead_seconds,
                "start_seconds": self.start_seconds}

    def _print(self, text: str) -> None:
        if self.rank == 0:
            print(text, file=self.stream or sys.stdout, flush=True)
