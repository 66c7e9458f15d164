"""The run's record and context: summary.json is typed and versioned, history.jsonl is core's (no tracker needed),
a resumed run's record, plot and ``fx runs`` cover every segment and no finished stage runs again, a run built from
one context prepares its data once and builds each plugin once, and ``fx merge``/``fx export`` record their checks
and reuse the run's own measurement of the adapter."""

from __future__ import annotations

import json
import re
import shutil
import signal

import pytest

import fx
from conftest import TINY_EXPERIMENT, TINY_ROWS, StageObserver
from fx import cli, config, pipeline
from fx.after import fidelity, inference
from fx.errors import Interrupted, UserError
from fx.hooks import manager
from fx.run.directory import RunDir
from fx.run.plots import loss_series
from fx.run.record import RunSummary
from fx.run.resume import load_run

pytestmark = pytest.mark.slow

NO_JSONL = TINY_EXPERIMENT.replace("[trackers.jsonl]\n", "[trackers.console]\n")


class StopAtStep3:  # the step in progress (4) finishes and is checkpointed
    @fx.hookimpl
    def fx_log(self, run, step, metrics):
        if step == 3 and "loss" in metrics:
            run.stop(signal.SIGTERM)


def steps_with(history, key):
    return [step for step, metrics in history if key in metrics]


@pytest.fixture
def stopped(write_experiment, register_plugin, tmp_path):
    """The tiny experiment with no jsonl tracker, stopped as SIGTERM stops it (checkpoint written at step 4): its
    folder."""
    path = write_experiment(NO_JSONL, TINY_ROWS)
    plugins = register_plugin(StopAtStep3(), "stop-at-3")
    with pytest.raises(Interrupted):
        pipeline.execute(config.load(path), plugins)
    (folder,) = (tmp_path / "runs").iterdir()
    return folder


def resume(folder, monkeypatch):
    """Resume ``folder`` watched by a :class:`StageObserver`; the observer and the history the plot was drawn from."""
    observer, drawn = StageObserver(), {}
    base = manager.build()
    base.pm.register(observer, name="observer")
    plugins = manager.Plugins(base.pm, base.versions)
    monkeypatch.setattr(manager, "get", lambda: plugins)
    plot = pipeline.write_loss_plot
    monkeypatch.setattr(pipeline, "write_loss_plot", lambda history, *a: (drawn.update(history=list(history)),
                                                                          plot(history, *a))[1])
    pipeline.execute(load_run(folder), plugins, resume=folder)
    return observer, drawn["history"]


