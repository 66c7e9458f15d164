"""Checkpoints as the trainer writes them (``checkpoint-<step>/``, its ``trainer_state.json`` written last). On
several ranks each rank writes its own part (its RNG state; under FSDP its shards), and fx marks the checkpoint
complete once every rank has written (``fx-ranks.json``)."""

from __future__ import annotations

import json
from pathlib import Path

from fx.files import write_atomic
from fx.training.distributed import barrier, current

MARK = "fx-ranks.json"


def mark_complete(folder: Path) -> None:
    """Called by every rank after the trainer saved ``folder``: once all have, rank 0 writes how many ranks did."""
    barrier()
    world = current()
    if world.main and folder.is_dir():
        write_atomic(folder / MARK, json.dumps({"world_size": world.size, "strategy": world.strategy}) + "\n")


def ranks_of(checkpoint: Path) -> dict | None:
    """The world a checkpoint was written by (``{"world_size", "strategy"}``), or None for one process."""
    try:
        return json.loads((Path(checkpoint) / MARK).read_text())
    except (OSError, ValueError):
        return None


def complete(checkpoint: Path) -> bool:
    """One process's checkpoint is complete when its trainer state parses; several ranks' when fx's mark says how
    many wrote it and each one's RNG state is there."""
    ranks = ranks_of(checkpoint)
    if ranks is None:
        return not any(checkpoint.glob("rng_state_*.pth"))  # written by several ranks, not all of them finished
    return all((checkpoint / f"rng_state_{r}.pth").is_file() for r in range(int(ranks["world_size"])))


def last_checkpoint(folder: Path) -> tuple[Path, int] | None:
    """The newest complete checkpoint in ``folder`` and its optimizer step: one whose ``trainer_state.json`` parses
    and, on several ranks, that every rank finished."""
    found = []
    for ckpt in Path(folder).glob("checkpoint-*"):
        try:
            state = json.loads((ckpt / "trainer_state.json").read_text())
            step = int(state["global_step"])
        except (OSError, ValueError, KeyError):
            continue  # being written when the run died
        if complete(ckpt):
            found.append((step, ckpt))
    if not found:
        return None
    step, ckpt = max(found)
    return ckpt, step
