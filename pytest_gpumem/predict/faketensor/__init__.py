"""Simulate one GRPO step of the real Hugging Face architecture on CPU, under ``FakeTensorMode``.

No weights, no memory, no GPU: the model is built from its config on ``meta`` (PEFT wraps it there), its
tensors are swapped for fake CPU tensors, and TRL's training step is replayed op for op while
:class:`~pytest_gpumem.predict.faketensor.tracker.LiveStorageTracker` accounts every live storage (rounded to
CUDA's 512-byte blocks). The result is a :class:`~pytest_gpumem.breakdown.Breakdown` with the same phases and
component names as :func:`pytest_gpumem.predict.analytic.estimate`, so the two can be compared component by
component (``tests/test_accuracy_matrix.py``; ``docs/accuracy.md``).

What is replayed (``step.py`` cites its sources):

* persistent: weights (the setup's dtype; NF4 linears for 4-bit bases), LoRA adapters (PEFT's dtypes, bf16
  for a quantised base as TRL casts them), AdamW states at steady state (created by one warm-up
  ``optimizer.step()`` before the measured step), the reference model when ``beta != 0`` without PEFT;
* scoring (when TRL runs one): the no-grad old/reference log-prob pass over ``b`` rows, checkpointing off;
* training: ``min(gradient_accumulation_steps, 2)`` micro-steps (the second one has the earlier gradients
  live) — forward under bf16 autocast with TRL's checkpointing (non-reentrant), the log-prob path of the
  setup's ``logits`` mode, the loss, ``backward()``;
* optimizer_step: ``clip_grad_norm_`` and ``optimizer.step()`` (fused / foreach AdamW as configured; bnb
  8-bit states are allocated with bitsandbytes' layout, its fused kernel allocates nothing).

Not simulated (and so absent from the breakdown; :func:`comparable_total` removes them from an estimate
before comparing): the CUDA context, the caching allocator's slack, vLLM, and the generation phase.

The stages: ``build`` (the models), ``step`` (the replayed step), ``attribution`` (live storages → components),
``fakes`` (stand-ins for CUDA-only code), ``tracker``; ``replay`` runs them. Importing this package imports no
torch: ``replay`` (and with it torch, transformers, peft and trl) is imported when a simulation runs.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ...breakdown import Breakdown, PeakJudgement
from ...errors import GpuMemError
from ...gpus import GPU, resolve_gpu
from ...models import ModelSpec
from ...spec import GRPOSetup
from .matrix import MATRIX, accuracy_matrix, reduced_config
from .ranks import GATHERED_PARAMS, UNSHARDED_GRADIENTS, WEIGHT_SYNC, ShardingPlan, plan_for
from .scope import (
    NOT_SIMULATED_COMPONENTS,
    SIMULATED_PHASES,
    SimulationError,
    check_supported,
    comparable_components,
    comparable_peak,
    comparable_total,
)

__all__ = ["GATHERED_PARAMS", "MATRIX", "NOT_SIMULATED_COMPONENTS", "SIMULATED_PHASES", "ShardingPlan",
           "Simulation", "SimulationError", "UNSHARDED_GRADIENTS", "WEIGHT_SYNC", "accuracy_matrix",
           "comparable_components", "comparable_peak", "comparable_total", "plan_for", "reduced_config",
           "run_simulation", "simulate", "simulate_rank"]



@dataclass(frozen=True)
class Simulation(PeakJudgement):
    """A simulated step: the breakdown, what was assumed, and the tensors alive at the peak."""

    peak_verb = "simulated"

    setup: GRPOSetup
    model: ModelSpec
    breakdown: Breakdown
    gpu: GPU | None
    assumptions: tuple[str, ...]
    warnings: tuple[str, ...]
    elapsed_seconds: float
    num_ops: int
    #: the rank of a multi-GPU job this breakdown is for (None: one GPU)
    sharding: ShardingPlan | None = None

    @property
    def largest_tensors(self) -> list[dict]:
        return [dict(t) for t in self.breakdown.largest_tensors]

    def peak_tensors(self) -> list[dict]:
        """The largest tensors alive at the peak phase's peak, largest first."""
        return [t for t in self.largest_tensors if t["phase"] == self.peak_phase]

    @property
    def largest_allocation_bytes(self) -> int:
        tensors = self.peak_tensors()
        return tensors[0]["bytes"] if tensors else 0

    @property
    def largest_allocation_name(self) -> str:
        tensors = self.peak_tensors()
        if not tensors:
            return "none"
        top = tensors[0]
        return f"{top['name']} {tuple(top['shape'])} {top['dtype']}"

    def summary(self) -> str:
        # the simulated peak has no CUDA context, allocator slack or vLLM: judge a real card with the estimate
        return f"{super().summary()} ({self.elapsed_seconds:.1f} s, {self.num_ops} ops)"

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``gpumem estimate`` (same keys) plus ``largest_tensors`` and the run's cost."""
        data = {"source": "simulate", **super().to_dict(), "largest_tensors": self.largest_tensors,
                "elapsed_seconds": round(self.elapsed_seconds, 3), "num_ops": self.num_ops}
        if self.sharding is not None:
            plan = self.sharding
            data["rank"] = {"rank": plan.rank, "world_size": plan.world_size, "distributed": plan.strategy,
                            "reshard_after_forward": plan.reshard_after_forward, "fsdp_wrap": plan.fsdp_wrap}
        return data



