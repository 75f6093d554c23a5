"""The early warning: from the steps measured so far, the peak this run reaches when completions hit
``max_completion_length``.

Memory of a GRPO step grows with the tokens of a training micro-batch, ``x = b × (P + C)`` (b =
per_device_train_batch_size, P = the prompt length, C = the longest completion of the batch: TRL pads the
completions of a batch to the longest, trl 1.16 ``_generate_and_score_completions``). The activations and the
log-prob tiles are linear in ``x`` (docs/memory-model.md §2.1 and §5); the rest of the step does not depend on it. So
the measured peak of step ``i`` is modelled as ``y_i = a + s · x_i``.

Early in a run every step has nearly the same ``x`` (completions start short and grow together), so a
least-squares slope from the measurements alone is undefined or noise. The estimate's own per-token slope
``s0`` (the analytic peak at two completion lengths, :func:`prior_slope`) is the prior: a ridge regression
pulls ``s`` towards ``s0`` with weight ``λ = (σ_y / σ_s)²`` —

    s = (Σ (x_i − x̄)(y_i − ȳ) + λ s0) / (Σ (x_i − x̄)² + λ),    a = ȳ − s x̄

with ``σ_y`` = :data:`MEASUREMENT_NOISE_BYTES` (how much the peak of two steps of the same ``x`` differs) and
``σ_s`` = :data:`PRIOR_WIDTH` × ``s0`` (how far the estimate's slope may be off). With all ``x_i`` equal the
slope is ``s0`` and the line passes through the measured level; as completions spread, the data take over.

PROVISIONAL: both widths are judgement, not fitted — no GPU run of a growing-completion job has been recorded
yet (README "Status"). Replace them from measured runs (the per-step ``gpumem/*`` logs give ``(x, y)`` pairs).
Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..units import MIB

#: σ_y: step-to-step spread of the measured peak at equal tokens. The caching allocator rounds large blocks
#: to 2 MiB and grows in 20 MiB segments (c10/cuda/CUDACachingAllocator.cpp kLargeBuffer / kRoundLarge);
#: fragmentation moves a peak by tens of MiB. 64 MiB: provisional, see the module docstring.
MEASUREMENT_NOISE_BYTES = 64 * MIB
#: σ_s / s0: the estimate's per-token slope is trusted to ±50% (provisional, see the module docstring).
PRIOR_WIDTH = 0.5
#: the smallest σ_s (bytes per token), so a setup whose estimate predicts no growth still lets data speak
MIN_PRIOR_SIGMA_BYTES_PER_TOKEN = 1024
#: steps measured before the warning may fire: the first step also allocates the optimizer states
MIN_STEPS = 2


def prior_slope(estimate_at, max_completion_length: int, tokens_per_completion_token: int) -> float:
    """The estimate's bytes per micro-batch token: ``(peak(C) − peak(C/2)) / (b × (C − C/2))``.

    ``estimate_at(completion_length)`` returns the predicted peak in bytes; ``tokens_per_completion_token`` is b
    (one more completion token adds b tokens to the micro-batch)."""
    high = max_completion_length
    low = max(1, high // 2)
    if high == low:
        return 0.0
    return max(0.0, (estimate_at(high) - estimate_at(low)) / (tokens_per_completion_token * (high - low)))


@dataclass
class SlopeFit:
    """``peak ≈ intercept_bytes + slope_bytes_per_token × tokens`` from ``steps`` measurements."""

    intercept_bytes: float
    slope_bytes_per_token: float
    steps: int

    def at(self, tokens: float) -> float:
        return self.intercept_bytes + self.slope_bytes_per_token * tokens

    def tokens_reaching(self, limit_bytes: float) -> float | None:
        """The micro-batch tokens at which the line reaches ``limit_bytes`` (None when it never grows)."""
        if self.slope_bytes_per_token <= 0:
            return None
        return (limit_bytes - self.intercept_bytes) / self.slope_bytes_per_token


@dataclass
class SlopeWatch:
    """Accumulates ``(tokens per micro-batch, measured peak bytes)`` and fits the ridge line of the module
    docstring around the prior slope ``prior_bytes_per_token``."""

    prior_bytes_per_token: float
    noise_bytes: float = MEASUREMENT_NOISE_BYTES
    prior_width: float = PRIOR_WIDTH
    points: list[tuple[float, float]] = field(default_factory=list)

    def observe(self, tokens: float, peak_bytes: float) -> None:
        self.points.append((float(tokens), float(peak_bytes)))

    @property
    def ridge_weight(self) -> float:
        """λ = (σ_y / σ_s)² in tokens²."""
        sigma_s = max(self.prior_width * self.prior_bytes_per_token, MIN_PRIOR_SIGMA_BYTES_PER_TOKEN)
        return (self.noise_bytes / sigma_s) ** 2

    def fit(self) -> SlopeFit | None:
        if not self.points:
            return None
        n = len(self.points)
        mean_x = sum(x for x, _ in self.points) / n
        mean_y = sum(y for _, y in self.points) / n
        sxx = sum((x - mean_x) ** 2 for x, _ in self.points)
        sxy = sum((x - mean_x) * (y - mean_y) for x, y in self.points)
        lam = self.ridge_weight
        slope = (sxy + lam * self.prior_bytes_per_token) / (sxx + lam)
        return SlopeFit(mean_y - slope * mean_x, slope, n)
