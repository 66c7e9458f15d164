"""The memory planner: peak GPU memory of a QLoRA training run, from the model's config alone.

No weights are read. The estimate is a sum of components, each computed from the architecture (hidden size,
layers, vocabulary, ...) and the run's shape (micro-batch, sequence length, LoRA rank and targets, dtypes,
gradient checkpointing). Each formula follows what the libraries fx trains with keep on the GPU:

* bitsandbytes stores a 4-bit weight as ``numel / 2`` bytes plus one absmax per block of 64 (fp32, or 8-bit
  with a second level of constants under double quantisation). Its 4-bit matmul saves no input for backward:
  the frozen base weights need no gradient. A dequantised copy of one weight lives while a matmul runs.
* Embeddings, norms and ``lm_head`` stay in the compute dtype.
* trl casts the LoRA parameters of a quantised model to bfloat16; under fp16 mixed precision fx keeps them in
  float32 (the gradient scaler can't unscale bfloat16). Gradients are rebuilt during each backward, so they
  are alive at the backward peak only when accumulation carries them. AdamW states are fp32 in bitsandbytes'
  32-bit optimizers, 8-bit in the 8-bit ones, the parameter's dtype in torch's.
  bitsandbytes' *paged* optimizers put the states of tensors with at least 1e5 elements in CUDA unified
  memory, outside PyTorch's allocator: they count against the card, not against ``max_memory_reserved``.
* Activations are the tensors autograd saves for backward, per token and per decoder layer (see
  :func:`layer_activation_bytes`, checked against the bytes autograd saves on an H100); with gradient
  checkpointing only each layer's input is kept, and one layer is recomputed at a time during backward.
* trl's fused LM head computes the loss in tiles of 4096 tokens x 32768 vocabulary entries, never the whole
  ``(batch, seq, vocab)`` logits; it is freed before the layers' backward, so the peak holds the larger of
  the two working sets, not both.

* Preference training (DPO) puts the chosen and the rejected answer of each pair through one forward (twice the
  sequences), and runs a no-grad reference forward of that batch (the adapter off) while the policy's activations
  wait for backward; its working set competes with the backward and loss working sets for the peak.

Measured on an H100, not derived: one layer's backward working set (``BACKWARD_WORKSET``), the allocator's
slack with expandable segments, and the CUDA context. ``scripts/measure_memory.py`` measures the calibration
matrix they were fitted on and a validation matrix (docs/memory.md: every estimate within 5%).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

GIB = 2**30

@dataclass(frozen=True)
class GPU:
    """A known GPU: memory a process can use (GiB, about what torch.cuda reports as the card's total), dense
    fp16/bf16 tensor peak (TFLOP/s, vendor datasheets, no sparsity), and whether it computes in bfloat16."""

    name: str
    memory_gib: float
    peak_tflops: float
    bf16: bool


GPUS: dict[str, GPU] = {
    "t4": GPU("NVIDIA T4", 14.5, 65.0, False),
    "a10g": GPU("NVIDIA A10G", 22.0, 70.0, True),
    "l4": GPU("NVIDIA L4", 22.0, 121.0, True),
    "a100-40": GPU("NVIDIA A100 40GB", 39.4, 312.0, True),
    "a100-80": GPU("NVIDIA A100 80GB", 79.1, 312.0, True),
    "h100": GPU("NVIDIA H100 80GB", 79.1, 989.0, True),
}

# Names torch.cuda.get_device_name reports -> the table's key (for MFU and for recording the card).
DEVICE_NAMES = {"T4": "t4", "A10G": "a10g", "L4": "l4", "A100-SXM4-40GB": "a100-40", "A100-PCIE-40GB": "a100-40",
                "A100-SXM4-80GB": "a100-80", "A100 80GB PCIe": "a100-80", "H100": "h100", "H200": "h100"}

BNB_BLOCK = 64               # bitsandbytes' 4-bit block size
PAGED_MIN_NUMEL = 100_000    # bitsandbytes pages optimizer states of tensors at least this large
LOGPROB_TOKENS = 4096        # trl's fused LM head: tokens per tile
LOGPROB_VOCAB = 32768        # trl's fused LM head: vocabulary entries per tile
CUDA_CONTEXT_GIB = 0.7       # driver, kernels and cuBLAS outside PyTorch's allocator (0.66 measured on an H100)
BACKWARD_WORKSET = 4.0       # bytes per token x intermediate size alive at once in one layer's backward (calibrated)
# allocator slack (reserved - allocated) with expandable segments, fitted on an H100: a fixed part and shares of
# the working set (allocated and freed layer by layer) and of the saved activations
SLACK_FIXED_GIB, SLACK_WORKING, SLACK_SAVED = 0.2, 0.07, 0.015


def budget_gib(budget: str | float) -> float:
    """A budget given as a GPU name from :data:`GPUS` or a number of GiB."""
    if isinstance(budget, (int, float)):
        return float(budget)
    key = str(budget).lower()
    if key in GPUS:
        return GPUS[key].memory_gib
    try:
        return float(key)
    except ValueError:
        raise ValueError(f"unknown GPU {budget!r}: one of {', '.join(GPUS)}, or a number of GiB") from None


@dataclass(frozen=True)
class Architecture:
    """What the planner needs from a transformers config of a Llama-like decoder."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """The quantised linears of one decoder layer: name -> (in_features, out_features)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @classmethod
    def from_config(cls, config: Any) -> Architecture:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, intermediate=config.intermediate_size,
                   layers=config.num_hidden_layers, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads, vocab=config.vocab_size,
                   tied=bool(getattr(config, "tie_word_embeddings", False)))


