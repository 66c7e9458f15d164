"""Checkpoints that can't betray a resume: a checkpoint counts only when every file its manifest lists verifies; the
newest verified one is chosen, newer damaged ones are set aside (kept, named), rotation never deletes the newest
verified one, and a missing optimizer state is refused unless --reset-optimizer is given."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fx.training import checkpoints


def save(folder: Path, step: int, manifest: bool = True, config: dict | None = None) -> Path:
    """A checkpoint as the trainer writes one (the file names it uses), then fx's manifest."""
    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (ckpt / "optimizer.pt").write_bytes(os.urandom(2048))
    (ckpt / "scheduler.pt").write_bytes(os.urandom(64))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if manifest:
        checkpoints.write_manifest(ckpt, step, config or {"method": {"learning_rate": 0.01}})
    return ckpt


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    lambda c: truncate(c / "trainer_state.json"),
    lambda c: truncate(c / "adapter_model.safetensors"),
    lambda c: flip(c / "adapter_model.safetensors"),  # same size, other bytes
    lambda c: (c / "scheduler.pt").unlink(),
    lambda c: (c / checkpoints.MANIFEST).unlink(),  # killed before the save finished
    lambda c: (c / checkpoints.MANIFEST).write_text('{"step": 9, "fi'),
], ids=["truncated-state", "truncated-adapter", "flipped-adapter", "missing-scheduler", "no-manifest",
        "truncated-manifest"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_verified_one(tmp_path, damage):
    save(tmp_path, 8)
    damage(save(tmp_path, 9))
    assert checkpoints.last_checkpoint(tmp_path) == (tmp_path / "checkpoint-8", 8)
    choice = checkpoints.choose(tmp_path)
    assert choice.checkpoint.step == 8 and [c.step for c in choice.rejected] == [9]
    assert choice.rejected[0].problems and choice.refusal() is None
    aside = checkpoints.set_aside(choice.rejected[0])
    assert aside.name == "checkpoint-9.rejected" and aside.is_dir()  # kept for a look, out of the trainer's way
    assert checkpoints.last_checkpoint(tmp_path) == (tmp_path / "checkpoint-8", 8)


def test_rotation_never_deletes_the_newest_verified_checkpoint(tmp_path):
    """The trainer's own rotation kept a corrupt checkpoint 9 and deleted the good 8: fx's keeps 8."""
    save(tmp_path, 7)
    save(tmp_path, 8)
    truncate(save(tmp_path, 9) / "trainer_state.json")
    deleted = checkpoints.rotate(tmp_path, keep=1)
    assert deleted == [tmp_path / "checkpoint-7"]
    assert (tmp_path / "checkpoint-8").is_dir() and (tmp_path / "checkpoint-9").is_dir()
    assert checkpoints.last_checkpoint(tmp_path)[1] == 8


def test_rotation_keeps_the_newest_k_and_drops_unfinished_older_saves(tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step)
    save(tmp_path, 3, manifest=False)  # a save that a kill interrupted, before the newest verified one
    save(tmp_path, 8, manifest=False)  # one being written now: never touched
    checkpoints.rotate(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]


def test_nothing_verifies_is_refused_with_what_is_wrong_and_nothing_is_deleted(tmp_path):
    truncate(save(tmp_path, 4) / "adapter_model.safetensors")
    choice = checkpoints.choose(tmp_path)
    assert choice.checkpoint is None
    assert "checkpoint-4" in choice.refusal() and "adapter_model.safetensors" in choice.refusal()
    assert checkpoints.rotate(tmp_path, keep=1) == [] and (tmp_path / "checkpoint-4").is_dir()


def test_a_missing_optimizer_is_refused_unless_reset_optimizer(tmp_path):
    (save(tmp_path, 4) / "optimizer.pt").unlink()
    choice = checkpoints.choose(tmp_path)
    assert choice.checkpoint is None and "--reset-optimizer" in choice.refusal()
    assert "optimizer.pt: missing" in choice.refusal()
    chosen = checkpoints.choose(tmp_path, reset_optimizer=True).checkpoint
    assert chosen.step == 4 and chosen.optimizer_only
    checkpoints.reset_optimizer(chosen)
    again = checkpoints.inspect(tmp_path / "checkpoint-4")
    assert again.verified and again.optimizer_reset  # the manifest records the reset


def test_a_damaged_optimizer_with_reset_optimizer_is_moved_out_of_the_trainers_reach(tmp_path):
    truncate(save(tmp_path, 4) / "optimizer.pt")
    chosen = checkpoints.choose(tmp_path, reset_optimizer=True).checkpoint
    checkpoints.reset_optimizer(chosen)
    assert not (tmp_path / "checkpoint-4" / "optimizer.pt").exists()
    assert (tmp_path / "checkpoint-4" / "optimizer.pt.reset").is_file()
    assert checkpoints.last_checkpoint(tmp_path)[1] == 4


def test_a_manifest_of_another_step_does_not_verify(tmp_path):
    ckpt = save(tmp_path, 4)
    ckpt.rename(tmp_path / "checkpoint-40")
    assert not checkpoints.inspect(tmp_path / "checkpoint-40").verified
