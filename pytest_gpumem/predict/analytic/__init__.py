"""The analytic memory model of one GRPO step on one GPU — pure Python, no torch.

Peak ≈ CUDA context + persistent + max(generation, scoring, training, optimizer-step transients) + slack
(shared/docs/memory-model.md §1). Each phase of the returned :class:`~pytest_gpumem.breakdown.Breakdown`
lists everything live at that phase's peak, so the step's peak is the largest phase. The model is of the
steady state (optimizer states exist; step ≥ 2), which is what a long run lives in.

Notation (memory-model.md): b = per_device_train_batch_size, G = num_generations, P / C = prompt /
completion tokens, L = P + C, V = vocab, h = hidden, I = MLP intermediate, n_l = layers, Ψ = parameters.
Every formula below cites where it comes from; numbers "measured on CPU" come from live-tensor accounting
of TRL's exact op sequence and are checked against the FakeTensor simulation (tests/test_accuracy_matrix.py)
and, where a session had a GPU, against measurements committed under validation/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ...architectures import architecture
from ...breakdown import Breakdown, Component, Phase, PeakJudgement
from ...errors import GpuMemError
from ...gpus import GPU, resolve_gpu
from ...models import ModelSpec
from ...spec import OPTIMIZERS, GRPOSetup
from ...units import GIB, MIB, format_gib

# -- constants, each with its source ----------------------------------------------------------------
#: CUDA context + cuBLAS/cuDNN workspaces: "≈ 0.3–0.6 GiB typical (0.2–1.3 GiB seen)" (memory-model.md §6).
CUDA_CONTEXT_BYTES = 512 * MIB
#: reserved − allocated of the caching allocator: "0–10% seen" (memory-model.md §6); the middle is used.
ALLOCATOR_SLACK_FRACTION = 0.05
#: NF4 bytes per quantised parameter: 4 bits + one fp32 absmax per 64 weights (QLoRA, arXiv:2305.14314).
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64
#: with double quantisation (8-bit absmax per 64, fp32 per 256 blocks) ≈ 4.127 bits (memory-model.md §4).
NF4_DOUBLE_QUANT_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
#: materialised fp32 logits (TRL ≤ 1.15 / accelerate's convert_outputs_to_fp32), bytes per element of b·C·V,
#: measured on CPU (memory-model.md §2.1 table): forward peak, retained to backward, backward peak, scoring.
MATERIALIZED_FP32_LOGITS_BYTES = {"forward": 8.96, "retained": 4.2, "backward": 16.3, "scoring": 6.1}
#: TRL 1.16 chunked log-prob kernel (trl/kernels/chunked_logprob.py): tokens and vocab per projection tile.
CHUNKED_TOKEN_TILE = 4096
CHUNKED_VOCAB_TILE = 32768  # trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE
#: Unsloth's chunked_hidden_states_selective_log_softmax: bf16 logits + fp32 copy per chunk ≈ 10 B/element.
UNSLOTH_CHUNK_BYTES_PER_LOGIT = 10
#: vLLM: TRL colocate passes max_num_batched_tokens=4096 (trl/generation/vllm_generation.py).
VLLM_MAX_BATCHED_TOKENS = 4096
#: vLLM non-torch memory (NCCL, cuBLAS handles): 0.07–0.13 GiB in published single-GPU start-up logs.
VLLM_NON_TORCH_BYTES = int(0.13 * GIB)
#: vLLM CUDA graphs: "0.3–1.5 GiB typically (0.36, 0.65 for gemma-3-4b)" (memory-model.md §3); TRL does not
#: pass enforce_eager, so graphs are captured and counted inside the budget (vLLM ≥ 0.21).
VLLM_CUDA_GRAPH_BYTES = int(0.5 * GIB)
#: Saved activations per block: derived op by op in _Model.layer_activation_bytes_per_token (the former
#: constant 26h + 8I held for Llama/Qwen2 in bf16 only; see docs/accuracy.md).

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class _C:
    """Component names as plain strings: an Enum member's ``.value`` is a descriptor call (~0.4 µs), and an
    estimate names components some fifty times — a fifth of its time when fit() explores 10,000 candidates."""


class _P:
    """Phase names as plain strings (see :class:`_C`)."""


for _member in Component:
    setattr(_C, _member.name, _member.value)
for _member in Phase:
    setattr(_P, _member.name, _member.value)
del _member
#: components outside torch's caching allocator (the context) or in vLLM's own pool: no allocator slack
_NOT_TORCH_ALLOCATED = frozenset([_C.CUDA_CONTEXT] + [c.value for c in Component
                                                                     if c.value.startswith("vllm_")])


@dataclass(frozen=True)
class Estimate(PeakJudgement):
    """The predicted memory of one GRPO step: a :class:`Breakdown` plus what an OOM would report."""

    setup: GRPOSetup
    model: ModelSpec
    breakdown: Breakdown
    gpu: GPU | None
    largest_allocation_bytes: int
    largest_allocation_name: str
    assumptions: tuple[str, ...]
    warnings: tuple[str, ...]


def estimate(setup: GRPOSetup | Mapping | str | Path, gpu: str | int | GPU | None = None) -> Estimate:
    """Predict the per-phase memory of ``setup`` (optionally judged against ``gpu``: a size or card name)."""
    return _Model(GRPOSetup.coerce(setup), resolve_gpu(gpu)).run()


class _Model:
    """One estimate's working state; each method computes one consumer of memory-model.md."""

    def __init__(self, setup: GRPOSetup, gpu: GPU | None):
        self.setup = setup
        self.spec = setup.model_spec
        self.gpu = gpu
        self.assumptions: list[str] = list(setup.resolution_notes)
        self.warnings: list[str] = []
        self.tensors: list[tuple[str, str, int]] = []  # (phase, description, bytes) for largest allocation
        self._lora_params: int | None = None
        # resolved once: the estimate asks for the adapted Linears many times
        self.lora_targets = frozenset(setup.resolve_target_modules()) if setup.is_lora else frozenset()

    # -- sizes of things ------------------------------------------------------------------------
    @property
    def weight_bytes_per_param(self) -> int:
        return DTYPE_BYTES[self.setup.dtype]

    @property
    def residual_bytes(self) -> int:
        """The residual stream's dtype: fp32 weights under bf16 autocast keep an fp32 residual stream
        (linears emit bf16, the adds promote to fp32); bf16 weights keep it bf16."""
        return 4 if self.setup.dtype == "float32" else 2

    def lora_params(self) -> int:
        """LoRA (PEFT): an adapted Linear adds ``r · (in + out)`` (memory-model.md §4)."""
        if not self.setup.is_lora:
            return 0
        if self._lora_params is None:
            self._lora_params = self._count_lora_params()
        return self._lora_params

    def _count_lora_params(self) -> int:
        shapes = self.spec.linear_shapes()
        per_layer = sum(shapes[name][0] + shapes[name][1] for name in self.lora_targets)
        return self.setup.lora_rank * per_layer * self.spec.num_hidden_layers

    def lora_bytes_per_param(self) -> int:
        """PEFT adapters are fp32 (autocast_adapter_dtype=True); TRL casts them to bf16 for a quantised base
        (trl/trainer/grpo_trainer.py: "When using QLoRA, the PEFT adapter weights are converted to bf16")."""
        if self.setup.load_in_4bit and self.setup.backend == "trl":
            return 2
        return 4

    def base_weight_bytes(self) -> int:
        """Policy weights: Ψ × dtype bytes, or NF4 linears + 16/32-bit embeddings, head and norms."""
        spec, setup = self.spec, self.setup
        if setup.load_in_4bit:
            quantised = spec.linear_params()
            per_param = NF4_DOUBLE_QUANT_BYTES_PER_PARAM if setup.backend == "unsloth" else NF4_BYTES_PER_PARAM
            rest = spec.num_params - quantised
            return int(quantised * per_param) + rest * self.weight_bytes_per_param
        weights = spec.num_params * self.weight_bytes_per_param
        if setup.cast_lm_head_to_fp32 and self.weight_bytes_per_param == 2:
            weights += spec.vocab_size * spec.hidden_size * 2  # lm_head (or the tied embedding) in fp32
        return weights

    def trainable_params(self) -> int:
        return self.lora_params() if self.setup.is_lora else self.spec.num_params

    def trainable_bytes_per_param(self) -> int:
        return self.lora_bytes_per_param() if self.setup.is_lora else self.weight_bytes_per_param

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> Estimate:
        setup = self.setup
        self._note_assumptions()
        persistent = self.persistent()
        phases: dict[str, dict[str, int]] = {_P.PERSISTENT: dict(persistent)}
        phases[_P.GENERATION] = self._with_slack({**persistent, **self.generation()})
        scoring = self.scoring()
        if scoring is not None:
            phases[_P.SCORING] = self._with_slack({**self._persistent_awake(persistent), **scoring})
        phases[_P.TRAINING] = self._with_slack({**self._persistent_awake(persistent), **self.training()})
        phases[_P.OPTIMIZER] = self._with_slack({**self._persistent_awake(persistent), **self.optimizer_step()})
        phases[_P.PERSISTENT] = self._with_slack(self._persistent_awake(persistent))
        breakdown = Breakdown(phases=phases, source="estimate")
        peak_phase = breakdown.peak_phase
        candidates = [t for t in self.tensors if t[0] == peak_phase] or self.tensors
        largest = max(candidates, key=lambda t: t[2]) if candidates else (peak_phase, "none", 0)
        self._check_vllm(persistent)
        if setup.use_vllm and setup.vllm_mode == "server":
            self.assumptions.append("vllm_mode='server': vLLM runs on other GPUs, none of its memory is on this one")
        return Estimate(setup=setup, model=self.spec, breakdown=breakdown, gpu=self.gpu,
                        largest_allocation_bytes=int(largest[2]), largest_allocation_name=largest[1],
                        assumptions=tuple(self.assumptions), warnings=tuple(self.warnings))

    def _note_assumptions(self) -> None:
        setup, explicit = self.setup, self.setup.explicit_fields
        if setup.backend == "trl" and "logits" not in explicit:
            mode = "chunked log-probs (fused lm_head)" if setup.logits == "chunked" else "materialised fp32 logits"
            self.assumptions.append(f"trl {setup.trl_version} → {mode}")
        if "dtype" not in explicit and setup.backend == "trl":
            self.assumptions.append("dtype not given: TRL loads a model given by name in float32 "
                                    "(set dtype='bfloat16' if you pass model_init_kwargs={'dtype': torch.bfloat16})")
        if "max_prompt_length" not in explicit and "max_seq_length" not in explicit:
            self.assumptions.append(f"max_prompt_length not given: prompts assumed ≤ {setup.max_prompt_length} tokens "
                                    "(TRL ≥ 0.28 does not truncate prompts)")
        if setup.is_lora and "lora_target_modules" not in explicit:
            self.assumptions.append(f"lora_target_modules not given: {', '.join(setup.resolve_target_modules())} "
                                    f"({'Unsloth' if setup.backend == 'unsloth' else 'PEFT'}'s default)")
        if setup.load_in_4bit:
            self.assumptions.append("4-bit base: NF4 linears, embeddings/head/norms unquantised; dequantisation is "
                                    "transient, one layer at a time")
        if self.spec.is_moe:
            self.assumptions.append("MoE: all experts' weights are resident; activations use the active experts "
                                    f"({self.spec.num_experts_per_tok} of {self.spec.num_experts})")

    # -- persistent -----------------------------------------------------------------------------
    def persistent(self) -> dict[str, int]:
        """Context, weights, LoRA, optimizer states, reference model, vLLM reservation, batch buffers
        (memory-model.md §1.1). Gradients are not persistent: ``zero_grad(set_to_none=True)`` frees them."""
        setup, spec = self.setup, self.spec
        parts = {_C.CUDA_CONTEXT: CUDA_CONTEXT_BYTES}
        parts[_C.WEIGHTS] = self.base_weight_bytes()
        if setup.is_lora:
            parts[_C.LORA] = self.lora_params() * self.lora_bytes_per_param()
        state_bytes, _ = OPTIMIZERS[setup.optim]
        if setup.optim.startswith(("adamw_torch", "adamw_hf")):
            # torch AdamW keeps exp_avg / exp_avg_sq in the parameter's dtype: 2 × param bytes. Not
            # bitsandbytes' paged_adamw_32bit: Optimizer2State allocates fp32 state1/state2 whatever the
            # parameter dtype (bnb/optim/optimizer.py, optim_bits=32) — OPTIMIZERS' 8 B/param stands
            state_bytes = 2 * self.trainable_bytes_per_param()
        parts[_C.OPTIMIZER_STATES] = int(self.trainable_params() * state_bytes)
        if setup.beta != 0 and not setup.is_lora:
            # a full second model, loaded by the same dtype rule (memory-model.md §2)
            parts[_C.REFERENCE] = spec.num_params * self.weight_bytes_per_param
        parts.update(self.vllm_reservation())
        if setup.backend == "unsloth" and setup.use_vllm:
            # fast_inference: the training model is built on vLLM's tensors — one copy of the base weights
            parts[_C.WEIGHTS] = 0
        rows = setup.generation_batch_size
        # the buffered generation batch: ids + masks (int64), old/ref log-probs and advantages (fp32)
        parts[_C.BATCH_BUFFERS] = rows * setup.seq_len * (8 + 8 + 4 + 4)
        return parts

    def vllm_reservation(self) -> dict[str, int]:
        """Colocated vLLM: ``gpu_memory_utilization × total`` split into weights, activation peak, non-torch,
        CUDA graphs and KV cache (the pool fills the rest of the budget; memory-model.md §3)."""
        setup, spec = self.setup, self.spec
        if not setup.use_vllm or setup.vllm_mode != "colocate":
            return {}
        if setup.load_in_4bit:
            vllm_weights = int(spec.linear_params() * NF4_BYTES_PER_PARAM) + (spec.num_params - spec.linear_params()) * 2
        else:
            vllm_weights = spec.num_params * 2  # bf16 from the checkpoint's dtype
        activations = self.vllm_activation_peak()
        if self.gpu is not None:
            total = self.gpu.total_bytes
            if setup.backend == "unsloth":
                # Unsloth scales the utilisation by the memory free when vLLM starts (first, on an empty card)
                budget = int(setup.vllm_gpu_memory_utilization * (total - CUDA_CONTEXT_BYTES))
            else:
                budget = int(setup.vllm_gpu_memory_utilization * total)
            kv_cache = vllm_kv_cache_bytes(budget, vllm_weights, activations, VLLM_NON_TORCH_BYTES,
                                           VLLM_CUDA_GRAPH_BYTES)
        else:
            # without a card the reservation is unknown: size the KV pool for one generation batch
            kv_cache = self.kv_cache_needed()
            self.assumptions.append("no GPU given: vLLM's KV cache sized for one generation batch; on a card it "
                                    "fills gpu_memory_utilization × total — pass gpu= for the real reservation")
        return {_C.VLLM_WEIGHTS: vllm_weights, _C.VLLM_ACTIVATIONS: activations,
                _C.VLLM_NON_TORCH: VLLM_NON_TORCH_BYTES,
                _C.VLLM_CUDA_GRAPHS: VLLM_CUDA_GRAPH_BYTES,
                _C.VLLM_KV_CACHE: max(kv_cache, 0)}

    def vllm_activation_peak(self) -> int:
        """vLLM profiles one dummy forward of max_num_batched_tokens tokens: the MLP's gate/up outputs and
        activation (3·I) plus norms/attention (4·h) in bf16, and the sampler's fp32 logits for max_num_seqs rows.
        Checked against the measured 0.32 GiB at 4096 tokens for a 7.56 GiB model (memory-model.md §3)."""
        spec = self.spec
        intermediate = spec.moe_intermediate_size * spec.num_experts_per_tok if spec.is_moe else spec.intermediate_size
        tokens = VLLM_MAX_BATCHED_TOKENS
        max_num_seqs = self.setup.generation_batch_size
        return tokens * (3 * intermediate + 4 * spec.hidden_size) * 2 + max_num_seqs * spec.vocab_size * 4 * 2

    def kv_cache_needed(self) -> int:
        """KV bytes for one generation batch: rows × one sequence's KV cache (ModelSpec.kv_cache_bytes)."""
        return self.setup.generation_batch_size * self.spec.kv_cache_bytes(self.setup.seq_len)

    def _persistent_awake(self, persistent: dict[str, int]) -> dict[str, int]:
        """Outside generation, sleep mode (level 2) frees vLLM's weights and KV cache; graphs, non-torch and
        the context stay (memory-model.md §3)."""
        if not (self.setup.use_vllm and self.setup.vllm_mode == "colocate" and self.setup.vllm_enable_sleep_mode):
            return dict(persistent)
        return {k: v for k, v in persistent.items()
                if k not in (_C.VLLM_WEIGHTS, _C.VLLM_KV_CACHE,
                             _C.VLLM_ACTIVATIONS)}

    # -- generation -----------------------------------------------------------------------------
    def generation(self) -> dict[str, int]:
        """Rollouts of the whole local generation batch (b × steps_per_generation rows) at once.
        vLLM: its reservation is already persistent. HF generate: dynamic KV cache of all rows, a (rows, V)
        fp32 logits row per step and the prefill's transient (memory-model.md §1.2)."""
        setup, spec = self.setup, self.spec
        if setup.use_vllm:
            return {}
        rows = setup.generation_batch_size
        kv_cache = self.kv_cache_needed()
        self.tensors.append((_P.GENERATION, f"generate KV cache, one layer ({rows} rows × {setup.seq_len} tokens)",
                             kv_cache // max(spec.num_hidden_layers, 1)))
        # logits of the last position, upcast to fp32 by generate, plus the softmax/sampling copy
        logits = rows * spec.vocab_size * 4 * 2
        # the prefill runs the prompt through one layer at a time under no_grad: MLP gate/up/act + 4 h-sized
        prefill = rows * setup.max_prompt_length * (3 * spec.intermediate_size + 4 * spec.hidden_size) * 2
        return {_C.GENERATE_KV_CACHE: kv_cache, _C.GENERATE_LOGITS: logits,
                _C.ACTIVATIONS: prefill}

    # -- scoring --------------------------------------------------------------------------------
    def scoring(self) -> dict[str, int] | None:
        """A no-grad forward over b rows (checkpointing off). Its peak is either inside a block — the MLP's
        gate, up and product live together (3 × I in bf16) beside the residual stream and the norm's output,
        plus the per-linear bf16 cast of an fp32 norm output — or in the log-prob head, whichever is larger;
        both sit on the hidden stream (b·L·h). Measured with the FakeTensor simulation
        (tests/test_accuracy_matrix.py): adding the two, as this model did before, over-counted by up to 5%."""
        if not self.setup.scoring_passes:
            return None
        setup, spec = self.setup, self.spec
        tokens = setup.per_device_train_batch_size * setup.seq_len
        h, r = spec.hidden_size, self.residual_bytes
        hidden_stream = tokens * h * r
        layer_peak = tokens * (6 * self._active_intermediate() + r * h + (4 * h if r == 4 else 0))
        head_peak = self.logits_bytes("scoring")
        if layer_peak >= head_peak:
            parts = {_C.ACTIVATIONS: hidden_stream + layer_peak}
        else:
            parts = {_C.ACTIVATIONS: hidden_stream, _C.LOGITS: head_peak}
        parts[_C.ATTENTION_MASK] = self.mask_bytes()
        return parts

    # -- training -------------------------------------------------------------------------------
    def _active_intermediate(self) -> int:
        spec = self.spec
        if spec.is_moe:
            return spec.num_experts_per_tok * (spec.moe_intermediate_size or spec.intermediate_size)
        return spec.intermediate_size

    # Saved activations, derived op by op from what autograd keeps in transformers 5's Llama/Qwen2/Qwen3/
    # Gemma3 blocks under bf16 autocast (sdpa), and checked per layer against the FakeTensor simulation
    # (pytest_gpumem/simulate.py): within 3% for those four families × {bf16, fp32} × {full, LoRA q/v, LoRA
    # all-linear, QLoRA} × {sdpa, eager} (docs/accuracy.md). The old constant (26h + 8I) was right for Llama
    # and Qwen2 in bf16 only: it missed Qwen3's/Gemma3's q/k norms, Gemma's four norms, the fp32 stream of
    # fp32 weights and the extra input copies LoRA adapters save (Qwen3 bf16: 74.7h measured vs 50h).

    def _lora_targets(self) -> frozenset:
        return self.lora_targets

    def _linear_inputs_saved(self, x_bytes: int, consumers: tuple, features: int) -> int:
        """Bytes per token kept for an input of ``features`` that feeds the Linears ``consumers``: a trained
        Linear keeps its bf16 input (shared when the input already is bf16, else its own autocast copy); a
        frozen base keeps nothing; a LoRA adapter keeps its own bf16 copy (PEFT casts the input to the
        adapter's fp32 dtype, autocast back to bf16) unless adapter and input are both bf16 (QLoRA)."""
        setup = self.setup
        trained = not setup.is_lora
        adapter_bf16 = setup.load_in_4bit and setup.backend == "trl"
        targets = self._lora_targets()
        shared, private = False, 0
        for name in consumers:
            if trained:
                if x_bytes == 2:
                    shared = True
                else:
                    private += 2 * features
            if name in targets:
                if adapter_bf16 and x_bytes == 2:
                    shared = True
                else:
                    private += 2 * features
        return (2 * features if shared else 0) + private

    def _norm_saved(self, x_bytes: int, features: int, consumers: tuple = ()) -> int:
        """An RMSNorm over ``features``: the fp32 upcast (a copy, or an fp32 input itself) is kept; a trained
        weight also keeps the normalised tensor (input dtype; Gemma's ``x * (1 + w)`` in fp32); then what the
        consuming Linears keep of its output."""
        saved = 4 * features
        if not self.setup.is_lora:
            saved += (4 if architecture(self.spec.model_type).gemma_norms else x_bytes) * features
        if consumers:
            saved += self._linear_inputs_saved(x_bytes, consumers, features)
        return saved

    def layer_activation_bytes_per_token(self) -> int:
        """Saved activations of one block without checkpointing, bytes per token, excluding the per-layer mask
        copy (:meth:`mask_copy_bytes`) and weight casts (:meth:`autocast_weight_copies`): norms, q/k norms,
        rotated q, k and v (repeated copies for GQA when kv heads > 1: transformers' ``repeat_kv``), the
        attention output, sdpa's fp32 log-sum-exp (eager: fp32 softmax + bf16 probabilities, 6·heads·L), the
        MLP's gate, activation and up (and their product when down_proj keeps its input)."""
        setup, spec = self.setup, self.spec
        h, q, kv, heads = spec.hidden_size, spec.q_out, spec.kv_out, spec.num_attention_heads
        inter = self._active_intermediate()
        r = self.residual_bytes
        trained = not setup.is_lora
        gemma = architecture(spec.model_type).gemma_norms
        adapter_bf16 = setup.load_in_4bit and setup.backend == "trl"
        # autocast Linears emit bf16; bitsandbytes' Linear4bit casts its output back to the input's dtype
        out_bytes = r if setup.load_in_4bit else 2
        per_token = self._norm_saved(r, h, ("q_proj", "k_proj", "v_proj"))
        if spec.qk_norm:
            for features in (q, kv):
                per_token += 4 * features
                if trained:
                    per_token += (4 if gemma else out_bytes) * features
        repeats = spec.num_attention_heads // max(spec.num_key_value_heads, 1)
        kv_saved = 2 * q if (repeats > 1 and spec.num_key_value_heads > 1) else 2 * kv
        attn = setup.attn_implementation
        if attn.startswith("flash"):
            # varlen: unpadded q/k/v copies, output, fp32 LSE; the padded output copy feeds o_proj
            per_token += 2 * q + 4 * kv + 2 * q + 4 * heads + 2 * q
        else:
            per_token += 2 * q + 2 * kv_saved + 2 * q
            per_token += 6 * heads * setup.seq_len if attn == "eager" else 4 * heads
        if "o_proj" in self._lora_targets() and not adapter_bf16:
            per_token += 2 * q
        if gemma:  # post-attention norm on o_proj's output
            per_token += self._norm_saved(out_bytes, h)
        per_token += self._norm_saved(r, h, ("gate_proj", "up_proj"))
        per_token += 3 * out_bytes * inter
        per_token += self._linear_inputs_saved(out_bytes, ("down_proj",), inter)
        if gemma:  # post-feedforward norm
            per_token += self._norm_saved(out_bytes, h)
        return per_token

    def saved_activations(self) -> int:
        """What the forward keeps for backward (memory-model.md §5): with checkpointing exactly one layer input
        per layer (h × residual bytes per token) plus ≈ 2h × residual bytes after the final norm; Unsloth's
        offloaded checkpointing keeps ~2 layer-input buffers on the GPU; without checkpointing every block's
        (:meth:`layer_activation_bytes_per_token`; mask copies and weight casts are separate components)."""
        setup, spec = self.setup, self.spec
        tokens = setup.per_device_train_batch_size * setup.seq_len
        h = spec.hidden_size
        if setup.gradient_checkpointing == "unsloth":
            return tokens * h * 2 * 2 + tokens * 2 * h * self.residual_bytes
        if setup.gradient_checkpointing:
            return tokens * h * self.residual_bytes * (spec.num_hidden_layers + 2)
        return tokens * (self.layer_activation_bytes_per_token() * spec.num_hidden_layers
                         + 2 * h * self.residual_bytes)

    def recompute_temporaries_per_token(self) -> int:
        """Backward temporaries of one block at its worst moment (the MLP's backward), bytes per token, fitted
        to the FakeTensor simulation (±3h over Llama/Qwen2/Qwen3/Gemma3): trained MLP — the gradients of the
        product, the activation and up (3 × 2I) minus the product already released, plus the incoming hidden
        gradient; LoRA on down_proj — PEFT's fp32 copy of its input (4I) is alive too."""
        setup, spec = self.setup, self.spec
        inter, h = self._active_intermediate(), spec.hidden_size
        if not setup.is_lora:
            return 4 * inter + 2 * h
        if "down_proj" in self._lora_targets() and not (setup.load_in_4bit and setup.backend == "trl"):
            return 6 * inter + 10 * h
        return 4 * inter + 9 * h

    def recomputed_layer(self) -> int:
        """The block being processed in backward, at its worst moment: under checkpointing its recomputed
        activations, per-layer mask copy and weight casts plus the backward temporaries; without, only the
        temporaries (its saved activations are counted with the others)."""
        setup = self.setup
        tokens = setup.per_device_train_batch_size * setup.seq_len
        temporaries = tokens * self.recompute_temporaries_per_token()
        if not setup.gradient_checkpointing:
            return temporaries
        return (tokens * self.layer_activation_bytes_per_token() + temporaries + self.mask_copy_bytes()
                + self.autocast_weight_copies())

    def mask_bytes(self) -> int:
        """The 4-D mask transformers builds once per forward for a padded batch: bool b·L² for sdpa (one per
        attention kind: Gemma's sliding and full layers get one each when the window is shorter than L),
        in the model's dtype for eager; FlashAttention none (memory-model.md §2)."""
        setup, spec = self.setup, self.spec
        b, length = setup.per_device_train_batch_size, setup.seq_len
        if setup.attn_implementation.startswith("flash"):
            return 0
        kinds = 2 if (spec.num_sliding_layers and spec.num_full_attention_layers and spec.sliding_window
                      and spec.sliding_window < length) else 1
        if setup.attn_implementation == "eager":
            return b * length * length * self.residual_bytes * kinds
        return b * length * length * kinds

    def mask_copy_bytes(self) -> int:
        """torch's ``scaled_dot_product_attention`` converts the bool mask to the query dtype on every call
        (``convert_boolean_attn_mask``) and the kernel keeps it for backward: b·L² × 2 bytes per layer
        (seen in the FakeTensor simulation as ``where`` outputs, one per layer)."""
        setup = self.setup
        if setup.attn_implementation != "sdpa":
            return 0
        return setup.per_device_train_batch_size * setup.seq_len ** 2 * 2

    def logits_bytes(self, when: str) -> int:
        """The log-prob path's transient for ``when`` in (forward, backward, scoring).

        materialised: the multipliers of memory-model.md §2.1 × b·C·V (fp32 logits through accelerate).
        chunked (TRL 1.16 ``ChunkedLogProbFunction``): a [4096, 32768] projection tile in the compute dtype,
        the compacted completion hidden states, fp32 per-token statistics; in backward an fp32 grad of those
        hidden states and, when the head is trained (full fine-tuning), an fp32 [V, h] weight gradient.
        Unsloth: per chunk ``tokens × V × 10 B`` (bf16 logits + fp32 copy)."""
        setup, spec = self.setup, self.spec
        b, completion = setup.per_device_train_batch_size, setup.max_completion_length
        vocab, h = spec.vocab_size, spec.hidden_size
        phase = _P.SCORING if when == "scoring" else _P.TRAINING
        if setup.backend == "unsloth":
            length = setup.seq_len
            tokens_per_chunk = -(-length // max(4, length // 4096))
            chunk = tokens_per_chunk * vocab * UNSLOTH_CHUNK_BYTES_PER_LOGIT
            self.tensors.append((phase, f"Unsloth logits chunk ({tokens_per_chunk}, {vocab}) float32",
                                 tokens_per_chunk * vocab * 4))
            return chunk
        if setup.logits == "materialized" and not setup.use_liger_kernel:
            elements = b * completion * vocab
            self.tensors.append((phase, f"logits ({b}, {completion + 1}, {vocab}) float32",
                                 b * (completion + 1) * vocab * 4))
            return int(elements * MATERIALIZED_FP32_LOGITS_BYTES[when])
        # chunked / fused head (Liger's fused linear cross-entropy is chunked the same way)
        tokens = b * completion
        compute_bytes = 4 if setup.cast_lm_head_to_fp32 else 2
        tile = min(tokens, CHUNKED_TOKEN_TILE) * min(vocab, CHUNKED_VOCAB_TILE) * compute_bytes
        weight_tile_copy = min(vocab, CHUNKED_VOCAB_TILE) * h * compute_bytes if self.weight_bytes_per_param != compute_bytes else 0
        hidden_compact = tokens * h * self.residual_bytes
        statistics = tokens * 4 * 8
        self.tensors.append((phase, f"log-prob tile ({min(tokens, CHUNKED_TOKEN_TILE)}, "
                                    f"{min(vocab, CHUNKED_VOCAB_TILE)}) {'float32' if compute_bytes == 4 else 'bfloat16'}",
                             tile))
        total = tile + weight_tile_copy + hidden_compact + statistics
        if when == "backward":
            total += tokens * h * 4  # fp32 grad of the hidden states
            # the backward loop's `w_chunk = weight[start:end].to(compute_dtype)` holds the previous vocabulary
            # chunk's copy until the next one is assigned: two copies at once (FakeTensor simulation, fp32 head)
            total += weight_tile_copy
            if self.residual_bytes != 4:
                # ChunkedLogProbFunction.backward returns grad_hidden.to(hidden.dtype): both alive at the return
                total += tokens * h * self.residual_bytes
            if not setup.is_lora:
                head_grad = vocab * h * 4
                self.tensors.append((phase, f"lm_head weight grad ({vocab}, {h}) float32", head_grad))
                total += head_grad
                if self.weight_bytes_per_param != 4:
                    # ... and grad_weight.to(weight.dtype) beside its fp32 accumulator (FakeTensor simulation:
                    # Llama-3.2-1B, bf16: the 1002 MiB fp32 and 501 MiB bf16 head gradients coexist)
                    total += vocab * h * self.weight_bytes_per_param
        return total

    def gradient_parts(self) -> tuple[int, int, int]:
        """(gradients made by the head's backward, gradients of one block, all gradients), bytes."""
        setup, spec = self.setup, self.spec
        grad_bytes = self.trainable_bytes_per_param()
        total = self.trainable_params() * grad_bytes
        if setup.is_lora:
            return 0, self.lora_params() // max(spec.num_hidden_layers, 1) * grad_bytes, total
        head = (spec.vocab_size * spec.hidden_size + spec.hidden_size) * grad_bytes
        return head, spec.layer_params() * grad_bytes, total

    def training(self) -> dict[str, int]:
        """One micro-step; the largest of four moments (checked against the FakeTensor simulation,
        tests/test_accuracy_matrix.py, which found the old two-candidate model 10–25% off where B or C rule):

        A — backward starts at the head: everything the forward saved + the log-prob path's backward
            transient (+ earlier micro-steps' gradients when gradient_accumulation_steps > 1);
        B — inside the blocks' backward, block i: the gradients of blocks > i and the saved activations of
            blocks ≤ i — linear in i, so the worst is block n−1 (all activations) or block 0 (all block
            gradients) — plus the block being processed (:meth:`recomputed_layer`);
        C — the embedding's backward, last (full fine-tuning): all gradients plus, with tied embeddings, the
            head's weight gradient parked in autograd's input buffer and the embedding's, summed out of place
            (2 × V·h), plus the new gradient before it is added in place when gradients exist already;
        F — the forward's end with fp32 weights under checkpointing: autocast caches the bf16 copy of every
            trained weight until the forward returns."""
        setup, spec = self.setup, self.spec
        tokens = setup.per_device_train_batch_size * setup.seq_len
        n_layers = spec.num_hidden_layers
        vocab, h = spec.vocab_size, spec.hidden_size
        checkpointing = bool(setup.gradient_checkpointing)
        head_grads, layer_grads, all_grads = self.gradient_parts()
        accumulating = setup.gradient_accumulation_steps > 1
        grads_before = all_grads if accumulating else 0
        saved = self.saved_activations()
        mask, mask_copy, casts = self.mask_bytes(), self.mask_copy_bytes(), self.autocast_weight_copies()
        # the lm_head's bf16 cast of fp32 weights is kept from the head's forward to its backward (a 4-bit
        # base too: bitsandbytes leaves the head unquantised, in the model's dtype)
        head_cast = vocab * h * 2 if (setup.dtype == "float32" and setup.logits == "materialized"
                                      and setup.backend != "unsloth") else 0
        mask_live = mask if checkpointing else 0
        candidate_a = {_C.GRADIENTS: grads_before, _C.ACTIVATIONS: saved,
                       _C.LOGITS: self.logits_bytes("backward"),
                       _C.ATTENTION_MASK: mask_live + (0 if checkpointing else n_layers * mask_copy),
                       _C.WEIGHT_CASTS: (0 if checkpointing else n_layers * casts) + head_cast}
        # B: block n-1 (all saved activations live) or block 0 (all block gradients live)
        if checkpointing and setup.gradient_checkpointing != "unsloth":
            fixed = 2 * tokens * h * self.residual_bytes  # final-norm tensors: released before the blocks
            per_layer_saved = tokens * h * self.residual_bytes
        elif checkpointing:
            fixed, per_layer_saved = 0, 0  # offloaded: the GPU keeps its two buffers either way
        else:
            fixed = 2 * tokens * h * self.residual_bytes
            per_layer_saved = tokens * self.layer_activation_bytes_per_token()
        recomputed = self.recomputed_layer()
        last_block = {_C.GRADIENTS: all_grads if accumulating else head_grads,
                      _C.ACTIVATIONS: saved,
                      _C.RECOMPUTED_LAYER: recomputed - fixed,
                      _C.ATTENTION_MASK: mask_live + (0 if checkpointing else n_layers * mask_copy),
                      _C.WEIGHT_CASTS: 0 if checkpointing else n_layers * casts}
        first_block = {_C.GRADIENTS: all_grads if accumulating
                       else head_grads + (n_layers - 1) * layer_grads,
                       _C.ACTIVATIONS: saved - (n_layers - 1) * per_layer_saved,
                       _C.RECOMPUTED_LAYER: recomputed - fixed,
                       _C.ATTENTION_MASK: mask_live + (0 if checkpointing else mask_copy),
                       _C.WEIGHT_CASTS: 0 if checkpointing else casts}
        candidates = [candidate_a, last_block, first_block]
        if not setup.is_lora:
            extra = (2 if spec.tie_word_embeddings else 0) + (1 if accumulating else 0)
            candidates.append({_C.GRADIENTS: all_grads,
                               _C.RECOMPUTED_LAYER: extra * vocab * h * self.trainable_bytes_per_param()})
            if (setup.dtype == "float32" and checkpointing and not setup.load_in_4bit
                    and setup.gradient_checkpointing != "unsloth"):
                head_forward = (setup.per_device_train_batch_size * (setup.max_completion_length + 1) * vocab * 2
                                if setup.logits == "materialized" else 0)
                candidates.append({_C.GRADIENTS: grads_before, _C.ACTIVATIONS: saved,
                                   _C.ATTENTION_MASK: mask,
                                   _C.WEIGHT_CASTS: spec.linear_params() * 2 + head_cast,
                                   _C.LOGITS: head_forward})
        self.tensors.append((_P.TRAINING, f"checkpointed layer input ({setup.per_device_train_batch_size}, "
                                                   f"{setup.seq_len}, {self.spec.hidden_size})",
                             setup.per_device_train_batch_size * setup.seq_len * self.spec.hidden_size * self.residual_bytes))
        return max(candidates, key=lambda parts: sum(parts.values()))

    def autocast_weight_copies(self) -> int:
        """fp32 weights under bf16 autocast: the bf16 copies of ONE block's Linear weights (trained weights are
        cached by autocast, frozen ones re-cast per use; both kept for backward). Without checkpointing every
        block keeps its own (×n_layers in :meth:`training`); with it, only the block being recomputed."""
        spec, setup = self.spec, self.setup
        if setup.dtype != "float32" or setup.load_in_4bit:
            return 0
        return spec.linear_params() // max(spec.num_hidden_layers, 1) * 2

    # -- optimizer step -------------------------------------------------------------------------
    def optimizer_step(self) -> dict[str, int]:
        """``optimizer.step()`` after the last micro-step: all gradients, plus foreach AdamW's state-sized
        temporary (memory-model.md §2: adamw_torch allocates one extra buffer; fused none)."""
        setup = self.setup
        grads = self.trainable_params() * self.trainable_bytes_per_param()
        _, temp_per_param = OPTIMIZERS[setup.optim]
        temp = self.trainable_params() * (self.trainable_bytes_per_param() if temp_per_param else 0)
        return {_C.GRADIENTS: grads, _C.OPTIMIZER_TEMP: temp}

    # -- slack and checks -----------------------------------------------------------------------
    def _with_slack(self, parts: dict[str, int]) -> dict[str, int]:
        """Caching-allocator slack on torch's own allocations (not the context nor vLLM's pool)."""
        torch_bytes = sum(v for k, v in parts.items() if k not in _NOT_TORCH_ALLOCATED)
        parts[_C.ALLOCATOR_SLACK] = int(torch_bytes * ALLOCATOR_SLACK_FRACTION)
        return parts

    def _check_vllm(self, persistent: dict[str, int]) -> None:
        """vLLM refuses to start when free memory < util × total; its KV pool must hold one full sequence."""
        setup = self.setup
        if not setup.use_vllm or setup.vllm_mode != "colocate" or self.gpu is None:
            return
        total = self.gpu.total_bytes
        desired = int(setup.vllm_gpu_memory_utilization * total)
        if setup.backend == "trl":
            # in colocate mode the policy (and a reference model) is on the GPU before vLLM starts
            already = CUDA_CONTEXT_BYTES + persistent.get(_C.WEIGHTS, 0) \
                + persistent.get(_C.LORA, 0) + persistent.get(_C.REFERENCE, 0)
            free = total - already
            if free < desired:
                self.warnings.append(
                    f"vLLM would refuse to start: free memory on device ({format_gib(free)}) is less than desired GPU "
                    f"memory utilization ({setup.vllm_gpu_memory_utilization} × {format_gib(total)} = "
                    f"{format_gib(desired)}); lower vllm_gpu_memory_utilization to ≤ {free / total:.2f}")
        kv_cache = persistent.get(_C.VLLM_KV_CACHE, 0)
        one_sequence = self.spec.kv_cache_bytes(setup.seq_len)
        if kv_cache < one_sequence:
            self.warnings.append(
                f"vLLM would refuse to start: its KV cache ({format_gib(kv_cache)}) cannot hold one sequence of "
                f"{setup.seq_len} tokens ({format_gib(one_sequence)}); raise vllm_gpu_memory_utilization or shorten "
                "max_prompt_length + max_completion_length")


def vllm_kv_cache_bytes(budget_bytes: int, weights_bytes: int, activation_peak_bytes: int, non_torch_bytes: int,
                        cuda_graph_bytes: int = 0) -> int:
    """vLLM's KV pool: ``util × total − (weights + activation peak + non-torch)`` − the CUDA-graph estimate
    (counted inside the budget since vLLM 0.21). The pool fills its budget whatever the workload
    (memory-model.md §3; e.g. 71.39 − 9.69 − 1.27 − 2.95 = 57.48 GiB in a published start-up log)."""
    return budget_bytes - weights_bytes - activation_peak_bytes - non_torch_bytes - cuda_graph_bytes


def load_setup_arg(value: str) -> GRPOSetup:
    """``--setup`` accepts a file path or inline JSON."""
    if value.lstrip().startswith("{"):
        try:
            return GRPOSetup.from_dict(json.loads(value))
        except json.JSONDecodeError as exc:
            raise GpuMemError("--setup", f"inline JSON is invalid: {exc}", fix="quote the JSON or use a file") from None
    return GRPOSetup.from_file(value)
