"""Trackers, read back with each tool's own reader; the loss plot; a failing tracker; ``fx runs``.

One real training run (tiny random Llama, 5 steps) with every built-in tracker, the plugin guide's example
tracker and a tracker that breaks mid-training is shared by the tests that read its outputs.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shutil
import sys
import time
import types
from datetime import datetime
from pathlib import Path

import pytest

import fx
from conftest import ROOT, TINY_EXPERIMENT, TINY_ROWS
from fx import cli, config, pipeline
from fx.hooks import manager
from fx.run.plots import loss_series, write_loss_plot
from fx.run.tracking import Tracker, TrackerHub

STEPS = 5
ALL_TRACKERS = """
[trackers.console]
[trackers.jsonl]
[trackers.csv]
[trackers.tensorboard]
[trackers.mlflow]
[trackers.leaderboard]
[trackers.broken]
"""


def experiment_text(out: Path, trackers: str, steps: int = STEPS) -> str:
    text = TINY_EXPERIMENT.replace("{out}", str(out)).replace("max_steps = 12", f"max_steps = {steps}")
    return text.replace("[trackers.jsonl]\n", trackers)


class Broken(Tracker):
    """Works until training logs its first loss, then raises."""

    def log(self, step, metrics):
        if "loss" in metrics:
            raise RuntimeError("disk full (on purpose)")


class BrokenPlugin:
    @fx.hookimpl
    def fx_register_trackers(self, register):
        register("broken", Broken)


def guide_example() -> types.ModuleType:
    """The complete third-party tracker of docs/plugins.md, loaded as the module its package would install."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    section = text[text.index("## Writing a tracker"):]
    code = re.search(r"`fx_leaderboard\.py`:\n\n```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("fx_leaderboard")
    exec(compile(code, "docs/plugins.md:fx_leaderboard.py", "exec"), module.__dict__)
    return module


def plugins_with(*extra: tuple[object, str]) -> manager.Plugins:
    base = manager.build()
    for plugin, name in extra:
        base.pm.register(plugin, name=name)
    return manager.Plugins(base.pm, base.versions)


def run_experiment(path: Path, plugins: manager.Plugins) -> tuple[Path, str]:
    """Run an experiment file with these plugins; return the run folder and what went to stderr."""
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr):
        mp.setattr(manager, "get", lambda: plugins)
        folder = pipeline.execute(config.load(path), plugins)
    return folder, stderr.getvalue()


