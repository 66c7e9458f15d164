"""An experiment held to its GPU budget: planned before anything loads (refused, or fitted by ``budget.auto``), the
CUDA allocator capped to the budget on a larger card, and the token budget that fits after an out-of-memory error."""

from __future__ import annotations

import copy
import os
from dataclasses import replace

from fx.config import apply_override, from_dict
from fx.errors import UserError
from fx.plan.cost import plan
from fx.plan.fit import (
    Fitted,
    allocator_fraction,
    auto_micro_batch,
    batch_overrides,
    fewest_checkpointed_layers,
    largest_token_budget,
    refusal,
)
from fx.plan.gpus import GIB, GPUS, budget_gib
from fx.plan.shapes import Architecture
from fx.training.distributed import current, per_rank_workload
from fx.training.distributed import problems as distributed_problems
from fx.training.kernels import expects_liger

# gradient_checkpointing = "auto" plans within this share of the budget: the planner's largest error measured is 5.4%
# (docs/memory.md), and what it does not count (a T4's SDPA masks, the CUDA graphs' pool) needs room too
AUTO_CHECKPOINTING_SHARE = 0.9


def plan_experiment(exp, budget: str | float | None = None, ranks: int | None = None,
                    strategy: str | None = None) -> Fitted:
    """Plan one rank of ``exp`` from its model's config alone. ``budget`` (a GPU name or GiB, per GPU) overrides
    ``[budget]``; ``ranks`` GPUs with ``strategy`` (None: the current world's; auto settled by
    :func:`choose_strategy`)."""
    if ranks is None:
        ranks, strategy = current().size, current().strategy
    if ranks > 1 and strategy is None:
        strategy = choose_strategy(exp, ranks, budget)
    if budget is None:
        budget = exp.budget.gpu if exp.budget.gpu is not None else exp.budget.vram_gib
    gpu = GPUS.get(str(budget).lower())
    try:
        budget_bytes = None if budget is None else budget_gib(budget) * GIB
    except ValueError as exc:
        raise UserError(f"--budget: {exc}") from None
    label = "" if budget is None else str(budget).lower() if gpu else f"{budget_bytes / GIB:g} GiB"
    source = exp.built.source
    problems = source.check()  # a model folder's clear message, before the planner reads its config
    if problems:
        raise UserError("\n".join(f"{exp.path}: {p}" for p in problems))
    arch = Architecture.from_config(source.config())
    work = exp.built.method.workload(exp.data.max_length, gpu.bf16 if gpu else None)
    if work is None:
        raise UserError(f"method {exp.method.name!r} gives the memory planner no workload; it can't be planned")
    work = replace(work, liger=expects_liger(getattr(exp.method.settings, "liger", False), arch.model_type))
    work = per_rank_workload(work, ranks, strategy)
    return Fitted(exp, plan(arch, work, source.config_origin), budget_bytes, label)


def plan_ranks(exp, budget: str | float | None, ranks: int) -> Fitted:
    """``fx plan --gpus N``: one rank's plan of ``exp`` on ``ranks`` GPUs; a strategy or batch that can't work on them
    is refused (UserError) as ``fx run --gpus`` would refuse it."""
    strategy = choose_strategy(exp, ranks, budget)
    problems = distributed_problems(exp, ranks, strategy, gpus=ranks)  # planning for GPUs this machine may lack
    if problems:
        raise UserError("\n".join(problems))
    return plan_experiment(exp, budget, ranks, strategy)


def choose_strategy(exp, ranks: int, budget: str | float | None = None) -> str | None:
    """``[distributed] strategy`` for ``ranks`` GPUs (None for one), ``auto`` settled: DDP when a rank's DDP plan fits
    one GPU (the budget, else this machine's GPU), else FSDP; DDP when neither is known, when the method can't be
    planned or can't shard."""
    chosen = exp.distributed.strategy
    if ranks == 1:
        return None
    if chosen != "auto":
        return chosen
    if "fsdp" not in getattr(exp.method.cls, "strategies", ()):
        return "ddp"
    try:
        fitted = plan_experiment(exp, budget, ranks, "ddp")
    except UserError:
        return "ddp"
    limit = fitted.budget_bytes or device_memory()
    return "fsdp" if limit and fitted.plan.total > limit else "ddp"