@dataclass(frozen=True)
class Workload:
    """A training run's shape, as the method will run it."""

    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool
    lora_r: int
    lora_targets: tuple[str, ...]
    lora_dropout: float
    compute_dtype: str = "float16"          # float16 | bfloat16 | float32
    quant_type: str = "nf4"
    double_quant: bool = False
    optim: str = "paged_adamw_32bit"
    gradient_accumulation: int = 1
    micro_batch_tokens: int = 0             # a token budget per forward/backward (0: micro_batch rows of seq_len)
    persistent_grads: bool = False          # gradients live in fixed buffers between steps (CUDA-graphed steps)
    # preference training (DPO): sequences per row in one forward (trl concatenates chosen and rejected answers
    # into one batch of 2 x micro-batch), a no-grad reference forward of that batch after the policy's (the base
    # with the adapter off), and a frozen copy of the adapter as the reference (training from an SFT adapter)
    sequences: int = 1
    reference_forward: bool = False
    reference_adapter: bool = False
    # the experiment keys that set each knob, for suggestions a user can paste after --set
    keys: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def tokens(self) -> int:
        """Tokens in the largest forward/backward: every row at the maximum length (both answers of a preference
        pair), or under a token budget the budget (a row longer than it goes alone), never more than the effective
        batch holds."""
        if self.micro_batch_tokens:
            return min(self.micro_batch * self.gradient_accumulation * self.seq_len,
                       max(self.micro_batch_tokens, self.seq_len))
        return self.micro_batch * self.sequences * self.seq_len

    @property
    def shape(self) -> str:
        if self.micro_batch_tokens:
            return f"micro-batches of at most {self.tokens} tokens (token budget)"
        if self.sequences == 2:
            return f"{self.micro_batch} x 2 (chosen, rejected) x {self.seq_len} tokens"
        return f"{self.micro_batch} x {self.seq_len} tokens"


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
    """Total LoRA parameters and the element count of each LoRA matrix (A and B of every module)."""
    sizes = []
    for fan_in, fan_out in lora_shapes(arch, work.lora_targets).values():
        sizes += [work.lora_r * fan_in, work.lora_r * fan_out]
    return arch.layers * sum(sizes), sizes * arch.layers


