"""QLoRA methods' shared half: a 4-bit (NF4) base with LoRA adapters, loaded, saved, reloaded and planned the same
way whichever trainer trains it. A method subclasses :class:`QLoraMethod` and provides its trainer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fx.training.arguments import trainer_arguments
from fx.training.checkpointing import decoder_layers, enable_checkpointing, layer_count
from fx.training.devices import compute_dtype, device, dtype_name
from fx.training.distributed import current
from fx.training.kernels import apply_liger, attention_problems, choose_attention, compile_layers
from fx.training.lora4bit import apply_levers
from fx.training.method import Method, Session
from fx.training.settings import QLoraSettings


class QLoraMethod(Method):
    """LoRA adapters on a 4-bit base: :meth:`load`, :meth:`save`, :meth:`load_trained` and :meth:`workload` for any
    trainer; :meth:`trainer_args` gives the trainer every precision, checkpoint and schedule argument from fx."""

    strategies = ("ddp", "fsdp")  # several GPUs: whole model per rank, or its 4-bit weights sharded

    class Settings(QLoraSettings):
        pass

    def check(self) -> list[str]:
        s = self.settings
        problems = []
        if s.compile and s.liger is True:
            problems.append("method.liger = true and method.compile = true don't go together (torch.compile can't "
                            "trace Liger's kernels; it fuses the same operations itself): set one of them to false")
        if s.attention.startswith("varlen"):
            problems += attention_problems(s.attention, getattr(s, "padding_free", False), device() == "cuda")
        return problems + lora_problems(s.lora)

    # -- the model --------------------------------------------------------------------------------------------------

    def quantization_config(self):
        from transformers import BitsAndBytesConfig

        s = self.settings
        dtype = compute_dtype(s.compute_dtype)
        # FSDP shards floating-point tensors only: the packed 4-bit weights are stored in the compute dtype
        storage = {"bnb_4bit_quant_storage": dtype} if current().strategy == "fsdp" else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=s.quant_type,
                                  bnb_4bit_use_double_quant=s.double_quant, bnb_4bit_compute_dtype=dtype, **storage)

    def load_base(self, source):
        """The 4-bit base model with the configured kernels and gradient checkpointing (of the first N layers), on this
        rank's GPU (under FSDP on the CPU, from where FSDP moves each layer's shard to the GPU: the whole model need not
        fit one)."""
        s = self.settings
        world = current()
        place = "cpu" if device() != "cuda" or world.strategy == "fsdp" else world.local_rank
        model = source.load(quantization_config=self.quantization_config(), dtype=compute_dtype(s.compute_dtype),
                            device_map={"": place})
        keep_4bit_layout(model)
        apply_liger(model, False if s.compile else s.liger)
        choose_attention(model, s.attention, getattr(s, "padding_free", False))
        model.config.use_cache = False
        enable_checkpointing(model, layer_count(s.gradient_checkpointing, len(decoder_layers(model))))
        return model

    def attach(self, model):
        """Fresh LoRA adapters (``[method.lora]``'s variant and initialisation) on a base from :meth:`load_base`."""
        from peft import LoraConfig, get_peft_model

        lora = self.settings.lora
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, bias="none",
                                                 task_type="CAUSAL_LM", use_dora=lora.variant == "dora",
                                                 use_rslora=lora.variant == "rslora"))
        if lora.init == "loftq":
            from peft import replace_lora_weights_loftq

            # peft's path for a base that is already 4-bit: the original weights are read from the model's
            # safetensors (a local folder, or the hub cache for a hub id)
            path = model.get_base_model().config._name_or_path
            replace_lora_weights_loftq(model, model_path=path if os.path.isdir(path) else None)
        return model

    @property
    def starts_as_base(self) -> bool:
        """Whether a fresh adapter leaves the model computing exactly its base (B = 0), so that the base with the
        adapter switched off is the policy training starts from; LoftQ's adapter starts elsewhere."""
        return self.settings.lora.init == "default"

    def load(self, source, tokenizer):
        return self.prepare_training(self.attach(self.load_base(source)))

    def prepare_training(self, model):
        """The levers that change a trainable model's modules: regional torch.compile, or else fx's 4-bit LoRA
        linears (fx.training.lora4bit: dequantise once per layer and step, the fused LoRA path)."""
        s = self.settings
        if s.compile:
            compile_layers(model)
        else:
            apply_levers(model, s.dequantize_once, s.fused_lora)
        return model

    def save(self, model, folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)

    def load_trained(self, source, folder: Path):
        """The base as trained, with the saved adapter in the dtype it was saved in (peft loads adapters in float32)."""
        from peft import PeftModel
        from safetensors import safe_open

        model = PeftModel.from_pretrained(self.load_base(source), folder)
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as saved:
            dtype = saved.get_tensor(next(iter(saved.keys()))).dtype
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(dtype)
        return model.eval()

    def merge_base(self, source, dtype):
        """The 4-bit base exactly as :meth:`load_base` quantises it (same quantisation, same compute dtype), each
        ``Linear4bit`` dequantised by bitsandbytes (``dequantize_4bit``, through transformers' ``dequantize``), then
        cast to ``dtype``: the weights the adapter was trained against. Merging into the original weights instead
        adds the quantisation error to the trained model (docs/after-training.md)."""
        model = source.load(quantization_config=self.quantization_config(),
                            dtype=compute_dtype(self.settings.compute_dtype),
                            device_map={"": 0} if device() == "cuda" else {"": "cpu"})
        return model.dequantize(dtype=dtype).to(dtype)

    # -- the trainer and the planner --------------------------------------------------------------------------------

    def trainer_args(self, config_class, session: Session, **fields: Any):
        """``config_class`` (``TrainingArguments`` or trl's ``SFTConfig``, ``DPOConfig``, ...) with fx's choice of
        every shared argument and the method's own ``fields``."""
        return trainer_arguments(config_class, self.settings, session, **fields)

    def workload(self, max_length: int, bf16: bool | None = None, **shape: Any):
        """The planner's shape of a QLoRA run; ``shape`` adds what the method changes (``sequences=2`` for preference
        pairs, ``reference_forward=True``, ...). ``bf16`` settles ``compute_dtype = "auto"`` for the target GPU."""
        from fx.plan.shapes import Workload

        s = self.settings
        if s.compute_dtype != "auto":
            dtype = s.compute_dtype
        elif bf16 is None:
            dtype = dtype_name(compute_dtype("auto")) if device() == "cuda" else "bfloat16"
        else:
            dtype = "bfloat16" if bf16 else "float16"
        targets = (s.lora.target_modules,) if isinstance(s.lora.target_modules, str) else tuple(s.lora.target_modules)
        packed = getattr(s, "padding_free", False)
        gc = s.gradient_checkpointing
        layers = gc if isinstance(gc, int) and not isinstance(gc, bool) else None  # the first N; None: all or none
        fields: dict[str, Any] = dict(
            micro_batch=s.micro_batch_size, seq_len=max_length, gradient_checkpointing=gc is not False and gc != 0,
            checkpointed_layers=layers, dequantize_once=s.dequantize_once and not s.compile,
            fused_mlp=s.fused_lora and not s.compile,
            lora_r=s.lora.r, lora_targets=targets, lora_dropout=s.lora.dropout, compute_dtype=dtype,
            quant_type=s.quant_type, double_quant=s.double_quant, optim=s.optim, dora=s.lora.variant == "dora",
            gradient_accumulation=s.gradient_accumulation_steps,
            micro_batch_tokens=getattr(s, "micro_batch_tokens", 0),
            persistent_grads=packed and getattr(s, "cuda_graphs", False) is not False,  # graphed steps (a CUDA target)
            keys={"micro_batch": "method.micro_batch_size",
                  "gradient_accumulation": "method.gradient_accumulation_steps",
                  "gradient_checkpointing": "method.gradient_checkpointing", "seq_len": "data.max_length",
                  "lora_r": "method.lora.r"},
        )
        return Workload(**{**fields, **shape})


