"""Generated docs tables are the output of their scripts (a table cannot drift from the code that makes it)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(script: str):
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_per_rank_table_is_the_scripts_output():
    text = (ROOT / "docs" / "distributed.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- per-rank-table:start -->\n(.*?)\n<!-- per-rank-table:end -->", text, re.S)
    assert found, "docs/distributed.md lost its per-rank table markers"
    assert found.group(1).strip() == _load("tools/per_rank_table.py").table().strip(), \
        "regenerate: python tools/per_rank_table.py"
