"""Attention for padding-free batches: each packed row attends only to itself, at the cost of its own length.

``fx_varlen`` sends packed rows (trl's collator passes their boundaries as ``cu_seq_lens_q``/``cu_seq_lens_k``) to
PyTorch's variable-length FlashAttention (``torch.nn.attention.varlen``, compute capability 8.0+): no mask, no work
across rows. Everything else (padded batches, generation, a T4, the CPU) goes to transformers' ``sdpa`` with its exact
mask. docs/performance.md says why (cuDNN's masked attention rebuilt its plan for every new length).
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
