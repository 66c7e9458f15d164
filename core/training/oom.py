"""The out-of-memory report: where training ran out, against what plan and cap, that the last checkpoint is intact,
and the command that continues the same training within the memory there is."""

from __future__ import annotations

from pathlib import Path

from fx.errors import TrainingFailed
from fx.training.budget import token_budget_within
from fx.training.checkpoints import last_checkpoint
from fx.training.contract import Progress
from fx.training.distributed import current


def failure(progress: Progress, fitted, cap: float | None, checkpoints: Path, resume: str,
            execution_keys: tuple[str, ...]) -> TrainingFailed:
    """The error that ends a run out of GPU memory. ``resume`` is the command that continues this run; a method
    with ``micro_batch_tokens`` is told the largest token budget its plan fits (same effective batch, same gradient)."""
    import torch

    plan = fitted.summary() if fitted else {}
    planned = (f"; planned {plan['total_gib']} GiB, allocator cap {round(cap / 2**30, 3) if cap else None} GiB"
               if plan else "")
    tokens = token_budget_within(fitted, cap) if fitted else None
    last = last_checkpoint(checkpoints)
    checkpointing = getattr(fitted.exp.method.settings, "gradient_checkpointing", None) if fitted else None
    if tokens and "micro_batch_tokens" in execution_keys:
        advice = (f"Continue the same training (same effective batch, same gradient) in passes of at most {tokens} "
                  f"tokens, which the plan fits: {resume} --set method.micro_batch_tokens={tokens}")
    elif "gradient_checkpointing" in execution_keys and checkpointing is not True:
        # off, "auto" or a count of layers: checkpointing every layer costs only speed
        advice = (f"The plan fits no smaller pass here; recomputing activations needs less memory for the same "
                  f"training: {resume} --set method.gradient_checkpointing=true")
    else:
        advice = (f"The plan fits no smaller pass here: {resume} continues the same training on a GPU with more "
                  "memory (or --set budget.vram_gib=<GiB>); a new run with a shorter data.max_length needs less")
    peak = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0
    world = current()
    where = f" on rank {world.rank} (GPU {world.local_rank}) of {world.size}" if world.size > 1 else ""
    error = TrainingFailed(
        f"out of GPU memory{where} at step {progress.step + 1}"
        + (f" on a batch of {progress.batch_tokens} tokens" if progress.batch_tokens else "")
        + f" (peak {peak:.2f} GiB reserved{planned}). The last checkpoint "
        f"({'step ' + str(last[1]) if last else 'none yet'}) is intact. {advice}")
    error.status = "out_of_memory"  # what the run's summary says (the launcher reads it from a failing rank)
    return error


def out_of_memory(cap: float | None, exc: BaseException) -> str:
    """One line for an out-of-memory error outside a run (``fx bench``)."""
    first = (str(exc).splitlines() or [''])[0][:200]
    if cap:
        return f"out of GPU memory under the budget's allocator cap of {cap / 2**30:.2f} GiB: {first}"
    return f"out of GPU memory: {first}"
