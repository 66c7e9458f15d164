"""Signals in every stage: SIGTERM or SIGHUP outside training's steps stops the run where it is with its record saying
``interrupted`` and naming the stage (exit 128+signal) and a resume that runs that stage again; during training
SIGHUP, like SIGTERM, finishes the step and checkpoints. ``fx runs`` tells a run whose process died from one that
runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import fx
from conftest import TINY_EXPERIMENT, TINY_ROWS
from fx import cli, config, pipeline
from fx.errors import Interrupted
from fx.run.directory import RunDir
from fx.run.resume import load_run

pytestmark = pytest.mark.slow


class SignalAt:
    """Sends this process ``signum`` as ``stage`` starts (or at training step ``step``)."""

    def __init__(self, signum: int, stage: str | None = None, step: int | None = None):
        self.signum, self.stage, self.step = signum, stage, step

    @fx.hookimpl
    def fx_stage_start(self, run, stage):
        if stage == self.stage:
            os.kill(os.getpid(), self.signum)

    @fx.hookimpl
    def fx_log(self, run, step, metrics):
        if step == self.step and "loss" in metrics:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_before_training_stops_the_run_naming_the_stage(signum, write_experiment, register_plugin,
                                                                 tmp_path):
    path = write_experiment(TINY_EXPERIMENT, TINY_ROWS)
    plugins = register_plugin(SignalAt(signum, stage="evaluate_before"), "signal")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    with pytest.raises(Interrupted) as stopped:
        pipeline.execute(config.load(path, ["method.max_steps=2"]), plugins)
    (folder,) = (tmp_path / "runs").iterdir()
    assert stopped.value.exit_code == 128 + signum
    assert str(stopped.value).startswith(f"{signal.Signals(signum).name}: interrupted during the evaluate_before "
                                         "stage, before training; nothing was trained yet. Resume with: fx run "
                                         f"--resume {folder}")
    summary = RunDir(folder).read_summary()
    assert summary.status == "interrupted" and summary.stages["evaluate_before"].status == "interrupted"
    assert summary.stages["load"].status == "completed" and summary.error is None
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the process's own handlers are back

    plugins.pm.unregister(name="signal")
    pipeline.execute(load_run(folder), plugins, resume=folder)
    summary = RunDir(folder).read_summary()
    assert summary.status == "completed" and summary.stages["evaluate_before"].status == "completed"
    assert summary.eval_before is not None and summary.steps == 2


def test_sighup_during_training_finishes_the_step_and_checkpoints(write_experiment, register_plugin, tmp_path):
    path = write_experiment(TINY_EXPERIMENT, TINY_ROWS)
    plugins = register_plugin(SignalAt(signal.SIGHUP, step=2), "signal")
    sets = ["stages.evaluate.enabled=false", "stages.generate.enabled=false"]
    with pytest.raises(Interrupted) as stopped:
        pipeline.execute(config.load(path, sets), plugins)
    (folder,) = (tmp_path / "runs").iterdir()
    assert stopped.value.exit_code == 128 + signal.SIGHUP and "stopped by SIGHUP after step 3" in str(stopped.value)
    summary = RunDir(folder).read_summary()
    assert summary.status == "interrupted" and summary.stages["train"].status == "interrupted"
    assert (folder / "checkpoints" / "checkpoint-3").is_dir()
    plugins.pm.unregister(name="signal")
    pipeline.execute(load_run(folder), plugins, resume=folder)
    assert RunDir(folder).read_summary().steps == 12


def test_fx_runs_tells_a_run_whose_process_died(tiny_run, tmp_path, capsys):
    """A run's record names the process of its segment; a record left ``running`` by a process that no longer
    exists (kill -9, the host's out-of-memory killer) is listed as ``died``, one whose process lives as running."""
    _, folder, _ = tiny_run
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["segments"][-1]["pid"] and summary["segments"][-1]["host"]
    for name, pid in (("dead", int(gone.stdout)), ("live", os.getpid())):
        copy = tmp_path / "runs" / name
        copy.mkdir(parents=True)
        (copy / "config.toml").write_bytes((folder / "config.toml").read_bytes())
        segments = [{**summary["segments"][-1], "pid": pid}]
        (copy / "summary.json").write_text(json.dumps({**summary, "name": name, "status": "running",
                                                       "segments": segments}))
    assert cli.main(["runs", str(tmp_path / "runs")]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["dead"],
                                                                                                          ["live"])}
    assert " died " in rows["dead"] and " running " in rows["live"]


def test_a_signal_during_a_command_on_a_finished_run_leaves_nothing_half_written(tiny_run, tmp_path, monkeypatch,
                                                                                capsys):
    """SIGTERM while ``fx export`` writes the GGUF file: the command stops with 143, its temporary folder and file
    gone, nothing at ``--out``."""
    from fx.after import gguf_file

    _, folder, _ = tiny_run
    write = gguf_file.write

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return write(*args, **kwargs)

    monkeypatch.setattr(gguf_file, "write", terminated)
    out = tmp_path / "model.gguf"
    assert cli.main(["export", str(folder), "--quant", "f32", "--out", str(out)]) == 128 + signal.SIGTERM
    assert "fx: interrupted by SIGTERM" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_signal_as_the_run_starts_marks_it_interrupted(write_experiment, register_plugin, tmp_path):
    """SIGTERM while the run folder is being written (here: as the plugins hear the run start): the record says
    ``interrupted``, never ``running`` forever."""

    class AtStart:
        @fx.hookimpl
        def fx_run_start(self, run):
            os.kill(os.getpid(), signal.SIGTERM)

    plugins = register_plugin(AtStart(), "at-start")
    with pytest.raises(Interrupted, match="SIGTERM: interrupted during the setup stage, before training"):
        pipeline.execute(config.load(write_experiment(TINY_EXPERIMENT, TINY_ROWS)), plugins)
    (folder,) = (tmp_path / "runs").iterdir()
    assert RunDir(folder).read_summary().status == "interrupted"