def layer_activation_bytes(arch: Architecture, work: Workload) -> float:
    """Bytes autograd keeps per token for one decoder layer's backward (no checkpointing).

    Per token, with d the compute dtype's size: each RMSNorm keeps its fp32 input (4h; its weight is frozen,
    so the normalised output is not kept); attention (SDPA) keeps q and k after rotary embedding, v, its
    output and a log-sum-exp per head (rotary's multiplications by cos and sin keep only cos and sin); the
    SwiGLU MLP keeps the gate projection, its activation and the up projection (3 x d x intermediate). The
    4-bit linears keep nothing: their weights are frozen. A LoRA module with dropout keeps the dropout mask
    (1 byte) and the dropped input (d bytes) per input feature, plus its rank-r hidden; without dropout it
    keeps the input it shares with the other modules reading it. Checked against the bytes autograd saves
    on the GPU (``scripts/measure_memory.py --probe``).
    """
    h, i, kv, d = arch.hidden, arch.intermediate, arch.kv_dim, dtype_bytes(work.compute_dtype)
    norms = 2 * 4 * h
    kv_saved = kv if arch.kv_heads == arch.heads else h  # repeat_kv materialises grouped keys and values
    attention = d * h + 2 * d * kv_saved + d * h + 4 * arch.heads
    mlp = 3 * d * i
    lora = 0.0
    shared_inputs = set()
    for name, (fan_in, _) in lora_shapes(arch, work.lora_targets).items():
        lora += d * work.lora_r
        if work.lora_dropout > 0:
            lora += (1 + d) * fan_in
        else:
            shared_inputs.add("attn_in" if name in ("q_proj", "k_proj", "v_proj") else
                              "mlp_in" if name in ("gate_proj", "up_proj") else name)
    for key in shared_inputs:
        lora += d * (i if key == "down_proj" else h)
    return norms + attention + mlp + lora


def saved_activation_bytes(arch: Architecture, work: Workload, checkpointing: bool) -> float:
    """Activations alive when backward starts: every layer's saved tensors, or with gradient checkpointing only
    each layer's input (the compute dtype's hidden state per token)."""
    n = work.tokens
    if checkpointing:
        return arch.layers * dtype_bytes(work.compute_dtype) * arch.hidden * n
    return arch.layers * layer_activation_bytes(arch, work) * n


def layer_working_bytes(arch: Architecture, work: Workload, checkpointing: bool) -> float:
    """What one layer's backward holds on top of the saved activations: with checkpointing, the layer's
    recomputed activations; the gradient of the residual stream and the layer's gradient temporaries
    (BACKWARD_WORKSET x intermediate per token); the hidden states' gradient and the final norm's tensors
    (6h per token with checkpointing, 16h without, as measured on an H100)."""
    n = work.tokens
    workset = BACKWARD_WORKSET * arch.intermediate * n
    if checkpointing:
        return layer_activation_bytes(arch, work) * n + workset + 6 * arch.hidden * n
    return workset + 16 * arch.hidden * n


def loss_working_bytes(arch: Architecture, work: Workload) -> float:
    """trl's fused LM head: a copy of the hidden states it scores, their fp32 gradient, the cast back, and one
    tile of 4096 tokens x 32768 vocabulary logits; the full (batch, seq, vocab) logits never exist."""
    n, d = work.tokens, dtype_bytes(work.compute_dtype)
    return n * arch.hidden * (d + 4 + d) + min(n, LOGPROB_TOKENS) * LOGPROB_VOCAB * d


def reference_forward_bytes(arch: Architecture, work: Workload) -> float:
    """DPO's reference forward (no grad, adapter off), run while the policy's activations wait for backward: the
    policy's final hidden states kept for its LM head's backward (h per token), plus the larger of one layer's
    transient forward tensors (its input and output, the MLP's gate, up and activation: 2h + 3 x intermediate per
    token) and the fused LM head's no-grad working set (its input and one logit tile). 0 without a reference."""
    if not work.reference_forward:
        return 0.0
    n, d = work.tokens, dtype_bytes(work.compute_dtype)
    layer = n * d * (2 * arch.hidden + 3 * arch.intermediate)
    head = n * arch.hidden * d + min(n, LOGPROB_TOKENS) * LOGPROB_VOCAB * d
    return n * arch.hidden * d + max(layer, head)


