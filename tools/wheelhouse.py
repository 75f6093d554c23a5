"""An offline wheelhouse for a GPU session: what a CUDA PyTorch image lacks to run ``gpumem validate``.

A GPU machine may be lent for minutes, without network. Build the wheelhouse beforehand on any machine that
reaches PyPI, carry it over, install from it offline::

    python tools/wheelhouse.py --out wheelhouse                        # image: the default package list
    python tools/wheelhouse.py --out wheelhouse --image-freeze f.txt   # f.txt = `pip list --format=freeze` there
    # on the GPU machine, no network:
    pip install --no-index --find-links wheelhouse trl datasets pytest-gpumem

How: (1) ``pip install --dry-run --no-deps --report`` reads, for the target's Python and platform, the version
and requirements of each distribution (metadata only); (2) the requirement closure of trl, datasets and
pytest-gpumem's own requirements is walked without descending into what the image has (torch's CUDA wheels are
never resolved); (3) ``pip download --no-deps --only-binary :all:`` fetches the rest; (4) this
project's own wheel is built with ``pip wheel --no-deps``. Measured sizes: docs/gpu-session.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: what the run needs beyond the image (trl pulls datasets; the test extra is not needed to validate)
WANTED = ("trl==1.16.0", "datasets")
#: a CUDA PyTorch image with torch 2.11, transformers, peft, accelerate, pandas, pyarrow, and what they pull in
DEFAULT_IMAGE = ("torch==2.11.0", "transformers", "peft", "accelerate", "pandas", "pyarrow", "numpy",
                 "huggingface-hub", "safetensors", "tokenizers", "fsspec", "jinja2", "markupsafe", "filelock",
                 "pyyaml", "tqdm", "packaging", "psutil", "requests", "urllib3", "idna", "certifi",
                 "charset-normalizer", "regex", "networkx", "sympy", "mpmath", "typing-extensions",
                 "python-dateutil", "pytz", "tzdata", "six", "setuptools", "triton", "hf-xet")
PYTHON_VERSION = "3.12"
#: pip takes --platform literally (no older-manylinux fallback): list the tags a glibc ≥ 2.28 x86_64 image accepts
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_freeze(text: str) -> list[str]:
    """``pip list --format=freeze`` / ``pip freeze`` lines → requirement strings (editable and URL lines dropped)."""
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-e", "-")) and " @ " not in line:
            lines.append(line)
    return lines


def image_names(image: list[str]) -> set[str]:
    return {canonical(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]) for requirement in image}


def own_requirements() -> list[str]:
    """pytest-gpumem's own runtime requirements (pyproject.toml [project] dependencies): its wheel is built
    from the checkout (step 4); with ``--only-binary`` pip cannot resolve the checkout itself."""
    import tomllib

    return list(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"])


def _platform_args(platforms: tuple[str, ...]) -> list[str]:
    return [arg for tag in platforms for arg in ("--platform", tag)]


def metadata_command(requirement: str, report: Path, target: Path, python_version: str = PYTHON_VERSION,
                     platforms: tuple[str, ...] = PLATFORMS) -> list[str]:
    """Step 1, per distribution: its version and requirements for the target (metadata only, ``--no-deps``:
    the image's own packages — torch and its CUDA wheels — are never resolved)."""
    return [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet",
            "--report", str(report), "--only-binary", ":all:", "--python-version", python_version,
            *_platform_args(platforms), "--target", str(target), requirement]


def pip_metadata(requirement: str, python_version: str = PYTHON_VERSION,
                 platforms: tuple[str, ...] = PLATFORMS) -> tuple[str, str, list[str]]:
    """(name, version, requires_dist) of the wheel pip would pick for ``requirement`` on the target."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(metadata_command(requirement, report, Path(tmp) / "t", python_version, platforms), check=True)
        metadata = json.loads(report.read_text())["install"][0]["metadata"]
    return metadata["name"], metadata["version"], list(metadata.get("requires_dist") or [])


def missing_from_image(wanted: list[str], image: list[str], metadata=pip_metadata,
                       python_version: str = PYTHON_VERSION) -> list[str]:
    """Step 2: ``name==version`` of every distribution the run needs that the image lacks — the requirement
    closure of ``wanted``, not descending into anything the image has (markers evaluated for Linux and the
    target's Python; extras not followed)."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    environment = {**default_environment(), "python_version": python_version, "python_full_version":
                   f"{python_version}.0", "sys_platform": "linux", "platform_system": "Linux", "extra": ""}
    have = image_names(image)
    queue, seen, found = list(wanted), set(have), []
    while queue:
        requirement = Requirement(queue.pop(0))
        name = canonical(requirement.name)
        if name in seen or (requirement.marker is not None and not requirement.marker.evaluate(environment)):
            continue
        seen.add(name)
        resolved_name, version, requires = metadata(str(requirement))
        found.append(f"{canonical(resolved_name)}=={version}")
        queue.extend(requires)
    return sorted(found)


def download_command(requirements: list[str], out: Path, python_version: str = PYTHON_VERSION,
                     platforms: tuple[str, ...] = PLATFORMS) -> list[str]:
    """Step 3: the missing wheels only, for the target's Python and platform."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
            "--python-version", python_version, *_platform_args(platforms),
            "-d", str(out), *requirements]


def own_wheel_command(out: Path) -> list[str]:
    """Step 4: this project's wheel (pure Python)."""
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("wheelhouse"))
    parser.add_argument("--image-freeze", type=Path, help="`pip list --format=freeze` of the GPU image")
    parser.add_argument("--python-version", default=PYTHON_VERSION)
    parser.add_argument("--platform", action="append", help="wheel platform tag (repeatable; default: "
                        "glibc ≥ 2.28 x86_64 manylinux tags)")
    args = parser.parse_args(argv)
    platforms = tuple(args.platform or PLATFORMS)
    image = read_freeze(args.image_freeze.read_text()) if args.image_freeze else list(DEFAULT_IMAGE)
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = missing_from_image([*WANTED, *own_requirements()], image,
                                lambda r: pip_metadata(r, args.python_version, platforms), args.python_version)
    print("missing from the image:", " ".join(wanted))
    subprocess.run(download_command(wanted, args.out, args.python_version, platforms), check=True)
    subprocess.run(own_wheel_command(args.out), check=True)
    total = sum(p.stat().st_size for p in args.out.glob("*.whl"))
    print(f"{len(list(args.out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
