"""Explain an out-of-memory error: read the message, tell the phase, map it on the prediction, rank the levers.

This automates the method users follow by hand: read the error, map the consumers, calculate before changing,
pull the biggest levers first, keep the effective batch with gradient accumulation.

Three layers, usable alone:

* :func:`parse_oom` reads PyTorch's caching-allocator OOM in every wording since torch 1.x (``… GiB total
  capacity; … already allocated; … cached``), the torch ≥ 2.1 wording ("GPU 0 has a total capacity of … of
  which … is free. Process N has … Including non-PyTorch memory, this process has … Of the allocated memory
  … is allocated by PyTorch, [with … allocated in private pools,] and … is reserved by PyTorch but
  unallocated"; torch's ``c10/cuda/CUDACachingAllocator.cpp``), the per-process memory-fraction wording
  ("Allocation on device 0 would exceed allowed memory"), ``CUDA error: out of memory`` and vLLM's start-up
  refusals (``vllm/v1/worker/gpu_worker.py`` "Free memory on device …", ``vllm/v1/core/kv_cache_utils.py``
  "To serve at least one request …", V0's "max seq len … larger than … KV cache", "No available memory for
  the cache blocks", the sampler warm-up and the memory-profiling assertion), anywhere inside a log:
  log prefixes, ANSI colours, markdown and hard line wraps (even mid-number) are tolerated.
* :func:`detect_phase` reads the traceback's frames (TRL, transformers, vLLM, torch.optim) to tell which phase
  of the GRPO step failed.
* :func:`diagnose` adds a setup: the predicted breakdown of that phase, which predicted tensor the failed
  allocation most likely is, and the ranked levers (:func:`rank_levers`), each re-estimated.

Byte values are ``round(printed number × unit)``, the same rounding as the fixtures' expected values; the
printed figures themselves carry two decimals, i.e. ±0.005 of the unit.
"""

from __future__ import annotations

import bisect
import json
import re
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Iterable, Mapping

from ..errors import GpuMemError, SetupError
from ..spec import GRPOSetup
from ..units import format_gib

