"""Peak GPU memory of a QLoRA training run, component by component, from the architecture and the workload.

Each formula follows what the libraries fx trains with keep on the GPU (docs/memory.md, "What the estimate
counts"); the constants below that are measured, not derived, were fitted on an H100 (scripts/measure_memory.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fx.plan.gpus import GIB
from fx.plan.shapes import Architecture, Workload

BNB_BLOCK = 64               # bitsandbytes' 4-bit block size
PAGED_MIN_NUMEL = 100_000    # bitsandbytes pages optimizer states of tensors at least this large
LOGPROB_TOKENS = 4096        # trl's fused LM head: tokens per tile
LOGPROB_VOCAB = 32768        # trl's fused LM head: vocabulary entries per tile
CUDA_CONTEXT_GIB = 0.7       # driver, kernels and cuBLAS outside PyTorch's allocator (0.66 measured on an H100)
BACKWARD_WORKSET = 4.0       # bytes per token x intermediate size alive at once in one layer's backward (calibrated)
# allocator slack (reserved - allocated) with expandable segments, fitted on an H100: a fixed part and shares of
# the working set (allocated and freed layer by layer) and of the saved activations
SLACK_FIXED_GIB, SLACK_WORKING, SLACK_SAVED = 0.2, 0.07, 0.015
# NCCL's own buffers and kernels per process with several ranks, outside PyTorch's allocator (not yet calibrated:
# docs/distributed.md says how it is measured)
NCCL_GIB = 0.3
GATHERED_LAYERS = 2          # FSDP2 holds the layer computing and the one it prefetches unsharded


def dtype_bytes(name: str) -> int:
    return 4 if name == "float32" else 2


@dataclass
class Component:
    name: str
    bytes: float
    note: str = ""
    in_allocator: bool = True  # False: CUDA context and paged optimizer states, which max_memory_reserved can't see

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass
class Plan:
    arch: Architecture
    work: Workload
    components: list[Component]
    activations_other: float  # activation bytes with gradient checkpointing flipped, for the table
    config_origin: str = ""

    @property
    def total(self) -> float:
        return sum(c.bytes for c in self.components)

    @property
    def reserved(self) -> float:
        """What ``torch.cuda.max_memory_reserved`` should read at the peak."""
        return sum(c.bytes for c in self.components if c.in_allocator)

    @property
    def outside_allocator(self) -> float:
        return sum(c.bytes for c in self.components if not c.in_allocator)

    def largest(self, n: int = 3) -> list[Component]:
        return sorted(self.components, key=lambda c: c.bytes, reverse=True)[:n]

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_gib": round(self.total / GIB, 3),
            "reserved_gib": round(self.reserved / GIB, 3),
            "outside_allocator_gib": round(self.outside_allocator / GIB, 3),
            "config_origin": self.config_origin,
            "workload": {k: v for k, v in self.work.__dict__.items() if k != "keys"},
            "components": [{"name": c.name, "gib": round(c.gib, 3), "note": c.note,
                            "in_allocator": c.in_allocator} for c in self.components],
            "activations_gib_with_checkpointing": round(
                (self.activation_bytes if self.work.gradient_checkpointing else self.activations_other) / GIB, 3),
            "activations_gib_without_checkpointing": round(
                (self.activations_other if self.work.gradient_checkpointing else self.activation_bytes) / GIB, 3),
        }

    @property
    def activation_bytes(self) -> float:
        """Activations with their working set, as the table's other-way figure counts them."""
        return sum(c.bytes for c in self.components
                   if c.name in ("activations", "backward working set", "logits and loss", "reference forward"))


def quantised_bytes(arch: Architecture, work: Workload) -> tuple[float, float]:
    """(packed 4-bit weights, quantisation constants) of every decoder layer's linears."""
    numel = arch.layers * sum(i * o for i, o in arch.linears().values())
    blocks = numel / BNB_BLOCK
    if work.double_quant:
        constants = blocks * 1 + blocks / 256 * 4  # 8-bit absmax, plus one fp32 constant per 256 of them
    else:
        constants = blocks * 4
    return numel / 2, constants


