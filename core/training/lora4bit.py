"""Less GPU work per token in the 4-bit LoRA linears, with the same computation (docs/performance.md measures each).

* ``dequantize_once``: bitsandbytes dequantises a 4-bit weight in the forward and again in the backward, and a
  checkpointed layer runs its forward twice (once more in the backward, to recompute it): three dequantisations per
  weight and step. In a checkpointed layer (fx.training.checkpointing marks both passes) the weight is dequantised
  and saved for the backward; the checkpoint drops what the first pass saves, so the recompute's copy is the one
  the backward uses: two dequantisations, at the cost of one layer's dequantised weights held from its recompute to
  its backward (the planner counts them).
* ``fused_lora``: peft's LoRA linear on a 4-bit base in one autograd function: the adapter's product is added into
  the base output by its matmul (no defensive clone, scaled copy or sum), its backward adds the adapter's input
  gradient into the base's, and an adapter without dropout shares the base's input. Where the down projection of a
  SwiGLU MLP is so adapted, the MLP is one function too (:func:`mlp_forward`): the down projection's adapter needs
  its input, the SwiGLU's output ``silu(gate) * up`` (tokens x intermediate), for its A's gradient, and the stock
  path keeps that tensor beside the gate and up projections the SwiGLU's own backward keeps (22 KB a token and
  layer for Llama 2 7B in fp16, a sixth of what a layer keeps on the all-linear recipe). The function keeps only
  gate and up and recomputes the SwiGLU's output in its backward, one elementwise kernel, as Unsloth's LoRA MLP
  does; the memory freed lets ``gradient_checkpointing = "auto"`` recompute fewer layers. With Liger on a GPU its
  Triton SwiGLU kernels compute the activation and its gradient; elsewhere torch's ops do.

Both replace the ``forward`` of the model's bitsandbytes and peft modules and MLPs (instance attributes, the classes
untouched; an MLP's Liger forward is kept and given back) and fall back to the stock forward wherever they don't
apply: no gradients, adapters off or merged, several adapters, DoRA, biases, a dtype the stock path would mix, or
(the MLP) dropout on the down projection's adapter, whose dropped input must be kept anyway.
"""

from __future__ import annotations

import functools
import types

from fx.training.checkpointing import checkpointed_pass

MARK = "_fx_lora4bit"  # set on a module whose forward this module replaced


def dequantize(weight, quant_state, dtype):
    """A 4-bit weight as bitsandbytes' backward dequantises it: ``(out_features, in_features)`` in ``dtype``."""
    import bitsandbytes.functional as F

    return F.dequantize_4bit(weight, quant_state).to(dtype)