def simulate(setup: GRPOSetup | Mapping | str | Path, gpu: str | int | GPU | None = None) -> Breakdown:
    """The simulated per-phase breakdown of ``setup`` (``source="simulate"``). ``gpu`` is accepted for
    symmetry with :func:`~pytest_gpumem.predict.analytic.estimate`; the breakdown does not depend on it.
    A multi-GPU setup (``world_size`` > 1 or ``distributed``) gives rank 0's breakdown (:func:`simulate_rank`)."""
    return run_simulation(setup, gpu=gpu).breakdown


def simulate_rank(setup: GRPOSetup | Mapping | str | Path, world_size: int | None = None,
                  strategy: str | None = None, reshard_after_forward: bool | None = None,
                  fsdp_wrap: str | None = None, rank: int = 0) -> Breakdown:
    """Rank ``rank``'s breakdown of a ``world_size``-process ``strategy`` job (each argument defaults to the
    setup's own key): the step replayed on CPU under a fake process group, the policy wrapped by accelerate's
    FSDP2, the reference by TRL's root-only wrap, and TRL's weight sync to vLLM when ``use_vllm``. Only
    ``"fsdp2"`` is traced; ZeRO and DDP raise :class:`SimulationError` pointing to the estimate. A one-GPU
    setup given a ``world_size`` is simulated as FSDP2."""
    setup = GRPOSetup.coerce(setup)
    if strategy is None:
        strategy = setup.distributed if setup.distributed not in (None, "none") else "fsdp2"
    return run_simulation(setup, world_size=world_size, strategy=strategy,
                          reshard_after_forward=reshard_after_forward, fsdp_wrap=fsdp_wrap, rank=rank).breakdown



def run_simulation(setup: GRPOSetup | Mapping | str | Path, gpu: str | int | GPU | None = None,
                   *, top_tensors: int = 10, progress: Callable[[str], None] | None = None,
                   world_size: int | None = None, strategy: str | None = None,
                   reshard_after_forward: bool | None = None, fsdp_wrap: str | None = None,
                   rank: int = 0) -> Simulation:
    """Simulate ``setup`` and return the breakdown with assumptions and the largest live tensors;
    ``progress(line)`` is told each stage as it starts (the imports, the model build, each traced phase). The
    multi-GPU arguments override the setup's keys (see :func:`simulate_rank`).

    Every failure is raised as :class:`SimulationError` (a :class:`~pytest_gpumem.errors.GpuMemError`): the
    simulation runs in-process, so it must never take its caller (a pytest worker) down with it."""
    setup = GRPOSetup.coerce(setup)
    resolved_gpu = resolve_gpu(gpu)
    spec = setup.model_spec
    check_supported(setup, spec)
    sharding = plan_for(setup, world_size=world_size, strategy=strategy,
                        reshard_after_forward=reshard_after_forward, fsdp_wrap=fsdp_wrap, rank=rank)
    started = time.perf_counter()
    state = None
    try:
        with warnings.catch_warnings():
            # transformers/PEFT deprecation notices about their own internal calls: nothing a user can act on
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            if progress is not None:
                progress("importing torch, transformers, peft and trl")
            from . import replay  # torch, transformers, peft and trl: imported when a simulation runs

            state = replay.Replay(setup, spec, top_tensors=top_tensors, progress=progress, sharding=sharding)
            breakdown = replay.run(state)
    except GpuMemError:
        raise
    except ImportError as exc:
        raise SimulationError("simulate", f"needs torch, transformers, peft and trl: {exc}",
                              fix="pip install 'pytest-gpumem[trl]' (CPU torch first), or use `gpumem estimate`"
                              ) from None
    except Exception as exc:  # noqa: BLE001 - any failure of a traced model becomes a clear error
        raise SimulationError(
            "simulate", f"the FakeTensor simulation of {spec.name} failed while "
                        f"{state.stage if state else 'starting'}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            fix="use `gpumem estimate` for this setup, and report the setup so the simulation can cover it"
        ) from exc
    elapsed = time.perf_counter() - started
    return Simulation(setup=setup, model=spec, breakdown=breakdown, gpu=resolved_gpu,
                      assumptions=tuple(state.assumptions), warnings=tuple(state.warnings),
                      elapsed_seconds=elapsed, num_ops=state.num_ops, sharding=sharding)
