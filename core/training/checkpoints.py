"""Checkpoints as the trainer writes them (``checkpoint-<step>/``, its ``trainer_state.json`` written last)."""

from __future__ import annotations

import json
from pathlib import Path


def last_checkpoint(folder: Path) -> tuple[Path, int] | None:
    """The newest complete checkpoint in ``folder`` and its optimizer step: one whose ``trainer_state.json`` parses."""
    found = []
    for ckpt in Path(folder).glob("checkpoint-*"):
        try:
            state = json.loads((ckpt / "trainer_state.json").read_text())
            found.append((int(state["global_step"]), ckpt))
        except (OSError, ValueError, KeyError):
            continue  # being written when the run died
    if not found:
        return None
    step, ckpt = max(found)
    return ckpt, step
