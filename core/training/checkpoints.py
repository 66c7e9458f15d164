"""Checkpoints that can't betray a resume. The trainer writes ``checkpoint-<step>/`` (on several ranks each rank
its own part: its RNG state; under FSDP its shards); once every rank has written, rank 0 writes fx's manifest
(``fx-manifest.json``, last): every file's size and SHA-256, the world that wrote it (ranks, strategy) and the
resolved experiment it was trained with. A checkpoint counts only when its manifest verifies: a manifest written
after every rank finished and files that match it are what "complete" means. fx rotates checkpoints itself (the
trainer's ``save_total_limit`` can delete the one good checkpoint and keep a damaged newer one): the newest verified
checkpoint is never deleted.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fx.files import MANIFEST, listing, mismatches, write_atomic
from fx.training.distributed import barrier, current

NAME = re.compile(r"^checkpoint-(\d+)$")  # the trainer's folders; set-aside ones (checkpoint-9.rejected) don't match
OPTIMIZER = "optimizer.pt"  # the optimizer's state, which --reset-optimizer does without
SCHEDULER = "scheduler.pt"
TRAINER_STATE = "trainer_state.json"


def needs(files: dict[str, Any]) -> list[str]:
    """What a checkpoint needs that its manifest doesn't list: the trainer's state and the model's weights (an
    adapter's safetensors, or FSDP's shards)."""
    weights = any(n.endswith((".safetensors", ".bin")) or n.startswith("pytorch_model_fsdp") for n in files)
    return [n for n in (TRAINER_STATE,) if n not in files] + ([] if weights else ["the model's weights"])


def write_manifest(folder: Path, step: int, config: dict[str, Any] | None, world: dict[str, Any] | None = None,
                   optimizer_reset: bool = False) -> None:
    """Record every file of the checkpoint in ``folder`` (size and SHA-256), the world that wrote it
    (``{"world_size", "strategy"}``) and the experiment it was trained with; written last and atomically, by rank 0
    once every rank has written its part, so a checkpoint with a manifest is one every rank finished."""
    manifest = {"step": step, "files": listing(folder), "world": world, "config": config,
                "optimizer_reset": optimizer_reset}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")


@dataclass
class Checkpoint:
    """A ``checkpoint-<step>`` folder and what its manifest says of it. ``problems``: one line per file that does
    not verify (empty: the checkpoint counts)."""

    path: Path
    step: int
    problems: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None
    world: dict[str, Any] | None = None  # {"world_size", "strategy"} of the ranks that wrote it
    optimizer_reset: bool = False
    optimizer_only: bool = False  # every problem is with the optimizer's state: --reset-optimizer can continue

    @property
    def verified(self) -> bool:
        return not self.problems


def inspect(path: Path, hashes: bool = True) -> Checkpoint:
    """What ``path`` (a ``checkpoint-<step>`` folder) holds against its manifest: sizes always, hashes unless
    ``hashes`` is false (rotation, which runs at every save, checks sizes only)."""
    match = NAME.match(path.name)
    step = int(match.group(1)) if match else -1
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or manifest.get("step") != step:
            raise ValueError("it does not describe this checkpoint")
    except FileNotFoundError:
        return Checkpoint(path, step, [f"no {MANIFEST}: the save did not finish (or another tool wrote it)"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Checkpoint(path, step, [f"{MANIFEST} is unreadable ({exc})"])
    missing = needs(files)
    if missing:
        return Checkpoint(path, step, [f"{MANIFEST} lists no {' and no '.join(missing)}: it describes no checkpoint "
                                       "that can be resumed"])
    problems, optimizer = [], []
    for name, problem in mismatches(path, files, hashes).items():
        (optimizer if name == OPTIMIZER else problems).append(f"{name}: {problem}")
    world = manifest.get("world") if isinstance(manifest.get("world"), dict) else None
    return Checkpoint(path, step, problems + optimizer, manifest.get("config"), world,
                      bool(manifest.get("optimizer_reset")), optimizer_only=bool(optimizer) and not problems)


def checkpoints(folder: Path, hashes: bool = True) -> list[Checkpoint]:
    """Every ``checkpoint-<step>`` in ``folder``, newest first."""
    found = [p for p in Path(folder).glob("checkpoint-*") if NAME.match(p.name) and p.is_dir()]
    return [inspect(p, hashes) for p in sorted(found, key=lambda p: int(NAME.match(p.name).group(1)), reverse=True)]

def ranks_of(checkpoint: Path) -> dict | None:
    """The world a checkpoint was written by (``{"world_size", "strategy"}``, from its manifest), or None for one
    process (or a checkpoint without a readable manifest)."""
    try:
        world = json.loads((Path(checkpoint) / MANIFEST).read_text()).get("world")
    except (OSError, ValueError, AttributeError):
        return None
    return world if isinstance(world, dict) and int(world.get("world_size") or 1) > 1 else None


def last_checkpoint(folder: Path) -> tuple[Path, int] | None:
    """The newest checkpoint in ``folder`` that verifies, and its optimizer step."""
    for checkpoint in checkpoints(folder):
        if checkpoint.verified:
            return checkpoint.path, checkpoint.step
    return None


def rotate(folder: Path, keep: int | None) -> list[Path]:
    """Keep the newest ``keep`` verified checkpoints; delete older verified ones and unfinished saves (no manifest)
    older than the newest verified one. Damaged checkpoints and anything newer are left alone. The deleted folders."""
    if not keep:
        return []
    found = checkpoints(folder, hashes=False)
    verified = [c for c in found if c.verified]
    if not verified:
        return []
    newest = verified[0].step
    doomed = [c.path for c in verified[keep:]]
    doomed += [c.path for c in found if c.step < newest and c.problems and not (c.path / MANIFEST).exists()]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


@dataclass
class Choice:
    """Where a resumed run continues: the newest usable checkpoint (None: none), and the newer ones that are not."""

    checkpoint: Checkpoint | None
    rejected: list[Checkpoint]

    def refusal(self) -> str | None:
        """Why the run can't resume, or None: every checkpoint there is fails to verify (no checkpoint at all is
        fine: the run starts from its first step)."""
        if self.checkpoint is not None or not self.rejected:
            return None
        lines = [f"  {c.path.name}: {'; '.join(c.problems[:3])}" for c in self.rejected[:5]]
        usable = next((c for c in self.rejected if c.optimizer_only), None)
        hint = (f"--reset-optimizer continues from {usable.path.name} with a fresh optimizer state" if usable else
                "move the checkpoints/ folder aside to train this run from its first step")
        return "no checkpoint verifies:\n" + "\n".join(lines) + "\n" + hint


def choose(folder: Path, reset_optimizer: bool = False) -> Choice:
    """The newest checkpoint that verifies (with ``reset_optimizer``: whose weights, schedule and state verify,
    whatever became of its optimizer's state), and the newer ones that don't."""
    rejected = []
    for checkpoint in checkpoints(folder):
        if checkpoint.verified or (reset_optimizer and checkpoint.optimizer_only):
            return Choice(checkpoint, rejected)
        rejected.append(checkpoint)
    return Choice(None, rejected)


def set_aside(checkpoint: Checkpoint) -> Path:
    """Rename a checkpoint that doesn't verify out of the trainer's way (``checkpoint-9.rejected``), kept for a look."""
    target = checkpoint.path.with_name(checkpoint.path.name + ".rejected")
    n = 1
    while target.exists():
        n += 1
        target = checkpoint.path.with_name(f"{checkpoint.path.name}.rejected{n}")
    checkpoint.path.rename(target)
    return target


def reset_optimizer(checkpoint: Checkpoint) -> None:
    """Continue from ``checkpoint`` with a fresh optimizer: its optimizer state (if any) is renamed out of the
    trainer's reach and the manifest says so; the learning-rate schedule is restored by the run contract."""
    state = checkpoint.path / OPTIMIZER
    if state.exists():
        state.rename(state.with_name(OPTIMIZER + ".reset"))
    write_manifest(checkpoint.path, checkpoint.step, checkpoint.config, checkpoint.world, optimizer_reset=True)


def manifest_callback(keep: int | None, config: dict[str, Any] | None, resume_from: Path | None):
    """The trainer callback that writes each checkpoint's manifest and rotates; on a resume whose optimizer state was
    reset, it restores the checkpoint's learning-rate schedule (the trainer loads it only with an optimizer)."""
    from transformers import TrainerCallback

    class Manifests(TrainerCallback):
        def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
            if resume_from is None or (resume_from / OPTIMIZER).exists() or lr_scheduler is None:
                return
            if (resume_from / SCHEDULER).is_file():
                import torch

                lr_scheduler.load_state_dict(torch.load(resume_from / SCHEDULER, weights_only=True))
                for group, lr in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.get_last_lr()):
                    group["lr"] = lr

        def on_save(self, args, state, control, **kwargs):
            barrier()  # every rank has written its part of the checkpoint (a no-op in one process)
            world = current()
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if world.main and folder.is_dir():
                wrote = {"world_size": world.size, "strategy": world.strategy}
                write_manifest(folder, state.global_step, config, wrote)
                rotate(Path(args.output_dir), keep)

    return Manifests()
