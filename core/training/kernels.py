"""Speed levers that act on the model, for any method: Liger's fused kernels, the attention function for packed
rows, and regional torch.compile (docs/performance.md measures each)."""

from __future__ import annotations

from fx.errors import UserError
from fx.training.devices import device


def apply_liger(model, choice: bool | str) -> bool:
    """Liger's Triton kernels for RMSNorm, RoPE and SwiGLU in place of the model's own (fewer, fused launches,
    fewer saved intermediates); whether they were applied. Its fused linear cross-entropy is left out: trl's fused
    LM head already scores the answers in tiles without the full logits. ``auto`` applies them on a CUDA GPU when
    liger-kernel is installed (the ``speed`` extra); ``true`` insists."""
    if choice is False:
        return False
    if device() != "cuda":
        if choice is True:
            raise UserError("method.liger = true needs a CUDA GPU (Liger's kernels are Triton); "
                            'set it to "auto" or false on this machine')
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except ImportError:
        if choice is True:
            raise UserError("method.liger = true needs liger-kernel: pip install 'fx[speed]'") from None
        return False
    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        if choice is True:
            raise UserError(f"method.liger = true: Liger has no kernels for model type {model.config.model_type!r}")
        return False
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return True


def expects_liger(choice: bool | str, model_type: str) -> bool:
    """Whether :func:`apply_liger` will put Liger's kernels into a model of ``model_type`` here: the planner's
    question (they keep fewer tensors for backward), answered without loading the model or refusing anything."""
    if choice is False or device() != "cuda":
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def attention_problems(choice: str, padding_free: bool, cuda: bool) -> list[str]:
    """What stops ``method.attention = choice`` before anything loads (choose_attention's refusals, found early)."""
    if choice.startswith("varlen") and not padding_free:
        return [f"method.attention = \"{choice}\" needs method.padding_free = true (padded rows need a mask)"]
    if choice.startswith("varlen") and not cuda:
        return [f"method.attention = \"{choice}\" needs a CUDA GPU (and PyTorch's memory-efficient attention "
                "kernel); \"auto\" falls back to sdpa"]
    return []


def choose_attention(model, choice: str, padding_free: bool) -> str:
    """The attention function for training (fx.attention): variable-length attention for padding-free batches where
    the GPU has it (FlashAttention's on compute capability 8.0+, else the memory-efficient kernel's, which a T4
    runs; ``"varlen_efficient"`` forces the latter), else transformers' sdpa with its exact block-diagonal mask; the
    name in use."""
    from fx.training.attention import use_varlen

    if choice != "sdpa" and padding_free:
        name = use_varlen(model, "efficient" if choice == "varlen_efficient" else "auto")
        if name:
            return name
    problems = attention_problems(choice, padding_free, cuda=False)
    if problems:
        raise UserError(problems[0])
    return model.config._attn_implementation


def compile_layers(model) -> None:
    """torch.compile every decoder layer in place (regional compilation: the layers share one compiled graph, so
    compiling takes one layer's time; shapes are dynamic, since padding-free batches change length every step)."""
    if device() != "cuda":
        raise UserError("method.compile = true needs a CUDA GPU")
    import torch

    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            module.compile(dynamic=True)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
