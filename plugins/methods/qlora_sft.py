"""Method ``qlora_sft``: supervised fine-tuning of LoRA adapters on a 4-bit (NF4) base, with trl's SFTTrainer.

Every precision and checkpointing flag is set from fx's own choice, never left to a library default
(trl's SFTConfig defaults to bf16 and gradient checkpointing even on CPU, measured ~20x slower here).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

import fx
from fx.config import Strict
from fx.errors import UserError
from fx.method import Method, compute_dtype, device, keep_4bit_layout


class LoraSettings(Strict):
    r: int = Field(64, ge=1, le=4096)
    alpha: float = Field(16, gt=0, le=1e6)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class QLoraSFT(Method):
    description = "4-bit NF4 base + LoRA adapters, supervised fine-tuning (trl SFTTrainer), loss on answers only"
    execution_keys = ("micro_batch_tokens", "gradient_checkpointing", "padding_free", "liger", "attention", "compile",
                      "cuda_graphs", "logging_steps")

    class Settings(Strict):
        lora: LoraSettings = LoraSettings()
        quant_type: Literal["nf4", "fp4"] = "nf4"
        double_quant: bool = False
        compute_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
        epochs: float = Field(1.0, gt=0, le=10_000)
        max_steps: int = Field(-1, ge=-1, le=10**9)
        micro_batch_size: int = Field(4, ge=1, le=65536)
        gradient_accumulation_steps: int = Field(1, ge=1, le=65536)
        learning_rate: float = Field(2e-4, gt=0, le=1)
        lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "cosine"
        warmup_ratio: float = Field(0.03, ge=0, lt=1)
        weight_decay: float = Field(0.001, ge=0, le=1)
        max_grad_norm: float = Field(0.3, gt=0, le=1e6)
        optim: Literal["adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_bnb_8bit"] = "paged_adamw_32bit"
        gradient_checkpointing: bool = True
        group_by_length: bool = False  # batch rows of similar length: less padding (the tutorial's choice)
        logging_steps: int = Field(1, ge=1, le=10**6)
        # speed (docs/performance.md): each lever measured on its own
        padding_free: bool = True  # a micro-batch's rows as one sequence, attention kept within each row
        liger: bool | Literal["auto"] = "auto"  # Liger's fused RMSNorm/RoPE/SwiGLU kernels; auto: on a CUDA GPU, not compiled
        micro_batch_tokens: int = Field(0, ge=0, le=10**8)  # token budget per forward/backward; 0: micro_batch_size rows
        attention: Literal["auto", "sdpa", "varlen"] = "auto"  # auto: varlen FlashAttention for padding-free rows where it exists
        compile: bool = False  # torch.compile each decoder layer (CUDA only; ~1.5 min to compile)
        cuda_graphs: bool | Literal["auto"] = "auto"  # replay each padding-free step as a CUDA graph; auto: on a CUDA GPU

    def check(self) -> list[str]:
        """Settings that don't go together, or not on this machine: refused before a run directory is made."""
        s, problems = self.settings, []
        if s.compile and s.liger is True:
            problems.append("method.liger = true and method.compile = true don't go together (torch.compile can't "
                            "trace Liger's kernels; it fuses the same operations itself): set one of them to false")
        if s.cuda_graphs is True and not s.padding_free:
            problems.append("method.cuda_graphs = true needs method.padding_free = true (a graph pads packed rows "
                            "to a fixed length)")
        if s.cuda_graphs is True and device() != "cuda":
            problems.append('method.cuda_graphs = true needs a CUDA GPU; set it to "auto" or false on this machine')
        return problems

    def quantization_config(self):
        from transformers import BitsAndBytesConfig

        s = self.settings
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=s.quant_type,
            bnb_4bit_use_double_quant=s.double_quant,
            bnb_4bit_compute_dtype=compute_dtype(s.compute_dtype),
        )

    def workload(self, max_length: int, bf16: bool | None = None):
        """The run's shape for the memory planner; ``bf16`` says whether the target GPU computes in bfloat16
        (None: this machine's GPU), which settles ``compute_dtype = "auto"``."""
        from fx.memory import Workload

        s = self.settings
        if s.compute_dtype != "auto":
            dtype = s.compute_dtype
        elif bf16 is None:
            dtype = str(compute_dtype("auto")).removeprefix("torch.") if device() == "cuda" else "bfloat16"
        else:
            dtype = "bfloat16" if bf16 else "float16"
        targets = (s.lora.target_modules,) if isinstance(s.lora.target_modules, str) else tuple(s.lora.target_modules)
        return Workload(
            micro_batch=s.micro_batch_size, seq_len=max_length, gradient_checkpointing=s.gradient_checkpointing,
            lora_r=s.lora.r, lora_targets=targets, lora_dropout=s.lora.dropout, compute_dtype=dtype,
            quant_type=s.quant_type, double_quant=s.double_quant, optim=s.optim,
            gradient_accumulation=s.gradient_accumulation_steps, micro_batch_tokens=s.micro_batch_tokens,
            persistent_grads=s.padding_free and s.cuda_graphs is not False,  # graphed steps on the (CUDA) target
            keys={"micro_batch": "method.micro_batch_size", "gradient_accumulation": "method.gradient_accumulation_steps",
                  "gradient_checkpointing": "method.gradient_checkpointing", "seq_len": "data.max_length",
                  "lora_r": "method.lora.r"},
        )

    def load_base(self, source):
        """The 4-bit base model, with gradient checkpointing set as configured."""
        s = self.settings
        model = source.load(
            quantization_config=self.quantization_config(),
            dtype=compute_dtype(s.compute_dtype),
            device_map={"": 0} if device() == "cuda" else {"": "cpu"},
        )
        keep_4bit_layout(model)
        apply_liger(model, False if s.compile else s.liger)
        choose_attention(model, s.attention, s.padding_free)
        model.config.use_cache = False
        if s.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        return model

    def attach(self, model):
        """LoRA adapters on ``model`` (a base from :meth:`load_base`)."""
        from peft import LoraConfig, get_peft_model

        s = self.settings
        lora = LoraConfig(
            r=s.lora.r, lora_alpha=s.lora.alpha, lora_dropout=s.lora.dropout,
            target_modules=s.lora.target_modules, bias="none", task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)

    def load(self, source, tokenizer):
        model = self.attach(self.load_base(source))
        if self.settings.compile:
            compile_layers(model)
        return model

    def trainer_args(self, output_dir: Path, seed: int):
        from trl import SFTConfig

        s = self.settings
        dtype = compute_dtype(s.compute_dtype)
        on_gpu = device() == "cuda"
        optim = s.optim if on_gpu else "adamw_torch"  # bitsandbytes' paged/8-bit optimizers need a GPU
        every = self.run.checkpoint_every if self.run else 0
        # with a token budget the trainer's batch is the whole effective batch, split by fx in training_step
        rows, accumulation = ((s.micro_batch_size * s.gradient_accumulation_steps, 1) if s.micro_batch_tokens
                              else (s.micro_batch_size, s.gradient_accumulation_steps))
        args = dict(
            output_dir=str(output_dir),
            use_cpu=not on_gpu,
            seed=seed,
            num_train_epochs=s.epochs,
            max_steps=s.max_steps,
            per_device_train_batch_size=rows,
            gradient_accumulation_steps=accumulation,
            learning_rate=s.learning_rate,
            lr_scheduler_type=s.lr_scheduler,
            warmup_steps=s.warmup_ratio,  # a value below 1 is a ratio of the total steps
            weight_decay=s.weight_decay,
            max_grad_norm=s.max_grad_norm,
            optim=optim,
            bf16=on_gpu and dtype is _torch().bfloat16,
            fp16=on_gpu and dtype is _torch().float16,
            gradient_checkpointing=False,  # set on the model in load(); the trainer must not change it
            logging_steps=s.logging_steps,
            logging_strategy="steps",
            train_sampling_strategy="group_by_length" if s.group_by_length else "random",
            save_strategy="steps" if every else "no",  # fx bench trains without a run: no checkpoints
            save_steps=every or None,
            save_total_limit=self.run.checkpoint_keep if self.run else None,
            save_only_model=False,  # optimizer, scheduler and RNG states too: a resumed run continues exactly
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            include_num_input_tokens_seen="non_padding",
            dataloader_num_workers=0,
            remove_unused_columns=False,
            max_length=None,  # rows arrive tokenized and truncated by fx
            packing=False,
            padding_free=s.padding_free,
            dataset_kwargs={"skip_prepare_dataset": True},
        )
        return SFTConfig(**args)

    def trainer(self, model, tokenizer, train_rows, output_dir: Path, seed: int, callbacks=(), **overrides):
        """trl's SFTTrainer for ``model``; ``overrides`` replace SFTConfig fields (fx bench sets max_steps)."""
        import dataclasses

        import datasets

        args = self.trainer_args(output_dir, seed)
        if overrides:
            args = dataclasses.replace(args, **overrides)
        trainer = sft_trainer_class()(
            micro_batch_tokens=self.settings.micro_batch_tokens,
            cuda_graphs=self.uses_cuda_graphs(),
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(train_rows),
            processing_class=tokenizer,
            callbacks=list(callbacks),
        )
        return self.finish_trainer(trainer, model)

    def uses_cuda_graphs(self) -> bool:
        s = self.settings
        return s.padding_free and device() == "cuda" and s.cuda_graphs is not False

    def finish_trainer(self, trainer, model):
        """What every fx trainer needs after trl built it: fx's trackers report progress (not trl's printer), the
        adapter trains in float32, and each batch's real tokens are counted for an out-of-memory report."""
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        keep_adapter_float32(model)
        collate = trainer.data_collator

        def counting_collator(features):
            batch = collate(features)
            self.run.batch_tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
            return batch

        if self.run is not None:
            trainer.data_collator = counting_collator
        return trainer

    def train(self, model, tokenizer, train_rows, eval_rows) -> dict[str, Any]:
        callback = log_callback(self.run)
        trainer = self.trainer(model, tokenizer, train_rows, self.run.dir / "checkpoints",
                               self.run.config["experiment"]["seed"], callbacks=[callback])
        start = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=str(self.run.resume_from) if self.run.resume_from else None)
        wall = time.perf_counter() - start
        tokens = trainer.state.num_input_tokens_seen
        tokens_now = tokens - callback.tokens_at_start  # a resumed run counts only what it trained itself
        return {
            "steps": trainer.state.global_step,
            "train_loss": round(output.training_loss, 4),
            "train_tokens": int(tokens),
            "train_tokens_per_s": round(tokens_now / wall, 1) if wall > 0 else None,
            "train_wall_s": round(wall, 1),
            **({"cuda_graphs": trainer.graph_stats} if getattr(trainer, "graph_stats", None) else {}),
        }

    def save(self, model, folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)

    def load_trained(self, source, folder: Path):
        """peft loads adapter weights in float32; trl trains a quantised model's adapters in bfloat16 (its
        QLoRA default), so they are put back in the dtype they were saved in, to compute as the trained model did."""
        from peft import PeftModel
        from safetensors import safe_open

        model = PeftModel.from_pretrained(self.load_base(source), folder)
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as saved:
            dtype = saved.get_tensor(next(iter(saved.keys()))).dtype
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(dtype)
        return model.eval()


