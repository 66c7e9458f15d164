"""The reference recipe written plainly against transformers, peft and trl, the way the original tutorial
(mlabonne's "Fine-tune Llama 2 in a Colab notebook") does it: ``fx bench --reference`` runs it on the same
model and data as the experiment and reports fx's ratio to it.

Kept deliberately close to the tutorial: BitsAndBytesConfig NF4 with float16 compute, LoraConfig r=64,
alpha=16, dropout=0.1 (peft's default Llama targets, q_proj and v_proj), SFTTrainer on the ``text`` column,
batch 4, paged_adamw_32bit, lr 2e-4, cosine, warmup 0.03, weight decay 0.001, max_grad_norm 0.3, grouped by
length, gradient checkpointing, and ``fp16=False, bf16=False`` as the tutorial had. The loss covers the whole
text (the tutorial's choice); fx's covers the answers. Both count real tokens.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any


def run(prep, exp, steps: int, warmup: int, timer) -> dict[str, Any]:
    """Train the plain recipe for ``warmup + steps`` steps on the experiment's training texts, timed by ``timer``
    (a trainer callback); its load time and trainable parameters."""
    started = time.perf_counter()
    model, tokenizer = load(prep)
    load_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(prep, exp, model, tokenizer, Path(tmp), warmup + steps, callbacks=[timer])
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
    return {"load_s": load_s, "trainable_params": trainable}


def load(prep):
    """The tutorial's 4-bit model and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    model_name = prep.source.path()
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16,
        bnb_4bit_use_double_quant=False
    )
    model = AutoModelForCausalLM.from_pretrained(model_name, quantization_config=bnb_config, device_map={"": 0})
    model.config.use_cache = False
    model.config.pretraining_tp = 1
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer


def build(prep, exp, model, tokenizer, output_dir: Path, max_steps: int, callbacks=(), lora: dict | None = None):
    """The tutorial's SFTTrainer on ``model`` (from :func:`load`) and the experiment's training texts; ``lora``
    changes its LoraConfig (another recipe on the same plain code)."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    import datasets
    from fx.data.tokenize import render

    texts = [render(prep.template, example).text for example in prep.train_examples]
    dataset = datasets.Dataset.from_dict({"text": texts})
    peft_config = LoraConfig(**{**dict(lora_alpha=16, lora_dropout=0.1, r=64, bias="none", task_type="CAUSAL_LM"),
                                **(lora or {})})
    args = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=1,
        max_steps=max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        optim="paged_adamw_32bit",
        save_strategy="no",
        logging_steps=exp.method.settings.logging_steps,  # 25 in the tutorial and the bench experiment
        learning_rate=2e-4,
        weight_decay=0.001,
        fp16=False,
        bf16=False,
        max_grad_norm=0.3,
        warmup_steps=0.03,
        train_sampling_strategy="group_by_length",
        lr_scheduler_type="cosine",
        report_to="none",
        gradient_checkpointing=True,
        max_length=exp.data.max_length,
        dataset_text_field="text",
        packing=False,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        seed=exp.experiment.seed,
    )
    return SFTTrainer(model=model, train_dataset=dataset, peft_config=peft_config, processing_class=tokenizer,
                      args=args, callbacks=list(callbacks))
