"""A plan against a budget: the single changes that bring it within, the largest micro-batch that fits, the
allocator's share of the card, and the token budget to resume with after running out of memory."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from fx.plan.cost import Plan, plan
from fx.plan.gpus import GIB
from fx.plan.shapes import Architecture, Workload


@dataclass
class Suggestion:
    description: str
    overrides: list[str]
    plan: Plan

    def as_set_flags(self) -> str:
        return " ".join(f"--set {o}" for o in self.overrides)


def suggestions(arch: Architecture, work: Workload, budget_bytes: float) -> list[Suggestion]:
    """Single changes that bring the plan within the budget, cheapest in lost throughput first."""
    keys = work.keys
    out: list[Suggestion] = []

    def consider(description: str, overrides: list[str], changed: Workload) -> None:
        p = plan(arch, changed)
        if p.total <= budget_bytes:
            out.append(Suggestion(description, overrides, p))

    effective = work.micro_batch * work.gradient_accumulation
    for b in sorted(divisors(effective), reverse=True):
        if b >= work.micro_batch:
            continue
        accum = effective // b
        changed = replace(work, micro_batch=b, gradient_accumulation=accum)
        if plan(arch, changed).total <= budget_bytes:
            ranks = f" per rank x {work.ranks} ranks" if work.ranks > 1 else ""
            consider(f"micro-batch {b} with {accum} accumulation steps{ranks} (same effective batch "
                     f"{effective * work.ranks})", batch_overrides(changed), changed)
            break
    if not work.gradient_checkpointing:
        consider("gradient checkpointing on", [f"{keys.get('gradient_checkpointing', 'gradient_checkpointing')}=true"],
                 replace(work, gradient_checkpointing=True))
    for length in (2048, 1536, 1024, 768, 512, 384, 256, 128):
        if length < work.seq_len:
            changed = replace(work, seq_len=length)
            if plan(arch, changed).total <= budget_bytes:
                consider(f"max length {length}", [f"{keys.get('seq_len', 'seq_len')}={length}"], changed)
                break
    for r in (32, 16, 8, 4):
        if r < work.lora_r:
            changed = replace(work, lora_r=r)
            if plan(arch, changed).total <= budget_bytes:
                consider(f"LoRA rank {r}", [f"{keys.get('lora_r', 'lora_r')}={r}"], changed)
                break
    return out


def batch_overrides(work: Workload) -> list[str]:
    """The ``--set`` assignments that give ``work``'s per-rank micro-batch and accumulation. An experiment's batch
    keys mean one GPU's batch; fx divides it between the ranks (fx.training.distributed.per_rank), so a rank's
    accumulation is written as ``ranks`` times as many steps on one GPU."""
    keys = work.keys
    return [f"{keys.get('micro_batch', 'micro_batch')}={work.micro_batch}",
            f"{keys.get('gradient_accumulation', 'gradient_accumulation')}={work.gradient_accumulation * work.ranks}"]


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def auto_micro_batch(arch: Architecture, work: Workload, budget_bytes: float) -> Workload | None:
    """The largest micro-batch dividing the effective batch that fits, with accumulation keeping that batch."""
    effective = work.micro_batch * work.gradient_accumulation
    for b in sorted(divisors(effective), reverse=True):
        changed = replace(work, micro_batch=b, gradient_accumulation=effective // b)
        if plan(arch, changed).total <= budget_bytes:
            return changed
    return None


def fewest_checkpointed_layers(arch: Architecture, work: Workload, limit: float) -> int | None:
    """The fewest decoder layers to checkpoint (the first ones) for ``work``'s plan to stay within ``limit`` bytes:
    every layer left out saves its recompute; None when not even checkpointing all of them fits."""
    for layers in range(arch.layers + 1):
        changed = replace(work, gradient_checkpointing=layers > 0,
                          checkpointed_layers=None if layers == arch.layers else layers)
        if plan(arch, changed).total <= limit:
            return layers
    return None


def allocator_fraction(plan_: Plan, budget_bytes: float, device_total: float) -> float | None:
    """The share of the card PyTorch's allocator may take so that the process stays within the budget.

    The CUDA context and paged optimizer states sit outside the allocator, so they come off the budget first.
    None when the card is not larger than the budget (nothing to cap).
    """
    cap = budget_bytes - plan_.outside_allocator
    if cap >= device_total:
        return None
    return max(cap, 0.0) / device_total


def largest_token_budget(arch: Architecture, work: Workload, limit: float, key: str = "total") -> int | None:
    """The largest token budget per micro-batch (a multiple of 256, or one row of the maximum length) whose plan's
    ``key`` (``total`` or ``reserved``) stays within ``limit`` bytes, and at most half of what ``work``'s
    micro-batch holds; None when not even one row of the maximum length fits."""
    best = None
    for tokens in [work.seq_len, *range(256 * (work.seq_len // 256 + 1), work.tokens // 2 + 1, 256)]:
        if getattr(plan(arch, replace(work, micro_batch_tokens=tokens)), key) > limit:
            break
        best = tokens
    return best


def fmt_gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


@dataclass
class Fitted:
    """An experiment's plan against its budget, after ``budget.auto`` had its say."""

    exp: Any
    plan: Plan
    budget_bytes: float | None
    budget_label: str
    changes: list[str] = field(default_factory=list)  # --set assignments auto applied

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.plan.total <= self.budget_bytes

    def summary(self) -> dict[str, Any]:
        out = self.plan.as_dict()
        out["budget"] = self.budget_label or None
        out["budget_gib"] = round(self.budget_bytes / GIB, 3) if self.budget_bytes else None
        out["fits"] = self.fits
        if self.changes:
            out["auto_changes"] = self.changes
        return out


def refusal(path, fitted: Fitted) -> str:
    p = fitted.plan
    largest = ", ".join(f"{c.name} {fmt_gib(c.bytes)}" for c in p.largest(3))
    rank = f" a rank of {p.work.ranks} GPUs" if p.work.ranks > 1 else ""
    lines = [f"{path}: the plan{' of' + rank if rank else ''} needs {fmt_gib(p.total)}, over the {fitted.budget_label} "
             f"budget{' per GPU' if rank else ''} of "
             f"{fmt_gib(fitted.budget_bytes)} (largest: {largest})."]
    options = suggestions(p.arch, p.work, fitted.budget_bytes)
    if options:
        lines.append("Changes that fit, each on its own:")
        for option in options:
            lines.append(f"  {option.description}: {fmt_gib(option.plan.total)}   {option.as_set_flags()}")
        lines.append("Or set [budget] auto = true to pick the largest micro-batch that fits.")
    else:
        lines.append("No single change fits; try a smaller model or a larger GPU.")
    return "\n".join(lines)
