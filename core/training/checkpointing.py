"""Gradient checkpointing of the first N decoder layers: all of them, none, or as many as the budget needs
(``gradient_checkpointing = "auto"``, resolved by fx.training.budget). The first ones are the right ones: their
backward runs last, after the other layers' activations are freed, so the peak is the smaller of the two.

Each checkpointed forward and its recompute run under :func:`checkpointed_pass`'s marker, so that an operation can
keep from the recompute what its backward would compute again (fx.training.lora4bit keeps the dequantised weights):
both passes must save the same tensors, and the first pass's are dropped by the checkpoint as they are saved.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_PASS: contextvars.ContextVar[str | None] = contextvars.ContextVar("fx_checkpointed_pass", default=None)


def checkpointed_pass() -> str | None:
    """``"forward"`` inside a checkpointed layer's forward, ``"recompute"`` inside its recompute, else None."""
    return _PASS.get()


@contextlib.contextmanager
def _marked(name: str) -> Iterator[None]:
    token = _PASS.set(name)
    try:
        yield
    finally:
        _PASS.reset(token)


def _contexts():
    """torch.utils.checkpoint's ``context_fn``: the forward's context and the recompute's."""
    return _marked("forward"), _marked("recompute")


def decoder_layers(model) -> list:
    """The model's decoder layers (transformers' checkpointable layers), first to last."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def layer_count(setting: bool | str | int, total: int) -> int:
    """How many layers a ``gradient_checkpointing`` setting checkpoints: all (true, or "auto" left unresolved, as
    without a budget), none (false), or the first N."""
    if setting is True or setting == "auto":
        return total
    if setting is False:
        return 0
    return min(int(setting), total)


def enable_checkpointing(model, layers: int) -> None:
    """Checkpoint the first ``layers`` decoder layers of ``model`` (non-reentrant, each pass marked), and keep that
    choice when a trainer turns checkpointing off and on again (trl's DPOTrainer does, around its reference pass)."""
    if layers <= 0:
        return
    _checkpoint_first(model, layers)
    model.enable_input_require_grads()

    def gradient_checkpointing_enable(gradient_checkpointing_kwargs=None, **ignored):
        _checkpoint_first(model, layers)

    model.gradient_checkpointing_enable = gradient_checkpointing_enable


def _checkpoint_first(model, layers: int) -> None:
    kwargs = {"use_reentrant": False, "context_fn": _contexts}
    # the class's method: the one enable() sets on the instance calls this function
    type(model).gradient_checkpointing_enable(model, gradient_checkpointing_kwargs=kwargs)
    for layer in decoder_layers(model)[layers:]:
        layer.gradient_checkpointing = False