def read_jsonl(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def step_records(folder: Path) -> list[tuple[int, dict]]:
    """What the run logged (fx_log calls), as the jsonl tracker kept it."""
    return [(r["step"], {k: v for k, v in r.items() if k not in ("time", "step")})
            for r in read_jsonl(folder) if "step" in r]


def points(folder: Path, key: str) -> list[tuple[int, float]]:
    return [(step, m[key]) for step, m in step_records(folder) if key in m]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    root = tmp_path_factory.mktemp("tracked")
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    (root / "exp.toml").write_text(experiment_text(root / "runs", ALL_TRACKERS))
    plugins = plugins_with((BrokenPlugin(), "broken-tracker"), (guide_example(), "fx_leaderboard"))
    folder, stderr = run_experiment(root / "exp.toml", plugins)
    return types.SimpleNamespace(folder=folder, stderr=stderr, out=root / "runs",
                                 summary=json.loads((folder / "summary.json").read_text()))


def test_failing_tracker_is_reported_once_and_the_run_completes_with_every_other_output(tracked):
    assert tracked.stderr.count("tracker 'broken' failed") == 1
    assert "failed in log() and is switched off: RuntimeError: disk full (on purpose)" in tracked.stderr
    assert tracked.summary["status"] == "completed"
    assert tracked.summary["steps"] == STEPS
    assert tracked.summary["trackers_failed"] == {"broken": "RuntimeError: disk full (on purpose)"}
    folder = tracked.folder
    for name in ("config.toml", "env.json", "summary.json", "samples.md", "adapter/adapter_model.safetensors",
                 "plots/loss.png", "metrics.jsonl", "metrics.csv", "summary.csv"):
        assert (folder / name).is_file(), name
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
    assert (tracked.out / "mlflow.db").is_file() and (tracked.out / "leaderboard.tsv").is_file()
    # trackers after the broken one kept receiving steps: every training step reached the jsonl file
    assert [s for s, _ in points(folder, "loss")] == list(range(1, STEPS + 1))


def test_tensorboard_event_files_hold_every_logged_scalar_at_its_step(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked.folder / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for key, tag in (("loss", "train/loss"), ("learning_rate", "train/learning_rate"), ("eval_loss", "eval/loss"),
                     ("eval_contains", "eval/contains")):
        logged = points(tracked.folder, key)
        read = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in read] == [s for s, _ in logged], tag
        assert [v for _, v in read] == pytest.approx([v for _, v in logged], rel=1e-6), tag  # stored as float32
    assert [s for s, _ in points(tracked.folder, "eval_loss")] == [0, STEPS]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == "```toml\n" + (tracked.folder / "config.toml").read_text() + "```"
    summary = events.Tensors("summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert (json.loads(summary.removeprefix("```json\n").removesuffix("\n```"))["eval_after"]
            == tracked.summary["eval_after"])


def test_mlflow_run_holds_params_metrics_by_step_and_artifacts(tracked, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked.out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == tracked.folder.name and found.info.status == "FINISHED"
    assert found.data.params["method.max_steps"] == str(STEPS)
    assert found.data.params["method.lora.r"] == "8"
    assert found.data.params["template.name"] == "llama2"
    for key in ("loss", "learning_rate", "eval_loss", "eval_contains"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, key))
        assert history == points(tracked.folder, key), key
    assert found.data.metrics["train_tokens_per_s"] == tracked.summary["train_tokens_per_s"]
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"adapter", "plots", "config.toml", "summary.json", "samples.md"} <= artifacts
    assert "plots/loss.png" in {a.path for a in client.list_artifacts(found.info.run_id, "plots")}
    local = client.download_artifacts(found.info.run_id, "adapter", str(tmp_path))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (Path(local) / name).read_bytes() == (tracked.folder / "adapter" / name).read_bytes()


def test_jsonl_ends_with_the_summary(tracked):
    last = read_jsonl(tracked.folder)[-1]
    written = {k: v for k, v in last["summary"].items() if k != "trackers_failed"}  # set after the trackers finish
    assert written == {k: v for k, v in tracked.summary.items() if k != "trackers_failed"}


