"""Explain an out-of-memory error: read the message, tell the phase, map it on the prediction, rank the levers.

Three layers, usable alone: :func:`~pytest_gpumem.measure.oom_message.parse_oom` and
:func:`~pytest_gpumem.measure.oom_message.detect_phase` read the message and its traceback; :func:`diagnose`
adds a setup: the predicted breakdown of that phase, which predicted tensor the failed allocation most likely
is (:func:`match_tensor`), and the ranked levers (:func:`~pytest_gpumem.diagnose.levers.rank_levers`), each
re-estimated.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from typing import Any, Mapping

from ..breakdown import Role
from ..errors import GpuMemError
from ..gpus import GPU, resolve_gpu
from ..measure.oom_message import OomMessage, PhaseGuess, parse, parse_oom
from ..predict.analytic import estimate
from ..spec import GRPOSetup
from ..units import format_gib
from .generation_levers import server_levers
from .levers import Lever, no_lever_text, rank_levers


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
        ("one layer's KV cache in generate", "rows × L × 2·kv_heads·head_dim × 2 B",
         (rows_gen, length, 2 * spec.kv_out, 2)),
        ("the lm_head / embedding weight (fp32)", "V × h × 4 B", (vocab, h, 4)),
        ("the lm_head / embedding weight (bf16)", "V × h × 2 B", (vocab, h, 2)),
        ("an MLP activation", "rows × L × I × 2 B", (b, length, inter, 2)),
        ("an MLP activation (fp32)", "rows × L × I × 4 B", (b, length, inter, 4)),
        ("the hidden states (fp32)", "rows × L × h × 4 B", (b, length, h, 4)),
        ("SDPA's 4-D attention mask", "rows × L × L × 1 B", (b, length, length, 1)),
        ("eager attention scores", "rows × heads × L × L × 2 B", (b, spec.num_attention_heads, length, length, 2)),
        ("one MLP weight (fp32)", "h × I × 4 B", (h, inter, 4)),
        ("vLLM's sampler logits", "seqs × V × 4 B", (rows_gen, vocab, 4)),
        ("a chunked log-prob tile", "min(rows·C, 4096) × min(V, 32768) × 2 B",
         (min(b * c, 4096), min(vocab, 32768), 2)),
    ]
    out += _distributed_tensors(setup)
    result = []
    for name, formula, factors in out:
        num_bytes = 1
        for factor in factors:
            num_bytes *= factor
        values = " × ".join(str(f) for f in factors[:-1]) + f" × {factors[-1]} B"
        result.append({"name": name, "formula": formula, "values": values, "bytes": num_bytes})
    return result


def _distributed_tensors(setup: Any) -> list[tuple[str, str, tuple]]:
    """The single allocations a sharding strategy adds (predict/analytic/parallel/ names their sources): ZeRO's IPG
    bucket and ZeRO-3's prefetch bucket, the whole model TRL gathers for HF generate under ZeRO-3, one FSDP
    unit's all-gather, and the full fp32 parameter FSDP2's weight sync materialises."""
    if not setup.is_distributed:
        return []
    spec, out = setup.model_spec, []
    layer = spec.layer_params()
    if setup.distributed in ("zero1", "zero2", "zero3"):
        out.append(("DeepSpeed's IPG reduce bucket", "reduce_bucket_size × 2 B", (setup.reduce_bucket_size, 2)))
    if setup.distributed == "zero3":
        out.append(("ZeRO-3's prefetch bucket", "stage3_prefetch_bucket_size × 2 B",
                    (setup.stage3_prefetch_bucket_size, 2)))
        out.append(("the whole bf16 model gathered for generation (ZeRO-3)", "Ψ × 2 B", (spec.num_params, 2)))
    if setup.distributed in ("fsdp1", "fsdp2"):
        out.append(("one decoder layer's FSDP all-gather (bf16)", "Ψ_layer × 2 B", (layer, 2)))
        out.append(("the largest parameter in fp32 (FSDP weight sync)", "V × h × 4 B",
                    (spec.vocab_size, spec.hidden_size, 4)))
    return out


def match_tensor(requested_bytes: int | None, setup: Any, tolerance: float = 0.1) -> dict[str, Any] | None:
    """The predicted tensor closest to ``requested_bytes`` (within ``tolerance`` relative): torch prints
    two decimals and rounds large blocks up to 2 MiB, so an exact match is not expected."""
    if not requested_bytes:
        return None
    scored = [(abs(c["bytes"] - requested_bytes) / requested_bytes, c)
              for c in tensor_candidates(setup) if c["bytes"] > 0]
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
    #: the role of the GPU that ran out (rank0, rank1+, vllm_server) and what in the log says so
    role: str | None = None
    role_evidence: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = self.message.to_dict()
        data["phase"] = self.phase.phase
        data["phase_evidence"] = self.phase.evidence
        data["phase_detail"] = self.phase.detail
        data["role"] = self.role
        data["role_evidence"] = self.role_evidence
        if self.estimate is not None:
            phase = self.predicted_phase
            breakdown = self._role_breakdown()
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

    def _role_breakdown(self) -> Any:
        return _role_view(self.estimate.breakdown, self.role)

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
        if self.role:
            lines.append(f"role: {self.role} — {self.role_evidence}")
        if self.estimate is not None:
            ph = self.predicted_phase
            shown = self._role_breakdown()
            top = ", ".join(f"{name} {format_gib(num)}" for name, num in shown.top_components(ph, n=5))
            lines.append(f"predicted {ph} phase{f' of {self.role}' if self.role else ''}: "
                         f"{format_gib(shown.total(ph))} ({top})")
            if self.tensor:
                lines.append(f"the failed allocation is most likely {self.tensor['text']}")
            elif v.get("requested_bytes") and m.source == "torch":
                lines.append("no predicted tensor matches the requested size within 10%")
            if self.levers:
                lines.append("levers (re-estimated, largest saving first):")
                lines.extend(f"  {i}. {lever.line()}" for i, lever in enumerate(self.levers, 1))
            else:
                lines.append(no_lever_text(shown.peak_bytes))
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def short(self, n: int = 3) -> str:
        """A few lines for a failing test: shortfall, the tensor, the top ``n`` levers."""
        m = self.message
        head = f"{m.kind.replace('_', ' ')}" + (f" on {self.role}" if self.role else "")
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
    source, evidence = log_source(text)
    if setup is None:
        role = Role.VLLM_SERVER.value if source == "vllm_process" else source
        return Diagnosis(message, phase, notes=tuple(notes), role=role, role_evidence=evidence)
    setup = GRPOSetup.coerce(setup)
    gpu = resolve_gpu(gpu)
    role, evidence = _role(setup, source, evidence, message)
    if message.values.get("total_bytes"):
        total = message.values["total_bytes"] - message.others_bytes
        if role == Role.VLLM_SERVER.value:
            # the log is the server's: its card is the one the message prints
            setup = setup.replace(vllm_server_gpu=total)
            notes.append(f"the vLLM server's card taken from the message: {format_gib(total)}")
        elif gpu is None:
            gpu = GPU("GPU of the message" + (" less other processes" if message.others_bytes else ""), total,
                      "oom-message")
    if role == Role.VLLM_SERVER.value and message.kind == "vllm_free_memory":
        notes.append(f"on the server the utilisation is trl vllm-serve's --gpu-memory-utilization "
                     f"(vllm_server_gpu_memory_utilization={setup.vllm_server_gpu_memory_utilization}); its GPUs must "
                     "be free of other processes (a trainer rank placed on them?)")
    result = estimate(setup, gpu)
    shown = _role_view(result.breakdown, role)
    predicted = phase.phase if phase.phase in shown.phases else None
    if predicted is None:
        predicted = _PERSISTENT_PHASE if phase.phase == "vllm_startup" else shown.peak_phase
        if phase.phase is None:
            notes.append(f"the traceback does not tell the phase: showing the predicted peak phase ({predicted})")
    # a vLLM refusal's "request" is its whole reservation (util × total), not one tensor
    tensor = None if message.source == "vllm" else match_tensor(message.values.get("requested_bytes"), result.setup)
    if role == Role.VLLM_SERVER.value:
        levers = server_levers(result, gpu, headroom=headroom)
    else:
        levers = rank_levers(result, gpu, headroom=headroom, phase=predicted)
    notes.extend(_setup_notes(message, result, gpu, shown))
    return Diagnosis(message, phase, result, predicted, tensor, tuple(levers), tuple(notes), role, evidence)


def _role_view(breakdown: Any, role: str | None) -> Any:
    """The breakdown of the role that ran out: that role's, or the whole one (one GPU, or no role known)."""
    return breakdown.role(role) if role in breakdown.roles else breakdown


