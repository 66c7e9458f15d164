"""Runs that survive: SIGKILL then --resume gives the uninterrupted result; SIGTERM checkpoints and says how to
resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PREF_ROWS, TINY_EXPERIMENT, TINY_ROWS, UNPAIRED_ROWS

pytestmark = pytest.mark.slow  # every test here starts fx processes that train

SETS = ["--set", "checkpoints.every_steps=4", "--set", "stages.generate.enabled=false"]


def start(path: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fx.cli", "run", *args, *([str(path)] if path else []), *SETS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fx(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fx.cli", *args], capture_output=True, text=True)


def run_dir(out: Path) -> Path:
    (folder,) = out.iterdir()
    return folder


def wait_for_step(folder_parent: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> Path:
    """Wait until the run has logged ``step`` (and so has a checkpoint at or before it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        for metrics in folder_parent.glob("*/metrics.jsonl"):
            if any(json.loads(line).get("step") == step and "\"loss\"" in line
                   for line in metrics.read_text().splitlines() if line.strip()):
                return metrics.parent
        time.sleep(0.1)
    raise TimeoutError(f"step {step} never came")


def stop_with_sigterm(path: Path, out: Path, *sets: str) -> tuple[Path, dict]:
    """Start ``path`` in a real fx process, SIGTERM it once step 2 is logged and check how it stopped: exit
    128 + SIGTERM, the resume command, no traceback, an interrupted summary. Returns the run folder and summary."""
    proc = start(path, "--set", f"experiment.output_dir={out}", *sets)
    folder = wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"Resume with: fx run --resume {folder}" in err and "Traceback" not in err
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 2 <= summary["steps"] < 12
    return folder, summary


def train_steps(folder: Path) -> list[int]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "step" in r and "loss" in r]


@pytest.fixture
def experiment(write_experiment):
    return write_experiment(TINY_EXPERIMENT, TINY_ROWS)


def test_sigkill_then_resume_matches_an_uninterrupted_run(experiment, tmp_path):
    straight = start(experiment, "--set", f"experiment.output_dir={tmp_path / 'straight'}")
    assert straight.wait(timeout=600) == 0, straight.communicate()

    killed = start(experiment, "--set", f"experiment.output_dir={tmp_path / 'killed'}")
    folder = wait_for_step(tmp_path / "killed", 6, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (folder / "adapter").exists()

    resumed = fx("run", "--resume", str(folder))
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] in (4, 8)
    assert train_steps(folder) == list(range(1, 13))  # each step exactly once

    ours = load_file(folder / "adapter" / "adapter_model.safetensors")
    theirs = load_file(run_dir(tmp_path / "straight") / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)


def test_sigterm_writes_a_checkpoint_and_a_summary(experiment, tmp_path):
    folder, summary = stop_with_sigterm(experiment, tmp_path / "runs")
    from fx.training.checkpoints import last_checkpoint

    checkpoint, step = last_checkpoint(folder / "checkpoints")
    assert step == summary["steps"]
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "rng_state.pth").is_file()

    # a resumed run may change how it executes (a token budget after an OOM), never what it trains
    refused = fx("run", "--resume", str(folder), "--set", "method.learning_rate=0.5")
    assert refused.returncode == 2 and "can't change method.learning_rate" in refused.stderr
    assert "Traceback" not in refused.stderr
    resumed = fx("run", "--resume", str(folder), "--set", "method.micro_batch_tokens=64")
    assert resumed.returncode == 0, resumed.stderr
    assert train_steps(folder) == list(range(1, 13))
    assert "micro_batch_tokens = 64" in (folder / "config.toml").read_text()