def keep_adapter_float32(model) -> None:
    """Undo trl's cast of LoRA weights to bfloat16 on quantized models (SFTTrainer.__init__, trl 1.16).

    fx keeps trainable weights in float32: fp16 mixed precision (T4) needs float32 master weights, and a CPU
    without native bf16 computes bf16 many times slower. The optimizer is created later, in train().
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != _torch().float32:
            param.data = param.data.float()


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


def choose_attention(model, choice: str, padding_free: bool) -> str:
    """The attention function for training (fx.attention): varlen FlashAttention for padding-free batches where the
    GPU has it, else transformers' sdpa with its exact block-diagonal mask; the name in use."""
    from fx import attention

    if choice == "varlen" and not padding_free:
        raise UserError("method.attention = \"varlen\" needs method.padding_free = true (padded rows need a mask)")
    if choice != "sdpa" and padding_free and attention.use_varlen(model):
        return attention.NAME
    if choice == "varlen":
        raise UserError("method.attention = \"varlen\" needs a CUDA GPU of compute capability 8.0 or newer and "
                        "PyTorch's torch.nn.attention.varlen; \"auto\" falls back to sdpa")
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


def split_micro_batches(batch: dict[str, Any], budget: int) -> list[dict[str, Any]]:
    """A collated batch cut, between whole rows, into micro-batches of at most ``budget`` tokens (a row longer
    than the budget goes alone). Padded rows (``attention_mask``) are grouped so that rows x the group's longest
    row fits, and each group loses the padding it no longer needs; a padding-free batch (one packed row with
    ``position_ids`` restarting at 0 for each sequence) is cut at sequence starts."""
    import torch

    def groups(lengths: list[int], cost) -> list[tuple[int, int]]:
        out, start = [], 0
        for end in range(1, len(lengths) + 1):
            if end - start > 1 and cost(lengths[start:end]) > budget:
                out.append((start, end - 1))
                start = end - 1
        return out + [(start, len(lengths))]

    if "attention_mask" in batch:
        lengths = batch["attention_mask"].sum(1).tolist()
        parts = []
        for a, b in groups(lengths, lambda ls: len(ls) * max(ls)):
            width = max(lengths[a:b])
            parts.append({k: v[a:b, :width] if isinstance(v, torch.Tensor) and v.dim() == 2 else v
                          for k, v in batch.items()})
        return parts
    positions = batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist() + [positions.numel()]
    lengths = [b - a for a, b in zip(starts, starts[1:])]
    parts = []
    for a, b in groups(lengths, sum):
        lo, hi = starts[a], starts[b]
        part = {k: batch[k][:, lo:hi] for k in ("input_ids", "labels", "position_ids")}
        if "cu_seq_lens_q" in batch:  # the varlen kernels' sequence boundaries, as trl's collator gives them
            cu = torch.tensor([s - lo for s in starts[a:b + 1]], dtype=torch.int32, device=positions.device)
            part["cu_seq_lens_q"] = part["cu_seq_lens_k"] = cu
            part["max_length_q"] = part["max_length_k"] = max(lengths[a:b])
        if "seq_idx" in batch:
            part["seq_idx"] = batch["seq_idx"][:, lo:hi] - batch["seq_idx"][0, lo]
        parts.append(part)
    return parts


