"""The estimator held to the FakeTensor simulation: |estimate − simulation| ≤ 5% of the simulation.

25 setups (``pytest_gpumem.simulate.accuracy_matrix("ci")``): Llama-, Qwen2-, Qwen3- and Gemma3-style blocks
with their real vocabulary, hidden size, heads and MLP width but 2–3 layers and short sequences; full
fine-tuning, LoRA (q/v and all-linear), QLoRA; checkpointing on and off; fp32 and bf16 weights; materialised
and chunked log-probs; sdpa, eager and FlashAttention; fused, foreach and 8-bit AdamW; b from 2 to 8;
gradient accumulation and scoring passes. Both sides are compared without what a simulation cannot see
(``comparable_total``: CUDA context, allocator slack, vLLM, batch buffers). The same setups at full size are
in docs/accuracy.md (``benchmarks/bench_simulate.py``).
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="the simulation needs torch (pip install 'pytest-gpumem[trl]')")
pytest.importorskip("transformers", reason="the simulation needs transformers")
pytest.importorskip("peft", reason="the simulation needs peft")
pytest.importorskip("trl", reason="the simulation needs trl")

from pytest_gpumem.breakdown import Phase  # noqa: E402
from pytest_gpumem.predict.analytic import estimate  # noqa: E402
from pytest_gpumem.predict.faketensor import (  # noqa: E402
    SIMULATED_PHASES,
    accuracy_matrix,
    comparable_peak,
    comparable_total,
    run_simulation,
)
from pytest_gpumem.spec import GRPOSetup  # noqa: E402
from pytest_gpumem.units import GIB  # noqa: E402

TOLERANCE = 0.05
MATRIX = accuracy_matrix("ci")


def test_matrix_covers_what_the_issue_asks_for():
    setups = [GRPOSetup.coerce(setup) for _, setup in MATRIX]
    assert len(setups) >= 20
    assert {s.model_spec.model_type for s in setups} >= {"llama", "qwen2", "qwen3", "gemma3_text"}
    assert {s.is_lora for s in setups} == {True, False}
    assert {bool(s.gradient_checkpointing) for s in setups} == {True, False}
    assert {s.dtype for s in setups} >= {"float32", "bfloat16"}
    assert {s.logits for s in setups} == {"materialized", "chunked"}
    assert len({s.per_device_train_batch_size for s in setups}) >= 3
    assert len({s.max_completion_length for s in setups}) >= 3
    # the reduced configs keep the real vocabulary and hidden sizes
    assert {s.model_spec.vocab_size for s in setups} >= {128256, 151936, 262144}


@pytest.mark.parametrize("name,setup", MATRIX, ids=[name for name, _ in MATRIX])
def test_estimate_within_5_percent_of_simulation(name, setup):
    simulation = run_simulation(setup)
    predicted = estimate(setup)
    assert set(simulation.breakdown.phases) <= set(SIMULATED_PHASES)
    assert Phase.TRAINING.value in simulation.breakdown.phases
    checks = {
        "training": (comparable_total(predicted.breakdown, "training"),
                     comparable_total(simulation.breakdown, "training")),
        "peak": (comparable_peak(predicted.breakdown), comparable_peak(simulation.breakdown)),
    }
    for what, (estimated, simulated) in checks.items():
        error = (estimated - simulated) / simulated
        assert abs(error) <= TOLERANCE, (
            f"{name}: {what} estimate {estimated / GIB:.3f} GiB vs simulation {simulated / GIB:.3f} GiB "
            f"({error:+.1%}); simulated components {simulation.breakdown.components('training')}, "
            f"estimated {predicted.breakdown.components('training')}; largest simulated tensors "
            f"{simulation.peak_tensors()[:5]}")
    # the persistent parts are exact: same weights, adapters and optimizer states
    for phase in ("persistent",):
        assert comparable_total(predicted.breakdown, phase) == pytest.approx(
            comparable_total(simulation.breakdown, phase), rel=0.01)