def lora_problems(lora) -> list[str]:
    """``[method.lora]`` combinations that can't work on a 4-bit base, one line each naming the key."""
    problems = []
    if lora.init == "pissa":
        problems.append("method.lora.init = 'pissa' can't work on a 4-bit base: PiSSA moves the base weights' "
                        "principal components into the adapter and leaves the residual in the base, which peft "
                        "computes on 16- or 32-bit weights; a 4-bit base would have to be quantised again from that "
                        "residual (a model of its own). Use init = 'loftq', made for 4-bit bases, or 'default'")
    if lora.init == "loftq":
        if device() != "cuda":
            problems.append("method.lora.init = 'loftq' needs a CUDA GPU: peft computes LoftQ's initialisation "
                            "there (replace_lora_weights_loftq); use init = 'default' on this machine")
        if lora.variant == "dora":
            problems.append("method.lora.init = 'loftq' and variant = 'dora' don't go together: DoRA takes its "
                            "magnitudes from the base before LoftQ sets the adapter's weights")
        if abs(lora.scaling - 1) > 1e-9:
            wanted = f"{lora.r ** 0.5:g} (the square root of r, with rsLoRA)" if lora.variant == "rslora" else lora.r
            problems.append(f"method.lora.alpha: LoftQ sets B x A to the 4-bit base's quantisation error without "
                            f"LoRA's scaling (peft issue #1982), so it needs a scaling of 1: alpha = {wanted}")
    return problems


def keep_4bit_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference: on CPUs with AVX512-BF16, bitsandbytes 0.50
    rewrites a Linear4bit's weight the first time it runs in eval mode, and its training path then misreads it
    (docs/memory.md, "bitsandbytes on the CPU")."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def keep_adapter_float32(model) -> None:
    """Trainable weights in float32, whatever trl cast them to (trl casts a quantised model's LoRA weights to
    bfloat16): fp16 mixed precision needs float32 master weights, and a CPU computes bfloat16 many times slower."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