#: a vLLM process's log prefix (V1's engine core, its workers, the API server) and torchrun's rank prefix
_VLLM_PROCESS = re.compile(r"\(((?:EngineCore|VllmWorker|Worker_TP|Worker_DP|Worker|APIServer)\w*)(?: rank=(\d+))?"
                           r" pid=\d+\)")
_TORCHRUN_RANK = re.compile(r"\[rank(\d+)\]:")


def log_source(text: str) -> tuple[str | None, str | None]:
    """Who wrote the log: ``"vllm_process"`` (a vLLM engine/worker/API-server prefix), ``"rank0"`` / ``"rank1+"``
    (torchrun's ``[rankN]:``), or None — and the prefix that says so."""
    match = _VLLM_PROCESS.search(text)
    if match:
        return "vllm_process", f"the log lines carry a vLLM process prefix ({match.group(0)})"
    match = _TORCHRUN_RANK.search(text)
    if match:
        rank = int(match.group(1))
        return ("rank0" if rank == 0 else "rank1+"), f"the log lines carry torchrun's prefix [rank{rank}]:"
    return None, None


def _role(setup: Any, source: str | None, evidence: str | None, message: OomMessage) -> tuple[str | None, str | None]:
    """The role that ran out, given the setup: a vLLM process or a vLLM refusal is the server in server mode
    (colocated vLLM runs inside a training rank: then the rank, rank 0 when the log does not say)."""
    server = setup.use_vllm and setup.vllm_mode == "server"
    vllm_side = source == "vllm_process" or message.source == "vllm"
    if server and vllm_side:
        why = evidence if source == "vllm_process" else f"a vLLM refusal ({message.kind}) in server mode"
        return Role.VLLM_SERVER.value, why
    if source in ("rank0", "rank1+"):
        return source, evidence
    if setup.is_distributed or server:
        return Role.RANK0.value, "no rank prefix in the log: assumed training rank 0"
    return None, None


