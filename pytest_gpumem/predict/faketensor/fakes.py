"""Stand-ins for what cannot run on CPU under FakeTensorMode, each with the memory behaviour of the real thing:
bitsandbytes' NF4 linears and 8-bit AdamW states, FlashAttention-2, TRL's Triton log-prob folds; and the swap
of a meta model's tensors for fake CPU tensors.

This module imports torch; :mod:`pytest_gpumem.predict.faketensor` imports it only when a simulation runs.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

#: bitsandbytes 8-bit optimizers: tensors under 4096 elements keep 32-bit state (``min_8bit_size``), the
#: others blockwise uint8 state with one fp32 absmax per 256 values (``bnb.optim.optimizer.Optimizer2State``).
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK_SIZE = 256
#: NF4 (bitsandbytes ``quantize_4bit``): one fp32 absmax per 64 weights; with double quantisation the absmax
#: is itself 8-bit with an fp32 absmax per 256 blocks (QLoRA, arXiv:2305.14314).
NF4_BLOCK_SIZE = 64
NF4_NESTED_BLOCK_SIZE = 256


@contextlib.contextmanager
def fake_cuda_logprob_kernels():
    """Inside the simulation, TRL's chunked log-prob kernels behave as on CUDA: the Triton folds and the
    ``out_dtype`` addmm write in place and allocate nothing, so their CPU stand-ins (which allocate fp32
    copies of every tile) are replaced by no-ops. Restored on exit."""
    try:
        from trl.kernels import chunked_logprob as module
    except ImportError:
        yield
        return

    def _no_op(*args, **kwargs):
        return None

    saved = {name: getattr(module, name) for name in ("_forward_tile", "_backward_tile", "_addmm_fp32")
             if hasattr(module, name)}
    for name in saved:
        setattr(module, name, _no_op)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def swap_to_fake(model, fake_mode) -> None:
    """Replace every meta parameter/buffer by a fake CPU tensor of the same shape and dtype (ties kept)."""
    memo: dict[int, Any] = {}
    with fake_mode:
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                new = memo.get(id(param))
                if new is None:
                    new = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                             requires_grad=param.requires_grad)
                    memo[id(param)] = new
                module._parameters[name] = new
            for name, buffer in list(module._buffers.items()):
                if buffer is None:
                    continue
                new = memo.get(id(buffer))
                if new is None:
                    new = torch.empty(buffer.shape, dtype=buffer.dtype)
                    memo[id(buffer)] = new
                module._buffers[name] = new


def quantise_linears_nf4(model, *, double_quant: bool, compute_dtype) -> None:
    """Replace the decoder's ``nn.Linear`` weights (what bitsandbytes quantises: not lm_head, not LoRA's
    A/B) by :class:`_FakeLinear4bit` modules holding NF4's storage."""
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replacements = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if type(child) is torch.nn.Linear and child is not lm_head and "lora_" not in child_name \
                    and not name.split(".")[-1].startswith("lora_"):
                replacements.append((module, child_name, child))
    for parent, child_name, linear in replacements:
        setattr(parent, child_name, _make_fake_linear4bit(linear, double_quant, compute_dtype))


