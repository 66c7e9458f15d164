"""Attention for padding-free batches: each packed row attends only to itself, at the cost of its own length.

trl's padding-free collator packs a micro-batch into one sequence and passes the rows' boundaries
(``cu_seq_lens_q``/``cu_seq_lens_k``, ``max_length_q``/``max_length_k``) down to the attention function.
transformers' ``sdpa`` ignores them and builds a (tokens x tokens) block-diagonal mask instead: exact, but the masked
kernels compute every block, and on an H100 the cuDNN backend that PyTorch picks for masked attention rebuilds its
execution plan for every new length (measured: ~2 ms of CPU per call, a third of a step's CPU time).

``fx_varlen`` sends packed rows to PyTorch's own variable-length FlashAttention (``torch.nn.attention.varlen``,
CUDA GPUs of compute capability 8.0 or newer): no mask, no work across rows. Everything else (padded batches,
generation with a KV cache, a GPU without the kernel such as a T4, the CPU) goes to transformers' ``sdpa`` with the
mask it builds, which is exact.
"""

from __future__ import annotations

import functools
import inspect

NAME = "fx_varlen"


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


def fx_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function interface: query (batch, heads, tokens, dim); returns (batch, tokens, heads,
    dim) and no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is None or query.shape[0] != 1 or dropout:  # not a packed training batch
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    varlen_attn, causal, gqa = _varlen()
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    extra = {}
    if k.shape[1] != q.shape[1]:
        if gqa:
            extra["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    cu_k = kwargs.get("cu_seq_lens_k", cu_q)
    out = varlen_attn(q, k, v, cu_q.to(q.device, non_blocking=True), cu_k.to(q.device, non_blocking=True),
                      int(kwargs["max_length_q"]), int(kwargs.get("max_length_k", kwargs["max_length_q"])),
                      scale=scaling, **causal, **extra)
    return out.unsqueeze(0), None


def use_varlen(model) -> bool:
    """Switch ``model`` to ``fx_varlen`` where the kernel exists; whether it did. Masks stay sdpa's, for every call
    that is not a packed training batch."""
    if not varlen_available():
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, fx_varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
