"""GPU names and sizes → the total memory torch reports on that card.

``torch.cuda.get_device_properties().total_memory`` (what an OOM message calls "total capacity") is less
than the marketing size and less than nvidia-smi's total: a "24 GB" L4 gives torch 22.03 GiB. Budgets and
fits are judged against that number. Values and their sources: ``data/gpus.json`` (each record lists the OOM
messages / nvidia-smi tables it was read from).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import GpuMemError
from .units import GIB, MIB, parse_size

DATA_FILE = Path(__file__).parent / "data" / "gpus.json"

# Short names users type -> the record's `card` label prefix in gpus.json.
_ALIASES = {
    "t4": "NVIDIA Tesla T4", "l4": "NVIDIA L4", "a10g": "NVIDIA A10G", "a10": "NVIDIA A10 (24 GB)",
    "rtx3060": "GeForce RTX 3060", "3060": "GeForce RTX 3060",
    "rtx3080": "GeForce RTX 3080 10GB", "3080": "GeForce RTX 3080 10GB",
    "rtx3090": "GeForce RTX 3090", "3090": "GeForce RTX 3090",
    "rtx4090": "GeForce RTX 4090", "4090": "GeForce RTX 4090",
    "rtx4080": "GeForce RTX 4080", "4080": "GeForce RTX 4080",
    "rtx5090": "GeForce RTX 5090", "5090": "GeForce RTX 5090",
    "a6000": "NVIDIA RTX A6000", "rtxa6000": "NVIDIA RTX A6000",
    "l40s": "NVIDIA L40S", "l40": "NVIDIA L40 (48 GB)", "rtx6000ada": "NVIDIA RTX 6000 Ada",
    "a10040gb": "NVIDIA A100-SXM4-40GB", "a100sxm440gb": "NVIDIA A100-SXM4-40GB",
    "a10080gb": "NVIDIA A100 80GB", "a100sxm480gb": "NVIDIA A100 80GB", "a100pcie80gb": "NVIDIA A100 80GB",
    "h100": "NVIDIA H100 80GB HBM3", "h10080gb": "NVIDIA H100 80GB HBM3", "h100sxm": "NVIDIA H100 80GB HBM3",
    "h10080gbhbm3": "NVIDIA H100 80GB HBM3", "h100nvl": "NVIDIA H100 NVL",
    "h200": "NVIDIA H200", "h20": "NVIDIA H20",
    "v10016gb": "NVIDIA Tesla V100 16GB", "v10032gb": "NVIDIA Tesla V100 32GB", "v100": "NVIDIA Tesla V100 32GB",
    "a800": "NVIDIA A800 40GB", "a4000": "NVIDIA RTX A4000", "rtxa4000": "NVIDIA RTX A4000",
    "rtx8000": "Quadro RTX 8000", "quadrortx8000": "Quadro RTX 8000", "a30": "NVIDIA A30",
}
_AMBIGUOUS = {"a100": ("A100 comes as 40 GB and 80 GB", "write A100-40GB or A100-80GB")}


@dataclass(frozen=True)
class GPU:
    name: str
    total_bytes: int
    source: str  # where the number comes from: "torch" (an OOM's total capacity), "nvidia-smi", "size"

    def to_dict(self) -> dict:
        return {"name": self.name, "total_bytes": self.total_bytes, "source": self.source}


@lru_cache(maxsize=1)
def _cards() -> list[dict]:
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def known_gpus() -> dict[str, GPU]:
    """Short name -> GPU, for every card with a known torch total (or, failing that, nvidia-smi's)."""
    result = {}
    for alias, label in _ALIASES.items():
        gpu = _gpu_from_record(label)
        if gpu is not None:
            result[alias] = gpu
    return result


def _gpu_from_record(label: str) -> GPU | None:
    for record in _cards():
        if record["card"].startswith(label):
            if record.get("torch_total_gib"):
                return GPU(record["card"], int(round(record["torch_total_gib"] * GIB)), "torch")
            if record.get("nvidia_smi_total_mib"):
                # no card-labelled torch value published: nvidia-smi's total is an upper bound
                # (on an H100 SXM torch reports 0.54 GiB less than nvidia-smi)
                return GPU(record["card"], int(record["nvidia_smi_total_mib"]) * MIB, "nvidia-smi")
            return None
    return None


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("nvidia", "").replace("geforce", "")
                  .replace("tesla", ""))


def resolve_gpu(gpu: str | int | float | GPU | None, *, field: str = "gpu") -> GPU | None:
    """A size (``"24GiB"``, ``"80GB"``, bytes as int) or a card name (``"L4"``, ``"A100-80GB"``) → :class:`GPU`."""
    if gpu is None or isinstance(gpu, GPU):
        return gpu
    if isinstance(gpu, bool):
        raise GpuMemError(field, f"expected a size or card name, got {gpu!r}", fix="e.g. '24GiB' or 'L4'")
    if isinstance(gpu, (int, float)):
        if not math.isfinite(gpu) or gpu <= 0:
            raise GpuMemError(field, f"must be positive, got {gpu!r}", fix="e.g. '24GiB' or 'L4'")
        return GPU(f"{gpu / GIB:.2f} GiB", int(gpu), "size")
    text = str(gpu).strip()
    if re.match(r"^[0-9.]+\s*[A-Za-z]+$", text) and not re.match(r"^[0-9]+$", _normalise(text)):
        try:
            total = parse_size(text, field=field)
            return GPU(text, total, "size")
        except GpuMemError:
            pass  # maybe a card name like "3090ti": fall through to the card lookup
    key = _normalise(text)
    if key in _AMBIGUOUS:
        problem, fix = _AMBIGUOUS[key]
        raise GpuMemError(field, f"{text!r} is ambiguous: {problem}", fix=fix)
    gpus = known_gpus()
    if key in gpus:
        return gpus[key]
    by_card = {_normalise(gpu.name): gpu for gpu in gpus.values()}  # the full name as printed works too
    if key in by_card:
        return by_card[key]
    # suggest the names people read (NVIDIA Tesla V100 16GB), not the lookup keys (v10016gb)
    close = difflib.get_close_matches(key, [*gpus, *by_card], n=6, cutoff=0.5)
    names = list(dict.fromkeys((gpus.get(k) or by_card[k]).name for k in close))[:3]
    hint = f"did you mean {' or '.join(repr(name) for name in names)}? " if names else ""
    raise GpuMemError(field, f"unknown GPU {text!r}",
                      fix=f"{hint}give a card name (`gpumem gpus` lists them: L4, T4, A100-80GB, H100, ...) or a "
                          "size with units ('24GiB', '80GB')")