def test_csv_holds_every_logged_step_eval_and_the_summary(tracked):
    with open(tracked.folder / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    logged = step_records(tracked.folder)
    assert len(rows) == len(logged)
    for row, (step, metrics) in zip(rows, logged):
        assert int(row["step"]) == step
        assert {k: float(v) for k, v in row.items() if v and k not in ("time", "step")} == metrics
    with open(tracked.folder / "summary.csv", newline="") as fh:
        summary = {r["key"]: r["value"] for r in csv.DictReader(fh)}
    assert summary["status"] == "completed"
    assert float(summary["eval_after.loss"]) == tracked.summary["eval_after"]["loss"]
    assert int(summary["steps"]) == STEPS


def test_loss_plot_draws_the_logged_points(tracked, tmp_path):
    history = step_records(tracked.folder)
    drawn = write_loss_plot(history, tmp_path / "loss.png", f"{tracked.folder.name} (completed)")
    assert drawn["train loss"] == tuple(map(list, zip(*points(tracked.folder, "loss"))))
    assert drawn["held-out loss"] == ([0, STEPS], [tracked.summary["eval_before"]["loss"],
                                                   tracked.summary["eval_after"]["loss"]])
    assert drawn["learning rate"] == tuple(map(list, zip(*points(tracked.folder, "learning_rate"))))
    # the run's own picture is exactly the one drawn from these points
    assert (tracked.folder / "plots" / "loss.png").read_bytes() == (tmp_path / "loss.png").read_bytes()


def test_console_shows_progress_and_the_closing_table(tracked):
    assert f"{STEPS}/{STEPS}" in tracked.stderr
    assert re.search(r"loss \d+\.\d{4}\s+lr 1\.00e-02\s+\d+ tok/s", tracked.stderr)
    assert f"{tracked.folder.name} (completed)" in tracked.stderr and "held-out loss" in tracked.stderr


def test_console_shows_peak_vram_when_it_is_logged(capsys, tmp_path):
    from fx.plugins.trackers.console import ConsoleTracker

    run = types.SimpleNamespace(name="r", dir=tmp_path, max_steps=2, step=0)
    console = ConsoleTracker(ConsoleTracker.Settings(), run)
    console.start()
    console.stage_start("train")
    for step in (1, 2):  # captured stderr is no terminal: a line at the last step
        console.log(step, {"loss": 2.0, "learning_rate": 1e-4, "tokens_per_s": 1000.0, "peak_vram_gib": 3.25})
    console.stage_end("train", {})
    console.finish({"status": "completed", "steps": 1, "peak_vram_gib": 3.25}, None)
    err = capsys.readouterr().err
    assert "peak VRAM 3.25 GiB" in err
    assert re.search(r"peak_vram_gib\s*│\s*│\s*3\.25", err)


def test_guide_example_tracker_ranks_the_run(tracked):
    with open(tracked.out / "leaderboard.tsv", newline="") as fh:
        (row,) = list(csv.DictReader(fh, delimiter="\t"))
    best_step, best = min(points(tracked.folder, "eval_loss"), key=lambda p: p[1])
    assert row["run"] == tracked.folder.name
    assert (float(row["value"]), int(row["step"]), int(row["steps"])) == (best, best_step, STEPS)
    assert (row["model"], row["method"]) == ("random", "qlora_sft")


def test_loss_plot_is_written_without_any_tracker(tmp_path):
    logged = []

    class Recorder:  # a plain plugin, not a tracker: sees what the plot is drawn from
        @fx.hookimpl
        def fx_log(self, run, step, metrics):
            logged.append((step, dict(metrics)))

    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    text = "trackers = {}\n" + experiment_text(tmp_path / "runs", "", steps=2)  # no tracker at all
    text = text.replace("[stages.evaluate]\n", "[stages.evaluate]\nenabled = false\n")
    text = text.replace("[stages.generate]\n", "[stages.generate]\nenabled = false\n")
    (tmp_path / "exp.toml").write_text(text)
    folder, _ = run_experiment(tmp_path / "exp.toml", plugins_with((Recorder(), "recorder")))
    assert not (folder / "metrics.jsonl").exists()
    assert [s for s, m in logged if "loss" in m] == [1, 2]
    drawn = write_loss_plot(logged, tmp_path / "again.png", f"{folder.name} (completed)")
    assert drawn["train loss"] == loss_series(logged)["train loss"]
    assert (folder / "plots" / "loss.png").read_bytes() == (tmp_path / "again.png").read_bytes()


def test_tracker_hub_switches_off_a_tracker_that_raises_and_keeps_the_others():
    seen = []

    class Good(Tracker):
        def log(self, step, metrics):
            seen.append(step)

    class Bad(Tracker):
        def start(self):
            raise ValueError("no")

    hub = TrackerHub({"bad": Bad(Tracker.Settings(), None), "good": Good(Tracker.Settings(), None)})
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        hub.fx_run_start(run=None)
        hub.fx_log(run=None, step=1, metrics={"loss": 1.0})
        hub.fx_log(run=None, step=2, metrics={"loss": 1.0})
    assert seen == [1, 2] and list(hub.trackers) == ["good"]
    assert hub.failed == {"bad": "ValueError: no"} and err.getvalue().count("tracker 'bad' failed in start()") == 1


@pytest.mark.parametrize("name, extra, module",
                         [("tensorboard", "tensorboard", "tensorboard"), ("mlflow", "mlflow", "mlflow")])
def test_missing_extra_is_a_user_error_naming_the_extra(write_experiment, tmp_path, monkeypatch, capsys,
                                                        name, extra, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: find_spec gives None, import fails
    path = write_experiment(TINY_EXPERIMENT.replace("[trackers.jsonl]\n", f"[trackers.jsonl]\n[trackers.{name}]\n"),
                            TINY_ROWS)
    assert cli.main(["validate", str(path)]) == 2
    assert (f"trackers.{name}: tracker '{name}' needs {module} (not installed): pip install 'fx[{extra}]'"
            in capsys.readouterr().err)
    assert cli.main(["run", str(path)]) == 2
    assert not (tmp_path / "runs").exists()


def test_mlflow_tracker_logs_to_a_given_tracking_uri(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow import MlflowClient

    from fx.plugins.trackers.mlflow import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    run = types.SimpleNamespace(name="r1", dir=tmp_path / "runs" / "r1",
                                config={"experiment": {"name": "given"}, "model": {"source": "random"},
                                        "method": {"name": "qlora_sft", "lora": {"r": 4}}})
    client = MlflowClient(tracking_uri=uri)
    client.delete_experiment(client.create_experiment("given"))  # a name still held by a deleted experiment
    tracker = MlflowTracker(MlflowTracker.Settings(tracking_uri=uri), run)
    tracker.start()
    tracker.log(1, {"loss": 2.5})
    tracker.log(2, {"loss": 2.0})
    tracker.finish({"status": "failed", "steps": 2}, RuntimeError("x"))
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    (found,) = client.search_runs([client.get_experiment_by_name("given").experiment_id])
    assert found.info.status == "FAILED" and found.data.params["method.lora.r"] == "4"
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "loss")] == [(1, 2.5), (2, 2.0)]


def test_fx_runs_lists_sorts_and_compares(tracked, tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    first = out / tracked.folder.name
    shutil.copytree(tracked.folder, first)
    second = out / "tiny-faster"
    shutil.copytree(tracked.folder, second)
    summary = {**tracked.summary, "name": "tiny-faster",
               "train_tokens_per_s": tracked.summary["train_tokens_per_s"] * 2}
    (second / "summary.json").write_text(json.dumps(summary))
    (second / "config.toml").write_text((first / "config.toml").read_text().replace("r = 8", "r = 16"))
    (out / "mlflow.db").write_text("")  # other things in an output folder are passed over

    assert cli.main(["runs", str(out), "--sort", "tokens_s"]) == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if "tiny-" in line]
    assert [line.split()[0] for line in lines] == [tracked.folder.name, "tiny-faster"]
    assert "random:tiny" in lines[0] and "qlora_sft" in lines[0] and "completed" in lines[0]
    assert "contains" in lines[0] and f" {STEPS} " in lines[0]
    created = datetime.fromisoformat(tracked.summary["created"]).strftime("%Y-%m-%d %H:%M")
    assert "created" in table and created in lines[0]
    assert cli.main(["runs", str(out), "--sort", "tokens_s", "--reverse"]) == 0
    assert ([line.split()[0] for line in capsys.readouterr().out.splitlines() if "tiny-" in line]
            == ["tiny-faster", tracked.folder.name])

    from fx.after import runs

    row = runs.row(first)
    assert (row.metric, row.final) == ("contains", tracked.summary["eval_after"]["contains"])
    assert row.best == max(v for _, v in points(tracked.folder, "eval_contains"))
    assert row.tokens_s == tracked.summary["train_tokens_per_s"] and row.steps == STEPS

    assert cli.main(["runs", str(out), "--compare", first.name, str(second)]) == 0
    compared = capsys.readouterr().out
    assert re.search(r"method\.lora\.r\s+8\s+16", compared)
    assert "experiment.name" not in compared  # only differences
    tokens = tracked.summary["train_tokens_per_s"]
    assert re.search(rf"train_tokens_per_s\s+{tokens:.4g}\s+{tokens * 2:.4g}", compared)
    # the measures that are equal (every one but the speed: the summary is a copy) are counted, not listed
    equal = re.search(r"measures that differ \(1; (\d+) equal, not shown\)", compared)
    assert equal and int(equal.group(1)) > 10
    for key in ("train_loss", "steps", "eval_after.loss", "status"):
        assert not re.search(rf"^\s*{re.escape(key)}\s", compared, re.M), key

    assert cli.main(["runs", str(out), "--compare", "nope", first.name]) == 2
    assert "nope: no such run" in capsys.readouterr().err
    assert cli.main(["runs", str(tmp_path / "missing")]) == 2


def test_console_writes_a_line_every_n_steps_into_a_log_file(tmp_path):
    """With stderr redirected to a file (nohup, a scheduler) there is no bar to redraw: plain lines, the first step's
    at once, then one every ``every_steps`` steps (or ``every_s`` seconds) and the last step's, each with the loss
    and the time left; each stage's start, and its end with its time."""
    from fx.plugins.trackers.console import ConsoleTracker

    run = types.SimpleNamespace(name="r", dir=tmp_path, max_steps=7, step=0)
    log = tmp_path / "fx.log"
    # the console's clock at each reading: the stage's start, the ETA's origin, then per step
    clock = iter([0, 0, 1, 1, 2, 3, 4, 4, 70, 70, 70, 71, 72, 72, 80])
    with log.open("w") as fh, pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stderr", fh)
        mp.setattr(time, "perf_counter", lambda: next(clock))
        console = ConsoleTracker(ConsoleTracker.Settings(every_steps=4), run)
        console.start()
        console.stage_start("train")
        for step in range(1, 8):  # seconds 1, 2, 3, 4, 70, 71, 72: step 5 is a minute after step 4's line
            console.log(step, {"loss": 3.0 - step / 10, "learning_rate": 1e-3})
        console.stage_end("train", {"steps": 7})
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("train ")]
    assert [line.split()[1] for line in lines] == ["...", "1/7", "4/7", "5/7", "7/7", "done"]
    assert "loss 2.9000" in lines[1] and "lr 1.00e-03" in lines[1] and all(" ETA " in line for line in lines[1:-1])
    assert "train done in 1 min 20 s: steps 7" in text
    assert "\r" not in text and "\x1b[" not in text  # no bar, no terminal codes in the file
    assert ConsoleTracker.Settings().every_steps == 10


