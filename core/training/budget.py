"""An experiment held to its GPU budget: planned before anything loads (refused, or fitted by ``budget.auto``), the
CUDA allocator capped to the budget on a larger card, and the token budget that fits after an out-of-memory error."""

from __future__ import annotations

import copy
import os

from fx.config import apply_override, from_dict
from fx.errors import UserError
from fx.plan.cost import plan
from fx.plan.fit import Fitted, allocator_fraction, auto_micro_batch, largest_token_budget, refusal
from fx.plan.gpus import GIB, GPUS, budget_gib
from fx.plan.shapes import Architecture


def plan_experiment(exp, budget: str | float | None = None) -> Fitted:
    """Plan ``exp`` from its model's config alone. ``budget`` (a GPU name or GiB) overrides ``[budget]``."""
    if budget is None:
        budget = exp.budget.gpu if exp.budget.gpu is not None else exp.budget.vram_gib
    gpu = GPUS.get(str(budget).lower())
    try:
        budget_bytes = None if budget is None else budget_gib(budget) * GIB
    except ValueError as exc:
        raise UserError(f"--budget: {exc}") from None
    label = "" if budget is None else str(budget).lower() if gpu else f"{budget_bytes / GIB:g} GiB"
    source = exp.model.cls(exp.model.settings)
    problems = source.check()  # a model folder's clear message, before the planner reads its config
    if problems:
        raise UserError("\n".join(f"{exp.path}: {p}" for p in problems))
    arch = Architecture.from_config(source.config())
    work = exp.method.cls(exp.method.settings).workload(exp.data.max_length, gpu.bf16 if gpu else None)
    if work is None:
        raise UserError(f"method {exp.method.name!r} gives the memory planner no workload; it can't be planned")
    return Fitted(exp, plan(arch, work, source.config_origin), budget_bytes, label)


def fit(exp) -> Fitted | None:
    """Plan ``exp`` against ``[budget]``: apply ``budget.auto``, or refuse (UserError, exit 2) a run that won't fit.
    Without a budget a plan is only recorded: None when the experiment can't be planned (a method without a
    workload, a config that can't be read yet), and the run goes on."""
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
                apply_override(raw, assignment)
            new_exp = from_dict(raw, exp.path, exp.base_dir) if changes else exp
            return Fitted(new_exp, plan(arch, chosen, fitted.plan.config_origin), fitted.budget_bytes,
                          fitted.budget_label, changes)
    if fitted.fits or not exp.budget.refuse:
        return fitted
    raise UserError(refusal(exp.path, fitted))


def use_expandable_segments() -> None:
    """Ask PyTorch's allocator for expandable segments (unless the user chose a setting): fragmentation then costs a
    few percent instead of up to a fifth of the peak, so the plan holds. Read when CUDA is first used."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


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


def token_budget_within(fitted: Fitted, cap: float | None, margin: float = 0.9) -> int | None:
    """After an out-of-memory error: the largest token budget whose plan fits within ``margin`` of the allocator
    cap (else of the budget, else of this card); None when not even one row of the maximum length fits."""
    import torch

    if cap:
        limit, key = cap * margin, "reserved"
    elif fitted.budget_bytes:
        limit, key = fitted.budget_bytes * margin, "total"
    elif torch.cuda.is_available():
        limit, key = torch.cuda.get_device_properties(0).total_memory * margin, "total"
    else:
        return None
    return largest_token_budget(fitted.plan.arch, fitted.plan.work, limit, key)