# -- units ------------------------------------------------------------------------------------------
_UNIT_BYTES = {"bytes": 1, "byte": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
               "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
#: a printed size: number and unit, possibly split by whitespace or a line wrap
# (no trailing \b: lines are joined without a separator, so "4.34 GiBRequested" must still read as GiB)
_SIZE = r"(\d+(?:\.\d+)?)\s*(bytes|byte|KiB|MiB|GiB|TiB|KB|MB|GB|TB|B)"


def _bytes(number: str, unit: str) -> int:
    """``("7.33", "GiB")`` → ``round(7.33 × 2**30)``, computed exactly (Decimal) then rounded half-even
    like Python's ``round`` — the fixtures' expected values use the same rule."""
    value = Decimal(number) * _UNIT_BYTES[unit.lower()]
    return int(value.to_integral_value())


def _w(pattern: str) -> re.Pattern:
    """Compile ``pattern`` with every literal space turned into ``\\s*``: wrapped or re-spaced text matches."""
    return re.compile(pattern.replace(" ", r"\s*"), re.IGNORECASE)


# -- normalising a pasted log ------------------------------------------------------------------------
_ANSI = re.compile(r"(?:\x1b|\^\[)\[[0-9;]*[A-Za-z]")
# prefixes that loggers put in front of every line: stripped (repeatedly) before wrapped lines are joined
_LINE_PREFIXES = [
    re.compile(r"^\s*\[rank\d+\]:\s?"),  # torchrun
    re.compile(r"^\s*\((?:EngineCore\w*|VllmWorker\w*|Worker\w*|APIServer|\w+)(?: rank=\d+)? pid=\d+\)\s*"),
    re.compile(r"^\s*\[\d{4}-\d\d-\d\d[T ][\d:.,]+Z?\]\s*"),  # [2026-02-24T20:21:58Z]
    re.compile(r"^\s*(?:ERROR|WARNING|WARN|INFO|DEBUG|CRITICAL)\s+\d\d-\d\d\s+[\d:.]+\s+\[?[\w./-]+:\d+\]\s?"),
    re.compile(r"^\s*\[[\w./-]+\.py:\d+\]\s?"),  # [multiproc_executor.py:492]
    re.compile(r"^\s*[\w.-]+-\d+\s+\|\s?"),  # docker compose: "vllm-1  | "
]


def _strip_prefixes(line: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _LINE_PREFIXES:
            stripped = prefix.sub("", line, count=1)
            if stripped != line:
                line, changed = stripped, True
    return line


@dataclass
class _Text:
    """A pasted text, as lines (for frames) and as one flat string (for messages) with a map between them.

    Lines are joined with nothing — terminal wraps cut inside numbers and words ("4\\n0.30 GiB",
    "PyTorc\\nh") — and every message pattern allows optional whitespace between its words."""

    lines: list[str]
    flat: str
    line_starts: list[int]

    @classmethod
    def of(cls, text: str) -> "_Text":
        text = _ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
        lines = [_strip_prefixes(line) for line in text.split("\n")]
        flat_parts, starts, offset = [], [], 0
        for line in lines:
            # literal "\n" escapes (a message inside a repr'd string or a Rust panic) act as whitespace,
            # markdown bold is the reporter's; both only in the flat copy
            piece = line.replace("\\n", " ").replace("**", "")
            starts.append(offset)
            flat_parts.append(piece)
            offset += len(piece)
        return cls(lines=lines, flat="".join(flat_parts), line_starts=starts)

    def line_of(self, flat_position: int) -> int:
        return max(bisect.bisect_right(self.line_starts, flat_position) - 1, 0)


# -- the messages ------------------------------------------------------------------------------------
# torch caching allocator (c10/cuda/CUDACachingAllocator.cpp), torch ≥ 1.x; "HIP"/"XPU" on other backends
_TORCH_ANCHOR = _w(r"(?:CUDA|HIP|XPU|MPS)? out of memory\. Tried to allocate " + _SIZE)
_TORCH_FIELDS = {
    # torch ≥ 2.1 ("capacty" is the typo of torch 2.1–2.2)
    "capacity": _w(r"GPU ?(\d*) has a total capac(?:i)?ty of " + _SIZE + r" of which " + _SIZE + r" is free"),
    "this_process": _w(r"this process has " + _SIZE + r" memory in use"),
    "process": _w(r"Process (\d+) has " + _SIZE + r" memory in use"),
    "allocated": _w(r"Of the allocated memory " + _SIZE + r" is allocated by PyTorch"),
    "private_pools": _w(r"with " + _SIZE + r" allocated in private pools"),
    "reserved_unallocated": _w(_SIZE + r" is reserved by PyTorch but unallocated"),
    # torch ≤ 2.0: "(GPU 0; 11.93 GiB total capacity; 4.00 GiB already allocated; 7.33 GiB free; … cached)"
    "legacy_gpu": _w(r"\(GPU (\d+);"),
    "legacy_total": _w(_SIZE + r" total capacity;"),
    "legacy_allocated": _w(_SIZE + r" already allocated"),
    "legacy_free": _w(_SIZE + r" free[;)]"),
    "legacy_cached": _w(_SIZE + r" cached\)"),
    "legacy_reserved": _w(_SIZE + r" reserved in total by PyTorch"),
}
# torch.cuda.set_per_process_memory_fraction: "Allocation on device 0 would exceed allowed memory."
_FRACTION_ANCHOR = _w(r"Allocation on device ?(\d*) would exceed allowed memory")
_FRACTION_FIELDS = {
    "allocated": _w(r"Currently allocated ?: " + _SIZE),
    "requested": _w(r"Requested ?: " + _SIZE),
    "limit": _w(r"Device limit ?: " + _SIZE),
    "free": _w(r"Free \(according to CUDA\) ?: " + _SIZE),
    "fraction": _w(r"PyTorch limit \(set by user-supplied memory fraction\) ?: " + _SIZE),
}
_CUDA_ERROR = _w(r"(?:CUDA|HIP) error: out of memory|CUBLAS_STATUS_ALLOC_FAILED")
# vLLM V1 gpu_worker.init_device / request_memory
_VLLM_FREE = _w(r"Free memory on device ?(cuda:\d+|[\w:]+)? ?\( ?(\d+(?:\.\d+)?) ?/ ?(\d+(?:\.\d+)?) ?GiB ?\) ?on startup "
                r"is less than desired GPU memory utilization ?\( ?(\d+(?:\.\d+)?) ?, ?(\d+(?:\.\d+)?) ?GiB ?\)")
# vLLM V1 kv_cache_utils.check_enough_kv_cache_memory ("models's" before the typo fix, "model's" after)
_VLLM_KV_V1 = _w(r"To serve at least one request with the models?'?s max seq len \((\d+)\),? \(? ?" + _SIZE
                 + r" KV cache is needed, which is larger than the available KV cache memory \( ?" + _SIZE + r" ?\)")
_VLLM_KV_ESTIMATE = _w(r"estimated maximum model length is (\d+)")
# vLLM V0 worker.raise_if_cache_size_invalid
_VLLM_KV_V0 = _w(r"(?:The model'?s )?max seq len \((\d+)\) is larger than the maximum number of tokens that can be stored in KV "
                 r"cache \((\d+)\)")
_VLLM_NO_BLOCKS = _w(r"No available memory for the cache blocks")
_VLLM_SAMPLER = _w(r"CUDA out of memory occurred when warming up sampler with (\d+) dummy requests")
_VLLM_PROFILING = _w(r"Error in memory profiling\. Initial free memory " + _SIZE + r", current free memory " + _SIZE)
# vLLM V0's profiling summary line, read as context when present
_VLLM_PROFILE_LINE = {
    "total_bytes": _w(r"total_gpu_memory=" + _SIZE),
    "peak_torch_memory_bytes": _w(r"peak_torch_memory=" + _SIZE),
    "non_torch_memory_bytes": _w(r"non_torch_memory=" + _SIZE),
    "kv_cache_bytes": _w(r"kv_cache_size=" + _SIZE),
}
_VLLM_PROFILE_UTIL = _w(r"gpu_memory_utilization=(\d+(?:\.\d+)?)")
_VLLM_GPU_BLOCKS = _w(r"# GPU blocks: (\d+)")

#: kinds, from most to least informative: when a log holds several, the most informative one is explained
KINDS = ("torch_oom", "torch_memory_fraction", "vllm_free_memory", "vllm_kv_cache", "vllm_no_cache_blocks",
         "vllm_sampler_warmup", "vllm_memory_profiling", "cuda_error")
_VLLM_KINDS = {k for k in KINDS if k.startswith("vllm_")}

#: the fields every parse result has (None when the message does not print it)
CORE_FIELDS = ("requested_bytes", "total_bytes", "free_bytes", "process_in_use_bytes", "torch_allocated_bytes",
               "torch_reserved_unallocated_bytes")


@dataclass(frozen=True)
class OomMessage:
    """One OOM / refusal message found in a text, with every figure it prints, in bytes.

    ``values`` holds :data:`CORE_FIELDS` (``None`` when not printed) plus whatever else the wording carries
    (``other_processes``, ``torch_reserved_total_bytes``, ``max_model_len``, ``kv_cache_needed_bytes``, …).
    """

    kind: str
    message: str
    values: Mapping[str, Any]
    position: int = 0  # where the message starts in the flattened text
    count: int = 1  # how many messages of any kind the text held

    def __getattr__(self, name: str) -> Any:  # parsed.requested_bytes etc.
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    @property
    def source(self) -> str:
        return "vllm" if self.kind in _VLLM_KINDS else "torch"

    @property
    def shortfall_bytes(self) -> int | None:
        """requested − free (what the allocator was short of); for vLLM's KV refusal: needed − available."""
        v = self.values
        if v.get("requested_bytes") is not None and v.get("free_bytes") is not None:
            return v["requested_bytes"] - v["free_bytes"]
        if v.get("kv_cache_needed_bytes") is not None and v.get("kv_cache_available_bytes") is not None:
            return v["kv_cache_needed_bytes"] - v["kv_cache_available_bytes"]
        return None

    @property
    def non_torch_bytes(self) -> int | None:
        """This process's memory outside PyTorch's allocator (CUDA context, NCCL, cuBLAS workspaces):
        ``process in use − allocated − reserved-but-unallocated``; None when not printed or impossible."""
        v = self.values
        used, allocated, slack = (v.get("process_in_use_bytes"), v.get("torch_allocated_bytes"),
                                  v.get("torch_reserved_unallocated_bytes"))
        if v.get("non_torch_memory_bytes") is not None:
            return v["non_torch_memory_bytes"]
        if used is None or allocated is None or slack is None or not self.process_figure_plausible:
            return None
        return used - allocated - slack

    @property
    def process_figure_plausible(self) -> bool:
        """NVML sometimes reports nonsense for the process (17179869184.00 GiB = 2^64 B, or 0 bytes while
        PyTorch holds GiBs): such a figure is kept as printed but not used for arithmetic."""
        v = self.values
        used, total = v.get("process_in_use_bytes"), v.get("total_bytes")
        if used is None:
            return False
        if total is not None and used > total:
            return False
        reserved = (v.get("torch_allocated_bytes") or 0) + (v.get("torch_reserved_unallocated_bytes") or 0)
        return used >= reserved

    @property
    def others_bytes(self) -> int:
        """Memory of other processes on the card (only when torch also printed this process's own line,
        so that the 'Process N' lines are known to be others — in a container torch cannot match PIDs)."""
        if self.values.get("process_in_use_bytes") is None:
            return 0
        return sum(p["bytes"] for p in self.values.get("other_processes", ()))

    def to_dict(self) -> dict[str, Any]:
        data = {"kind": self.kind, "source": self.source}
        data.update({name: self.values.get(name) for name in CORE_FIELDS})
        data.update({k: v for k, v in self.values.items() if k not in data})
        data["non_torch_bytes"] = self.non_torch_bytes
        data["shortfall_bytes"] = self.shortfall_bytes
        data["message"] = self.message
        return data


def _size(match: re.Match | None, group: int = 1) -> int | None:
    if match is None:
        return None
    return _bytes(match.group(group), match.group(group + 1))


def _parse_torch(flat: str, start: int, end: int, anchor: re.Match) -> dict[str, Any]:
    window = flat[start:end]
    f = {name: pattern.search(window) for name, pattern in _TORCH_FIELDS.items() if name != "process"}
    values: dict[str, Any] = {name: None for name in CORE_FIELDS}
    values["requested_bytes"] = _size(anchor)
    if f["capacity"]:
        values["device_index"] = int(f["capacity"].group(1)) if f["capacity"].group(1) else None
        values["total_bytes"] = _size(f["capacity"], 2)
        values["free_bytes"] = _size(f["capacity"], 4)
        values["process_in_use_bytes"] = _size(f["this_process"])
        values["torch_allocated_bytes"] = _size(f["allocated"])
        values["torch_reserved_unallocated_bytes"] = _size(f["reserved_unallocated"])
        if f["private_pools"]:
            values["torch_private_pools_bytes"] = _size(f["private_pools"])
        others = [{"pid": int(m.group(1)), "bytes": _bytes(m.group(2), m.group(3))}
                  for m in _TORCH_FIELDS["process"].finditer(window)]
        if others:
            values["other_processes"] = others
    elif f["legacy_total"] or f["legacy_allocated"]:
        values["device_index"] = int(f["legacy_gpu"].group(1)) if f["legacy_gpu"] else None
        values["total_bytes"] = _size(f["legacy_total"])
        values["torch_allocated_bytes"] = _size(f["legacy_allocated"])
        values["free_bytes"] = _size(f["legacy_free"])
        if f["legacy_cached"]:
            # torch ≤ 1.5 "cached" = held by the allocator but not used by the program (pytorch#13751)
            values["torch_reserved_unallocated_bytes"] = _size(f["legacy_cached"])
        if f["legacy_reserved"]:
            reserved = _size(f["legacy_reserved"])
            values["torch_reserved_total_bytes"] = reserved
            if values["torch_allocated_bytes"] is not None:
                values["torch_reserved_unallocated_bytes_derived"] = reserved - values["torch_allocated_bytes"]
    else:
        values["device_index"] = None  # message cut off after "Tried to allocate …" (torch 2.3, pytorch#125393)
    return values


def _parse_fraction(flat: str, start: int, end: int, anchor: re.Match) -> dict[str, Any]:
    window = flat[start:end]
    f = {name: pattern.search(window) for name, pattern in _FRACTION_FIELDS.items()}
    values: dict[str, Any] = {name: None for name in CORE_FIELDS}
    values["device_index"] = int(anchor.group(1)) if anchor.group(1) else None
    values["requested_bytes"] = _size(f["requested"])
    values["torch_allocated_bytes"] = _size(f["allocated"])
    values["total_bytes"] = _size(f["limit"])
    values["free_bytes"] = _size(f["free"])
    values["torch_memory_fraction_limit_bytes"] = _size(f["fraction"])
    return values


def _vllm_context(flat: str, values: dict[str, Any]) -> None:
    """Figures of vLLM V0's "Memory profiling results" line, when the log holds it."""
    for name, pattern in _VLLM_PROFILE_LINE.items():
        match = pattern.search(flat)
        if match and values.get(name) is None:
            values[name] = _size(match)
    util = _VLLM_PROFILE_UTIL.search(flat)
    if util and values.get("gpu_memory_utilization") is None:
        values["gpu_memory_utilization"] = float(util.group(1))
    blocks = _VLLM_GPU_BLOCKS.search(flat)
    if blocks:
        values["gpu_blocks"] = int(blocks.group(1))


def _find_messages(text: _Text) -> list[tuple[int, str, re.Match]]:
    flat = text.flat
    found: list[tuple[int, str, re.Match]] = []
    for kind, pattern in (("torch_oom", _TORCH_ANCHOR), ("torch_memory_fraction", _FRACTION_ANCHOR),
                          ("vllm_free_memory", _VLLM_FREE), ("vllm_kv_cache", _VLLM_KV_V1),
                          ("vllm_kv_cache", _VLLM_KV_V0), ("vllm_no_cache_blocks", _VLLM_NO_BLOCKS),
                          ("vllm_sampler_warmup", _VLLM_SAMPLER), ("vllm_memory_profiling", _VLLM_PROFILING),
                          ("cuda_error", _CUDA_ERROR)):
        for match in pattern.finditer(flat):
            line_index = text.line_of(match.start())
            line = text.flat[text.line_starts[line_index]:match.start()].lstrip()
            # the source line of a `raise ValueError("…")` is not the message — unless the message itself
            # follows on that line ("raise ValueError(…) ValueError: No available memory …", a pasted title)
            if line.startswith(("raise ", "assert ")) and not re.search(r"\w(?:Error|Exception):\s*$", line):
                continue
            found.append((match.start(), kind, match))
    found.sort(key=lambda item: item[0])
    return found


def parse_oom(text: str) -> OomMessage | None:
    """Find and read the OOM message in ``text`` (a message, a traceback or a whole log).

    When the text holds several, the most informative kind wins (:data:`KINDS` order), the first of that
    kind (per-rank copies of one message are identical). Returns None when there is none."""
    if not isinstance(text, str) or not text.strip():
        return None
    parsed = _Text.of(text)
    found = _find_messages(parsed)
    if not found:
        return None
    position, kind, match = min(found, key=lambda item: (KINDS.index(item[1]), item[0]))
    flat = parsed.flat
    later = [p for p, _, _ in found if p > position]
    end = min(later) if later else len(flat)
    end = min(end, position + 4000)
    if kind == "torch_oom":
        values = _parse_torch(flat, position, end, match)
    elif kind == "torch_memory_fraction":
        values = _parse_fraction(flat, position, end, match)
    else:
        values = {name: None for name in CORE_FIELDS}
        if kind == "vllm_free_memory":
            device, free, total, util, desired = match.groups()
            values.update(free_bytes=_bytes(free, "GiB"), total_bytes=_bytes(total, "GiB"),
                          requested_bytes=_bytes(desired, "GiB"), gpu_memory_utilization=float(util))
            if device:
                values["device"] = device
                index = re.search(r"(\d+)$", device)
                values["device_index"] = int(index.group(1)) if index else None
        elif kind == "vllm_kv_cache" and match.re is _VLLM_KV_V1:
            values.update(max_model_len=int(match.group(1)), kv_cache_needed_bytes=_size(match, 2),
                          kv_cache_available_bytes=_size(match, 4))
            estimate_match = _VLLM_KV_ESTIMATE.search(flat, match.end(), end)
            if estimate_match:
                values["estimated_max_model_len"] = int(estimate_match.group(1))
        elif kind == "vllm_kv_cache":
            values.update(max_model_len=int(match.group(1)), kv_cache_tokens=int(match.group(2)))
        elif kind == "vllm_sampler_warmup":
            values["dummy_requests"] = int(match.group(1))
        elif kind == "vllm_memory_profiling":
            values.update(initial_free_bytes=_size(match, 1), current_free_bytes=_size(match, 3))
        if kind in _VLLM_KINDS:
            _vllm_context(flat, values)
    message = _message_text(parsed, position, end)
    return OomMessage(kind=kind, message=message, values=values, position=position, count=len(found))


def _message_text(text: _Text, start: int, end: int) -> str:
    """The message itself, for display: its lines re-joined with spaces, from the match to the end of its
    sentence block (≤ 600 characters)."""
    first, last = text.line_of(start), text.line_of(max(end - 1, start))
    column = start - text.line_starts[first]
    pieces = [text.flat[text.line_starts[i]:(text.line_starts[i + 1] if i + 1 < len(text.lines) else len(text.flat))]
              for i in range(first, last + 1)]
    # a line of ≥ 100 characters without trailing space was cut by the terminal: rejoin it without a space
    snippet = ""
    for index, piece in enumerate(pieces):
        wrapped = index > 0 and len(pieces[index - 1]) >= 100 and not pieces[index - 1][-1:].isspace()
        snippet += (piece if wrapped or index == 0 else " " + piece.strip())
    snippet = snippet[column:]
    for stop in ("If reserved", "See documentation", "Traceback (most recent", "Try increasing",
                 "Decrease GPU memory", "Please try"):
        cut = snippet.find(stop)
        if cut > 40:
            snippet = snippet[:cut]
    return re.sub(r"\s+", " ", snippet[:600]).strip()


# -- the phase, from the traceback ------------------------------------------------------------------
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>[\w<>.]+)')


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    function: str
    code: str = ""

    def __str__(self) -> str:
        where = self.file.replace("\\", "/").split("site-packages/")[-1]
        return f"{where}:{self.line} in {self.function}"


def parse_frames(text: str, before_line: int | None = None) -> list[Frame]:
    """The traceback frames of ``text`` (outermost first), from the last ``Traceback`` header before
    ``before_line`` (the line of the message) — the frames that raised it. Source lines without a ``File``
    header (pastes that begin mid-traceback) are kept as frames with an empty file name."""
    parsed = _Text.of(text) if isinstance(text, str) else text
    lines = parsed.lines if before_line is None else parsed.lines[:before_line + 1]
    start = 0
    for index, line in enumerate(lines):
        if "Traceback (most recent call last)" in line:
            start = index
    frames: list[Frame] = []
    pending: Frame | None = None
    for line in lines[start:]:
        matches = list(_FRAME.finditer(line))
        if matches:
            for match in matches:
                if pending is not None:
                    frames.append(pending)
                pending = Frame(match.group("file"), int(match.group("line")), match.group("func"))
            continue
        stripped = line.strip()
        if pending is not None:
            if stripped and not set(stripped) <= set("^~ "):
                frames.append(Frame(pending.file, pending.line, pending.function, stripped))
                pending = None
        elif stripped and not stripped.startswith(("[Previous line", "During handling", "The above exception")) \
                and re.match(r"^[\w.\[\](), =*'\"-]+\($|^[\w.]+\s*=|^return |^e?turn ", stripped):
            frames.append(Frame("", 0, "", stripped))
    if pending is not None:
        frames.append(pending)
    return frames


#: (phase, why) rules on a frame's function name / file / code line. Sources: TRL 1.16
#: trl/trainer/grpo_trainer.py (_generate_and_score_completions, _get_per_token_logps_and_entropies,
#: compute_loss, _generate), transformers generation/utils.py (generate, _sample), vLLM v1 worker/gpu_worker.py
#: (determine_available_memory, init_device), v1/engine/core.py (_initialize_kv_caches), torch/optim/adamw.py.
_VLLM_STARTUP_FUNCS = {"determine_available_memory", "_initialize_kv_caches", "profile_run", "init_device",
                       "determine_num_available_blocks", "raise_if_cache_size_invalid", "initialize_cache",
                       "_init_cache", "check_enough_kv_cache_memory", "_check_enough_kv_cache_memory",
                       "get_kv_cache_config", "get_kv_cache_configs", "_dummy_sampler_run", "capture_model",
                       "initialize_from_config", "_init_executor", "request_memory", "_determine_available_memory"}
_GENERATION_FUNCS = {"generate", "_sample", "_generate", "_generate_single_turn", "_generate_completions",
                     "_beam_search", "_assisted_decoding", "vllm_generate", "_run_engine", "execute_model",
                     "sample_tokens", "_generate_with_vllm"}
_SCORING_FUNCS = re.compile(r"^_?(compute|get)_\w*(ref|old)\w*_?logps|^_compute_\w*logps$|^compute_ref_log_probs$")
_LOGPS_FUNCS = {"_get_per_token_logps_and_entropies", "_get_per_token_logps", "get_per_token_logps",
                "selective_log_softmax", "entropy_from_logits", "chunked_hidden_states_selective_log_softmax"}
_TRAINING_FUNCS = {"compute_loss", "_compute_loss", "training_step", "grpo_accumulated_loss"}
_BACKWARD_FUNCS = {"backward", "run_backward", "_engine_run_backward", "_backward"}
_LOAD_FUNCS = {"_apply", "convert", "from_pretrained", "load_state_dict", "_load_state_dict_into_meta_model",
               "load_model", "to", "cuda"}


@dataclass(frozen=True)
class PhaseGuess:
    """Which phase failed (a :class:`~pytest_gpumem.breakdown.Phase` value, ``"vllm_startup"`` or None) and
    the frame or line that says so."""

    phase: str | None
    evidence: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "evidence": self.evidence, "detail": self.detail}


