"""Reading an out-of-memory message: its figures, and the phase of the GRPO step its traceback failed in.

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

The measurement child parses its own OOM with it (so it lives in ``measure/``); ``diagnose.explain`` adds the
prediction and the levers. Byte values are ``round(printed number × unit)``, the same rounding as the
fixtures' expected values; the printed figures themselves carry two decimals, i.e. ±0.005 of the unit.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Iterable, Mapping

from ..units import UNIT_BYTES

# -- units ------------------------------------------------------------------------------------------
#: the units torch and vLLM print (a user's sizes are read by units.read_size, not here)
_UNIT_BYTES = {**UNIT_BYTES, "bytes": 1, "byte": 1}
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
_VLLM_FREE = _w(r"Free memory on device ?(cuda:\d+|[\w:]+)? ?\( ?(\d+(?:\.\d+)?) ?/ ?(\d+(?:\.\d+)?) ?GiB ?\) ?"
                r"on startup "
                r"is less than desired GPU memory utilization ?\( ?(\d+(?:\.\d+)?) ?, ?(\d+(?:\.\d+)?) ?GiB ?\)")
# vLLM V1 kv_cache_utils.check_enough_kv_cache_memory ("models's" before the typo fix, "model's" after)
_VLLM_KV_V1 = _w(r"To serve at least one request with the models?'?s max seq len \((\d+)\),? \(? ?" + _SIZE
                 + r" KV cache is needed, which is larger than the available KV cache memory \( ?" + _SIZE + r" ?\)")
_VLLM_KV_ESTIMATE = _w(r"estimated maximum model length is (\d+)")
# vLLM V0 worker.raise_if_cache_size_invalid
_VLLM_KV_V0 = _w(r"(?:The model'?s )?max seq len \((\d+)\) is larger than the maximum number of tokens that can be "
                 r"stored in KV "
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
        return PhaseGuess("training", str(hit) if hit.file else hit.code,
                          "forward / log-probs of a training micro-step")
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
