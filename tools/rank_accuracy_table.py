"""The per-rank FSDP2 estimate against the rank simulation, as docs/distributed.md §9 prints it: for each case
of tests/test_rank_accuracy.py's grid, each phase's total ratio (estimate / simulation, without what a
simulation cannot see) and the worst component's ratio (components over 1% of the phase). Run:
``python tools/rank_accuracy_table.py`` (≈ 30 s on 2 cores)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _grid_module():
    spec = importlib.util.spec_from_file_location("rank_accuracy", ROOT / "tests" / "test_rank_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows() -> list[str]:
    from pytest_gpumem import estimate
    from pytest_gpumem.predict.faketensor import simulate
    from pytest_gpumem.predict.faketensor.scope import comparable_components

    grid = _grid_module()
    out = ["| model | method | N | persistent | training | optimizer step | worst component (phase) |",
           "|---|---|---|---|---|---|---|"]
    for model in grid.ARCHS:
        for method, keys in grid.METHODS.items():
            for n in grid.WORLD_SIZES:
                setup = grid._setup(model, grid.LAYERS, n, keys)
                sim, est = simulate(setup), estimate(setup).breakdown.role("rank0")
                totals, worst = {}, (1.0, "–")
                for phase in sim.phase_names():
                    s, e = comparable_components(sim, phase), comparable_components(est, phase)
                    total = sum(s.values())
                    totals[phase] = sum(e.values()) / total
                    for name in set(s) | set(e):
                        if max(s.get(name, 0), e.get(name, 0)) > 0.01 * total:
                            ratio = e.get(name, 0) / s[name] if s.get(name) else float("inf")
                            if abs(ratio - 1) > abs(worst[0] - 1):
                                worst = (ratio, f"{name} ({phase})")
                cells = [f"{totals.get(p, float('nan')):.4f}" for p in ("persistent", "training", "optimizer_step")]
                out.append(f"| {model.split('/')[-1]} | {method} | {n} | " + " | ".join(cells)
                           + f" | {worst[0]:.4f} {worst[1]} |")
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print("\n".join(rows()))
