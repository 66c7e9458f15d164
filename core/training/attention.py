"""Attention for padding-free batches: each packed row attends only to itself, at the cost of its own length.

Two attention functions take packed rows (trl's collator passes their boundaries as ``cu_seq_lens_q``/``cu_seq_lens_k``)
with no mask and no work across rows:

* ``fx_varlen``: PyTorch's variable-length FlashAttention (``torch.nn.attention.varlen``, compute capability 8.0+;
  fp16 and bf16, so float32 rows take the memory-efficient kernel);
* ``fx_varlen_efficient``: PyTorch's memory-efficient attention kernel (the one SDPA uses for a mask on a T4, and
  for nested tensors) given the same sequence offsets, through ``torch.ops.aten._efficient_attention_forward`` and
  its backward, as ``torch.nn.attention.varlen`` calls FlashAttention's; any CUDA GPU, so a T4 (compute
  capability 7.5) too.

Everything else (padded batches, generation, the CPU) goes to transformers' ``sdpa`` with its exact mask.
docs/performance.md says why (cuDNN's masked attention rebuilt its plan for every new length) and what each costs.
"""

from __future__ import annotations

import functools
import inspect

NAME = "fx_varlen"  # FlashAttention
EFFICIENT = "fx_varlen_efficient"  # the memory-efficient kernel
NAMES = (NAME, EFFICIENT)


@functools.cache
def varlen_available() -> bool:
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability(0) < (8, 0):
        return False
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _varlen():
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    # PyTorch 2.10-2.11 take is_causal; later releases a window, (-1, 0) being causal
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return varlen_attn, causal, "enable_gqa" in params


@functools.cache
def efficient_available() -> bool:
    import torch

    return torch.cuda.is_available() and hasattr(torch.ops.aten, "_efficient_attention_forward")


@functools.cache
def _efficient_function():
    import torch

    class EfficientVarlen(torch.autograd.Function):
        """Causal attention within each packed sequence by the memory-efficient kernel: q, k, v (tokens, heads, dim),
        ``cu`` the sequences' int32 offsets; no dropout. Saves what its backward kernel needs: the inputs, the output
        and the log-sum-exp."""

        @staticmethod
        def forward(ctx, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale):
            grad = any(ctx.needs_input_grad[:3])
            out, lse, seed, offset, _, _ = torch.ops.aten._efficient_attention_forward(
                q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, cu_q, cu_k, max_q, max_k, 0.0,
                1,  # causal, from each sequence's top left
                grad, scale=scale)
            if grad:
                ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seed, offset)
                ctx.lengths, ctx.scale = (max_q, max_k), scale
            return out[0]

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, out, lse, cu_q, cu_k, seed, offset = ctx.saved_tensors
            dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
                grad_out.unsqueeze(0).contiguous(), q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, out, cu_q,
                cu_k, *ctx.lengths, lse, 0.0, seed, offset, 1, False, scale=ctx.scale)
            return dq[0], dk[0], dv[0], None, None, None, None, None

    return EfficientVarlen


def efficient_varlen_attn(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale=None):
    """Causal variable-length attention by the memory-efficient kernel, ``torch.nn.attention.varlen.varlen_attn``'s
    layout: q, k, v (tokens, heads, dim), k/v with as many heads as q; returns (tokens, heads, dim)."""
    return _efficient_function().apply(q, k, v, cu_q.int(), cu_k.int(), max_q, max_k, scale)


def packed(t):
    """A packed batch's (1, heads, tokens, dim) query, key or value as the kernels take it, (tokens, heads, dim): a
    view of the projection's (tokens, heads x dim) output, whose gradient flows back without a copy. (``t[0]``'s
    backward writes each gradient into a fresh zeroed tensor laid out (heads, tokens, dim), a fill and a strided copy
    for each of q, k and v, and Liger's RoPE backward (q, k) and v's projection view copy them back: six copies a
    layer.)"""
    return t.squeeze(0).transpose(0, 1)


def fx_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function interface: query (batch, heads, tokens, dim); returns (batch, tokens, heads,
    dim) and no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is None or query.shape[0] != 1 or dropout:  # not a packed training batch
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    import torch

    # FlashAttention takes fp16 and bf16 only: float32 rows (a float32 model, or RoPE's float32 product under fp16
    # autocast) go to the memory-efficient kernel, which takes all three
    efficient = module.config._attn_implementation == EFFICIENT or query.dtype not in (torch.float16, torch.bfloat16)
    if efficient:
        kernel, causal, gqa = efficient_varlen_attn, {}, False
    else:
        kernel, causal, gqa = _varlen()
    q, k, v = (packed(t) for t in (query, key, value))
    extra = {}
    if k.shape[1] != q.shape[1]:
        if gqa:
            extra["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    cu_k = kwargs.get("cu_seq_lens_k", cu_q)
    out = kernel(q, k, v, cu_q.to(q.device, non_blocking=True), cu_k.to(q.device, non_blocking=True),
                 int(kwargs["max_length_q"]), int(kwargs.get("max_length_k", kwargs["max_length_q"])),
                 scale=scaling, **causal, **extra)
    return out.unsqueeze(0), None


def use_varlen(model, kernel: str = "auto") -> str | None:
    """Switch ``model`` to variable-length attention for packed rows: ``kernel`` "flash" (``fx_varlen``),
    "efficient" (``fx_varlen_efficient``) or "auto" (FlashAttention where it exists, else the memory-efficient
    kernel); the name switched to, or None where the kernel does not exist here. Masks stay sdpa's, for every call
    that is not a packed training batch."""
    if kernel in ("auto", "flash") and varlen_available():
        name = NAME
    elif kernel in ("auto", "efficient") and efficient_available():
        name = EFFICIENT
    else:
        return None
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, fx_varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    model.set_attn_implementation(name)
    return name