def _make_fake_linear4bit(linear, double_quant: bool, compute_dtype):
    class _Dequant4bitMatmul(torch.autograd.Function):
        """bitsandbytes ``MatMul4Bit``: dequantise to the compute dtype, matmul, keep only the packed
        weight for backward (which dequantises again)."""

        @staticmethod
        def forward(ctx, x, packed, out_features, in_features):
            weight = torch.empty((out_features, in_features), dtype=x.dtype, device=x.device)
            ctx.shape = (out_features, in_features)
            return torch.nn.functional.linear(x, weight)

        @staticmethod
        def backward(ctx, grad_output):
            weight = torch.empty(ctx.shape, dtype=grad_output.dtype, device=grad_output.device)
            return torch.matmul(grad_output, weight), None, None, None

    class _FakeLinear4bit(torch.nn.Module):
        """The storage of ``bnb.nn.Linear4bit`` (packed uint8 weight, absmax) and its forward's dtypes."""

        def __init__(self):
            super().__init__()
            numel = linear.in_features * linear.out_features
            self.in_features, self.out_features = linear.in_features, linear.out_features
            device = linear.weight.device
            self.weight = torch.nn.Parameter(torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=device),
                                             requires_grad=False)
            blocks = -(-numel // NF4_BLOCK_SIZE)
            if double_quant:
                self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
                self.register_buffer("nested_absmax", torch.empty(-(-blocks // NF4_NESTED_BLOCK_SIZE),
                                                                  dtype=torch.float32, device=device))
            else:
                self.register_buffer("absmax", torch.empty(blocks, dtype=torch.float32, device=device))
            self.bias = None
            if linear.bias is not None:
                self.bias = torch.nn.Parameter(torch.empty(linear.out_features, dtype=linear.bias.dtype,
                                                           device=device), requires_grad=False)

        def forward(self, x):
            # bnb.nn.Linear4bit.forward: x → compute dtype, bias → compute dtype, matmul_4bit, back to x's dtype
            input_dtype = x.dtype
            x = x.to(compute_dtype)
            out = _Dequant4bitMatmul.apply(x, self.weight, self.out_features, self.in_features)
            if self.bias is not None:
                out = out + self.bias.to(compute_dtype)
            return out.to(input_dtype)

    return _FakeLinear4bit()


class BnbLikeAdamW:
    """bitsandbytes AdamW's state layout without bitsandbytes (a CUDA library): per parameter ``state1``,
    ``state2`` as uint8 with fp32 ``absmax1/2`` per 256 values (8-bit, tensors ≥ 4096 elements) or fp32
    (32-bit, and small tensors). The update is one fused kernel that allocates nothing."""

    def __init__(self, groups, bits: int):
        self.param_groups = groups
        self.bits = bits
        self.state: dict = {}

    def step(self):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None or param in self.state:
                    continue
                numel = param.numel()
                if self.bits == 8 and numel >= BNB_MIN_8BIT_SIZE:
                    blocks = -(-numel // BNB_BLOCK_SIZE)
                    self.state[param] = {"state1": torch.zeros(param.shape, dtype=torch.uint8),
                                         "state2": torch.zeros(param.shape, dtype=torch.uint8),
                                         "absmax1": torch.zeros(blocks, dtype=torch.float32),
                                         "absmax2": torch.zeros(blocks, dtype=torch.float32)}
                else:
                    self.state[param] = {"state1": torch.zeros(param.shape, dtype=torch.float32),
                                         "state2": torch.zeros(param.shape, dtype=torch.float32)}

    def zero_grad(self, set_to_none: bool = True):
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = None


FLASH_NAME = "gpumem_unpadded_attention"  # a name with "flash" in it makes transformers look for a hub kernel


def register_fake_flash_attention() -> str:
    """Register an attention function with FlashAttention-2's memory behaviour (it cannot run on CPU):
    transformers' varlen path copies the unpadded q/k/v, the kernel saves q/k/v/out and an fp32 log-sum-exp
    (heads × tokens), the output is padded back; backward allocates dq/dk/dv and an fp32 dq accumulator.
    No 4-D mask is built (transformers' ``flash_attention_mask`` keeps the 2-D padding mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    class _FlashFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            # q: (tokens, heads, d) unpadded copies
            out = torch.empty_like(q)
            lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, out, lse = ctx.saved_tensors
            dq_accum = torch.empty(q.shape, dtype=torch.float32, device=q.device)
            softmax_d = torch.empty_like(lse)
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            del dq_accum, softmax_d
            return dq, dk, dv

    def fake_flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        # query: (b, heads, L, d) → unpad to (b·L, heads, d) copies (index_first_axis)
        b, heads, length, dim = query.shape
        q = query.transpose(1, 2).reshape(b * length, heads, dim).clone()
        k = key.transpose(1, 2).reshape(b * key.shape[2], key.shape[1], dim).clone()
        v = value.transpose(1, 2).reshape(b * value.shape[2], value.shape[1], value.shape[3]).clone()
        out = _FlashFunction.apply(q, k, v)
        return out.reshape(b, length, heads, dim).clone(), None  # pad_input

    def padding_mask_2d(batch_size, q_length, kv_length, *args, attention_mask=None, **kwargs):
        # transformers' flash_attention_mask, minus its data-dependent `attention_mask.all()` shortcut: GRPO
        # batches are padded, so the 2-D mask is kept (and the varlen path unpads)
        return None if attention_mask is None else attention_mask[:, -kv_length:]

    AttentionInterface.register(FLASH_NAME, fake_flash_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(FLASH_NAME, padding_mask_2d)
    return FLASH_NAME