@functools.cache
def sft_trainer_class():
    """trl's SFTTrainer with fx's token-budget micro-batching, and padding-free batches' tokens counted right."""
    from trl import SFTTrainer

    class FxSFTTrainer(SFTTrainer):
        def __init__(self, *args, micro_batch_tokens: int = 0, cuda_graphs: bool = False, **kwargs):
            self.micro_batch_tokens = micro_batch_tokens
            self.cuda_graphs = cuda_graphs  # padding-free steps through fx.graphs (captured on a CUDA GPU)
            self.graphs = None
            self.graph_stats = None  # what the graphs did, kept when training ends and they are released
            super().__init__(*args, **kwargs)

        def train(self, *args, **kwargs):
            try:
                return super().train(*args, **kwargs)
            finally:
                if self.graphs is not None:
                    self.graph_stats = self.graphs.stats()
                    self.graphs.release()
                    self.graphs = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            """With a token budget, the batch is the whole effective batch: forward and backward each micro-batch,
            every loss divided by the batch's answer-token count, so the summed gradient is the full batch's mean
            (what gradient accumulation computes), whatever the split."""
            parts = split_micro_batches(inputs, self.micro_batch_tokens) if self.micro_batch_tokens else [inputs]
            if len(parts) == 1:
                return self.one_step(model, inputs, num_items_in_batch)
            total = (inputs["labels"][:, 1:] != -100).sum()  # positions whose next token is scored
            return sum(self.one_step(model, part, total) for part in parts)

        def one_step(self, model, inputs, num_items_in_batch):
            """A forward and backward: a padded, graphed step (fx.graphs) where it can be, else the trainer's."""
            if self.cuda_graphs:
                from fx import graphs

                if self.graphs is None:
                    self.graphs = graphs.GraphedSteps(model, rows=self.args.per_device_train_batch_size,
                                                      capture=_torch().cuda.is_available())
                loss = self.graphs.step(self, self._prepare_inputs(inputs), num_items_in_batch)
                if loss is not None:
                    self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
                    return loss
            return super().training_step(model, inputs, num_items_in_batch)

        def log(self, logs, *args, **kwargs):
            if self.graphs is not None:
                self.graphs.flush_metrics(self._metrics["train"])
            return super().log(logs, *args, **kwargs)

        def _track_num_input_tokens(self, inputs):
            """A padding-free batch has no padding and no attention mask: every token is real. (The trainer would
            count tokens unequal to the pad token, missing each row's EOS when the pad token is the EOS.)"""
            if "attention_mask" in inputs or "position_ids" not in inputs or self.args.include_num_input_tokens_seen == "no":
                return super()._track_num_input_tokens(inputs)
            self.state.num_input_tokens_seen += int(inputs["input_ids"].numel())

    return FxSFTTrainer


