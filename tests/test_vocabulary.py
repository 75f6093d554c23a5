"""The component vocabulary is complete everywhere it must be: every :class:`Component` has its colour in the
HTML report, and is either attributed by the FakeTensor simulation or listed as not simulated. Adding a
component without the rest fails here (README "Layout": where do I add a memory component)."""

from __future__ import annotations

import ast
from pathlib import Path

from pytest_gpumem.breakdown import Component
from pytest_gpumem.predict.faketensor import NOT_SIMULATED_COMPONENTS
from pytest_gpumem.report.html import COMPONENT_COLOURS

FAKETENSOR = Path(__file__).parents[1] / "pytest_gpumem" / "predict" / "faketensor"


def _components_named_in(*files: str) -> set[str]:
    """``Component.X`` members a module's code names (the simulation's attribution and its registered tensors)."""
    names = set()
    for name in files:
        for node in ast.walk(ast.parse((FAKETENSOR / name).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Component":
                names.add(node.attr)
    return names


def test_every_component_has_a_colour():
    assert {c.value for c in Component} <= set(COMPONENT_COLOURS)
    assert len(set(COMPONENT_COLOURS.values())) == len(COMPONENT_COLOURS)  # one colour each


def test_every_component_is_simulated_or_said_not_to_be():
    attributed = _components_named_in("attribution.py", "replay.py")
    assert attributed <= {c.name for c in Component}
    unaccounted = [c.value for c in Component if c.name not in attributed and c.value not in NOT_SIMULATED_COMPONENTS]
    assert unaccounted == []
    assert NOT_SIMULATED_COMPONENTS <= {c.value for c in Component}
