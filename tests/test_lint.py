"""ruff (pycodestyle, pyflakes, import sorting, bugbear; pyproject.toml [tool.ruff]) is clean on everything the
project ships and tests: it runs in CI through the README's test command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("pytest_gpumem", "tests", "benchmarks", "examples", "tools", "conftest.py")


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *CHECKED], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert "No module named ruff" not in result.stderr, "ruff is in the test extra: pip install -e '.[test]'"
    assert result.returncode == 0, result.stdout + result.stderr
