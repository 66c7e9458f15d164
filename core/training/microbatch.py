"""Token-budget micro-batching: a trainer's batch (the whole effective batch) cut between rows into passes of at
most ``method.micro_batch_tokens`` tokens, each loss divided by the whole batch's answer tokens, so that the summed
gradient is the full batch's mean (what gradient accumulation computes) whatever the split."""

from __future__ import annotations

import functools
from typing import Any

from fx.training.distributed import current, total


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


def split_steps(trainer, budget: int) -> None:
    """Make ``trainer`` train each batch in passes of at most ``budget`` tokens (its own ``training_step`` for each).
    For trainers whose loss is a sum over answer tokens divided by ``num_items_in_batch`` (SFT's). Under DDP each rank's
    passes but its last skip the gradient reduction, so ranks may cut their batches differently."""
    import contextlib

    step = trainer.training_step

    def training_step(model, inputs, num_items_in_batch=None):
        parts = split_micro_batches(inputs, budget)
        if len(parts) == 1:
            return step(model, inputs, num_items_in_batch)
        # positions whose next token is scored; on several ranks, all ranks' (the trainer counts them for each batch
        # and scales each rank's loss by the ranks)
        scored = (inputs["labels"][:, 1:] != -100).sum()
        if current().size > 1:
            scored = num_items_in_batch if num_items_in_batch is not None else total(scored)
        # ranks cut their batches into different numbers of passes: only the last one reduces the gradients
        quiet = functools.partial(trainer.accelerator.no_sync, model) if current().size > 1 else contextlib.nullcontext
        loss = 0
        for part in parts[:-1]:
            with quiet():
                loss = loss + step(model, part, scored)
        return loss + step(model, parts[-1], scored)

    trainer.training_step = training_step
