"""Who may import whom (README "Layout"), checked on the AST of every module of the package.

- a folder imports only the folders its row of :data:`MAY_IMPORT` names (the pipeline's arrows run one way);
- ``pytest`` is imported only in ``plugin/``, ``argparse`` only in ``cli/``, and nothing imports ``cli`` or ``trl``
  (the training-script callback: it imports transformers at its top);
- the measurement child never imports the runner that starts it;
- an intra-package import inside a function is allowed only when the module it imports is heavy (imports
  torch, transformers, ... at its top) or is listed in :data:`LAZY`, with why — never to dodge a cycle;
- the intra-package imports form no cycle (type-only imports under ``if TYPE_CHECKING:`` excepted).

The checker works on a ``{module name: source}`` mapping, so the self-tests below feed it planted violations.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "pytest_gpumem"
ROOT = Path(__file__).resolve().parent.parent
#: third-party packages that may only be imported lazily from light code (their import takes seconds)
HEAVY = {"torch", "transformers", "trl", "peft", "vllm", "unsloth", "pynvml", "deepspeed", "bitsandbytes",
         "accelerate", "datasets", "tokenizers"}
ROOT_LAYER = "vocabulary"
LAYERS = ("predict.analytic", "predict.faketensor", "predict", "measure", "diagnose", "compare", "report",
          "plugin", "cli", "trl")
EVERYTHING = {ROOT_LAYER, *LAYERS}
#: layer -> the layers (or single modules) it may import besides itself
MAY_IMPORT: dict[str, set[str]] = {
    ROOT_LAYER: set(),
    "predict": set(),
    "predict.analytic": {ROOT_LAYER},
    "predict.faketensor": {ROOT_LAYER},
    "measure": {ROOT_LAYER},
    "diagnose": {ROOT_LAYER, "predict.analytic", f"{PACKAGE}.measure.oom_message"},
    "compare": {ROOT_LAYER, "predict.analytic", "measure", "diagnose"},
    "report": {ROOT_LAYER},
    "plugin": EVERYTHING - {"cli", "trl"},
    "cli": EVERYTHING - {"plugin", "trl"},
    "trl": {ROOT_LAYER, "predict.analytic", "measure", "diagnose"},
    "facade": {ROOT_LAYER, "predict.analytic", "predict.faketensor"},
}
#: (importer, imported) pairs allowed inside a function though the imported module is light, and why. "The inert
#: plugin's import cost": every pytest run of an environment with pytest-gpumem installed imports the plugin (and
#: so the facade) with --gpu-budget off; goal < 30 ms over plain pytest (benchmarks/bench_plugin.py). Each figure:
#: median of 11 fresh processes of `import pytest, pytest_gpumem.plugin; import <module>` (the module's cost over
#: what the inert plugin imports), 2-core machine, load ≈ 1.
INERT = "the inert plugin's import cost"
LAZY = {(PACKAGE, f"{PACKAGE}.predict.faketensor"):
        "the facade's `simulate` (module __getattr__): the simulation is the [sim] extra's, kept off the "
        "plugin's import",
        **{(PACKAGE, f"{PACKAGE}.{module}"): f"the facade's names on first use (module __getattr__): {INERT}: {cost}"
           for module, cost in (("predict.analytic", "22 ms"), ("spec", "11 ms"), ("models", "2.9 ms"),
                                ("breakdown", "2.8 ms"), ("gpus", "2.3 ms"), ("units", "1.0 ms"))},
        (f"{PACKAGE}.plugin", f"{PACKAGE}.plugin.manager"): f"pytest_configure, a mode on: {INERT}: 37 ms",
        (f"{PACKAGE}.plugin", f"{PACKAGE}.plugin.defaults"): f"pytest_configure, a mode on: {INERT}: 15 ms",
        (f"{PACKAGE}.plugin.fixtures", f"{PACKAGE}.predict.analytic"): f"grpo_step's estimate: {INERT}: 22 ms",
        (f"{PACKAGE}.plugin.fixtures", f"{PACKAGE}.plugin.marker"): f"grpo_step's setup reader: {INERT}: 13 ms",
        (f"{PACKAGE}.plugin.fixtures", f"{PACKAGE}.record"): f"grpo_step's record: {INERT}: 13 ms",
        (f"{PACKAGE}.plugin.fixtures", f"{PACKAGE}.measure.block"): f"gpu_memory's tracker: {INERT}: 5.0 ms",
        (f"{PACKAGE}.plugin.state", f"{PACKAGE}.record"): f"StepResult.peak_bytes: {INERT}: 13 ms",
        (f"{PACKAGE}.plugin.mode", f"{PACKAGE}.measure.device"): f"the device probe, a mode asked for: {INERT}: 2.2 ms",
        (f"{PACKAGE}.report", f"{PACKAGE}.report.markdown"): f"WRITERS' md row, on first write: {INERT}: 15 ms",
        (f"{PACKAGE}.report", f"{PACKAGE}.report.html"): f"WRITERS' html row, on first write: {INERT}: 15 ms"}


def layer_of(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return "facade"
    if parts[0] == "predict" and len(parts) > 1:
        return f"predict.{parts[1]}"
    return parts[0] if parts[0] in LAYERS or len(parts) > 1 else ROOT_LAYER


def package_sources(root: Path = ROOT) -> dict[str, str]:
    """``{module name: source}`` of every module of the package (``pkg/__init__.py`` is ``pkg``)."""
    sources = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        sources[".".join(parts)] = path.read_text(encoding="utf-8")
    return sources


def _imports(module: str, source: str, modules: set[str]):
    """(imported module, top-level name, in a function, type-only) for every import of ``module``."""
    tree = ast.parse(source)
    is_package = f"{module}.__init__" in modules or any(m.startswith(module + ".") for m in modules)
    package = module.split(".") if is_package else module.split(".")[:-1]

    def visit(node, in_function: bool, type_only: bool):
        for child in ast.iter_child_nodes(node):
            function = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            guarded = type_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, alias.name.split(".")[0], in_function, type_only
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[:len(package) - child.level + 1] + (child.module.split(".") if child.module else [])
                    target = ".".join(base)
                else:
                    target = child.module or ""
                names = [f"{target}.{alias.name}" for alias in child.names]
                submodules = [name for name in names if name in modules]
                for name in submodules or [target]:
                    yield name, name.split(".")[0], in_function, type_only
            yield from visit(child, function, guarded)

    yield from visit(tree, False, False)


def violations(sources: dict[str, str]) -> list[str]:
    """Every broken rule of the module docstring, one line each (empty: the layout holds)."""
    modules = set(sources)
    imports = {module: list(_imports(module, source, modules)) for module, source in sources.items()}
    heavy = {module for module, found in imports.items()
             if any(top in HEAVY and not lazy and not typed for _, top, lazy, typed in found)}
    problems, edges = [], {module: set() for module in modules}
    for module, found in imports.items():
        layer = layer_of(module)
        for target, top, in_function, type_only in found:
            if top in ("pytest", "_pytest") and layer != "plugin":
                problems.append(f"{module} imports pytest (only plugin/ may)")
            if top == "argparse" and layer != "cli":
                problems.append(f"{module} imports argparse (only cli/ may)")
            if top != PACKAGE or target == module:
                continue
            if not type_only:
                edges[module].add(target)
            target_layer = layer_of(target)
            allowed = MAY_IMPORT[layer] | {layer}
            if target_layer not in allowed and not any(target.startswith(a) for a in allowed if "." in a):
                problems.append(f"{module} ({layer}) imports {target} ({target_layer})")
            if module.startswith(f"{PACKAGE}.measure.child") and target == f"{PACKAGE}.measure.runner":
                problems.append(f"{module} imports the runner that starts the child")
            if in_function and not type_only and target not in heavy and (module, target) not in LAZY:
                problems.append(f"{module} imports {target} inside a function, and {target} is not heavy")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(edges)]
    return problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected part of the import graph that has one (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:
                continue
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                part.append(member)
                if member == node:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


# -- the package ------------------------------------------------------------------------------------------
def test_the_package_keeps_its_layers():
    sources = package_sources()
    assert len(sources) > 50  # the walk found the tree
    assert violations(sources) == []


def test_every_module_has_a_layer_with_a_rule():
    for module in package_sources():
        assert layer_of(module) in MAY_IMPORT, module


# -- the checker fails on planted violations --------------------------------------------------------------------
def _planted(**planted: str) -> list[str]:
    sources = package_sources()
    sources.update({f"{PACKAGE}.{name.replace('__', '.')}": text for name, text in planted.items()})
    return violations(sources)


def test_a_planted_layer_violation_fails():
    found = _planted(report__bad="from ..plugin import manager\nfrom ..measure import runner\n")
    assert f"{PACKAGE}.report.bad (report) imports {PACKAGE}.plugin.manager (plugin)" in found
    assert f"{PACKAGE}.report.bad (report) imports {PACKAGE}.measure.runner (measure)" in found
    assert any("imports pytest_gpumem.cli" in p for p in _planted(compare__bad="from ..cli import main\n"))
    assert _planted(diagnose__ok="from ..measure.oom_message import parse_oom\n") == []
    assert _planted(diagnose__bad="from ..measure.runner import run\n") != []
    assert f"{PACKAGE}.plugin.bad (plugin) imports {PACKAGE}.trl.callback (trl)" in _planted(
        plugin__bad="from ..trl import callback\n")
    assert _planted(trl__ok="from ..diagnose.explain import diagnose\nfrom ..measure.nvml import nvml\n") == []
    assert _planted(trl__bad="from ..compare import checks\n") != []


def test_planted_pytest_argparse_and_child_imports_fail():
    assert _planted(predict__analytic__bad="import pytest\n") == [
        f"{PACKAGE}.predict.analytic.bad imports pytest (only plugin/ may)"]
    assert _planted(measure__bad="import argparse\n") == [f"{PACKAGE}.measure.bad imports argparse (only cli/ may)"]
    assert f"{PACKAGE}.measure.child.bad imports the runner that starts the child" in _planted(
        measure__child__bad="from ..runner import run\n")


def test_a_planted_function_level_import_fails_unless_the_target_is_heavy():
    lazy_light = "def f():\n    from ..spec import GRPOSetup\n    return GRPOSetup\n"
    assert _planted(compare__bad=lazy_light) == [
        f"{PACKAGE}.compare.bad imports {PACKAGE}.spec inside a function, and {PACKAGE}.spec is not heavy"]
    lazy_heavy = "def f():\n    from . import replay\n    return replay\n"  # replay imports torch at its top
    assert _planted(predict__faketensor__fine=lazy_heavy) == []
    type_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..plugin import manager\n"
    assert _planted(report__typed=type_only) != []  # a type-only import still keeps the layer rule


def test_a_planted_cycle_fails():
    sources = package_sources()
    sources[f"{PACKAGE}.units"] += "\nfrom .record import judged_peak\n"  # record imports units
    found = violations(sources)
    assert any(p.startswith("import cycle:") and f"{PACKAGE}.record" in p and f"{PACKAGE}.units" in p for p in found)
