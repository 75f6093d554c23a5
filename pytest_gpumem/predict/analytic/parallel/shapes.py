"""The parameter tensors of a model spec, for what sharding needs: per-rank shard sizes, the largest module, the
FSDP units (one per decoder layer + the root) and DeepSpeed's "persistent" small parameters.

Shapes follow transformers' Llama-family modules (``nn.Linear`` weight is ``(out, in)``, the embedding
``(V, h)``); :func:`tensors` reproduces :attr:`ModelSpec.num_params` exactly for dense models, and a model
whose layout it does not spell out (MoE experts) gets the remainder as one flat tensor per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ....models import ModelSpec

#: DeepSpeed ZeRO-3 keeps parameters under this many elements whole on every rank
#: (deepspeed/runtime/zero/config.py: ``param_persistence_threshold: int = Field(pp_int(1e5), ge=0,
#: alias="stage3_param_persistence_threshold")``)
PARAM_PERSISTENCE_THRESHOLD = 100_000


@dataclass(frozen=True)
class Tensor:
    """``count`` parameter tensors of ``shape`` owned by ``module`` ("layer" = one per decoder layer)."""

    module: str
    shape: tuple[int, ...]
    count: int = 1

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@lru_cache(maxsize=256)
def tensors(spec: ModelSpec) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(one decoder layer's tensors, the root's tensors: embedding, final norm, untied lm_head)."""
    h, layer = spec.hidden_size, []
    for name, (fan_in, fan_out) in spec.linear_shapes().items():
        layer.append(Tensor(name, (fan_out, fan_in)))
    if spec.qkv_bias:
        layer += [Tensor("q_proj", (spec.q_out,)), Tensor("k_proj", (spec.kv_out,)), Tensor("v_proj", (spec.kv_out,))]
    if spec.o_proj_bias:
        layer.append(Tensor("o_proj", (h,)))
    if spec.mlp_bias and not spec.is_moe:
        layer += [Tensor("gate_proj", (spec.intermediate_size,)), Tensor("up_proj", (spec.intermediate_size,)),
                  Tensor("down_proj", (h,))]
    if spec.qk_norm:
        layer += [Tensor("q_norm", (spec.head_dim,)), Tensor("k_norm", (spec.head_dim,))]
    if spec.attention_sinks:
        layer.append(Tensor("sinks", (spec.num_attention_heads,)))
    layer += [Tensor(f"norm{i}", (h,)) for i in range(spec.norms_per_layer)]
    rest = spec.layer_params() - sum(t.numel for t in layer)
    if rest > 0:  # MoE experts and router: one flat tensor per expert (a module of its own in DeepSpeed's view)
        experts = spec.num_experts or 1
        layer += [Tensor("expert", (rest // experts,), experts)] if rest % experts == 0 else [Tensor("mlp", (rest,))]
    root = [Tensor("embed_tokens", (spec.vocab_size, h)), Tensor("norm", (h,))]
    if not spec.tie_word_embeddings:
        root.append(Tensor("lm_head", (spec.vocab_size, h)))
    return tuple(layer), tuple(root)


def block_params(spec: ModelSpec) -> int:
    return spec.layer_params()


def root_params(spec: ModelSpec) -> int:
    return sum(t.numel * t.count for t in tensors(spec)[1])


def largest_module_params(spec: ModelSpec) -> int:
    """The most parameters one module holds directly (DeepSpeed's "largest layer": the embedding or lm_head of
    an LLM; ``estimate_zero3_model_states_mem_needs_all_live`` takes the max over ``model.modules()``)."""
    by_module: dict[str, int] = {}
    layer, root = tensors(spec)
    for t in layer + root:
        by_module[t.module] = by_module.get(t.module, 0) + t.numel
    return max(by_module.values())


def largest_param(spec: ModelSpec) -> int:
    layer, root = tensors(spec)
    return max(t.numel for t in layer + root)


def persistent_params(spec: ModelSpec, threshold: int = PARAM_PERSISTENCE_THRESHOLD) -> int:
    """Parameters ZeRO-3 never partitions (each under ``threshold`` elements: norms, biases) — whole on every
    rank."""
    layer, root = tensors(spec)
    small = sum(t.numel * t.count for t in layer if t.numel < threshold) * spec.num_hidden_layers
    return small + sum(t.numel * t.count for t in root if t.numel < threshold)


def fsdp_shard_params(spec: ModelSpec, world_size: int, rank: int) -> int:
    """FSDP2 shards every parameter on dim 0 (``torch.chunk``-style: ``ceil(d0 / N)`` rows per rank, the last
    ranks get fewer or none); rank ``rank``'s share of the whole model, in elements."""
    layer, root = tensors(spec)
    return (_rank_rows(layer, world_size, rank) * spec.num_hidden_layers
            + _rank_rows(root, world_size, rank))


def root_shard_params(spec: ModelSpec, world_size: int, rank: int) -> int:
    """Rank ``rank``'s dim-0 share of the root's parameters (embedding, final norm, lm_head)."""
    return _rank_rows(tensors(spec)[1], world_size, rank)


def _rank_rows(group: tuple[Tensor, ...], world_size: int, rank: int) -> int:
    total = 0
    for t in group:
        rows, rest = t.shape[0], t.numel // t.shape[0]
        chunk = -(-rows // world_size)
        mine = max(0, min(chunk, rows - rank * chunk))
        total += mine * rest * t.count
    return total


def flat_shard(numel: int, world_size: int) -> int:
    """A flat partition padded to a multiple of the world size (DeepSpeed ZeRO, FSDP1's FlatParameter): every rank
    holds ``ceil(numel / N)`` elements."""
    return -(-numel // world_size)