_PERSISTENT_PHASE = "persistent"


def diagnose_exception(exc: BaseException, setup: Any = None, gpu: Any = None, *, headroom: float = 0.0
                       ) -> Diagnosis | None:
    """:func:`diagnose` for a caught exception (its formatted traceback, chained causes included), or None
    when it is not an OOM — for the plugin, whose measured step failed with ``exc``."""
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
            notes.append(f"one request of max_model_len {v['max_model_len']} needs "
                         f"{format_gib(v['kv_cache_needed_bytes'])} of KV cache, "
                         f"{format_gib(v['kv_cache_available_bytes'])} is available: raise gpu_memory_utilization by "
                         f"≥ {format_gib(message.shortfall_bytes)} / total, or lower max_model_len"
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


def _setup_notes(message: OomMessage, result: Any, gpu: Any, shown: Any = None) -> list[str]:
    """``shown``: the breakdown of the role that ran out (default: the estimate's)."""
    notes = []
    shown = shown if shown is not None else result.breakdown
    v = message.values
    if v.get("requested_bytes") is not None and v.get("torch_allocated_bytes") is not None:
        observed = v["torch_allocated_bytes"] + (v.get("torch_reserved_unallocated_bytes") or 0) \
            + (message.non_torch_bytes or 0) + v["requested_bytes"]
        notes.append(f"observed need ≥ {format_gib(observed)} (what the process held + the request) vs predicted "
                     f"peak {format_gib(shown.peak_bytes)} in the {shown.peak_phase} phase")
    for warning in result.warnings:
        notes.append(warning)
    if gpu is not None and result.fits():
        notes.append(f"the estimate says this setup fits {gpu.name} ({format_gib(gpu.total_bytes)}): the real run "
                     "differs from the setup (longer sequences, other processes, another TRL version?)")
    return notes
