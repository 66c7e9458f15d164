"""What the planner is given: a decoder's architecture, and the shape of the run its method will train."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fx.errors import UserError


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
    model_type: str = ""  # transformers' name for it ("llama", ...): which fused kernels it can take

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
        try:
            heads = config.num_attention_heads
            return cls(hidden=config.hidden_size, intermediate=config.intermediate_size,
                       layers=config.num_hidden_layers, heads=heads,
                       kv_heads=getattr(config, "num_key_value_heads", None) or heads, vocab=config.vocab_size,
                       tied=bool(getattr(config, "tie_word_embeddings", False)),
                       model_type=str(getattr(config, "model_type", "") or ""))
        except AttributeError as exc:  # an architecture whose config names its shapes otherwise (GPT-2's n_embd)
            raise UserError(f"the memory planner can't read a {getattr(config, 'model_type', '?')!r} config: "
                            f"{exc.args[0] if exc.args else exc}") from None


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
    checkpointed_layers: int | None = None  # with gradient_checkpointing: only the first N decoder layers (None: all)
    dequantize_once: bool = False           # a checkpointed layer's recompute keeps its dequantised weights
    liger: bool = False                     # Liger's RMSNorm and SwiGLU kernels, which keep fewer tensors for backward
    fused_mlp: bool = False                 # an adapted down projection and the SwiGLU in one function (fused_lora):
                                            # gate and up kept, the SwiGLU's output recomputed in the backward
    # preference training (DPO): sequences per row in one forward (trl concatenates chosen and rejected answers
    # into one batch of 2 x micro-batch), a no-grad reference forward of that batch after the policy's (the base
    # with the adapter off), and a frozen copy of the adapter as the reference (training from an SFT adapter)
    sequences: int = 1
    reference_forward: bool = False
    reference_adapter: bool = False
    # KTO: a no-grad forward of the KL batch (each prompt with another row's answer) through the policy and one through
    # the reference, beside the reference forward; the same size as it (more work, no more memory at the peak)
    kl_forward: bool = False
    # the trainer builds the whole (tokens x vocabulary) logits in float32 for a loss of its own, instead of trl's
    # tiled LM head
    full_logits: bool = False
    # several GPUs, planned per rank (docs/distributed.md): how many ranks, and whether FSDP shards the weights,
    # adapters, gradients and optimizer states across them (else DDP: each rank holds the whole model)
    ranks: int = 1
    sharded: bool = False
    # the trainer builds the whole logits in the compute dtype and keeps this many float32 log-softmaxes of them for
    # backward, in units of the batch's tokens (trl's ORPO: 1.5, every row's and the chosen half's again for its
    # NLL term; CPO/SimPO: 1, or 1.5 with its NLL term)
    log_softmaxes: float = 0.0
    # DoRA (LoRA's magnitude/direction split): a trainable magnitude per output feature of each adapted module, two
    # more activations per module, and the weight norm computed in each forward
    dora: bool = False
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
    def strategy(self) -> str | None:
        return None if self.ranks == 1 else "fsdp" if self.sharded else "ddp"

    @property
    def shape(self) -> str:
        if self.micro_batch_tokens:
            return f"micro-batches of at most {self.tokens} tokens (token budget)"
        if self.sequences == 2:
            return f"{self.micro_batch} x 2 (chosen, rejected) x {self.seq_len} tokens"
        return f"{self.micro_batch} x {self.seq_len} tokens"