def lora_shapes(arch: Architecture, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    linears = arch.linears()
    if "all-linear" in targets:
        return linears
    return {name: shape for name, shape in linears.items() if name in targets}


def lora_params(arch: Architecture, work: Workload) -> tuple[int, list[int]]:
    """Total LoRA parameters and the element count of each trainable tensor (A and B of every module, and DoRA's
    magnitude vector of its output features)."""
    sizes = []
    for fan_in, fan_out in lora_shapes(arch, work.lora_targets).values():
        sizes += [work.lora_r * fan_in, work.lora_r * fan_out] + ([fan_out] if work.dora else [])
    return arch.layers * sum(sizes), sizes * arch.layers


def dora_weight_bytes(arch: Architecture, work: Workload) -> float:
    """What DoRA keeps for backward per layer beyond activations: with LoRA dropout, peft recomputes the base output
    from the dropped input with the dequantised weight, which that matmul keeps (in x out x d per module); without
    dropout nothing (it reuses the base layer's output)."""
    if not work.dora or work.lora_dropout == 0:
        return 0.0
    return dtype_bytes(work.compute_dtype) * sum(i * o for i, o in lora_shapes(arch, work.lora_targets).values())


def dora_norm_bytes(arch: Architecture, work: Workload) -> float:
    """DoRA's weight norm, computed in every forward of an adapted module (not calibrated): the adapter's B x A built
    from an identity of the input size (in x in, float32, and its cast), the dequantised weight, the scaled B x A and
    their sum (in x out x d each) and the float32 copy the norm reads; the largest adapted module's."""
    if not work.dora:
        return 0.0
    d = dtype_bytes(work.compute_dtype)
    return max(i * i * 6 + i * o * (4 * d + 4) for i, o in lora_shapes(arch, work.lora_targets).values())


def layer_activation_bytes(arch: Architecture, work: Workload) -> float:
    """Bytes autograd keeps per token for one decoder layer's backward (no checkpointing).

    Per token, with d the compute dtype's size: each RMSNorm keeps its fp32 input (4h; its weight is frozen,
    so the normalised output is not kept); attention (SDPA) keeps q and k after rotary embedding, v, its
    output and a log-sum-exp per head (rotary's multiplications by cos and sin keep only cos and sin); the
    SwiGLU MLP keeps the gate projection, its activation and the up projection (3 x d x intermediate). The
    4-bit linears keep nothing: their weights are frozen. A LoRA module with dropout keeps the dropout mask
    (1 byte) and the dropped input (d bytes) per input feature, plus its rank-r hidden; without dropout it
    keeps the input it shares with the other modules reading it. DoRA keeps the base output and the scaled LoRA
    output of each adapted module for its magnitude's gradient (2 x d x out; not calibrated). Checked against the
    bytes autograd saves on the GPU (``scripts/measure_memory.py --probe``). With Liger's kernels
    (``work.liger``) each RMSNorm keeps its input in the compute dtype and one float32 reciprocal norm per token,
    and the SwiGLU keeps only the gate and up projections (it recomputes the activation in its backward), as does fx's
    fused MLP (``work.fused_mlp``), which recomputes the adapted down projection's input too."""
    h, i, kv, d = arch.hidden, arch.intermediate, arch.kv_dim, dtype_bytes(work.compute_dtype)
    norms = 2 * (d * h + 4) if work.liger else 2 * 4 * h
    kv_saved = kv if arch.kv_heads == arch.heads else h  # repeat_kv materialises grouped keys and values
    attention = d * h + 2 * d * kv_saved + d * h + 4 * arch.heads
    shapes = lora_shapes(arch, work.lora_targets)
    fused_mlp = work.fused_mlp and "down_proj" in shapes and work.lora_dropout == 0 and not work.dora
    mlp, lora, shared_inputs = 2 * d * i if work.liger or fused_mlp else 3 * d * i, 0.0, set()
    for name, (fan_in, fan_out) in shapes.items():
        lora += d * work.lora_r + (2 * d * fan_out if work.dora else 0)
        if work.lora_dropout > 0:
            lora += (1 + d) * fan_in
        else:
            shared_inputs.add("attn_in" if name in ("q_proj", "k_proj", "v_proj") else
                              "mlp_in" if name in ("gate_proj", "up_proj") else name)
    for key in shared_inputs - ({"down_proj"} if fused_mlp else set()):
        lora += d * (i if key == "down_proj" else h)
    return norms + attention + mlp + lora


def checkpointed_layers(arch: Architecture, work: Workload) -> int:
    """How many decoder layers gradient checkpointing recomputes: the first ones, whose backward runs last, after
    the other layers' activations are freed."""
    if not work.gradient_checkpointing:
        return 0
    return arch.layers if work.checkpointed_layers is None else min(work.checkpointed_layers, arch.layers)


def saved_activation_bytes(arch: Architecture, work: Workload, checkpointed: int) -> float:
    """Activations alive when backward starts: each of the ``checkpointed`` layers keeps only its input (the compute
    dtype's hidden state per token), every other layer all its saved tensors."""
    n = work.tokens
    inputs = checkpointed * dtype_bytes(work.compute_dtype) * arch.hidden * n
    kept = layer_activation_bytes(arch, work) * n + dora_weight_bytes(arch, work)
    return inputs + (arch.layers - checkpointed) * kept


def layer_working_bytes(arch: Architecture, work: Workload, checkpointing: bool) -> float:
    """What one layer's backward holds on top of the saved activations: with checkpointing, the layer's
    recomputed activations; the gradient of the residual stream and the layer's gradient temporaries
    (BACKWARD_WORKSET x intermediate per token); the hidden states' gradient and the final norm's tensors
    (6h per token with checkpointing, 16h without, as measured on an H100)."""
    n = work.tokens
    workset = BACKWARD_WORKSET * arch.intermediate * n
    if checkpointing:
        return layer_activation_bytes(arch, work) * n + dora_weight_bytes(arch, work) + workset + 6 * arch.hidden * n
    return workset + 16 * arch.hidden * n


def loss_working_bytes(arch: Architecture, work: Workload) -> float:
    """trl's fused LM head: a copy of the hidden states it scores, their fp32 gradient, the cast back, and one
    tile of 4096 tokens x 32768 vocabulary logits; the full (batch, seq, vocab) logits never exist. A trainer with
    ``log_softmaxes`` (trl's ORPO and CPO) builds the whole logits in the compute dtype and keeps that many float32
    log-softmaxes of them for backward, beside the final norm's float32 input and its output (not calibrated)."""
    n, d = work.tokens, dtype_bytes(work.compute_dtype)
    if work.log_softmaxes:
        return n * arch.vocab * (d + 4 * work.log_softmaxes) + n * arch.hidden * (d + 4)
    if work.full_logits:  # not calibrated: the logits, their float32 copy, the log-softmax kept and its gradient,
        per_token = arch.vocab * (d + 12)  # and a reference's logits and log-softmax beside them
        per_token += arch.vocab * (d + 8) if work.reference_forward else 0
        return n * arch.hidden * (d + 4 + d) + n * per_token
    return n * arch.hidden * (d + 4 + d) + min(n, LOGPROB_TOKENS) * LOGPROB_VOCAB * d


def reference_forward_bytes(arch: Architecture, work: Workload) -> float:
    """A reference forward (no grad, adapter off: DPO's, KTO's and its KL batch's, one at a time), run while the
    policy's activations wait for backward: the policy's final hidden states kept for its LM head's backward (h per
    token), plus the larger of one layer's
    transient forward tensors (its input and output, the MLP's gate, up and activation: 2h + 3 x intermediate per
    token) and the fused LM head's no-grad working set (its input and one logit tile). 0 without a reference."""
    if not work.reference_forward:
        return 0.0
    n, d = work.tokens, dtype_bytes(work.compute_dtype)
    layer = n * d * (2 * arch.hidden + 3 * arch.intermediate)
    head = n * arch.hidden * d + min(n, LOGPROB_TOKENS) * LOGPROB_VOCAB * d
    return n * arch.hidden * d + max(layer, head)


@dataclass
class Peak:
    """What is alive at the backward's peak: activations, the working set on top, dequantised base weights."""

    saved: float
    working: float
    weights: float
    kind: str  # "layer" (a layer's backward), "loss" (the LM head's), "reference" (DPO's reference forward)
    recomputed: bool = False  # a checkpointed layer's backward, after the other layers' activations were freed

    @property
    def total(self) -> float:
        return self.saved + self.working + self.weights


def backward_peak(arch: Architecture, work: Workload, checkpointed: int) -> Peak:
    """The backward's peak with the first ``checkpointed`` layers checkpointed. At its start everything saved is
    alive, with the loss's, DPO's reference forward's or a kept layer's working set on top; the checkpointed layers'
    backward runs last, with only their inputs left and one layer recomputed on top (holding all its dequantised
    weights when ``dequantize_once`` keeps them from the recompute for its backward)."""
    d, n = dtype_bytes(work.compute_dtype), work.tokens
    one = max(i * o for i, o in arch.linears().values()) * d  # one dequantised weight during its matmul
    saved = saved_activation_bytes(arch, work, checkpointed)
    candidates = []
    if checkpointed:
        weights = sum(i * o for i, o in arch.linears().values()) * d if work.dequantize_once else one
        candidates.append(Peak(checkpointed * d * arch.hidden * n, layer_working_bytes(arch, work, True), weights,
                               "layer", recomputed=True))
    if checkpointed < arch.layers:
        candidates.append(Peak(saved, layer_working_bytes(arch, work, False), one, "layer"))
    candidates.append(Peak(saved, loss_working_bytes(arch, work), one, "loss"))
    candidates.append(Peak(saved, reference_forward_bytes(arch, work), one, "reference"))
    return max(candidates, key=lambda p: p.total)  # the first of equals: a layer's before the loss's


def activation_bytes(arch: Architecture, work: Workload, checkpointing: bool) -> float:
    """Activations with every layer checkpointed or none, plus the largest working set on top of them."""
    peak = backward_peak(arch, work, arch.layers if checkpointing else 0)
    return peak.saved + peak.working


def optimizer_bytes(work: Workload, sizes: list[int], param_bytes: int) -> tuple[float, float]:
    """(inside the allocator, paged outside it) bytes of the optimizer's states."""
    inside = outside = 0.0
    for numel in sizes:
        if work.optim in ("paged_adamw_32bit", "adamw_bnb_32bit"):
            per = 8
        elif work.optim in ("paged_adamw_8bit", "adamw_bnb_8bit"):
            per = 2 if numel >= 4096 else 8
        else:  # torch AdamW keeps its two states in the parameter's dtype
            per = 2 * param_bytes
        if work.optim.startswith("paged") and numel >= PAGED_MIN_NUMEL:
            outside += per * numel
        else:
            inside += per * numel
    return inside, outside


def plan(arch: Architecture, work: Workload, config_origin: str = "") -> Plan:
    d = dtype_bytes(work.compute_dtype)
    packed, constants = quantised_bytes(arch, work)
    embed = arch.vocab * arch.hidden * d
    head = 0 if arch.tied else arch.vocab * arch.hidden * d
    norms = (2 * arch.layers + 1) * arch.hidden * d
    n_lora, sizes = lora_params(arch, work)
    # trl casts LoRA weights of a quantised model to bfloat16; fx keeps them in float32 under fp16 mixed precision
    lora_dtype = "float32" if work.compute_dtype == "float16" else "bfloat16"
    lora_bytes = 4 if lora_dtype == "float32" else 2
    opt_inside, opt_paged = optimizer_bytes(work, sizes, lora_bytes)
    ckpt = checkpointed_layers(arch, work)
    peak = backward_peak(arch, work, ckpt)
    other = activation_bytes(arch, work, not work.gradient_checkpointing)
    layer = layer_working_bytes(arch, work, ckpt == arch.layers)
    loss, ref = loss_working_bytes(arch, work), reference_forward_bytes(arch, work)
    norm = dora_norm_bytes(arch, work)
    # Gradients are freed after each optimizer step (set_to_none) and rebuilt during backward, so at the backward
    # peak they exist only when accumulation carries them over from the micro-batch before, or when graphed steps
    # add them into buffers that stay (fx.graphs).
    grads = n_lora * lora_bytes if work.gradient_accumulation > 1 or work.persistent_grads else 0.0
    layers = "on" if ckpt == arch.layers else f"on for the first {ckpt} of {arch.layers} layers" if ckpt else "off"
    components = [
        Component("4-bit weights", packed, f"{work.quant_type}, {arch.layers} layers x 7 linears"),
        Component("quantisation constants", constants,
                  "absmax per 64 weights" + (", double-quantised" if work.double_quant else " (fp32)")),
        Component("16-bit modules", embed + head + norms,
                  f"embeddings, {'tied ' if arch.tied else ''}lm_head, norms in {work.compute_dtype}"),
        Component("LoRA parameters", n_lora * lora_bytes, f"r={work.lora_r} on {', '.join(work.lora_targets)}"
                  + (" with DoRA magnitudes" if work.dora else "") + f": {n_lora / 1e6:.1f}M params, {lora_dtype}"),
        Component("LoRA gradients", grads, f"{n_lora * lora_bytes / GIB:.2f} GiB, "
                  + ("kept across accumulation steps" if work.gradient_accumulation > 1 else
                     "fixed buffers of the CUDA-graphed steps" if grads else
                     "rebuilt during backward: not alive at the peak")),
        Component("optimizer states", opt_inside, work.optim + (" (states of small tensors)" if opt_paged else "")),
        Component("activations", peak.saved,
                  f"kept for backward, {work.shape}, checkpointing {layers}"
                  + (", Liger's norms and SwiGLU" if work.liger else "")
                  + (", the checkpointed layers' inputs left when their backward runs" if peak.recomputed
                     and ckpt < arch.layers else "")
                  + f" (the other way, with its working set: {other / GIB:.2f} GiB)"),
        Component("backward working set", peak.working if peak.kind == "layer" else 0.0,
                  ("one layer recomputed, its gradient temporaries" if peak.recomputed or ckpt == arch.layers
                   else "one layer's gradient temporaries")
                  + ("" if peak.kind == "layer" else f" ({layer / GIB:.2f} GiB, below the {peak.kind}'s)")),
        Component("logits and loss", peak.working if peak.kind == "loss" else 0.0,
                  (f"the whole logits and {work.log_softmaxes:g} float32 log-softmaxes of them" if work.log_softmaxes
                   else "the trainer's full float32 logits" if work.full_logits else
                   "trl's fused LM head, 4096 x 32768 logit tiles")
                  + ("" if peak.kind == "loss" else f" ({loss / GIB:.2f} GiB, freed before the layers' backward)")),
        Component("dequantised weight", peak.weights,
                  "one layer's base weights, kept from its recompute for its backward (dequantize_once)"
                  if peak.recomputed and work.dequantize_once else
                  "one base weight in the compute dtype during its matmul"),
    ]
    if work.reference_forward:
        components.insert(-1, Component("reference forward", peak.working if peak.kind == "reference" else 0.0,
                                         "the no-grad reference pass, adapter off, beside the policy's activations"
                                         + (" (and KTO's KL batch, one pass at a time)" if work.kl_forward else "")
                                         + ("" if peak.kind == "reference"
                                            else f" ({ref / GIB:.2f} GiB, not at the peak)")))
    if work.reference_adapter:
        components.insert(4, Component("reference adapter", n_lora * 4, "a frozen float32 copy of the initial adapter"))
    if work.dora:
        components.append(Component("DoRA weight norm", norm, "the largest adapted module's weight and B x A, "
                                    "built in each of its forwards"))
    slack = (SLACK_FIXED_GIB * GIB + SLACK_WORKING * (peak.working + peak.weights + norm)
             + SLACK_SAVED * peak.saved)
    components.append(Component("allocator slack", slack, "rounding and fragmentation (expandable segments)"))
    if opt_paged:
        components.append(Component("paged optimizer states", opt_paged,
                                    "bitsandbytes unified memory, outside PyTorch's allocator", in_allocator=False))
    components.append(Component("CUDA context", CUDA_CONTEXT_GIB * GIB,
                                "driver, kernels, cuBLAS, outside the allocator", in_allocator=False))
    if work.ranks > 1:
        components = per_rank(components, arch, work, n_lora, lora_bytes)
    return Plan(arch, work, components, other, config_origin)


def per_rank(components: list[Component], arch: Architecture, work: Workload, n_lora: int,
             lora_bytes: int) -> list[Component]:
    """One rank's share of a run on ``work.ranks`` GPUs. DDP: the single-GPU plan (of the per-rank micro-batch) plus
    DDP's gradient buckets, a flat copy of every trainable gradient that lives as long as the model. FSDP: the
    4-bit weights, 16-bit modules, adapters, their gradients and optimizer states divided by the ranks, plus the
    layers gathered whole while they compute and the LM head, gathered from the end of the forward to the start of
    the backward; bitsandbytes keeps each linear's whole quantisation state on every rank, so the constants are not
    divided. Both add NCCL's buffers."""
    n = work.ranks
    out = []
    for c in components:
        if work.sharded and c.name in ("4-bit weights", "16-bit modules", "LoRA parameters", "optimizer states"):
            c = Component(c.name, c.bytes / n, f"{c.note}; a 1/{n} shard", c.in_allocator)
        elif work.sharded and c.name == "LoRA gradients":
            c = Component(c.name, n_lora * lora_bytes / n + n_lora / arch.layers * lora_bytes,
                          f"a 1/{n} shard of every gradient, and one layer's whole before its reduce-scatter")
        elif work.sharded and c.name == "quantisation constants":
            c = Component(c.name, c.bytes, f"{c.note}; whole on every rank (bitsandbytes' quant state)")
        out.append(c)
        if c.name == "optimizer states" and not work.sharded:
            out.append(Component("gradient buckets", n_lora * lora_bytes,
                                 "DDP's flat copy of the trainable gradients for the all-reduce"))
        if c.name == "optimizer states" and work.sharded:
            packed = sum(i * o for i, o in arch.linears().values()) / 2
            lora = n_lora / arch.layers * dtype_bytes(work.compute_dtype)
            head = arch.vocab * arch.hidden * dtype_bytes(work.compute_dtype)
            out.append(Component("gathered layers", GATHERED_LAYERS * (packed + lora),
                                 f"{GATHERED_LAYERS} decoder layers unsharded at once (computing, prefetched)"))
            out.append(Component("gathered head", head, "the LM head whole from the end of the forward to the "
                                 "start of the backward"))
    out.insert(len(out) - 1, Component("NCCL buffers", NCCL_GIB * GIB,
                                       f"communication between {n} ranks, outside the allocator", in_allocator=False))
    return out