@pytest.mark.parametrize("method", ["orpo", "simpo", "kto"])
def test_sigterm_then_resume_for_the_preference_methods(write_experiment, tmp_path, method):
    """The new methods get the shared layer's SIGTERM handling like every other: a checkpoint at the step it
    stopped, exit 128 + SIGTERM with the resume command, and --resume finishing each step exactly once."""
    text = TINY_EXPERIMENT.replace('name = "qlora_sft"', f'name = "{method}"')
    path = write_experiment(text, UNPAIRED_ROWS if method == "kto" else PREF_ROWS)
    folder, _ = stop_with_sigterm(path, tmp_path / "runs", "--set", "stages.evaluate.enabled=false")
    resumed = fx("run", "--resume", str(folder))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((folder / "summary.json").read_text())["status"] == "completed"
    assert train_steps(folder) == list(range(1, 13))
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_refuses_a_folder_that_is_not_a_run(tmp_path):
    out = fx("run", "--resume", str(tmp_path))
    assert out.returncode == 2 and "not a run directory" in out.stderr


OOM_EXPERIMENT = """
[experiment]
name = "oom"
seed = 0
output_dir = "{out}"

[model]
source = "random"
architecture = "smollm2-135m"
dtype = "float16"

[data]
source = "file"
path = "rows.jsonl"
eval_fraction = 0.0
max_length = 2048

[template]
name = "llama2"

[method]
name = "qlora_sft"
compute_dtype = "float16"
max_steps = 40
micro_batch_size = 3
optim = "adamw_torch"
gradient_checkpointing = false
liger = false         # the planner is calibrated on transformers' own layers
warmup_ratio = 0.0

[method.lora]
r = 8
target_modules = ["q_proj", "v_proj"]

[checkpoints]
every_steps = 1

[budget]
vram_gib = {vram}
refuse = false

[trackers.jsonl]

[stages.evaluate]
enabled = false

[stages.generate]
enabled = false
"""


@pytest.mark.gpu
def test_out_of_memory_on_a_gpu_names_the_step_and_resumes_with_a_token_budget(write_experiment, tmp_path):
    """Every micro-batch holds three ~1,900-token rows. The run trains a few steps, is stopped (a checkpoint), and
    is resumed under an allocator cap set between the plans for one such row and for three: the next step runs out
    of memory,
    and the message names the step, the batch's tokens, the plan and a token budget to resume with, the checkpoint
    before it intact. Resuming with that budget (each row alone) finishes the same training, each step logged once."""
    from fx import config
    from fx.training.budget import plan_experiment
    from fx.training.checkpoints import last_checkpoint

    rows = [{"messages": [{"role": "user", "content": f"Recite {k}."}, {"role": "assistant", "content": "la " * 1900}]}
            for k in range(18)]
    path = write_experiment(OOM_EXPERIMENT.replace("{vram}", "80.0"), rows)
    one = plan_experiment(config.load(path, ["method.micro_batch_tokens=2048"])).plan
    three = plan_experiment(config.load(path)).plan
    cap = (one.reserved / 0.9 + three.reserved) / 2  # the suggested budget fits at 90% of the cap; three rows don't
    assert one.reserved / 0.9 < cap < three.reserved
    vram = f"budget.vram_gib={(cap + three.outside_allocator) / 2**30:.4f}"

    proc = start(path, "--set", f"experiment.output_dir={tmp_path / 'runs'}")
    folder = wait_for_step(tmp_path / "runs", 2, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    _, done = last_checkpoint(folder / "checkpoints")
    assert done < 40, "the run finished before it was stopped"

    failed = fx("run", "--resume", str(folder), "--set", vram)
    message = failed.stderr
    assert failed.returncode == 1, message
    assert "Traceback" not in message
    assert f"out of GPU memory at step {done + 1} on a batch of" in message and "planned" in message
    assert f"(step {done}) is intact" in message and last_checkpoint(folder / "checkpoints")[1] == done
    suggested = message.split(f"fx run --resume {folder} ")[1].split()[:2]
    assert suggested[0] == "--set" and suggested[1].startswith("method.micro_batch_tokens=")

    resumed = fx("run", "--resume", str(folder), *suggested)
    assert resumed.returncode == 0, resumed.stderr
    assert train_steps(folder) == list(range(1, 41))
    assert json.loads((folder / "summary.json").read_text())["status"] == "completed"