def _torch():
    import torch

    return torch


def log_callback(run):
    """A trainer callback that forwards the trainer's logs to fx, adding tokens/s over each interval."""
    from transformers import TrainerCallback

    class LogCallback(TrainerCallback):
        def __init__(self):
            self.last = (time.perf_counter(), 0)
            self.tokens_at_start = 0

        def on_train_begin(self, args, state, control, **kwargs):
            run.max_steps = state.max_steps
            run.step = state.global_step  # a resumed run starts at its checkpoint's step
            self.tokens_at_start = state.num_input_tokens_seen
            self.last = (time.perf_counter(), state.num_input_tokens_seen)

        def on_step_end(self, args, state, control, **kwargs):
            run.step = state.global_step
            if state.global_step >= state.max_steps:
                control.should_save = True  # the final checkpoint, whatever the interval
            if run.stop_signal is not None:  # SIGINT/SIGTERM: checkpoint this step, then stop
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            if "train_loss" in logs:  # the trainer's closing summary, not a step
                return
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and k != "num_input_tokens_seen"}
            if now > self.last[0]:
                metrics["tokens_per_s"] = (tokens - self.last[1]) / (now - self.last[0])
            metrics["tokens"] = float(tokens)
            self.last = (now, tokens)
            run.log(state.global_step, metrics)

    return LogCallback()


@fx.hookimpl
def fx_register_methods(register):
    register("qlora_sft", QLoraSFT)