def _is_vllm(frame: Frame) -> bool:
    return re.search(r"[/\\]vllm[/\\]", frame.file) is not None


def _is_trl(frame: Frame) -> bool:
    return re.search(r"[/\\]trl[/\\]", frame.file) is not None


def detect_phase(frames: Iterable[Frame], kind: str | None = None) -> PhaseGuess:
    """The phase of the GRPO step a traceback failed in, by the strongest signal in the stack.

    Order of the rules (the first that matches anywhere in the stack wins): a vLLM start-up refusal or a
    start-up frame → ``vllm_startup``; ``torch/optim`` / AdamW → ``optimizer_step``; autograd's backward →
    ``training``; generation (HF ``generate``/``_sample``, vLLM engine/sampler, TRL ``_generate``) →
    ``generation``; log-prob code under ``_generate_and_score_completions`` or a ``_compute_*logps`` function
    (no_grad) → ``scoring``; ``compute_loss`` / log-prob code otherwise → ``training``; ``Module._apply`` /
    ``from_pretrained`` → ``persistent`` (the model was being loaded or moved)."""
    frames = list(frames)
    if kind in _VLLM_KINDS:
        return PhaseGuess("vllm_startup", f"vLLM start-up refusal ({kind})", "vLLM was reserving its memory")

    def find(predicate) -> Frame | None:
        for frame in reversed(frames):  # innermost first
            if predicate(frame):
                return frame
        return None

    def code_has(frame: Frame, *needles: str) -> bool:
        return any(needle in frame.code for needle in needles)

    hit = find(lambda f: f.function in _VLLM_STARTUP_FUNCS and (_is_vllm(f) or not f.file))
    if hit:
        return PhaseGuess("vllm_startup", str(hit), "vLLM start-up (profiling / KV cache allocation)")
    hit = find(lambda f: "torch/optim" in f.file.replace("\\", "/") or "bitsandbytes/optim" in f.file.replace("\\", "/")
               or re.search(r"adamw|_multi_tensor_adam|_fused_adam", f.function)
               or code_has(f, "optimizer.step(", "_foreach_sqrt"))
    if hit:
        return PhaseGuess("optimizer_step", str(hit), "optimizer.step()")
    hit = find(lambda f: f.function in _BACKWARD_FUNCS or code_has(f, ".backward(", "run_backward("))
    if hit:
        return PhaseGuess("training", str(hit) if hit.file else hit.code, "backward")
    hit = find(lambda f: (f.function in _GENERATION_FUNCS and (f.function != "generate" or "generation" in f.file
                                                               or _is_vllm(f) or _is_trl(f) or not f.file))
               or "vllm/v1/sample" in f.file.replace("\\", "/") or "vllm/model_executor/layers/sampler" in f.file
               or code_has(f, ".generate(", "llm.generate("))
    if hit:
        return PhaseGuess("generation", str(hit) if hit.file else hit.code, "generating completions")
    outer_scoring = any(f.function == "_generate_and_score_completions" for f in frames)
    hit = find(lambda f: _SCORING_FUNCS.search(f.function) is not None)
    if hit:
        return PhaseGuess("scoring", str(hit), "no-grad old/reference log-probs")
    hit = find(lambda f: f.function in _LOGPS_FUNCS or code_has(f, "log_softmax", "per_token_logps",
                                                               "selective_log_softmax"))
    if hit and outer_scoring:
        return PhaseGuess("scoring", str(hit), "no-grad log-probs inside _generate_and_score_completions")
    if hit:
        return PhaseGuess("training", str(hit) if hit.file else hit.code, "forward / log-probs of a training micro-step")
    if outer_scoring:  # e.g. a reward model inside _generate_and_score_completions (before training_step's rule)
        return PhaseGuess("scoring", "_generate_and_score_completions", "scoring completions")
    hit = find(lambda f: f.function in _TRAINING_FUNCS)
    if hit:
        return PhaseGuess("training", str(hit), "training micro-step")
    hit = find(lambda f: f.function in _LOAD_FUNCS and ("torch/nn/modules/module.py" in f.file.replace("\\", "/")
                                                       or "transformers" in f.file or not f.file)
               or code_has(f, "return t.to(", "from_pretrained("))
    if hit:
        return PhaseGuess("persistent", str(hit) if hit.file else hit.code, "loading or moving the model to the GPU")
    return PhaseGuess(None, "no frame that identifies a GRPO phase", "")