def test_console_lines_reach_a_runs_redirected_stderr(tracked):
    """In a real run with stderr not a terminal, the last step's line is there (STEPS < every_steps' default)."""
    assert re.search(rf"^train {STEPS}/{STEPS}  loss \d+\.\d{{4}}", tracked.stderr, re.M)


@pytest.mark.gpu
def test_peak_vram_is_logged_every_step_and_shown_on_a_gpu(tmp_path):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    (tmp_path / "exp.toml").write_text(experiment_text(tmp_path / "runs", "[trackers.console]\n[trackers.jsonl]\n",
                                                       steps=3))
    folder, stderr = run_experiment(tmp_path / "exp.toml", plugins_with())
    vram = [m["peak_vram_gib"] for _, m in step_records(folder)]
    assert len(vram) == 3 + 2 and all(v > 0 for v in vram)  # 3 training steps and 2 held-out evaluations
    assert vram == sorted(vram)  # a peak never falls
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["peak_vram_gib"] >= vram[-1]
    assert re.search(r"peak VRAM \d+\.\d\d GiB", stderr)


def test_loss_plot_and_csv_are_written_when_training_fails(tmp_path):
    from fx.training import sft

    class Crashing(fx.QLoraMethod):
        """Trains two steps, then its third step breaks."""

        class Settings(fx.QLoraMethod.Settings, fx.training.PackingSettings):
            pass

        def trainer(self, model, tokenizer, rows, session):
            trainer = sft.trainer(self, model, tokenizer, rows, session)
            step, calls = trainer.training_step, []

            def breaking(*args, **kwargs):
                calls.append(1)
                if len(calls) == 3:
                    raise RuntimeError("out of memory (on purpose)")
                return step(*args, **kwargs)

            trainer.training_step = breaking
            return trainer

    class CrashingPlugin:
        @fx.hookimpl
        def fx_register_methods(self, register):
            register("crashing", Crashing)

    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    text = experiment_text(tmp_path / "runs", "[trackers.csv]\n").replace('name = "qlora_sft"', 'name = "crashing"')
    (tmp_path / "exp.toml").write_text(text.replace("[stages.evaluate]\n", "[stages.evaluate]\nenabled = false\n"))
    with pytest.raises(RuntimeError, match="on purpose"):
        run_experiment(tmp_path / "exp.toml", plugins_with((CrashingPlugin(), "crashing-method")))
    (folder,) = (tmp_path / "runs").iterdir()
    assert json.loads((folder / "summary.json").read_text())["status"] == "failed"
    with open(folder / "metrics.csv", newline="") as fh:
        logged = [(int(r["step"]), {k: float(r[k]) for k in ("loss", "learning_rate")}) for r in csv.DictReader(fh)]
    assert [step for step, _ in logged] == [1, 2]
    drawn = write_loss_plot(logged, tmp_path / "again.png", f"{folder.name} (failed)")
    assert drawn["train loss"] == ([1, 2], [m["loss"] for _, m in logged])
    assert (folder / "plots" / "loss.png").read_bytes() == (tmp_path / "again.png").read_bytes()