def test_a_resumed_run_without_jsonl_keeps_one_record_of_every_segment(stopped, monkeypatch, capsys):
    files = RunDir(stopped)
    first = files.read_summary()
    assert first.status == "interrupted" and first.stages["train"].status == "interrupted"
    assert first.samples.before and first.samples.after is None and "_(not generated yet)_" in files.samples.read_text()
    assert not files.metrics.exists() and steps_with(files.read_history(), "loss") == [1, 2, 3, 4]

    before = stopped.parent.parent / "before-resume"  # outside the output folder fx runs lists
    shutil.copytree(stopped, before)
    observer, drawn = resume(stopped, monkeypatch)
    # the stages the first segment completed are not run again; load always is (it builds the model in memory)
    assert observer.started == ["load", "train", "save", "evaluate_after", "generate_after"]
    summary = files.read_summary()
    assert summary.status == "completed" and len(summary.segments) == 2 and summary.resumed_from_step == 4
    assert [s.from_step for s in summary.segments] == [0, 4] and summary.segments[-1].to_step == 12
    assert all(entry.status == "completed" for entry in summary.stages.values())
    assert list(summary.stages) == ["load", "evaluate_before", "generate_before", "train", "save", "evaluate_after",
                                    "generate_after"]
    assert summary.eval_before == first.eval_before and summary.samples.before == first.samples.before
    samples = files.samples.read_text()
    assert all(answer in samples for answer in summary.samples.before + summary.samples.after)
    history = files.read_history()
    assert steps_with(history, "loss") == list(range(1, 13))  # each step once, both segments
    assert steps_with(history, "eval_loss") == [0, 12]
    series = loss_series(drawn)
    assert series["train loss"][0] == list(range(1, 13)) and series["held-out loss"][0] == [0, 12]
    assert cli.main(["runs", str(stopped.parent)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if stopped.name in line)
    best = max(m["eval_contains"] for _, m in history if "eval_contains" in m)
    assert "completed" in row and f"{best:.4g}" in row
    assert cli.main(["runs", "--compare", str(before), str(stopped)]) == 0  # both read from their records alone
    compared = capsys.readouterr().out
    assert re.search(r"status\s+interrupted\s+completed", compared) and re.search(r"steps\s+4\s+12", compared)


def test_a_run_recorded_before_the_schema_resumes(stopped, monkeypatch):
    """A run whose summary.json has no version (and none of schema 1's new fields) and whose history is only in the
    jsonl tracker's metrics.jsonl resumes: its record is read as it is, its history carried into history.jsonl."""
    files = RunDir(stopped)
    summary = json.loads(files.summary.read_text())
    legacy = {k: v for k, v in summary.items()
              if k not in ("version", "stages", "results", "samples", "adapter_heldout", "trainable_params")
              and v is not None and v != []}
    files.summary.write_text(json.dumps(legacy))
    files.history.rename(files.metrics)
    assert files.read_summary().version == 0
    observer, _ = resume(stopped, monkeypatch)
    assert observer.started[0] == "load" and "train" in observer.started
    after = files.read_summary()
    assert after.status == "completed" and after.version == 1 and after.steps == 12
    assert steps_with(files.read_history(), "loss") == list(range(1, 13))


def test_a_summary_that_does_not_fit_the_schema_is_refused_naming_the_file(stopped, capsys):
    files = RunDir(stopped)
    summary = json.loads(files.summary.read_text())
    files.summary.write_text(json.dumps({**summary, "tokens_per_joule": 3}))
    with pytest.raises(UserError, match="summary.json: not a summary fx can read \\(tokens_per_joule: unknown field"):
        files.read_summary()
    assert cli.main(["run", "--resume", str(stopped)]) == 2
    assert "tokens_per_joule: unknown field" in capsys.readouterr().err
    assert cli.main(["runs", str(stopped.parent)]) == 0  # the damaged run is listed as such, not a reason to list none
    out = capsys.readouterr()
    assert "unreadable" in out.out and "tokens_per_joule" in out.err
    files.summary.write_text(json.dumps({**summary, "version": 2}))
    with pytest.raises(UserError, match="written by a newer fx \\(summary schema 2"):
        files.read_summary()
    files.summary.write_text(json.dumps(summary))  # the session's check of every summary reads this one too


def test_one_run_prepares_its_data_once_and_builds_each_plugin_once_and_exports_reuse_its_measurement(
        write_experiment, tmp_path, monkeypatch, capsys):
    """With merge and export on, the run tokenizes its rows once (train and held-out: two calls) and constructs
    its model source, dataset source, template and method once each. The merge and export stages measure the
    trained adapter once, on the model in memory; a later ``fx export`` and ``fx merge`` reuse that measurement
    (the adapter is never loaded again) and record their checks in the run's summary."""
    plugins = manager.get()
    built = {kind: plugins[kind][name].cls for kind, name in
             (("models", "random"), ("datasets", "file"), ("templates", "llama2"), ("methods", "qlora_sft"))}
    counts = dict.fromkeys([*built, "tokenize", "measure"], 0)

    def counting(key, function):
        def wrapped(*args, **kwargs):
            counts[key] += 1
            return function(*args, **kwargs)
        return wrapped

    for kind, cls in built.items():
        monkeypatch.setattr(cls, "__init__", counting(kind, cls.__init__))
    monkeypatch.setattr(built["methods"], "tokenize", counting("tokenize", built["methods"].tokenize))
    monkeypatch.setattr(fidelity, "measure", counting("measure", fidelity.measure))
    path = write_experiment(TINY_EXPERIMENT, TINY_ROWS)
    sets = ["method.max_steps=4", "stages.merge.enabled=true", 'stages.merge.dtype="float32"',
            "stages.export.enabled=true", 'stages.export.quant="f32"']
    folder = pipeline.execute(config.load(path, sets), plugins)
    assert {k: counts[k] for k in built} == dict.fromkeys(built, 1)
    assert counts["tokenize"] == 2
    # the trained adapter, the merged model, the exported file: each measured once
    assert counts["measure"] == 3
    summary = RunDir(folder).read_summary()
    adapter = summary.adapter_heldout
    assert adapter["answers"] and summary.merge["check"]["adapter"]["loss"] == adapter["loss"]
    assert summary.exports[0]["check"]["passed"] and summary.exports[0]["check"]["adapter"]["loss"] == adapter["loss"]

    def no_loading(*args, **kwargs):
        raise AssertionError("the adapter was loaded and measured again")

    monkeypatch.setattr(inference, "load_model", no_loading)
    counts["measure"] = 0
    other = tmp_path / "again.gguf"
    assert cli.main(["export", str(folder), "--quant", "f32", "--out", str(other)]) == 0
    assert counts["measure"] == 1  # the exported file alone
    assert cli.main(["merge", str(folder), "--out", str(tmp_path / "merged-again"), "--dtype", "float32"]) == 0
    capsys.readouterr()
    summary = RunDir(folder).read_summary()
    assert [e["out"] for e in summary.exports] == [str(folder / "export" / f"{folder.name}-f32.gguf"), str(other)]
    assert summary.exports[1]["check"]["passed"] and summary.exports[1]["check"]["adapter"]["loss"] == adapter["loss"]
    assert summary.merge["path"] == str(tmp_path / "merged-again") and summary.merge["check"]["within_tolerance"]
    assert summary.adapter_heldout == adapter and RunSummary.model_validate(summary.to_dict()) == summary


def test_a_refused_resume_says_nothing_of_resuming(stopped, tmp_path, capsys):
    """A resume refused after its checkpoint was chosen (the data has gone) prints the refusal alone: no "resuming
    from" line before it, which would say the run went on."""
    (tmp_path / "rows.jsonl").rename(tmp_path / "elsewhere.jsonl")
    assert cli.main(["run", "--resume", str(stopped)]) == 2
    err = capsys.readouterr().err
    assert "rows.jsonl" in err and "resuming" not in err


def test_advice_to_resume_on_several_gpus_says_it_needs_them(tmp_path, monkeypatch):
    """A checkpoint FSDP wrote on 2 ranks, resumed in one process on a machine without GPUs: the refusal says the
    resume needs a machine with 2 GPUs, instead of suggesting a command this machine can't run."""
    from fx.training import checkpoints
    from fx.training.distributed import World

    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    checkpoints.write_manifest(folder, 4, None, {"world_size": 2, "strategy": "fsdp"})
    monkeypatch.setattr(pipeline, "device_count", lambda: 0)
    with pytest.raises(UserError, match="resume with --gpus 2 --set distributed.strategy=fsdp on a machine with 2 "
                                        "CUDA GPUs \\(this one has none\\)"):
        pipeline.resumable(folder, World(1, 0, 0, None))


def test_fx_runs_fits_the_terminal_and_says_what_it_left_out(stopped, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert cli.main(["runs", str(stopped.parent)]) == 0
    out = capsys.readouterr().out
    assert all(len(line) <= 80 for line in out.splitlines()), out
    assert stopped.name in out and "interrupted" in out
    note = re.search(r"(\d+) column\(s\) left out to fit 80 columns: ([a-zA-Z/ ,]+); a terminal (\d+) wide "
                     r"\(or COLUMNS=\3 fx runs \.\.\.\) shows them all", " ".join(out.split()))  # wrapped to 80
    assert note and "created" in note.group(2)
    monkeypatch.setenv("COLUMNS", note.group(3))
    assert cli.main(["runs", str(stopped.parent)]) == 0
    wide = capsys.readouterr().out
    assert "left out" not in wide and "created" in wide and "VRAM GiB" in wide
