"""The run contract, the same for every method: fx builds the method's trainer, adds its callback and trains.

The callback numbers steps, forces a checkpoint at the last step and after SIGINT/SIGTERM (the step in progress
finishes first), and sends every log to the trackers with the real tokens per second. Token budgets split the
batches of methods whose settings have ``micro_batch_tokens``; each batch's real tokens are counted for the
out-of-memory report (fx.training.oom).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fx.errors import UserError
from fx.files import drop_placeholder_card
from fx.training.checkpoints import manifest_callback
from fx.training.distributed import batch_keys, current, largest, per_rank
from fx.training.microbatch import split_steps
from fx.training.qlora import keep_adapter_float32

Log = Callable[[int, dict[str, float]], None]


@dataclass
class Progress:
    """Where training stands: written by fx's callback and signal handler, read by the run's trackers."""

    max_steps: int | None = None  # known once training starts
    step: int = 0  # optimizer steps done (a resumed run starts at its checkpoint's)
    batch_tokens: int | None = None  # real tokens of the batch being trained on
    stop_signal: int | None = None  # SIGINT/SIGTERM/SIGHUP arrived: finish the step, checkpoint, stop
    tokens_at_start: int = 0  # tokens the trainer had counted when this process started training


SIMULATE_OOM = "FX_SIMULATE_OOM_AT_STEP"  # rehearse the out-of-memory path: CUDA's error as that step begins


def simulated_oom_step() -> int | None:
    """The step ``FX_SIMULATE_OOM_AT_STEP`` names (None: unset); UserError for a value that names no step."""
    value = os.environ.get(SIMULATE_OOM, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{SIMULATE_OOM}={value!r}: give the optimizer step (1 or more) whose start should run out "
                        "of memory, or unset it")
    return int(value)


def contract_callback(progress: Progress, log: Log):
    from transformers import TrainerCallback

    simulate = simulated_oom_step()

    class RunContract(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            progress.max_steps, progress.step = state.max_steps, state.global_step
            progress.tokens_at_start = state.num_input_tokens_seen
            self.last = (time.perf_counter(), state.num_input_tokens_seen)

        def on_step_begin(self, args, state, control, **kwargs):
            if simulate is not None and state.global_step + 1 == simulate:
                import torch

                raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {SIMULATE_OOM}={simulate})")

        def on_step_end(self, args, state, control, **kwargs):
            progress.step = state.global_step
            if state.global_step >= state.max_steps:
                control.should_save = True  # the final checkpoint, whatever the interval
            if current().size > 1:  # a signal to any rank stops every rank after the same step
                progress.stop_signal = largest(progress.stop_signal or 0) or None
            if progress.stop_signal is not None:
                control.should_save = True
                control.should_training_stop = True
            if control.should_save:  # every checkpoint's log history ends with its own step (whole_run_loss)
                control.should_log = True

        def on_save(self, args, state, control, **kwargs):
            # before the manifest (the next callback) lists the checkpoint's files
            if current().main:  # the rank that saved the adapter and its card
                drop_placeholder_card(Path(args.output_dir) / f"checkpoint-{state.global_step}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            if "train_loss" in logs:  # the trainer's closing summary, not a step
                return
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            metrics = {k: float(v) for k, v in logs.items()
                       if isinstance(v, (int, float)) and k != "num_input_tokens_seen"}
            if now > self.last[0]:
                metrics["tokens_per_s"] = (tokens - self.last[1]) / (now - self.last[0])
            metrics["tokens"] = float(tokens)
            self.last = (now, tokens)
            log(state.global_step, metrics)

    return RunContract()


@contextmanager
def stop_on_signals(progress: Progress) -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP ask training to finish its step and checkpoint; a second one stops at once."""

    def handler(signum, frame):
        if progress.stop_signal is not None:
            raise KeyboardInterrupt
        progress.stop_signal = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def real_tokens(batch) -> int | None:
    """The tokens a collated batch trains on, padding excluded: its attention mask, or both answers' with their
    prompt (the paired batches of trl's ORPO and CPO trainers)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "chosen_attention_mask" in batch:
        return int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    return int(batch["input_ids"].numel()) if "input_ids" in batch else None


def _count_batch_tokens(trainer, progress: Progress) -> None:
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        progress.batch_tokens = real_tokens(batch)
        return batch

    trainer.data_collator = counting


def check_world(method, trainer) -> None:
    """Refuse a trainer that would not train as the world says (the mistake launchers make silently): all the
    ranks, each its share of the effective batch, under FSDP when FSDP was chosen and not otherwise (an accelerate
    config can switch it on behind fx's back)."""
    world, args = current(), trainer.args
    if world.size == 1:
        return
    if args.world_size != world.size:
        raise UserError(f"the trainer sees {args.world_size} process(es) of the {world.size} launched")
    if bool(getattr(trainer, "is_fsdp_enabled", False)) != (world.strategy == "fsdp"):
        raise UserError(f"distributed.strategy is {world.strategy!r} but accelerate "
                        f"{'shards' if trainer.is_fsdp_enabled else 'does not shard'} the model (an accelerate "
                        "config or ACCELERATE_USE_FSDP?); set distributed.strategy to match, or unset it")
    keys = batch_keys(method.settings)
    budget = getattr(method.settings, "micro_batch_tokens", 0)
    if keys is not None:
        rows, accumulation = per_rank(keys[0] * keys[1], 1, world.size) if budget else per_rank(*keys, world.size)
        if (args.per_device_train_batch_size, args.gradient_accumulation_steps) != (rows, accumulation):
            raise UserError(f"method {type(method).__name__}'s trainer takes micro-batch "
                            f"{args.per_device_train_batch_size} x accumulation {args.gradient_accumulation_steps} per "
                            f"rank, not the {rows} x {accumulation} that keep the experiment's effective batch on "
                            f"{world.size} GPUs: build its arguments with fx.QLoraMethod.trainer_args")


def whole_run_loss(history: list[dict[str, Any]], first_step: int, last_step: int,
                   segment_loss: float) -> float | None:
    """The mean training loss over every step of a run, when this process trained only the steps after
    ``first_step`` (a resumed run) to a mean of ``segment_loss``: the steps before come from the checkpoint's log
    history, each logged ``loss`` being the mean over the steps since the previous log. None when that history does
    not reach ``first_step`` (a checkpoint written without a log at its step)."""
    if first_step == 0:
        return segment_loss
    covered, total, previous = 0, 0.0, 0
    for record in history:
        step = record.get("step")
        if "loss" not in record or not isinstance(step, int) or not previous < step <= first_step:
            continue
        total += record["loss"] * (step - previous)
        covered, previous = step, step
    if covered != first_step or last_step <= 0:
        return None
    return (total + segment_loss * (last_step - first_step)) / last_step


def build(method, model, tokenizer, rows: list[dict], session, progress: Progress | None = None, callbacks=()):
    """The method's trainer as fx trains it: fx's callbacks instead of trl's printer, trainable weights in float32,
    token budgets, and (given ``progress``) each batch's real tokens counted."""
    from transformers.trainer_callback import PrinterCallback

    trainer = method.trainer(model, tokenizer, rows, session)
    check_world(method, trainer)
    trainer.remove_callback(PrinterCallback)
    trainer.create_model_card = lambda *args, **kwargs: None  # trl's card of a checkpoint knows nothing of the run
    keep_adapter_float32(model)  # the optimizer is created later, in train()
    budget = getattr(method.settings, "micro_batch_tokens", 0)
    if budget:
        split_steps(trainer, budget)
    if progress is not None:
        _count_batch_tokens(trainer, progress)
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


def train(method, model, tokenizer, rows: list[dict], session, progress: Progress, log: Log,
          resume_from: Path | None = None, trained_with: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``model`` under the run contract (continuing from the checkpoint ``resume_from``); what was measured.
    Each checkpoint gets its manifest, recording ``trained_with`` (the resolved experiment), and fx rotates them
    (fx.training.checkpoints). Raises ``torch.OutOfMemoryError`` as it comes: the caller reports it with what it
    knows of the run."""
    callbacks = [contract_callback(progress, log),
                 manifest_callback(session.checkpoint_keep, trained_with, resume_from)]
    trainer = build(method, model, tokenizer, rows, session, progress, callbacks)
    first_step = 0
    if resume_from is not None:
        first_step = int(json.loads((Path(resume_from) / "trainer_state.json").read_text())["global_step"])
    start = time.perf_counter()
    with stop_on_signals(progress):
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.perf_counter() - start
    tokens = trainer.state.num_input_tokens_seen
    tokens_now = tokens - progress.tokens_at_start  # a resumed run counts only what it trained itself
    graphs = getattr(trainer, "graph_stats", None)
    steps = trainer.state.global_step
    whole = whole_run_loss(trainer.state.log_history, first_step, steps, output.training_loss)
    return {
        "steps": steps,
        # the mean over every step of the run, resumed segments included (None: the history didn't say)
        "train_loss": round(whole, 4) if whole is not None else None,
        **({"train_loss_since_resume": round(output.training_loss, 4)} if first_step else {}),
        "train_tokens": int(tokens),
        "train_tokens_per_s": round(tokens_now / wall, 1) if wall > 0 else None,
        "train_wall_s": round(wall, 1),
        **({"cuda_graphs": graphs} if graphs else {}),
    }
