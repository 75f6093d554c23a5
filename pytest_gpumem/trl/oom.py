"""``with explain_oom(trainer): trainer.train()`` — when the OOM comes anyway, say what it was and re-raise.

The diagnosis is :func:`~pytest_gpumem.diagnose.explain.diagnose_exception` of the real exception (its message
and traceback: the phase is read from the frames) against the live setup: the one a bound
:class:`~pytest_gpumem.trl.callback.GpuMemCallback` built at the start of the run, else one read from the trainer
now (:func:`~pytest_gpumem.trl.live.setup_from_trainer`). The exception always propagates unchanged; a diagnosis
that fails itself is reported in one line and never hides the OOM.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator, TextIO

from ..diagnose.explain import diagnose_exception
from .callback import PREFIX, GpuMemCallback
from .live import setup_from_trainer


def _live_setup(trainer: Any) -> tuple[Any, Any]:
    """``(setup, gpu)`` of the trainer's GpuMemCallback when it started the run, else read from the trainer."""
    handler = getattr(trainer, "callback_handler", None)
    for callback in getattr(handler, "callbacks", ()):
        if isinstance(callback, GpuMemCallback) and callback.setup is not None:
            return callback.setup, callback.gpu
    setup, _notes = setup_from_trainer(trainer)
    return setup, None


@contextmanager
def explain_oom(trainer: Any, *, gpu: Any = None, stream: TextIO | None = None, levers: int = 5) -> Iterator[None]:
    """Catch an out-of-memory error of the block (``torch.OutOfMemoryError``, a CUDA "out of memory" error, vLLM's
    refusals), print its diagnosis against ``trainer``'s setup, and re-raise it. ``gpu`` overrides the card
    (default: the callback's, else the one the message prints)."""
    try:
        yield
    except Exception as exc:
        out = stream or sys.stderr
        try:
            setup, callback_gpu = _live_setup(trainer)
            diagnosis = diagnose_exception(exc, setup, gpu if gpu is not None else callback_gpu)
            if diagnosis is not None:
                text = diagnosis.render().splitlines()
                print("\n".join(PREFIX + line for line in _trim_levers(text, levers)), file=out, flush=True)
        except Exception as failure:  # the diagnosis must never replace the user's real error
            if diagnose_exception(exc) is not None:
                print(f"{PREFIX}could not diagnose the OOM against the setup: {type(failure).__name__}: {failure}",
                      file=out, flush=True)
        raise


def _trim_levers(lines: list[str], keep: int) -> list[str]:
    """The rendered diagnosis with only the first ``keep`` numbered levers."""
    out, numbered = [], 0
    for line in lines:
        if line.startswith("  ") and line.strip()[:1].isdigit():
            numbered += 1
            if numbered > keep:
                continue
        out.append(line)
    return out
