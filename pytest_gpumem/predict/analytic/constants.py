"""The estimate's constants, each with its source, and the component/phase names as plain strings."""

from __future__ import annotations

from ...breakdown import Component, Phase
from ...units import GIB, MIB

#: CUDA context + cuBLAS/cuDNN workspaces: "≈ 0.3–0.6 GiB typical (0.2–1.3 GiB seen)" (docs/memory-model.md §6).
CUDA_CONTEXT_BYTES = 512 * MIB
#: reserved − allocated of the caching allocator: "0–10% seen" (docs/memory-model.md §6); the middle is used.
ALLOCATOR_SLACK_FRACTION = 0.05
#: NF4 bytes per quantised parameter: 4 bits + one fp32 absmax per 64 weights (QLoRA, arXiv:2305.14314).
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64
#: with double quantisation (8-bit absmax per 64, fp32 per 256 blocks) ≈ 4.127 bits (docs/memory-model.md §4):
#: 0.515869 B/param. vLLM's bitsandbytes loader keeps the same packed layout; embeddings, lm_head and norms stay
#: 16-bit (Phi-4 4-bit: 8.46 GiB + LoRA slots predicted, 8.49 GiB logged, tests/data/realworld/).
NF4_DOUBLE_QUANT_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
#: FP8 (e4m3) linears: 1 byte + one fp32 scale per 128×128 block (vLLM's block-FP8 / compressed-tensors layout);
#: embeddings, lm_head and norms stay 16-bit (Qwen3-8B-FP8: 8.79 GiB + LoRA slots vs 8.96 logged).
FP8_BYTES_PER_PARAM = 1 + 4 / (128 * 128)
#: materialised fp32 logits (TRL ≤ 1.15 / accelerate's convert_outputs_to_fp32), bytes per element of b·C·V,
#: measured on CPU (docs/memory-model.md §2.1 table): forward peak, retained to backward, backward peak, scoring.
MATERIALIZED_FP32_LOGITS_BYTES = {"forward": 8.96, "retained": 4.2, "backward": 16.3, "scoring": 6.1}
#: TRL 1.16 chunked log-prob kernel (trl/kernels/chunked_logprob.py): tokens and vocab per projection tile.
CHUNKED_TOKEN_TILE = 4096
CHUNKED_VOCAB_TILE = 32768  # trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE
#: Unsloth's chunked_hidden_states_selective_log_softmax: bf16 logits + fp32 copy per chunk ≈ 10 B/element.
UNSLOTH_CHUNK_BYTES_PER_LOGIT = 10
#: vLLM non-torch memory (NCCL, cuBLAS handles): an upper bound, not a point: 0.00–0.13 GiB in the 12 public
#: single-GPU start-up logs that print it (tests/data/realworld/vllm-startup-logs.json, docs/accuracy.md).
VLLM_NON_TORCH_BYTES = int(0.13 * GIB)
#: vLLM CUDA graphs: "0.3–1.5 GiB typically (0.36, 0.65 for gemma-3-4b)" (docs/memory-model.md §3); 0.21–1.15 GiB
#: in the public start-up logs. Not modelled per setup (no GPU measurement of the per-graph cost yet): the
#: middle of the cited range. Where they count (on top of or inside the budget) is by version (vllm.py).
VLLM_CUDA_GRAPH_BYTES = int(0.5 * GIB)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class C:
    """Component names as plain strings: an Enum member's ``.value`` is a descriptor call (~0.4 µs), and an
    estimate names components some fifty times — a fifth of its time when fit() explores 10,000 candidates."""


class P:
    """Phase names as plain strings (see :class:`C`)."""


for _member in Component:
    setattr(C, _member.name, _member.value)
for _member in Phase:
    setattr(P, _member.name, _member.value)
del _member
#: components outside torch's caching allocator (the context) or in vLLM's own pool: no allocator slack
NOT_TORCH_ALLOCATED = frozenset([Component.CUDA_CONTEXT.value, Component.NCCL_BUFFERS.value]
                                + [c.value for c in Component if c.value.startswith("vllm_")])
