"""The arguments every fx trainer shares, set from fx's own choices and never left to a library default: trl's
configs default to bf16 and gradient checkpointing even on a CPU (measured ~20x slower there)."""

from __future__ import annotations

from typing import Any

from fx.training.devices import compute_dtype, device
from fx.training.distributed import current, fsdp_arguments, per_rank


def trainer_arguments(config_class, settings, session, **fields: Any):
    """``config_class(...)`` (``TrainingArguments`` or a subclass such as trl's ``SFTConfig``) from a method's QLoRA
    settings (:class:`fx.training.settings.QLoraSettings`, with ``micro_batch_tokens`` when it has one), the run's
    :class:`fx.training.method.Session`, and the method's own ``fields`` (which win). On several GPUs each rank gets
    its share of the effective batch (:func:`fx.training.distributed.per_rank`) and, under FSDP, accelerate's FSDP2."""
    import torch

    s = settings
    dtype = compute_dtype(s.compute_dtype)
    on_gpu = device() == "cuda"
    # with a token budget the trainer's batch is the whole effective batch, cut by fx (fx.training.microbatch)
    budget = getattr(s, "micro_batch_tokens", 0)
    rows, accumulation = ((s.micro_batch_size * s.gradient_accumulation_steps, 1) if budget
                          else (s.micro_batch_size, s.gradient_accumulation_steps))
    world = current()
    rows, accumulation = per_rank(rows, accumulation, world.size)  # the same effective batch on any number of GPUs
    sharded = world.strategy == "fsdp"
    every = session.checkpoint_every
    args: dict[str, Any] = dict(
        output_dir=str(session.output_dir),
        use_cpu=not on_gpu,
        seed=session.seed,
        num_train_epochs=s.epochs,
        max_steps=session.max_steps if session.max_steps is not None else s.max_steps,
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=accumulation,
        learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler,
        warmup_steps=s.warmup_ratio,  # a value below 1 is a ratio of the total steps
        weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm,
        # bitsandbytes' paged and 8-bit optimizers need a GPU (and not FSDP's sharded parameters); torch's (fused too)
        # run anywhere
        optim=s.optim if (on_gpu and not sharded) or s.optim.startswith("adamw_torch") else "adamw_torch",
        bf16=on_gpu and dtype is torch.bfloat16,
        fp16=on_gpu and dtype is torch.float16,
        gradient_checkpointing=False,  # set on the model when it is loaded; the trainer must not change it
        logging_steps=s.logging_steps,
        logging_strategy="steps",
        train_sampling_strategy="group_by_length" if s.group_by_length else "random",
        save_strategy="steps" if every else "no",
        save_steps=every or None,
        save_total_limit=None,  # fx rotates (fx.training.checkpoints): never the newest checkpoint that verifies
        save_only_model=False,  # optimizer, scheduler and RNG states too: a resumed run continues exactly
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every adapter weight takes part in every step
        **(fsdp_arguments() if sharded else {}),
    )
    args.update(fields)
    return config_class(**args)
