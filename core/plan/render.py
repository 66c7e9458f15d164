"""The plan as ``fx plan`` prints it: components, total, the budget's verdict, and the known GPUs."""

from __future__ import annotations

from fx.plan.cost import checkpointed_layers
from fx.plan.fit import Fitted, fmt_gib
from fx.plan.gpus import GIB, GPUS

RANKS = {"ddp": "DDP (each holds the whole model; micro-batch and accumulation are the rank's share)",
         "fsdp": "FSDP (weights, adapters, gradients and optimizer states sharded across the ranks)"}


def render(fitted: Fitted):
    """The plan as a rich renderable: components, total, the budget's verdict, and the known GPUs."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    p, w = fitted.plan, fitted.plan.work
    layers = checkpointed_layers(p.arch, w)
    checkpointing = ("on" if layers == p.arch.layers else f"on for the first {layers} of {p.arch.layers} layers"
                     if layers else "off")
    head = Text(f"model config: {p.config_origin}\n"
                f"workload: {w.shape if w.micro_batch_tokens else 'micro-batch ' + w.shape} "
                f"(accumulation {w.gradient_accumulation}), "
                + ("a no-grad reference forward (adapter off), " if w.reference_forward else "") +
                f"{w.quant_type} with {w.compute_dtype} compute, LoRA r={w.lora_r} on {', '.join(w.lora_targets)}, "
                f"gradient checkpointing {checkpointing}, {w.optim}"
                + (f"\none rank of {w.ranks} GPUs, {RANKS[w.strategy]}" if w.ranks > 1 else ""))
    table = Table(title="estimated peak GPU memory" + (" of each rank" if w.ranks > 1 else ""))
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("note")
    for c in p.components:
        table.add_row(c.name, f"{c.gib:.2f}", c.note + ("" if c.in_allocator else " [not in max_memory_reserved]"))
    table.add_row("total", f"{p.total / GIB:.2f}", f"of which PyTorch's allocator: {p.reserved / GIB:.2f} GiB",
                  style="bold")
    parts = [head, table]
    if fitted.budget_bytes is not None:
        room = fitted.budget_bytes - p.total
        per = " per GPU" if w.ranks > 1 else ""
        verdict = (f"fits the {fitted.budget_label} budget{per} ({fmt_gib(fitted.budget_bytes)}) with {fmt_gib(room)} "
                   f"headroom ({100 * room / fitted.budget_bytes:.0f}%)" if room >= 0 else
                   f"does NOT fit the {fitted.budget_label} budget{per} ({fmt_gib(fitted.budget_bytes)}): "
                   f"{fmt_gib(-room)} over")
        parts.append(Text(verdict, style="green" if room >= 0 else "red bold"))
    gpus = Table(title="known GPUs")
    for column in ("gpu", "usable GiB", "fits"):
        gpus.add_column(column)
    for key, gpu in GPUS.items():
        gpus.add_row(f"{key} ({gpu.name})", f"{gpu.memory_gib:.1f}", "yes" if p.total <= gpu.memory_gib * GIB else "no")
    parts.append(gpus)
    return Group(*parts)