def activation_bytes(arch: Architecture, work: Workload, checkpointing: bool) -> float:
    """Saved activations plus the largest working set on top of them (a layer's backward, the loss's, DPO's
    reference forward)."""
    return saved_activation_bytes(arch, work, checkpointing) + max(
        layer_working_bytes(arch, work, checkpointing), loss_working_bytes(arch, work), reference_forward_bytes(arch, work))


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
    ckpt = work.gradient_checkpointing
    saved = saved_activation_bytes(arch, work, ckpt)
    other = activation_bytes(arch, work, not ckpt)
    layer, loss = layer_working_bytes(arch, work, ckpt), loss_working_bytes(arch, work)
    ref = reference_forward_bytes(arch, work)
    largest = max(i * o for i, o in arch.linears().values())
    dequant = largest * d  # one dequantised weight while its matmul runs
    # Gradients are freed after each optimizer step (set_to_none) and rebuilt during backward, so at the backward
    # peak they exist only when accumulation carries them over from the micro-batch before, or when graphed steps
    # add them into buffers that stay (fx.graphs).
    grads = n_lora * lora_bytes if work.gradient_accumulation > 1 or work.persistent_grads else 0.0
    components = [
        Component("4-bit weights", packed, f"{work.quant_type}, {arch.layers} layers x 7 linears"),
        Component("quantisation constants", constants,
                  "absmax per 64 weights" + (", double-quantised" if work.double_quant else " (fp32)")),
        Component("16-bit modules", embed + head + norms,
                  f"embeddings, {'tied ' if arch.tied else ''}lm_head, norms in {work.compute_dtype}"),
        Component("LoRA parameters", n_lora * lora_bytes, f"r={work.lora_r} on {', '.join(work.lora_targets)}: "
                  f"{n_lora / 1e6:.1f}M params, {lora_dtype}"),
        Component("LoRA gradients", grads, f"{n_lora * lora_bytes / GIB:.2f} GiB, "
                  + ("kept across accumulation steps" if work.gradient_accumulation > 1 else
                     "fixed buffers of the CUDA-graphed steps" if grads else
                     "rebuilt during backward: not alive at the peak")),
        Component("optimizer states", opt_inside, work.optim + (" (states of small tensors)" if opt_paged else "")),
        Component("activations", saved,
                  f"kept for backward, {work.shape}, checkpointing "
                  f"{'on' if ckpt else 'off'} (the other way, with its working set: {other / GIB:.2f} GiB)"),
        Component("backward working set", layer if layer >= max(loss, ref) else 0.0,
                  ("one layer recomputed, its gradient temporaries" if ckpt else "one layer's gradient temporaries")
                  + ("" if layer >= loss else f" ({layer / GIB:.2f} GiB, below the loss's)")),
        Component("logits and loss", loss if loss > layer and loss >= ref else 0.0,
                  "trl's fused LM head, 4096 x 32768 logit tiles" + ("" if loss > layer and loss >= ref else
                                                                      f" ({loss / GIB:.2f} GiB, freed before the layers' backward)")),
        Component("dequantised weight", dequant, "one base weight in the compute dtype during its matmul"),
    ]
    if work.reference_forward:
        components.insert(-1, Component("reference forward", ref if ref > max(layer, loss) else 0.0,
                                         "DPO's no-grad reference pass, adapter off, beside the policy's activations"
                                         + ("" if ref > max(layer, loss) else f" ({ref / GIB:.2f} GiB, not at the peak)")))
    if work.reference_adapter:
        components.insert(4, Component("reference adapter", n_lora * 4, "a frozen float32 copy of the initial adapter"))
    working = max(layer, loss, ref) + dequant
    slack = SLACK_FIXED_GIB * GIB + SLACK_WORKING * working + SLACK_SAVED * saved
    components.append(Component("allocator slack", slack, "rounding and fragmentation (expandable segments)"))
    if opt_paged:
        components.append(Component("paged optimizer states", opt_paged,
                                    "bitsandbytes unified memory, outside PyTorch's allocator", in_allocator=False))
    components.append(Component("CUDA context", CUDA_CONTEXT_GIB * GIB, "driver, kernels, cuBLAS, outside the allocator",
                                in_allocator=False))
    return Plan(arch, work, components, other, config_origin)


