"""tools/wheelhouse.py without network: the requirement closure stops at what the image has, and the pip
commands ask for the target's Python and platform, wheels only, no dependencies."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "tools" / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheelhouse)

#: canned metadata (as pip's --report gives it) of a small world: trl → datasets, accelerate (in the image)…
METADATA = {
    "trl": ("trl", "1.16.0", ["accelerate>=1.10.1", "datasets>=4.7.0", "transformers>=4.56.2", "pandas"]),
    "datasets": ("datasets", "5.2.0", ["dill<0.4.2,>=0.3.0", "multiprocess<0.70.20", "xxhash", "pyarrow>=24.0.0",
                                       "fsspec", "tomli; python_version < '3.11'",
                                       "soundfile; extra == 'audio'"]),
    "dill": ("dill", "0.4.1", []),
    "multiprocess": ("multiprocess", "0.70.19", ["dill>=0.4.1"]),
    "xxhash": ("xxhash", "4.1.0", []),
    "pytest": ("pytest", "9.2.0", ["pluggy<2,>=1.5", "iniconfig>=1"]),
    "pluggy": ("pluggy", "1.7.0", []),
    "iniconfig": ("iniconfig", "2.3.1", []),
}


def fake_metadata(requirement: str):
    from packaging.requirements import Requirement

    return METADATA[wheelhouse.canonical(Requirement(requirement).name)]


def test_closure_stops_at_the_image_and_follows_markers():
    image = wheelhouse.read_freeze("torch==2.11.0\ntransformers==5.1.0\naccelerate==1.15.0\npandas==2.3.3\n"
                                   "pyarrow==24.0.0\nfsspec==2026.9.0\n-e git+https://x#egg=y\n")
    found = wheelhouse.missing_from_image(["trl==1.16.0", "pytest>=7.4"], image, fake_metadata, "3.12")
    assert found == ["datasets==5.2.0", "dill==0.4.1", "iniconfig==2.3.1", "multiprocess==0.70.19",
                     "pluggy==1.7.0", "pytest==9.2.0", "trl==1.16.0", "xxhash==4.1.0"]
    # on Python 3.10 the tomli marker holds: it would be fetched (and fail here: not in the canned world)
    try:
        wheelhouse.missing_from_image(["datasets"], image, fake_metadata, "3.10")
    except KeyError as exc:
        assert "tomli" in str(exc)
    else:
        raise AssertionError("tomli's marker was not evaluated for Python 3.10")


def test_default_image_holds_the_stack_the_gpu_image_ships():
    names = wheelhouse.image_names(list(wheelhouse.DEFAULT_IMAGE))
    assert {"torch", "transformers", "peft", "accelerate", "pandas", "pyarrow"} <= names
    assert not {"trl", "datasets"} & names


def test_commands_are_wheels_only_for_the_target_without_dependencies(tmp_path):
    metadata = wheelhouse.metadata_command("trl==1.16.0", tmp_path / "r.json", tmp_path / "t", "3.12")
    download = wheelhouse.download_command(["trl==1.16.0", "xxhash==4.1.0"], tmp_path / "wh", "3.12")
    for command in (metadata, download):
        assert command[:3] == [sys.executable, "-m", "pip"]
        assert "--no-deps" in command and command[command.index("--only-binary") + 1] == ":all:"
        assert command[command.index("--python-version") + 1] == "3.12"
        assert "manylinux_2_17_x86_64" in command and "manylinux_2_28_x86_64" in command
    assert metadata[3] == "install" and "--dry-run" in metadata and "--report" in metadata
    assert download[3] == "download" and download[-2:] == ["trl==1.16.0", "xxhash==4.1.0"]
    own = wheelhouse.own_wheel_command(tmp_path / "wh")
    assert own[3] == "wheel" and "--no-deps" in own and own[-1] == str(wheelhouse.ROOT)


def test_own_requirements_come_from_pyproject():
    requirements = wheelhouse.own_requirements()
    assert any(r.startswith("pytest") for r in requirements) and any("nvidia-ml-py" in r for r in requirements)