@functools.cache
def functions():
    """The autograd functions (built on first use: torch and bitsandbytes load only when a model does)."""
    import bitsandbytes as bnb
    import torch

    class KeptDequantized(torch.autograd.Function):
        """A 4-bit matmul whose dequantised weight is saved for the backward (inside a checkpointed layer)."""

        @staticmethod
        def forward(ctx, x, weight, quant_state):
            w = dequantize(weight, quant_state, x.dtype)
            ctx.save_for_backward(w)
            return torch.nn.functional.linear(x, w)

        @staticmethod
        def backward(ctx, grad):
            (w,) = ctx.saved_tensors
            return torch.matmul(grad, w.to(grad.dtype)), None, None

    class FusedLora4bit(torch.autograd.Function):
        """``x W^T + scale (xd A^T) B^T`` with W in 4 bits; ``xd`` is the adapter's input (dropout applied), None
        when it is ``x`` itself. ``keep``: dequantise W here and save it for the backward."""

        @staticmethod
        def forward(ctx, x, xd, weight, quant_state, a, b, scale, keep):
            shared = xd is None
            xd = x if shared else xd
            if keep:
                w = dequantize(weight, quant_state, x.dtype)
                out = torch.nn.functional.linear(x, w)
            else:
                w = None
                out = bnb.matmul_4bit(x, weight, quant_state=quant_state)  # no grad in here: the plain kernel
            flat_in = xd.reshape(-1, xd.shape[-1])
            h = torch.mm(flat_in, a.to(x.dtype).t())
            out.view(-1, out.shape[-1]).addmm_(h, b.to(x.dtype).t(), alpha=scale)
            ctx.save_for_backward(*((x, h, a, b) if shared else (xd, h, a, b)), *(() if w is None else (w,)))
            ctx.weight, ctx.quant_state, ctx.scale, ctx.shared = weight, quant_state, scale, shared
            ctx.x_shape = x.shape
            return out

        @staticmethod
        def backward(ctx, grad):
            xd, h, a, b, *kept = ctx.saved_tensors
            dtype = grad.dtype
            g = grad.reshape(-1, grad.shape[-1])
            dh = torch.mm(g, b.to(dtype)).mul_(ctx.scale)
            da = db = dx = dxd = None
            if ctx.needs_input_grad[4]:
                da = torch.mm(dh.t(), xd.reshape(-1, xd.shape[-1])).to(a.dtype)
            if ctx.needs_input_grad[5]:
                db = torch.mm(g.t(), h).mul_(ctx.scale).to(b.dtype)
            if ctx.needs_input_grad[0]:
                w = kept[0] if kept else dequantize(ctx.weight, ctx.quant_state, dtype)
                dx = torch.matmul(grad, w.to(dtype))
                if ctx.shared:
                    dx.view(-1, dx.shape[-1]).addmm_(dh, a.to(dtype))
            if not ctx.shared and ctx.needs_input_grad[1]:
                dxd = torch.mm(dh, a.to(dtype)).view(ctx.x_shape)
            return dx, dxd, None, None, da, db, None, None

    return KeptDequantized, FusedLora4bit


def _keep() -> bool:
    return checkpointed_pass() is not None


def _ready(base, x):
    """The bitsandbytes layer's own preparation (its quantisation state, its compute dtype), as its forward does."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(base)
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True


def base_forward(self, x):
    """bitsandbytes' Linear4bit forward, dequantising once per pass inside a checkpointed layer."""
    import torch

    if not (_keep() and torch.is_grad_enabled() and x.requires_grad and self.bias is None):
        return type(self).forward(self, x)
    _ready(self, x)
    dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    kept, _ = functions()
    return kept.apply(x, self.weight, self.weight.quant_state).to(dtype)


def _fusable_adapter(self, x, args, kwargs) -> str | None:
    """The one plain LoRA adapter this call computes, or None when the stock forward must run."""
    import torch

    if (args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1
            or not torch.is_grad_enabled()):
        return None
    name = self.active_adapters[0]
    if (name not in self.lora_A or name in getattr(self, "lora_variant", {}) or self.use_dora.get(name)
            or self.base_layer.bias is not None or self.lora_B[name].bias is not None):
        return None
    # the dtype peft computes the adapter in (autocast's, else the adapter's own) must be the base's and the input's
    device = x.device.type
    dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
             else self.lora_A[name].weight.dtype)
    base_dtype = self.base_layer.compute_dtype or x.dtype
    return name if dtype == base_dtype == x.dtype else None