# -- fitting a budget ---------------------------------------------------------------------------------------------


@dataclass
class Suggestion:
    description: str
    overrides: list[str]
    plan: Plan

    def as_set_flags(self) -> str:
        return " ".join(f"--set {o}" for o in self.overrides)


def suggestions(arch: Architecture, work: Workload, budget_bytes: float) -> list[Suggestion]:
    """Single changes that bring the plan within the budget, cheapest in lost throughput first."""
    keys = work.keys
    out: list[Suggestion] = []

    def consider(description: str, overrides: list[str], changed: Workload) -> None:
        p = plan(arch, changed)
        if p.total <= budget_bytes:
            out.append(Suggestion(description, overrides, p))

    effective = work.micro_batch * work.gradient_accumulation
    for b in sorted(divisors(effective), reverse=True):
        if b >= work.micro_batch:
            continue
        accum = effective // b
        changed = replace(work, micro_batch=b, gradient_accumulation=accum)
        if plan(arch, changed).total <= budget_bytes:
            consider(f"micro-batch {b} with {accum} accumulation steps (same effective batch {effective})",
                     [f"{keys.get('micro_batch', 'micro_batch')}={b}",
                      f"{keys.get('gradient_accumulation', 'gradient_accumulation')}={accum}"], changed)
            break
    if not work.gradient_checkpointing:
        consider("gradient checkpointing on", [f"{keys.get('gradient_checkpointing', 'gradient_checkpointing')}=true"],
                 replace(work, gradient_checkpointing=True))
    for length in (2048, 1536, 1024, 768, 512, 384, 256, 128):
        if length < work.seq_len:
            changed = replace(work, seq_len=length)
            if plan(arch, changed).total <= budget_bytes:
                consider(f"max length {length}", [f"{keys.get('seq_len', 'seq_len')}={length}"], changed)
                break
    for r in (32, 16, 8, 4):
        if r < work.lora_r:
            changed = replace(work, lora_r=r)
            if plan(arch, changed).total <= budget_bytes:
                consider(f"LoRA rank {r}", [f"{keys.get('lora_r', 'lora_r')}={r}"], changed)
                break
    return out


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def auto_micro_batch(arch: Architecture, work: Workload, budget_bytes: float) -> Workload | None:
    """The largest micro-batch dividing the effective batch that fits, with accumulation keeping that batch."""
    effective = work.micro_batch * work.gradient_accumulation
    for b in sorted(divisors(effective), reverse=True):
        changed = replace(work, micro_batch=b, gradient_accumulation=effective // b)
        if plan(arch, changed).total <= budget_bytes:
            return changed
    return None


def allocator_fraction(plan_: Plan, budget_bytes: float, device_total: float) -> float | None:
    """The share of the card PyTorch's allocator may take so that the process stays within the budget.

    The CUDA context and paged optimizer states sit outside the allocator, so they come off the budget first.
    None when the card is not larger than the budget (nothing to cap).
    """
    cap = budget_bytes - plan_.outside_allocator
    if cap >= device_total:
        return None
    return max(cap, 0.0) / device_total


def token_budget_within(fitted: Fitted, cap: float | None, margin: float = 0.9) -> int | None:
    """After an out-of-memory error: the largest token budget per micro-batch (a multiple of 256) whose plan fits
    within ``margin`` of the allocator cap (else of the budget, else of this card), and at most half of what the
    failed micro-batch could hold; None when not even one row of the maximum length fits."""
    import torch

    work, arch = fitted.plan.work, fitted.plan.arch
    if cap:
        limit, key = cap * margin, "reserved"
    elif fitted.budget_bytes:
        limit, key = fitted.budget_bytes * margin, "total"
    elif torch.cuda.is_available():
        limit, key = torch.cuda.get_device_properties(0).total_memory * margin, "total"
    else:
        return None
    best = None
    for tokens in [work.seq_len, *range(256 * (work.seq_len // 256 + 1), work.tokens // 2 + 1, 256)]:
        if getattr(plan(arch, replace(work, micro_batch_tokens=tokens)), key) > limit:
            break
        best = tokens
    return best


def fmt_gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


# -- experiments --------------------------------------------------------------------------------------------------


@dataclass
class Fitted:
    """An experiment's plan against its budget, after ``budget.auto`` had its say."""

    exp: Any
    plan: Plan
    budget_bytes: float | None
    budget_label: str
    changes: list[str] = field(default_factory=list)  # --set assignments auto applied

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.plan.total <= self.budget_bytes

    def summary(self) -> dict[str, Any]:
        out = self.plan.as_dict()
        out["budget"] = self.budget_label or None
        out["budget_gib"] = round(self.budget_bytes / GIB, 3) if self.budget_bytes else None
        out["fits"] = self.fits
        if self.changes:
            out["auto_changes"] = self.changes
        return out


def plan_experiment(exp, budget: str | float | None = None) -> Fitted:
    """Plan ``exp`` from its model's config alone. ``budget`` (a GPU name or GiB) overrides ``[budget]``."""
    from fx.errors import UserError

    if budget is None:
        budget = exp.budget.gpu if exp.budget.gpu is not None else exp.budget.vram_gib
    label = "" if budget is None else (str(budget).lower() if str(budget).lower() in GPUS else f"{float(budget):g} GiB")
    try:
        budget_bytes = None if budget is None else budget_gib(budget) * GIB
    except ValueError as exc:
        raise UserError(f"--budget: {exc}") from None
    bf16 = GPUS[str(budget).lower()].bf16 if str(budget).lower() in GPUS else None
    source = exp.model.cls(exp.model.settings)
    arch = Architecture.from_config(source.config())
    method = exp.method.cls(exp.method.settings, None)
    work = method.workload(exp.data.max_length, bf16)
    if work is None:
        raise UserError(f"method {exp.method.name!r} gives the memory planner no workload; it can't be planned")
    return Fitted(exp, plan(arch, work, source.config_origin), budget_bytes, label)


def fit(exp) -> Fitted | None:
    """Plan ``exp`` against ``[budget]``: apply ``budget.auto``, or refuse (UserError, exit 2) a run that won't fit.
    Without a budget a plan is only recorded: None when the experiment can't be planned (a method without a
    workload, a config that can't be read yet), and the run goes on."""
    from fx import config
    from fx.errors import UserError

    if exp.budget.gib() is None:
        try:
            return plan_experiment(exp)
        except UserError:
            return None
    fitted = plan_experiment(exp)
    work, arch = fitted.plan.work, fitted.plan.arch
    if exp.budget.auto:
        chosen = auto_micro_batch(arch, work, fitted.budget_bytes)
        if chosen is not None:
            changes = []
            if chosen.micro_batch != work.micro_batch:
                changes = [f"{work.keys['micro_batch']}={chosen.micro_batch}",
                           f"{work.keys['gradient_accumulation']}={chosen.gradient_accumulation}"]
            raw = copy.deepcopy(exp.raw)
            for assignment in changes:
                config.apply_override(raw, assignment)
            new_exp = config.from_dict(raw, exp.path) if changes else exp
            return Fitted(new_exp, plan(arch, chosen, fitted.plan.config_origin), fitted.budget_bytes,
                          fitted.budget_label, changes)
    if fitted.fits or not exp.budget.refuse:
        return fitted
    raise UserError(refusal(exp.path, fitted))


def refusal(path, fitted: Fitted) -> str:
    p = fitted.plan
    largest = ", ".join(f"{c.name} {fmt_gib(c.bytes)}" for c in p.largest(3))
    lines = [f"{path}: the plan needs {fmt_gib(p.total)}, over the {fitted.budget_label} budget of "
             f"{fmt_gib(fitted.budget_bytes)} (largest: {largest})."]
    options = suggestions(p.arch, p.work, fitted.budget_bytes)
    if options:
        lines.append("Changes that fit, each on its own:")
        for option in options:
            lines.append(f"  {option.description}: {fmt_gib(option.plan.total)}   {option.as_set_flags()}")
        lines.append("Or set [budget] auto = true to pick the largest micro-batch that fits.")
    else:
        lines.append("No single change fits; try a smaller model or a larger GPU.")
    return "\n".join(lines)


def cap_allocator(fitted: Fitted | None) -> float | None:
    """Cap PyTorch's CUDA allocator so the process holds the budget on a larger GPU; the cap in bytes, or None."""
    import torch

    if fitted is None or fitted.budget_bytes is None or not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = allocator_fraction(fitted.plan, fitted.budget_bytes, total)
    if fraction is None:
        return None
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    return fraction * total


def out_of_memory(cap: float | None, exc: BaseException) -> str:
    first = str(exc).splitlines()[0][:200]
    if cap:
        return f"out of GPU memory under the budget's allocator cap of {cap / GIB:.2f} GiB: {first}"
    return f"out of GPU memory: {first}"


def use_expandable_segments() -> None:
    """Ask PyTorch's allocator for expandable segments (unless the user chose a setting): fragmentation then
    costs a few percent instead of up to a fifth of the peak, so the plan holds and a budget goes further.
    Read when CUDA is first used, so this must run before then."""
    import os

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def render(fitted: Fitted):
    """The plan as a rich renderable: components, total, the budget's verdict, and the known GPUs."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    p, w = fitted.plan, fitted.plan.work
    head = Text(f"model config: {p.config_origin}\n"
                f"workload: {w.shape if w.micro_batch_tokens else 'micro-batch ' + w.shape} (accumulation {w.gradient_accumulation}), "
                + ("a no-grad reference forward (adapter off), " if w.reference_forward else "") +
                f"{w.quant_type} with {w.compute_dtype} compute, LoRA r={w.lora_r} on {', '.join(w.lora_targets)}, "
                f"gradient checkpointing {'on' if w.gradient_checkpointing else 'off'}, {w.optim}")
    table = Table(title="estimated peak GPU memory")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("note")
    for c in p.components:
        table.add_row(c.name, f"{c.gib:.2f}", c.note + ("" if c.in_allocator else " [not in max_memory_reserved]"))
    table.add_row("total", f"{p.total / GIB:.2f}", f"of which PyTorch's allocator: {p.reserved / GIB:.2f} GiB", style="bold")
    parts = [head, table]
    if fitted.budget_bytes is not None:
        room = fitted.budget_bytes - p.total
        verdict = (f"fits the {fitted.budget_label} budget ({fmt_gib(fitted.budget_bytes)}) with {fmt_gib(room)} "
                   f"headroom ({100 * room / fitted.budget_bytes:.0f}%)" if room >= 0 else
                   f"does NOT fit the {fitted.budget_label} budget ({fmt_gib(fitted.budget_bytes)}): "
                   f"{fmt_gib(-room)} over")
        parts.append(Text(verdict, style="green" if room >= 0 else "red bold"))
    gpus = Table(title="known GPUs")
    for column in ("gpu", "usable GiB", "fits"):
        gpus.add_column(column)
    for key, gpu in GPUS.items():
        gpus.add_row(f"{key} ({gpu.name})", f"{gpu.memory_gib:.1f}", "yes" if p.total <= gpu.memory_gib * GIB else "no")
    parts.append(gpus)
    return Group(*parts)