def parse(text: str) -> tuple[OomMessage | None, PhaseGuess]:
    """Message and phase of ``text``."""
    flat = _Text.of(text) if isinstance(text, str) else None
    message = parse_oom(text)
    if message is None or flat is None:
        return message, PhaseGuess(None, "no OOM message found")
    frames = parse_frames(flat, flat.line_of(message.position))
    return message, detect_phase(frames, message.kind)


# -- levers: one-step changes, each re-estimated ----------------------------------------------------
#: 8-bit optimizers (bitsandbytes) and optimizers without Adam moments: the 8-bit lever does not apply
_EIGHT_BIT_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "adamw_bnb_8bit")
_STATELESS_OPTIMIZERS = ("sgd", "adafactor")


@dataclass(frozen=True)
class Lever:
    """A concrete one-step change of a setup and what it does, by re-estimating the changed setup.

    ``saves_bytes`` = predicted peak before − after (never negative: levers that save nothing are dropped);
    ``fits_after`` judges the changed setup against the GPU or budget (None when there is neither);
    ``trade_off`` says what the change costs."""

    name: str
    changes: Mapping[str, tuple[Any, Any]]  # field -> (old, new)
    saves_bytes: int
    peak_after_bytes: int
    fits_after: bool | None
    trade_off: str
    setup: Any = field(default=None, compare=False, repr=False)  # the changed GRPOSetup
    phase_saves_bytes: int | None = None  # saving in the phase that failed (when known)

    @property
    def change(self) -> str:
        """``per_device_train_batch_size 8 → 4, gradient_accumulation_steps 1 → 2``"""
        return ", ".join(f"{name} {_show(old)} → {_show(new)}" for name, (old, new) in self.changes.items())

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "change": self.change,
                "changes": {name: {"from": old, "to": new} for name, (old, new) in self.changes.items()},
                "saves_bytes": self.saves_bytes, "peak_after_bytes": self.peak_after_bytes,
                "fits_after": self.fits_after, "trade_off": self.trade_off}
        if self.phase_saves_bytes is not None:
            data["phase_saves_bytes"] = self.phase_saves_bytes
        return data

    def line(self) -> str:
        fits = {True: "fits", False: "still too big", None: ""}[self.fits_after]
        after = f"peak {format_gib(self.peak_after_bytes)}" + (f", {fits}" if fits else "")
        return f"{self.name}: {self.change} — saves {format_gib(self.saves_bytes)} ({after}); costs: {self.trade_off}"


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "null"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def min_vllm_utilization(setup: Any, total_bytes: int, result: Any = None) -> float | None:
    """The smallest ``vllm_gpu_memory_utilization`` (2 decimals, rounded up) whose KV pool still holds one
    full sequence: ``(vLLM weights + activation peak + non-torch + CUDA graphs + one sequence) / total``
    (Unsloth scales by the memory free when vLLM starts: total − CUDA context). None without colocated vLLM.
    ``result``: an estimate of ``setup`` at any utilisation (the fixed parts do not depend on it)."""
    from ..breakdown import Component
    from ..predict.analytic import estimate
    from ..predict.analytic.constants import CUDA_CONTEXT_BYTES

    if not (setup.use_vllm and setup.vllm_mode == "colocate"):
        return None
    if result is None:
        result = estimate(setup, gpu=total_bytes)
    # the generation phase: vLLM is awake there even in sleep mode (the persistent phase then omits it)
    persistent = result.breakdown.components("generation")
    fixed = sum(persistent.get(c.value, 0) for c in (Component.VLLM_WEIGHTS, Component.VLLM_ACTIVATIONS,
                                                      Component.VLLM_NON_TORCH, Component.VLLM_CUDA_GRAPHS))
    basis = total_bytes - CUDA_CONTEXT_BYTES if setup.backend == "unsloth" else total_bytes
    needed = (fixed + setup.model_spec.kv_cache_bytes(setup.seq_len)) / basis
    return min(1.0, -(-round(needed * 10000) // 100) / 100)  # ceil to 0.01 (via integer math, no float drift)


def batch_halved_changes(setup: Any) -> dict[str, Any] | None:
    """``per_device_train_batch_size`` halved with ``gradient_accumulation_steps`` doubled: completions per
    optimizer step unchanged; an explicit ``steps_per_generation`` doubles too, so the generation batch
    (b × steps_per_generation, which must stay divisible by num_generations — TRL GRPOConfig) is unchanged."""
    b = setup.per_device_train_batch_size
    if b < 2 or b % 2:
        return None
    changes: dict[str, Any] = {"per_device_train_batch_size": b // 2,
                               "gradient_accumulation_steps": setup.gradient_accumulation_steps * 2}
    if "steps_per_generation" in setup.explicit_fields:
        changes["steps_per_generation"] = setup.steps_per_generation * 2
    return changes


def lever_candidates(setup: Any, total_bytes: int | None = None) -> list[tuple[str, dict[str, Any], str]]:
    """The one-step changes that apply to ``setup``: ``(name, {field: new value}, trade_off)``.

    Nothing here claims a saving: :func:`rank_levers` re-estimates each one."""
    s = setup
    out: list[tuple[str, dict[str, Any], str]] = []
    colocated = s.use_vllm and s.vllm_mode == "colocate"
    if colocated and total_bytes:
        floor = min_vllm_utilization(s, total_bytes) or 0.01
        new = max(round(s.vllm_gpu_memory_utilization - 0.1, 2), floor)
        if new < s.vllm_gpu_memory_utilization:
            out.append(("vLLM utilisation −0.1", {"vllm_gpu_memory_utilization": new},
                        f"smaller KV cache (floor {floor:g}: one {s.seq_len}-token sequence): fewer sequences "
                        "decoded at once, slower generation"))
    if colocated and not s.vllm_enable_sleep_mode:
        out.append(("vLLM sleep mode", {"vllm_enable_sleep_mode": True},
                    "vLLM's weights and KV cache are released outside generation and restored for it: "
                    "a few seconds of wake-up per generation round"))
    if colocated and s.backend == "trl":
        out.append(("vLLM server mode", {"vllm_mode": "server"},
                    "vLLM moves to other GPU(s) (`trl vllm-serve`): needs a second GPU"))
    batch = batch_halved_changes(s)
    if batch:
        out.append(("batch halved, accumulation doubled", batch,
                    "same completions per optimizer step, twice the micro-steps: slower step"))
    if s.steps_per_generation >= 2 and s.steps_per_generation % 2 == 0:
        out.append(("generation batch halved", {"steps_per_generation": s.steps_per_generation // 2},
                    "rollouts generated in twice as many rounds of half the rows: lower generation throughput"))
    if s.num_generations >= 4 and s.num_generations % 2 == 0:
        out.append(("num_generations halved", {"num_generations": s.num_generations // 2},
                    "smaller groups: noisier group-relative advantages"))
    completion = _shorter(s.max_completion_length)
    if completion:
        out.append(("completion length −25%", {"max_completion_length": completion},
                    "completions truncated earlier: long answers / reasoning cut off"))
    prompt = _shorter(s.max_prompt_length)
    if prompt:
        out.append(("prompt length −25%", {"max_prompt_length": prompt},
                    "longer prompts must be filtered or truncated (TRL ≥ 0.28 does not truncate prompts)"))
    if s.is_lora and s.lora_rank >= 2:
        out.append(("LoRA rank halved", {"lora_rank": s.lora_rank // 2}, "fewer trainable parameters (capacity)"))
    if not s.is_lora:
        out.append(("LoRA instead of full fine-tuning", {"lora_rank": 16, "lora_target_modules": "all-linear"},
                    "trains rank-16 adapters on all linear layers instead of every weight"))
    if not s.gradient_checkpointing:
        out.append(("gradient checkpointing on", {"gradient_checkpointing": True},
                    "the forward is recomputed in backward: ~30% slower training step"))
    elif s.backend == "unsloth" and s.gradient_checkpointing is True:
        out.append(("Unsloth offloaded checkpointing", {"gradient_checkpointing": "unsloth"},
                    "checkpoints offloaded to CPU RAM: slightly slower backward"))
    if s.optim not in _EIGHT_BIT_OPTIMIZERS + _STATELESS_OPTIMIZERS:
        out.append(("8-bit optimizer", {"optim": "adamw_8bit"},
                    "bitsandbytes 8-bit AdamW states: needs bitsandbytes; slightly different numerics"))
    if s.optim in ("adamw_torch", "adamw_hf"):
        out.append(("fused AdamW", {"optim": "adamw_torch_fused"}, "none (fused CUDA kernel, torch ≥ 2.x)"))
    if s.backend == "trl" and s.logits == "materialized" and not s.use_liger_kernel:
        out.append(("chunked log-probs (Liger)", {"use_liger_kernel": True},
                    "needs liger-kernel (or TRL ≥ 1.16, which chunks by default); same results"))
    if s.cast_lm_head_to_fp32:
        out.append(("lm_head in bf16", {"cast_lm_head_to_fp32": False}, "bf16 logits: less precise log-probs"))
    if s.backend == "trl" and s.dtype == "float32" and not s.load_in_4bit:
        out.append(("bf16 weights", {"dtype": "bfloat16"},
                    "no fp32 master weights: small updates can be lost to bf16 rounding"
                    if not s.is_lora else "bf16 base weights (adapters stay fp32): standard for LoRA"))
    if s.is_lora and not s.load_in_4bit:
        out.append(("4-bit base (QLoRA)", {"load_in_4bit": True},
                    "NF4-quantised base: slower forward (dequantisation), slight quality loss"))
    if s.beta != 0 and not s.is_lora:
        out.append(("no reference model (beta = 0)", {"beta": 0.0},
                    "no KL penalty towards the reference policy"))
    if s.attn_implementation in ("sdpa", "eager"):
        out.append(("FlashAttention-2", {"attn_implementation": "flash_attention_2"},
                    "needs flash-attn (Ampere or newer); no padding mask"))
    if s.use_vllm and s.vllm_mode == "colocate":
        out.append(("generate with transformers, not vLLM", {"use_vllm": False},
                    "HF generate: several times slower rollouts"))
    return out


def _shorter(length: int) -> int | None:
    """75% of a length, rounded down to a multiple of 8 above 64 tokens (None when it would not shrink)."""
    new = int(length * 0.75)
    if new >= 64:
        new -= new % 8
    return new if 1 <= new < length else None


def _apply(setup: Any, changes: Mapping[str, Any]) -> Any:
    """``setup.replace(**changes)``; when TRL's divisibility rule breaks (SetupError), halve num_generations
    along (b and G together), else give up (None)."""
    try:
        return setup.replace(**changes)
    except SetupError:
        if "num_generations" in changes or setup.num_generations < 4 or setup.num_generations % 2:
            return None
        try:
            return setup.replace(**changes, num_generations=setup.num_generations // 2)
        except SetupError:
            return None


def rank_levers(setup: Any, gpu: Any = None, *, budget_bytes: int | None = None, headroom: float = 0.0,
                phase: str | None = None, n: int | None = None) -> list[Lever]:
    """Every applicable one-step lever, re-estimated, ranked by saving (largest first).

    ``setup``: a GRPOSetup (or dict / path) or an :class:`~pytest_gpumem.estimate.Estimate`.
    ``fits_after`` is judged against ``budget_bytes`` when given, else against ``gpu``'s total with
    ``headroom`` (and vLLM's start-up checks). Levers that save nothing or give an invalid setup are dropped."""
    from ..predict.analytic import Estimate, estimate
    from ..gpus import resolve_gpu

    if isinstance(setup, Estimate):
        before = setup
        gpu = resolve_gpu(gpu) if gpu is not None else setup.gpu
        if gpu is not setup.gpu:
            before = estimate(setup.setup, gpu)
    else:
        gpu = resolve_gpu(gpu)
        before = estimate(setup, gpu)
    base = before.setup
    total = gpu.total_bytes if gpu is not None else None
    levers: list[Lever] = []
    for name, changes, trade_off in lever_candidates(base, total):
        after_setup = _apply(base, changes)
        if after_setup is None:
            continue
        after = estimate(after_setup, gpu)
        saves = before.peak_bytes - after.peak_bytes
        if saves <= 0:
            continue
        actual = {key: (getattr(base, key), getattr(after_setup, key)) for key in
                  list(changes) + ["num_generations"] if getattr(base, key) != getattr(after_setup, key)}
        if "num_generations" in actual and "num_generations" not in changes:
            trade_off += "; num_generations halved too (TRL: the generation batch must divide by it)"
        if budget_bytes is not None:
            fits = after.peak_bytes <= budget_bytes and not _vllm_refuses(after)
        elif gpu is not None:
            fits = after.fits(headroom=headroom)
        else:
            fits = None
        phase_saves = None
        if phase and phase in before.breakdown.phases and phase in after.breakdown.phases:
            phase_saves = before.breakdown.total(phase) - after.breakdown.total(phase)
        levers.append(Lever(name, actual, saves, after.peak_bytes, fits, trade_off, after_setup, phase_saves))
    levers.sort(key=lambda lever: (-lever.saves_bytes, lever.name))
    return levers[:n] if n is not None else levers


def _vllm_refuses(result: Any) -> bool:
    return any(w.startswith("vLLM would refuse") for w in result.warnings)


def levers_for(estimate_or_setup: Any, budget_bytes: int | None = None, n: int = 3, gpu: Any = None) -> list[Lever]:
    """The top ``n`` levers for a plugin failure message: those that bring the peak under ``budget_bytes``
    first (largest saving first), then the rest by saving. Each lever's ``line()`` is one printable line."""
    levers = rank_levers(estimate_or_setup, gpu, budget_bytes=budget_bytes)
    levers.sort(key=lambda lever: (lever.fits_after is not True, -lever.saves_bytes, lever.name))
    return levers[:n]


# -- which tensor the failed allocation was ---------------------------------------------------------
def tensor_candidates(setup: Any) -> list[dict[str, Any]]:
    """Single tensors of a GRPO step that are large enough to be "Tried to allocate X": name, formula, bytes.

    Shapes from TRL's GRPOTrainer (logits (rows, C+1, V) kept by ``logits_to_keep``, fp32 through
    accelerate's ``convert_outputs_to_fp32``), transformers' generate (a (rows, V) fp32 logits row per step,
    per-layer KV), SDPA's 4-D bool mask, AdamW's per-parameter states, vLLM's sampler (fp32 (seqs, V))."""
    spec = setup.model_spec
    b, c, p = setup.per_device_train_batch_size, setup.max_completion_length, setup.max_prompt_length
    length, vocab, h = setup.seq_len, spec.vocab_size, spec.hidden_size
    rows_gen = setup.generation_batch_size
    inter = spec.intermediate_size
    out = [
        ("the logits", "rows × (C+1) × V × 4 B", (b, c + 1, vocab, 4)),
        ("the logits sliced to the completion", "rows × C × V × 4 B", (b, c, vocab, 4)),
        ("the bf16 logits", "rows × (C+1) × V × 2 B", (b, c + 1, vocab, 2)),
        ("the log-softmax over the vocabulary", "rows × C × V × 4 B", (b, c, vocab, 4)),
        ("generate's next-token logits", "rows × V × 4 B", (rows_gen, vocab, 4)),
        ("the prefill logits of generate", "rows × P × V × 4 B", (rows_gen, p, vocab, 4)),
        ("one layer's KV cache in generate", "rows × L × 2·kv_heads·head_dim × 2 B", (rows_gen, length, 2 * spec.kv_out, 2)),
        ("the lm_head / embedding weight (fp32)", "V × h × 4 B", (vocab, h, 4)),
        ("the lm_head / embedding weight (bf16)", "V × h × 2 B", (vocab, h, 2)),
        ("an MLP activation", "rows × L × I × 2 B", (b, length, inter, 2)),
        ("an MLP activation (fp32)", "rows × L × I × 4 B", (b, length, inter, 4)),
        ("the hidden states (fp32)", "rows × L × h × 4 B", (b, length, h, 4)),
        ("SDPA's 4-D attention mask", "rows × L × L × 1 B", (b, length, length, 1)),
        ("eager attention scores", "rows × heads × L × L × 2 B", (b, spec.num_attention_heads, length, length, 2)),
        ("one MLP weight (fp32)", "h × I × 4 B", (h, inter, 4)),
        ("vLLM's sampler logits", "seqs × V × 4 B", (rows_gen, vocab, 4)),
        ("a chunked log-prob tile", "min(rows·C, 4096) × min(V, 32768) × 2 B", (min(b * c, 4096), min(vocab, 32768), 2)),
    ]
    result = []
    for name, formula, factors in out:
        num_bytes = 1
        for factor in factors:
            num_bytes *= factor
        values = " × ".join(str(f) for f in factors[:-1]) + f" × {factors[-1]} B"
        result.append({"name": name, "formula": formula, "values": values, "bytes": num_bytes})
    return result


def match_tensor(requested_bytes: int | None, setup: Any, tolerance: float = 0.1) -> dict[str, Any] | None:
    """The predicted tensor closest to ``requested_bytes`` (within ``tolerance`` relative): torch prints
    two decimals and rounds large blocks up to 2 MiB, so an exact match is not expected."""
    if not requested_bytes:
        return None
    scored = [(abs(c["bytes"] - requested_bytes) / requested_bytes, c) for c in tensor_candidates(setup) if c["bytes"] > 0]
    if not scored:
        return None
    # within the printing precision (two decimals, 2 MiB blocks: ~1%) candidates are indistinguishable
    # ((C+1) vs C rows of logits differ by 0.2%): the first in the list, the likelier, wins
    close = [item for item in scored if item[0] <= 0.01]
    error, candidate = close[0] if close else min(scored, key=lambda item: item[0])
    if error > tolerance:
        return None
    text = f"{candidate['name']}: {candidate['formula']} = {candidate['values']} = {format_gib(candidate['bytes'])}"
    return {**candidate, "relative_error": round(error, 4), "text": text}


# -- diagnose -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Diagnosis:
    """The explanation of one OOM: the parsed message, the phase, and with a setup the predicted
    breakdown of that phase, the tensor that failed and the ranked levers."""

    message: OomMessage
    phase: PhaseGuess
    estimate: Any = None  # Estimate of the setup on this GPU
    predicted_phase: str | None = None
    tensor: Mapping[str, Any] | None = None
    levers: tuple[Lever, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = self.message.to_dict()
        data["phase"] = self.phase.phase
        data["phase_evidence"] = self.phase.evidence
        data["phase_detail"] = self.phase.detail
        if self.estimate is not None:
            phase = self.predicted_phase
            breakdown = self.estimate.breakdown
            data["predicted"] = {
                "phase": phase, "phase_bytes": breakdown.total(phase) if phase else None,
                "components": breakdown.components(phase) if phase else {},
                "peak_phase": self.estimate.peak_phase, "peak_bytes": self.estimate.peak_bytes,
                "largest_allocation_name": self.estimate.largest_allocation_name,
                "largest_allocation_bytes": self.estimate.largest_allocation_bytes,
                "gpu": self.estimate.gpu.to_dict() if self.estimate.gpu else None,
                "warnings": list(self.estimate.warnings),
            }
            data["requested_tensor"] = dict(self.tensor) if self.tensor else None
            data["levers"] = [lever.to_dict() for lever in self.levers]
        data["notes"] = list(self.notes)
        return data

    def render(self) -> str:
        """The human-readable explanation (what ``gpumem explain`` prints)."""
        m, v = self.message, self.message.values
        lines = [f"found: {m.message}"]
        if m.count > 1:
            lines.append(f"({m.count} OOM/refusal messages in the input; explaining the most informative one)")
        if v.get("requested_bytes") is not None and v.get("free_bytes") is not None:
            where = f"GPU {v['device_index']}" if v.get("device_index") is not None else "the GPU"
            total = f" of {format_gib(v['total_bytes'])}" if v.get("total_bytes") else ""
            lines.append(f"requested {format_gib(v['requested_bytes'])}, free {format_gib(v['free_bytes'])}{total} "
                         f"on {where}: short by {format_gib(m.shortfall_bytes)}")
        elif m.shortfall_bytes is not None:
            lines.append(f"short by {format_gib(m.shortfall_bytes)}")
        if v.get("torch_allocated_bytes") is not None:
            parts = [f"{format_gib(v['torch_allocated_bytes'])} allocated by PyTorch"]
            if v.get("torch_reserved_unallocated_bytes") is not None:
                parts.append(f"{format_gib(v['torch_reserved_unallocated_bytes'])} reserved but unallocated")
            if m.non_torch_bytes is not None:
                parts.append(f"{format_gib(m.non_torch_bytes)} outside PyTorch")
            lines.append("this process: " + " + ".join(parts))
        phase = self.phase
        lines.append(f"phase: {phase.phase or 'unknown'}" + (f" ({phase.detail})" if phase.detail else "")
                     + f" — {phase.evidence}")
        if self.estimate is not None:
            est, ph = self.estimate, self.predicted_phase
            top = ", ".join(f"{name} {format_gib(num)}" for name, num in est.breakdown.top_components(ph, n=5))
            lines.append(f"predicted {ph} phase: {format_gib(est.breakdown.total(ph))} ({top})")
            if self.tensor:
                lines.append(f"the failed allocation is most likely {self.tensor['text']}")
            elif v.get("requested_bytes") and m.source == "torch":
                lines.append("no predicted tensor matches the requested size within 10%")
            if self.levers:
                lines.append("levers (re-estimated, largest saving first):")
                lines.extend(f"  {i}. {lever.line()}" for i, lever in enumerate(self.levers, 1))
            else:
                lines.append("no one-step lever lowers the predicted peak")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def short(self, n: int = 3) -> str:
        """A few lines for a failing test: shortfall, the tensor, the top ``n`` levers."""
        m = self.message
        head = f"{m.kind.replace('_', ' ')}"
        if m.shortfall_bytes is not None:
            head += f": short by {format_gib(m.shortfall_bytes)}"
        if self.phase.phase:
            head += f" in the {self.phase.phase} phase"
        lines = [head]
        if self.tensor:
            lines.append(f"failed allocation ≈ {self.tensor['text']}")
        for lever in self.levers[:n]:
            lines.append(f"lever: {lever.line()}")
        return "\n".join(lines)


def diagnose(text: str, setup: Any = None, gpu: Any = None, *, headroom: float = 0.0) -> Diagnosis:
    """Explain the OOM in ``text`` (a message, a traceback or a whole log).

    With ``setup`` (a GRPOSetup, dict or file path): the predicted breakdown of the phase that failed, the
    predicted tensor that matches the failed allocation, and the ranked levers judged against ``gpu``
    (default: the card's total as the message prints it, less other processes' memory)."""
    from ..predict.analytic import estimate
    from ..gpus import GPU, resolve_gpu

    if not isinstance(text, str):
        raise GpuMemError("text", f"expected the error text as a string, got {type(text).__name__}",
                          fix="pass the OOM message, the traceback or the whole log")
    message, phase = parse(text)
    if message is None:
        raise GpuMemError("text", "no OOM message found (looked for PyTorch's 'out of memory. Tried to allocate …', "
                          "'Allocation on device … would exceed allowed memory', 'CUDA error: out of memory' and "
                          "vLLM's start-up refusals)",
                          fix="pass the error message itself, its traceback, or the whole log that contains it")
    notes = _message_notes(message)
    if setup is None:
        return Diagnosis(message, phase, notes=tuple(notes))
    setup = GRPOSetup.coerce(setup)
    gpu = resolve_gpu(gpu)
    if gpu is None and message.values.get("total_bytes"):
        total = message.values["total_bytes"] - message.others_bytes
        gpu = GPU("GPU of the message" + (" less other processes" if message.others_bytes else ""), total, "oom-message")
    result = estimate(setup, gpu)
    predicted = phase.phase if phase.phase in result.breakdown.phases else None
    if predicted is None:
        predicted = _PERSISTENT_PHASE if phase.phase == "vllm_startup" else result.peak_phase
        if phase.phase is None:
            notes.append(f"the traceback does not tell the phase: showing the predicted peak phase ({predicted})")
    # a vLLM refusal's "request" is its whole reservation (util × total), not one tensor
    tensor = None if message.source == "vllm" else match_tensor(message.values.get("requested_bytes"), result.setup)
    levers = rank_levers(result, gpu, headroom=headroom, phase=predicted)
    notes.extend(_setup_notes(message, result, gpu))
    return Diagnosis(message, phase, result, predicted, tensor, tuple(levers), tuple(notes))


_PERSISTENT_PHASE = "persistent"


def diagnose_exception(exc: BaseException, setup: Any = None, gpu: Any = None, *, headroom: float = 0.0
                       ) -> Diagnosis | None:
    """:func:`diagnose` for a caught exception (its formatted traceback, chained causes included), or None
    when it is not an OOM — for the plugin, whose measured step failed with ``exc``."""
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if parse_oom(text) is None:
        return None
    return diagnose(text, setup, gpu, headroom=headroom)


def _message_notes(message: OomMessage) -> list[str]:
    """What the figures alone say (no setup needed)."""
    v, notes = message.values, []
    slack, allocated = v.get("torch_reserved_unallocated_bytes"), v.get("torch_allocated_bytes")
    if slack and allocated and slack > 0.1 * (slack + allocated):
        notes.append(f"{format_gib(slack)} is reserved by PyTorch but unallocated (fragmentation): "
                     "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True may recover it")
    shortfall = message.shortfall_bytes
    if message.kind == "torch_oom" and shortfall is not None and shortfall <= 0:
        notes.append("the request is not larger than the free memory: free memory is split in pieces none of which "
                     "is large enough (fragmentation), or another process allocated at the same moment")
    if v.get("process_in_use_bytes") is not None and not message.process_figure_plausible:
        notes.append(f"the per-process figure ({format_gib(v['process_in_use_bytes'])}) is impossible (NVML inside "
                     "a container or a driver quirk): non-PyTorch memory not computed")
    others = v.get("other_processes") or []
    if others and v.get("process_in_use_bytes") is not None:
        listed = ", ".join(f"PID {p['pid']}: {format_gib(p['bytes'])}" for p in others)
        notes.append(f"other processes hold {format_gib(message.others_bytes)} on this GPU ({listed})")
    elif others and allocated is not None:
        reserved = allocated + (slack or 0)
        mine = [p for p in others if p["bytes"] >= reserved]
        if len(others) == 1 and mine:
            notes.append(f"PID {others[0]['pid']} ({format_gib(others[0]['bytes'])}) is probably this process seen "
                         "from inside a container (torch cannot match NVML's host PIDs)")
    total = v.get("total_bytes")
    if v.get("requested_bytes") and total and v["requested_bytes"] > total and message.kind == "torch_oom":
        notes.append("the single allocation is larger than the whole GPU: no setting of the allocator helps; the "
                     "tensor itself must shrink")
    if message.kind == "vllm_free_memory" and total:
        util = v.get("gpu_memory_utilization")
        ceiling = int(v["free_bytes"] / total * 100) / 100  # floored: "below 0.89", never a rounded-up 0.90
        notes.append(f"vLLM needs util × total = {util} × {format_gib(total)} free when it starts, but only "
                     f"{format_gib(v['free_bytes'])} was free: lower gpu_memory_utilization to ≤ {ceiling:.2f} "
                     "(in TRL colocate mode the policy is already on the GPU when vLLM starts)")
    if message.kind == "vllm_kv_cache":
        if v.get("kv_cache_needed_bytes") is not None:
            notes.append(f"one request of max_model_len {v['max_model_len']} needs {format_gib(v['kv_cache_needed_bytes'])} "
                         f"of KV cache, {format_gib(v['kv_cache_available_bytes'])} is available: raise "
                         f"gpu_memory_utilization by ≥ {format_gib(message.shortfall_bytes)} / total, or lower max_model_len"
                         + (f" to ≤ {v['estimated_max_model_len']}" if v.get("estimated_max_model_len") else ""))
        elif v.get("kv_cache_tokens") is not None:
            notes.append(f"the KV cache holds {v['kv_cache_tokens']} tokens, max_model_len is {v['max_model_len']}: "
                         "raise gpu_memory_utilization or lower max_model_len "
                         f"(TRL: max_prompt_length + max_completion_length ≤ {v['kv_cache_tokens']})")
    if message.kind == "vllm_no_cache_blocks":
        notes.append("after weights and the profiling peak nothing was left of util × total for the KV cache: "
                     "raise gpu_memory_utilization or free the GPU")
    if message.kind == "vllm_sampler_warmup":
        notes.append("the sampler's fp32 (max_num_seqs × vocab) buffers did not fit: lower max_num_seqs "
                     "(TRL: per_device_train_batch_size × steps_per_generation) or gpu_memory_utilization")
    if message.kind == "vllm_memory_profiling":
        notes.append("another process released GPU memory while vLLM profiled: start vLLM on an idle GPU")
    if message.kind == "cuda_error":
        notes.append("a CUDA call (not PyTorch's allocator) ran out of memory: no figures are printed; "
                     "cuBLAS/cuDNN workspaces or a kernel launch found the card full")
    return notes


def _setup_notes(message: OomMessage, result: Any, gpu: Any) -> list[str]:
    notes = []
    v = message.values
    if v.get("requested_bytes") is not None and v.get("torch_allocated_bytes") is not None:
        observed = v["torch_allocated_bytes"] + (v.get("torch_reserved_unallocated_bytes") or 0) \
            + (message.non_torch_bytes or 0) + v["requested_bytes"]
        notes.append(f"observed need ≥ {format_gib(observed)} (what the process held + the request) vs predicted "
                     f"peak {format_gib(result.peak_bytes)} in the {result.peak_phase} phase")
    for warning in result.warnings:
        notes.append(warning)
    if gpu is not None and result.fits():
        notes.append(f"the estimate says this setup fits {gpu.name} ({format_gib(gpu.total_bytes)}): the real run "
                     "differs from the setup (longer sequences, other processes, another TRL version?)")
    return notes


# -- CLI ------------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("file", nargs="?", default="-", help="the error text or log (default: stdin)")
    parser.add_argument("--setup", help="the GRPO setup that failed (.json / .toml file or inline JSON)")
    parser.add_argument("--gpu", help="card name or size to judge levers against (default: the message's total)")
    parser.add_argument("--levers", type=int, default=None, metavar="N", help="show only the top N levers")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from ..cli.estimate import load_setup_arg

    if args.file == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(args.file, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError as exc:
            raise GpuMemError("file", f"cannot read {args.file}: {exc.strerror or exc}",
                              fix="give the path of a file holding the error text, or pipe it on stdin") from None
    setup = load_setup_arg(args.setup) if args.setup else None
    result = diagnose(text, setup, args.gpu)
    if args.levers is not None:
        result = Diagnosis(result.message, result.phase, result.estimate, result.predicted_phase, result.tensor,
                           result.levers[:args.levers], result.notes)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(result.render())
    return 0
