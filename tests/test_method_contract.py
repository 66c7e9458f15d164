"""The method contract, proved on a third party's method: the complete package of docs/plugins.md ("Writing a
method"), built and installed as a user would, gets checkpoints, resume after SIGKILL, SIGTERM, the out-of-memory
report, every tracker, fx plan and fx bench from fx, with no code of its own for any of them."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import GUIDE_METHOD, TINY_EXPERIMENT, TINY_ROWS, guide_files, importable, install_package
from fx import cli
from fx.hooks import manager

pytestmark = pytest.mark.slow

TRACKERS = "[trackers.console]\n[trackers.jsonl]\n[trackers.csv]\n[trackers.tensorboard]\n[trackers.mlflow]\n"
EXPERIMENT = (TINY_EXPERIMENT.replace('name = "qlora_sft"', 'name = "anchored_sft"\nbeta = 0.1')
              .replace("[trackers.jsonl]\n", TRACKERS) + "\n[checkpoints]\nevery_steps = 3\n")
QUIET = ["--set", "stages.generate.enabled=false", "--set", "stages.evaluate.enabled=false"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The guide's package, built and installed into a folder of its own."""
    return install_package(guide_files(*GUIDE_METHOD), tmp_path_factory.mktemp("fx-anchored"))


@pytest.fixture
def installed(site, monkeypatch):
    return importable(site, monkeypatch)


@pytest.fixture
def experiment(installed, write_experiment):
    return write_experiment(EXPERIMENT, TINY_ROWS)


def run_in_process(*args: str) -> int:
    manager.get.cache_clear()
    return cli.main(["run", *args])


def only_run(out: Path) -> Path:
    (folder,) = (p for p in out.iterdir() if (p / "config.toml").is_file())  # mlflow keeps its store beside
    return folder


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    ours, theirs = adapter(a), adapter(b)
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)


def logged_steps(folder: Path) -> list[int]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "step" in r and "loss" in r]


def start(path: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fx.cli", "run", str(path), "--set", f"experiment.output_dir={out}",
                             *QUIET], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        for metrics in out.glob("*/metrics.jsonl"):
            if step in logged_steps(metrics.parent):
                return metrics.parent
        time.sleep(0.1)
    raise TimeoutError(f"step {step} never came")


@pytest.fixture
def straight(experiment, tmp_path):
    """An uninterrupted run of the method, watched by every built-in tracker."""
    out = tmp_path / "straight"
    assert run_in_process(str(experiment), "--set", f"experiment.output_dir={out}", *QUIET) == 0
    return only_run(out)


def test_the_guide_method_is_found_through_its_entry_point(installed):
    out = subprocess.run([sys.executable, "-m", "fx.cli", "plugins", "--json"], capture_output=True, text=True)
    plugins = {p["name"]: p for p in json.loads(out.stdout)}
    assert plugins["anchored"]["version"] == "0.1.0" and plugins["anchored"]["registers"] == ["method:anchored_sft"]


def test_it_trains_checkpoints_and_logs_to_every_tracker(straight):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = json.loads((straight / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 12 and summary["train_tokens"] > 0
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["checkpoint-12", "checkpoint-9"]
    losses = {r["step"]: r["loss"] for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())
              if "loss" in r and "step" in r}
    assert sorted(losses) == list(range(1, 13)) and losses[12] < losses[1]
    header, *rows = (straight / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("loss")
    assert [float(r.split(",")[column]) for r in rows if r.split(",")[column]] == [losses[s] for s in range(1, 13)]
    events = EventAccumulator(str(straight / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == \
        [(s, round(losses[s], 4)) for s in range(1, 13)]
    client = MlflowClient(tracking_uri=f"sqlite:///{straight.parent / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    history = client.get_metric_history(found.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 13)) and found.data.params["method.name"] == "anchored_sft"


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(experiment, straight, tmp_path):
    out = tmp_path / "killed"
    proc = start(experiment, out)
    folder = wait_for_step(out, 7, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (folder / "adapter").exists()
    resumed = subprocess.run([sys.executable, "-m", "fx.cli", "run", "--resume", str(folder)], capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((folder / "summary.json").read_text())["resumed_from_step"] in (3, 6)
    assert logged_steps(folder) == list(range(1, 13))  # each step exactly once
    assert_same_adapter(folder, straight)


def test_sigterm_stops_with_a_checkpoint_that_resumes(experiment, straight, tmp_path):
    out = tmp_path / "stopped"
    proc = start(experiment, out)
    folder = wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert f"Resume with: fx run --resume {folder}" in err
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted" and (folder / "checkpoints" / f"checkpoint-{summary['steps']}").is_dir()
    resumed = subprocess.run([sys.executable, "-m", "fx.cli", "run", "--resume", str(folder)], capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert logged_steps(folder) == list(range(1, 13))
    assert_same_adapter(folder, straight)


def test_out_of_memory_reports_a_token_budget_that_continues_the_same_training(experiment, straight, tmp_path,
                                                                                 monkeypatch, capsys):
    """Out of memory at the third step (rehearsed as docs/plugins.md says: FX_SIMULATE_OOM_AT_STEP=3), under a
    [budget]: the report names the step and the intact checkpoint, and its command, run as printed, finishes the
    same training."""
    out = tmp_path / "oom"
    with monkeypatch.context() as patched:
        patched.setenv("FX_SIMULATE_OOM_AT_STEP", "3")
        code = run_in_process(str(experiment), "--set", f"experiment.output_dir={out}", "--set", "budget.vram_gib=14.5",
                              "--set", "checkpoints.every_steps=1", *QUIET)
    err = capsys.readouterr().err
    folder = only_run(out)
    assert code == 1 and "Traceback" not in err
    assert "out of GPU memory at step 3" in err and "The last checkpoint (step 2) is intact" in err
    command = re.search(r"fx run --resume \S+ --set method\.micro_batch_tokens=\d+", err).group(0)
    assert json.loads((folder / "summary.json").read_text())["status"] == "out_of_memory"
    assert run_in_process(*command.split()[2:]) == 0
    assert logged_steps(folder) == list(range(1, 13))
    assert_same_adapter(folder, straight)  # a token budget gives the same gradient


def test_fx_plan_and_fx_bench_run_it(experiment, tmp_path, capsys):
    manager.get.cache_clear()
    assert cli.main(["plan", str(experiment), "--budget", "t4"]) == 0
    planned = capsys.readouterr().out
    assert "reference forward" in planned and "full float32 logits" in planned and "fits the t4 budget" in planned
    result = tmp_path / "bench.json"
    assert cli.main(["bench", str(experiment), "--steps", "2", "--warmup", "1", "--out", str(result)]) == 0
    measured = json.loads(result.read_text())
    assert measured["results"]["measured_steps"] == 2 and measured["results"]["tokens"] > 0
    assert measured["config"]["method"]["name"] == "anchored_sft" and measured["plan"]["workload"]["full_logits"]
