"""The one error type users can cause: it names the field, what was wrong, and the fix."""

from __future__ import annotations


class GpuMemError(ValueError):
    """A user-caused problem (bad size string, invalid setup, unknown model, ...).

    ``field`` is the name the user wrote (``per_device_train_batch_size``, ``gb``, ``model``) so
    messages, collection errors and the CLI can point at it; ``fix`` says what to do instead.
    """

    def __init__(self, field: str, problem: str, fix: str | None = None):
        self.field = field
        self.problem = problem
        self.fix = fix
        message = f"{self.shown_field}: {problem}"
        if fix:
            message += f" — fix: {fix}"
        super().__init__(message)


    @property
    def shown_field(self) -> str:
        """The field as printed: quoted when it holds control or line-break characters (a key like
        ``'a\x85b'`` would otherwise split or garble the one-line message)."""
        return self.field if self.field.isprintable() else repr(self.field)


class SetupError(GpuMemError):
    """An invalid GRPO setup (the TRL/Unsloth constraint it breaks is in the message)."""


class UnknownModelError(GpuMemError):
    """A model name that is neither in the registry, a local path, nor in the offline HF cache."""


class MarkerError(GpuMemError):
    """A ``gpu_budget`` marker argument (or a setup given to it) that cannot be used."""