def device_memory() -> float | None:
    """This process's GPU's memory in bytes; None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def fit(exp, ranks: int | None = None, strategy: str | None = None) -> Fitted | None:
    """Plan a rank of ``exp`` against ``[budget]`` (per GPU; ``ranks`` and ``strategy`` as for
    :func:`plan_experiment`): apply ``budget.auto`` and ``gradient_checkpointing = "auto"``, or refuse (UserError,
    exit 2) a run that won't fit. Without a budget a plan is only recorded: None when the experiment can't be
    planned (a method without a workload, a config that can't be read yet), and the run goes on."""
    if exp.budget.gib() is None:
        try:
            return plan_experiment(exp, ranks=ranks, strategy=strategy)
        except UserError:
            return None
    fitted = plan_experiment(exp, ranks=ranks, strategy=strategy)
    if exp.budget.auto:
        fitted = _auto_micro_batch(fitted)
    fitted = auto_checkpointing(fitted)
    if fitted.fits or not exp.budget.refuse:
        return fitted
    raise UserError(refusal(exp.path, fitted))


def _refitted(fitted: Fitted, work, changes: list[str]) -> Fitted:
    """``fitted`` with its experiment changed by ``changes`` (--set assignments) and planned as ``work``."""
    exp = fitted.exp
    raw = copy.deepcopy(exp.raw)
    for assignment in changes:
        apply_override(raw, assignment)
    new_exp = from_dict(raw, exp.path, exp.base_dir) if changes else exp
    return Fitted(new_exp, plan(fitted.plan.arch, work, fitted.plan.config_origin), fitted.budget_bytes,
                  fitted.budget_label, fitted.changes + changes)


def _auto_micro_batch(fitted: Fitted) -> Fitted:
    """``budget.auto``: the largest micro-batch that fits, the effective batch kept."""
    work = fitted.plan.work
    chosen = auto_micro_batch(fitted.plan.arch, work, fitted.budget_bytes)
    if chosen is None:
        return fitted
    changes = batch_overrides(chosen) if chosen.micro_batch != work.micro_batch else []
    return _refitted(fitted, chosen, changes)


def auto_checkpointing(fitted: Fitted) -> Fitted:
    """``gradient_checkpointing = "auto"`` under a budget: the fewest layers checkpointed whose plan stays within
    AUTO_CHECKPOINTING_SHARE of it (all of them when none fits), written into the experiment as the number of
    layers, so that the run directory records what ran and a resumed run checkpoints the same layers. Without a
    budget, or another setting, ``fitted`` as it is ("auto" then checkpoints every layer)."""
    if fitted.budget_bytes is None or getattr(fitted.exp.method.settings, "gradient_checkpointing", None) != "auto":
        return fitted
    arch, work = fitted.plan.arch, fitted.plan.work
    layers = fewest_checkpointed_layers(arch, work, fitted.budget_bytes * AUTO_CHECKPOINTING_SHARE)
    layers = arch.layers if layers is None else layers
    value = "true" if layers == arch.layers else "false" if layers == 0 else str(layers)
    chosen = replace(work, gradient_checkpointing=layers > 0,
                     checkpointed_layers=None if layers == arch.layers else layers)
    return _refitted(fitted, chosen, [f"{work.keys.get('gradient_checkpointing', 'method.gradient_checkpointing')}"
                                      f"={value}"])


def use_expandable_segments() -> None:
    """Ask PyTorch's allocator for expandable segments (unless the user chose a setting): fragmentation then costs a
    few percent instead of up to a fifth of the peak, so the plan holds. Read when CUDA is first used."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def cap_allocator(fitted: Fitted | None) -> float | None:
    """Cap PyTorch's CUDA allocator so the process holds the budget on a larger GPU; the cap in bytes, or None."""
    import torch

    if fitted is None or fitted.budget_bytes is None or not torch.cuda.is_available():
        return None
    gpu = torch.cuda.current_device()  # a rank's own GPU
    total = torch.cuda.get_device_properties(gpu).total_memory
    fraction = allocator_fraction(fitted.plan, fitted.budget_bytes, total)
    if fraction is None:
        return None
    torch.cuda.set_per_process_memory_fraction(fraction, gpu)
    return fraction * total


def token_budget_within(fitted: Fitted, cap: float | None, margin: float = 0.9) -> int | None:
    """After an out-of-memory error: the largest token budget whose plan fits within ``margin`` of the allocator
    cap (else of the budget, else of this card); None when not even one row of the maximum length fits."""
    import torch

    if cap:
        limit, key = cap * margin, "reserved"
    elif fitted.budget_bytes:
        limit, key = fitted.budget_bytes * margin, "total"
    elif torch.cuda.is_available():
        limit, key = device_memory() * margin, "total"
    else:
        return None
    return largest_token_budget(fitted.plan.arch, fitted.plan.work, limit, key)