def lora_forward(self, x, *args, dequantize_once: bool = True, **kwargs):
    """peft's LoRA Linear4bit forward as one autograd function (:class:`FusedLora4bit`)."""
    import torch

    name = _fusable_adapter(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    _ready(base, x)
    dropout = self.lora_dropout[name]
    xd = None if isinstance(dropout, torch.nn.Identity) else dropout(x)
    _, fused = functions()
    with torch.autocast(x.device.type, enabled=False):  # every operand is in x's dtype already
        return fused.apply(x, xd, base.weight, base.weight.quant_state, self.lora_A[name].weight,
                           self.lora_B[name].weight, float(self.scaling[name]), dequantize_once and _keep())


# -- the SwiGLU MLP with an adapted down projection, in one function (part of fused_lora) ---------------------
PREVIOUS = "_fx_previous_forward"  # an instance forward fx replaced (Liger's MLP), restored by remove()


@functools.cache
def _liger_swiglu():
    """Liger's SwiGLU forward and backward kernels, or None (no liger-kernel, or no GPU for Triton)."""
    try:
        from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward
    except ImportError:
        return None
    return swiglu_forward, swiglu_backward


def _kernels(a):
    """Liger's SwiGLU kernels for a tensor on a GPU, else None."""
    return _liger_swiglu() if a.is_cuda else None


def swiglu(a, b):
    """``silu(a) * b`` in a's dtype, the activation computed in float32 (Liger's and transformers' numerics on fp16)."""
    import torch

    kernels = _kernels(a)
    if kernels is not None:
        return kernels[0](a, b)[2]
    return torch.nn.functional.silu(a.float()).to(a.dtype) * b


def swiglu_backward(a, b, dc):
    """The gradients of ``silu(a) * b`` with respect to a and b (Liger's kernel writes them into a and b)."""
    import torch

    kernels = _kernels(a)
    if kernels is not None:
        return kernels[1](a, b, dc)
    af = a.float()
    sig = torch.sigmoid(af)
    silu = af * sig
    db = (dc.float() * silu).to(b.dtype)
    da = (dc.float() * (silu * (1 - sig) + sig) * b.float()).to(a.dtype)
    return da, db


@functools.cache
def mlp_function():
    """The MLP's autograd function (built on first use, as :func:`functions`)."""
    import bitsandbytes as bnb
    import torch

    class SwiGLUDownLora4bit(torch.autograd.Function):
        """``c W^T + scale (c A^T) B^T`` with ``c = silu(gate) * up`` and W in 4 bits, keeping gate and up (not c)
        for the backward. ``keep``: dequantise W here and save it for the backward (a checkpointed layer)."""

        @staticmethod
        def forward(ctx, gate, up, weight, quant_state, a, b, scale, keep):
            gate, up = gate.contiguous(), up.contiguous()  # Liger's kernels read rows of contiguous tensors
            c = swiglu(gate, up)
            if keep:
                w = dequantize(weight, quant_state, c.dtype)
                out = torch.nn.functional.linear(c, w)
            else:
                w = None
                out = bnb.matmul_4bit(c, weight, quant_state=quant_state)
            h = torch.mm(c.reshape(-1, c.shape[-1]), a.to(c.dtype).t())
            out.view(-1, out.shape[-1]).addmm_(h, b.to(c.dtype).t(), alpha=scale)
            ctx.save_for_backward(gate, up, h, a, b, *(() if w is None else (w,)))
            ctx.weight, ctx.quant_state, ctx.scale = weight, quant_state, scale
            return out

        @staticmethod
        def backward(ctx, grad):
            gate, up, h, a, b, *kept = ctx.saved_tensors
            dtype = grad.dtype
            g = grad.reshape(-1, grad.shape[-1])
            dh = torch.mm(g, b.to(dtype)).mul_(ctx.scale)
            da = db = dgate = dup = None
            if ctx.needs_input_grad[4]:
                c = swiglu(gate, up)  # recomputed: the forward kept gate and up only
                da = torch.mm(dh.t(), c.reshape(-1, c.shape[-1])).to(a.dtype)
                del c
            if ctx.needs_input_grad[5]:
                db = torch.mm(g.t(), h).mul_(ctx.scale).to(b.dtype)
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                w = kept[0] if kept else dequantize(ctx.weight, ctx.quant_state, dtype)
                dc = torch.matmul(grad, w.to(dtype))
                dc.view(-1, dc.shape[-1]).addmm_(dh, a.to(dtype))
                # Liger's kernel writes the gradients over gate and up: nothing else reads them after this
                dgate, dup = swiglu_backward(gate, up, dc)
            return dgate, dup, None, None, da, db, None, None

    return SwiGLUDownLora4bit


def _silu(module) -> bool:
    import torch
    from transformers import activations

    # transformers' own SiLU module (5.x: ``SiLUActivation``; earlier releases use torch's) computes ``F.silu``
    return isinstance(module, (torch.nn.SiLU, getattr(activations, "SiLUActivation", torch.nn.SiLU)))


def mlp_forward(self, x, *, dequantize_once: bool = True):
    """The SwiGLU MLP's forward with ``down_proj``'s adapter fused into :class:`SwiGLUDownLora4bit`; the previous
    forward wherever that doesn't apply."""
    import torch

    down = self.down_proj
    previous = self.__dict__.get(PREVIOUS)
    name = _fusable_adapter(down, x, (), {})
    if name is None or not isinstance(down.lora_dropout[name], torch.nn.Identity):
        return previous(x) if previous is not None else type(self).forward(self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not (gate.dtype == up.dtype == x.dtype):  # the adapter would compute in another dtype: the stock product
        return down(self.act_fn(gate) * up)
    base = down.base_layer
    _ready(base, gate)
    with torch.autocast(x.device.type, enabled=False):  # every operand is in x's dtype already
        return mlp_function().apply(gate, up, base.weight, base.weight.quant_state, down.lora_A[name].weight,
                                down.lora_B[name].weight, float(down.scaling[name]), dequantize_once and _keep())


def fusable_mlp(module) -> bool:
    """Whether ``module`` is a SwiGLU MLP (gate, up and down projections, SiLU) whose down projection is a peft LoRA
    linear on a 4-bit base (whether a call can be fused, :func:`mlp_forward` asks as each call comes)."""
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    down = getattr(module, "down_proj", None)
    return (isinstance(down, LoraLinear4bit) and hasattr(module, "gate_proj") and hasattr(module, "up_proj")
            and _silu(getattr(module, "act_fn", None)))


def patch_mlp(module, dequantize_once: bool) -> None:
    """Put :func:`mlp_forward` into ``module``, keeping the forward it replaces (an instance's, such as Liger's)."""
    previous = module.__dict__.pop("forward", None)
    if previous is not None:
        setattr(module, PREVIOUS, previous)
    module.forward = types.MethodType(functools.partial(mlp_forward, dequantize_once=dequantize_once), module)


def restore(module) -> None:
    """Give ``module`` back the forward fx replaced (its class's, or what :func:`patch_mlp` kept)."""
    module.__dict__.pop("forward", None)
    previous = module.__dict__.pop(PREVIOUS, None)
    if previous is not None:
        module.forward = previous


def _liger_forward(module) -> bool:
    """Whether ``module``'s instance forward is one Liger bound into it (its SwiGLU MLP's)."""
    forward = module.__dict__.get("forward")
    return getattr(getattr(forward, "__func__", None), "__module__", "").startswith("liger_kernel")


def apply_levers(model, dequantize_once: bool, fused_lora: bool) -> dict[str, int]:
    """Replace the forward of ``model``'s 4-bit linears (and, with ``fused_lora``, of the SwiGLU MLPs whose down
    projection is adapted) as the levers say, any earlier replacement undone first; how many modules each took."""
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    remove(model)
    counts = {"dequantize_once": 0, "fused_lora": 0, "fused_mlp": 0}
    for module in model.modules():
        if fused_lora and fusable_mlp(module) and ("forward" not in module.__dict__ or _liger_forward(module)):
            patch_mlp(module, dequantize_once)
            counts["fused_mlp"] += 1
        elif "forward" in module.__dict__:  # someone else's hook (accelerate's offloading): leave it alone
            continue
        elif fused_lora and isinstance(module, LoraLinear4bit):
            module.forward = types.MethodType(functools.partial(lora_forward, dequantize_once=dequantize_once),
                                              module)
            counts["fused_lora"] += 1
        elif dequantize_once and isinstance(module, bnb.nn.Linear4bit):
            module.forward = types.MethodType(base_forward, module)
            counts["dequantize_once"] += 1
        else:
            continue
        setattr(module, MARK, True)
    return counts


def remove(model) -> None:
    """Give every module :func:`apply_levers` changed the forward it had back."""
    for module in model.modules():
        if module.__dict__.pop(MARK, False):
            restore(module)
