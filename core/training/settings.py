"""Settings that methods share: LoRA, 4-bit loading, the optimizer and schedule, the speed levers. A method's own
``Settings`` subclasses the ones it uses; a key made with :func:`execution` changes how a step runs, never what it
computes (``fx bench --compare`` compares across it and ``fx run --resume --set`` may change it)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from fx.settings import Settings


def execution(default: Any, **field: Any) -> Any:
    """A settings field that changes how a step executes (speed, memory), never what it computes."""
    return Field(default, json_schema_extra={"execution": True}, **field)


def execution_keys(settings: type[Settings]) -> tuple[str, ...]:
    """The execution keys of a settings model (:func:`execution`)."""
    return tuple(name for name, info in settings.model_fields.items()
                 if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("execution"))


class LoraSettings(Settings):
    r: int = Field(64, ge=1, le=4096)
    alpha: float = Field(16, gt=0, le=1e6)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    # PEFT's LoRA variants: "dora" (a trainable magnitude per output feature, the weight's direction from LoRA),
    # "rslora" (the update scaled by alpha / sqrt(r) instead of alpha / r)
    variant: Literal["lora", "dora", "rslora"] = "lora"
    # the adapter's starting weights: "default" (B = 0: the model starts as its base), "loftq" (B x A starts as the
    # 4-bit base's quantisation error, peft's replace_lora_weights_loftq; needs a CUDA GPU), "pissa" (refused on a
    # 4-bit base, with the reason: docs/methods.md)
    init: Literal["default", "pissa", "loftq"] = "default"

    @property
    def scaling(self) -> float:
        """The factor peft multiplies B x A by."""
        return self.alpha / (self.r ** 0.5 if self.variant == "rslora" else self.r)


class QLoraSettings(Settings):
    """A 4-bit base with LoRA adapters, trained by a transformers Trainer."""

    lora: LoraSettings = LoraSettings()
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = False
    compute_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    epochs: float = Field(1.0, gt=0, le=10_000)
    max_steps: int = Field(-1, ge=-1, le=10**9)

    @field_validator("max_steps")
    @classmethod
    def _trains_something(cls, value: int) -> int:
        if value == 0:
            raise ValueError("0 steps train nothing: give a number of steps, or -1 to train for `epochs`")
        return value
    micro_batch_size: int = Field(4, ge=1, le=65536)
    gradient_accumulation_steps: int = Field(1, ge=1, le=65536)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.001, ge=0, le=1)
    max_grad_norm: float = Field(0.3, gt=0, le=1e6)
    # adamw_torch_fused: torch's AdamW in one fused kernel per step, its states in the allocator (no paging)
    optim: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "paged_adamw_8bit",
                   "adamw_bnb_8bit"] = "paged_adamw_32bit"
    # recompute decoder layers in backward instead of keeping their activations: all (true), none (false), the
    # first N layers, or "auto": the fewest that keep the plan within the [budget] (all without a budget)
    gradient_checkpointing: bool | Literal["auto"] | Annotated[int, Field(ge=0, le=100_000)] = execution("auto")
    group_by_length: bool = False  # batch rows of similar length: less padding (the tutorial's choice)
    logging_steps: int = execution(1, ge=1, le=10**6)
    # kernels (docs/performance.md), each measured on its own
    liger: bool | Literal["auto"] = execution("auto")  # Liger's fused RMSNorm/RoPE/SwiGLU; auto: on a CUDA GPU
    # padding-free rows: "varlen" attends within each row (FlashAttention's kernel on compute capability 8.0+, else the
    # memory-efficient one, which a T4 runs), "varlen_efficient" forces the memory-efficient kernel, "sdpa" a
    # block-diagonal mask over the whole micro-batch; auto: varlen on a CUDA GPU, sdpa elsewhere
    attention: Literal["auto", "sdpa", "varlen", "varlen_efficient"] = execution("auto")
    compile: bool = execution(False)  # torch.compile each decoder layer (CUDA only; ~1.5 min to compile)
    # a checkpointed layer's recompute keeps its dequantised 4-bit weights for its backward (fx.training.lora4bit)
    dequantize_once: bool = execution(True)
    # each 4-bit LoRA linear's base matmul and adapter in one autograd function (fx.training.lora4bit)
    fused_lora: bool = execution(True)


class TokenBudgetSettings(Settings):
    """A token budget per forward/backward (fx.training.microbatch), for trainers whose loss is a sum over answer
    tokens divided by ``num_items_in_batch`` (the batch's answer tokens), as SFT's is."""

    # token budget per forward/backward; 0: micro_batch_size rows
    micro_batch_tokens: int = execution(0, ge=0, le=10**8)


class PackingSettings(TokenBudgetSettings):
    """SFT's levers (fx.training.sft): packed rows and their steps replayed as CUDA graphs."""

    padding_free: bool = execution(True)  # a micro-batch's rows as one sequence, attention kept within each row
    cuda_graphs: bool | Literal["auto"] = execution("auto")  # replay each padding-free step as a CUDA graph
