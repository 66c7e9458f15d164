"""Resuming a real run whose checkpoints were damaged: it continues from the newest checkpoint that verifies and says
so, never loses one, refuses a missing optimizer state unless --reset-optimizer, refuses an edited training key,
and the command fx advises after running out of memory works on that very run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fx.run.resume import load_run
from fx.training import checkpoints
from fx.training.contract import Progress
from fx.training.oom import failure
from fx.training.qlora import QLoraMethod

pytestmark = pytest.mark.slow  # the run is trained once; each resume trains its last steps again

OVERRIDES = ["checkpoints.every_steps=4", "checkpoints.keep=3", "stages.evaluate.enabled=false",
             "stages.generate.enabled=false"]


def fx(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fx.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture
def stopped(train_tiny, tmp_path) -> Path:
    """A copy of a 12-step run as a kill after step 8 leaves it: checkpoints 4 and 8, no adapter, not completed."""
    _, done = train_tiny("checkpointed", overrides=OVERRIDES)
    folder = tmp_path / done.name
    shutil.copytree(done, folder)
    shutil.rmtree(folder / "checkpoints" / "checkpoint-12")
    shutil.rmtree(folder / "adapter")
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "status": "interrupted", "steps": 8}))
    return folder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name", ["trainer_state.json", "adapter_model.safetensors", "scheduler.pt"])
def test_a_corrupt_newest_checkpoint_resumes_from_the_previous_verified_one(stopped, name):
    truncate(stopped / "checkpoints" / "checkpoint-8" / name)
    out = fx("run", "--resume", str(stopped))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "checkpoint-8 does not verify" in out.stderr and name in out.stderr
    assert "resuming from checkpoint-4 (step 4)" in out.stderr
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 4 and summary["steps"] == 12
    assert (stopped / "checkpoints" / "checkpoint-8.rejected" / name).is_file()  # set aside, not deleted
    assert checkpoints.last_checkpoint(stopped / "checkpoints")[1] == 12
    assert (stopped / "adapter" / "adapter_model.safetensors").is_file()


def test_a_missing_optimizer_is_refused_then_reset_optimizer_continues(stopped):
    for step in (4, 8):
        (stopped / "checkpoints" / f"checkpoint-{step}" / "optimizer.pt").unlink()
    before = sorted(p.name for p in (stopped / "checkpoints").iterdir())
    refused = fx("run", "--resume", str(stopped))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "optimizer.pt: missing" in refused.stderr and "--reset-optimizer" in refused.stderr
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == before  # nothing moved or lost
    assert json.loads((stopped / "summary.json").read_text())["steps"] == 8

    out = fx("run", "--resume", str(stopped), "--reset-optimizer")
    assert out.returncode == 0, out.stderr
    assert "resuming from checkpoint-8 (step 8), with a fresh optimizer state" in out.stderr
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 8 and summary["steps"] == 12


@pytest.mark.parametrize("edit, key", [
    (("learning_rate = 0.01", "learning_rate = 0.5"), "method.learning_rate (0.01 -> 0.5)"),
    (("max_steps = 12", "max_steps = 20"), "method.max_steps (12 -> 20)"),
])
def test_an_edited_training_key_in_config_toml_is_refused(stopped, edit, key):
    config = stopped / "config.toml"
    text = config.read_text()
    assert edit[0] in text
    config.write_text(text.replace(*edit))
    out = fx("run", "--resume", str(stopped))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert key in out.stderr and "checkpoint-8 was trained with" in out.stderr
    assert (stopped / "checkpoints" / "checkpoint-8").is_dir()
    assert json.loads((stopped / "summary.json").read_text())["status"] == "interrupted"


def test_execution_keys_stay_changeable_on_resume(stopped):
    """--set budget.* on a run that had no [budget] (what the OOM advice used to say) and an execution key."""
    exp = load_run(stopped, ["budget.vram_gib=14", "method.logging_steps=2"])
    assert exp.budget.vram_gib == 14 and exp.method.settings.logging_steps == 2


def test_the_out_of_memory_advice_is_a_command_that_works_on_that_run(stopped):
    message = str(failure(Progress(step=8), None, None, stopped / "checkpoints", f"fx run --resume {stopped}",
                          QLoraMethod.execution_keys()))
    assert "(step 8) is intact" in message
    command = message.split("fx run --resume ")[1].split()
    assert command[0] == str(stopped) and command[1] == "--set", message
    out = fx("run", "--resume", *command[:3])
    assert out.returncode == 0, out.stderr
    assert json.loads((stopped / "summary.json").read_text())["status"] == "completed"


def test_a_completed_run_is_not_resumed(train_tiny):
    _, done = train_tiny("checkpointed", overrides=OVERRIDES)
    out = fx("run", "--resume", str(done))
    assert out.returncode == 2 and "the run completed" in out.stderr and "Traceback" not in out.stderr
    before = sorted(p.name for p in (done / "checkpoints").iterdir())
    measured = fx("eval", str(done))  # reading a finished run is not resuming it: nothing refused, nothing moved
    assert measured.returncode == 0, measured.stderr
    assert sorted(p.name for p in (done / "checkpoints").iterdir()) == before
