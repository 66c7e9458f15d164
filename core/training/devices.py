"""The device a method trains on and the dtype it computes in: fx's own choice, never a library's default."""

from __future__ import annotations


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(choice: str):
    """``auto``: float32 on a CPU (bfloat16 measured ~15x slower on a CPU without native bf16), bfloat16 on GPUs that
    support it, float16 on T4-class GPUs."""
    import torch

    if choice != "auto":
        return getattr(torch, choice)
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
