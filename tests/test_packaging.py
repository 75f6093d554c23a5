"""The wheel built from the repository holds every subpackage and the data files (a flat ``packages = [...]``
list in pyproject.toml once shipped without them)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_subpackage_and_the_data(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "pytest_gpumem", source / "pytest_gpumem",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (tmp_path / "dist").glob("pytest_gpumem-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    packages = sorted(str(init.parent.relative_to(source)) for init in (source / "pytest_gpumem").rglob("__init__.py"))
    assert len(packages) >= 12  # the package and its stage folders
    for package in packages:
        assert f"{package}/__init__.py" in names, f"{package} is missing from the wheel"
    modules = {str(path.relative_to(source)) for path in (source / "pytest_gpumem").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    data = {str(path.relative_to(source)) for pattern in ("*.json", "*.md")
            for path in (source / "pytest_gpumem" / "data").glob(pattern)}
    assert {"pytest_gpumem/data/models.json", "pytest_gpumem/data/gpus.json"} <= data <= names, sorted(data - names)
    [entry_points] = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[pytest11]\ngpumem = pytest_gpumem.plugin" in text and "gpumem = pytest_gpumem.cli:main" in text
