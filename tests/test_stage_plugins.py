"""Stages as plugins, proved on a third party's stage: the complete package of docs/plugins.md ("Writing a stage"),
built and installed as a user would, runs after the held-out evaluation with its own validated settings, and its
result reaches the run's summary, every tracker and ``fx runs`` with no change to fx. Also: the declared list's
order and its generated docs, wrapping a stage, and a stage placed nowhere."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest

import fx
from conftest import GUIDE_STAGE, ROOT, TINY_EXPERIMENT, TINY_ROWS, guide_files, importable, install_package
from fx import cli, config
from fx.errors import PluginError
from fx.stages.builtin import BUILTIN
from fx.stages.order import declared, describe

pytestmark = pytest.mark.slow

GUIDE = (ROOT / "docs" / "plugins.md").read_text()
TRACKERS = "[trackers.console]\n[trackers.jsonl]\n[trackers.csv]\n[trackers.tensorboard]\n[trackers.mlflow]\n"
STAGE = "\n[stages.starts_with]\nenabled = true\nmax_examples = 4\n"
QUIET = ["--set", "stages.generate.enabled=false", "--set", "method.max_steps=4"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The guide's package, built and installed into a folder of its own."""
    return install_package(guide_files(*GUIDE_STAGE), tmp_path_factory.mktemp("fx-startswith"))


@pytest.fixture
def installed(site, monkeypatch):
    return importable(site, monkeypatch)


@pytest.fixture(scope="module")
def staged(site, tmp_path_factory):
    """The tiny experiment with the guide's stage on, watched by every built-in tracker: (output dir, run folder,
    what the console printed)."""
    root = tmp_path_factory.mktemp("staged")
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    path = root / "exp.toml"
    path.write_text(TINY_EXPERIMENT.replace("{out}", str(root / "runs")).replace("[trackers.jsonl]\n", TRACKERS)
                    + STAGE)
    out = subprocess.run([sys.executable, "-m", "fx.cli", "run", str(path), *QUIET], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    (folder,) = (p for p in (root / "runs").iterdir() if (p / "config.toml").is_file())
    return root / "runs", folder, out.stderr


def test_the_guide_stage_is_found_through_its_entry_point(installed):
    out = subprocess.run([sys.executable, "-m", "fx.cli", "plugins", "--json"], capture_output=True, text=True)
    plugins = {p["name"]: p for p in json.loads(out.stdout)}
    assert plugins["startswith"]["registers"] == ["stage:starts_with"]
    assert plugins["startswith"]["hooks"] == ["fx_register_stages"]


def test_the_guide_stage_runs_after_evaluate_and_its_result_is_in_the_summary(staged):
    _, folder, _ = staged
    summary = json.loads((folder / "summary.json").read_text())
    stages = list(summary["stages"])
    assert stages[stages.index("evaluate_after") + 1] == "starts_with"
    assert summary["stages"]["starts_with"]["status"] == "completed"
    result = summary["results"]["starts_with"]
    assert result["scored"] == 4 and 0.0 <= result["share"] <= 1.0


def test_the_guide_stage_result_reaches_every_tracker(staged):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, folder, console = staged
    share = json.loads((folder / "summary.json").read_text())["results"]["starts_with"]["share"]
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("starts_with_share") == share and r.get("step") == 4 for r in records)
    assert any(r.get("stage") == "starts_with" and r.get("scored") == 4 for r in records)
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    assert [float(r["starts_with_share"]) for r in rows if r["starts_with_share"]] == [share]
    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/starts_with_share")] == [(4, pytest.approx(share))]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "starts_with_share")] == [
        (4, pytest.approx(share))]
    assert re.search(rf"starts_with done in [\d.]+ s: share {share:g}, scored 4", console)
    history = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]
    assert any(r.get("starts_with_share") == share for r in history)  # core's record, whatever the trackers


def test_the_guide_stage_result_is_a_column_of_fx_runs(staged, capsys):
    out, folder, _ = staged
    share = json.loads((folder / "summary.json").read_text())["results"]["starts_with"]["share"]
    assert cli.main(["runs", str(out)]) == 0
    table = capsys.readouterr().out
    assert "starts_with.share" in table and "starts_with.scored" in table
    (row,) = [line.split() for line in table.splitlines() if line.split()[:1] == [folder.name]]
    assert f"{share:.4g}" in row and "4" in row


def test_the_stage_settings_are_validated_like_every_section(installed, write_experiment, capsys):
    path = write_experiment(TINY_EXPERIMENT + "\n[stages.starts_with]\nenabled = true\nmax_exampels = 3\n"
                            "\n[stages.startswith]\n", TINY_ROWS)
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stages.starts_with.max_exampels: unknown key; did you mean 'max_examples'?" in err
    assert "stages.startswith: unknown stage; did you mean 'starts_with'?" in err


def test_a_disabled_stage_is_left_out_and_its_settings_are_in_the_resolved_config(installed, write_experiment):
    exp = config.load(write_experiment(TINY_EXPERIMENT, TINY_ROWS))
    assert exp.resolved()["stages"]["starts_with"] == {"enabled": False, "max_examples": 16}
    names = [s.name for s in declared(exp)]
    assert names[names.index("evaluate_after") + 1] == "starts_with"


def test_the_docs_table_of_stages_is_generated_from_the_declared_list():
    start, end = "<!-- stages:start -->", "<!-- stages:end -->"
    block = GUIDE[GUIDE.index(start) + len(start):GUIDE.index(end)]
    assert block.strip() == describe(), ("docs/plugins.md's table of stages is out of date: paste the output of "
                                         "python -c 'from fx.stages.order import describe; print(describe())'")
    assert [s.name for s in BUILTIN] == ["load", "evaluate_before", "benchmark_before", "generate_before", "train",
                                         "save", "evaluate_after", "benchmark_after", "generate_after", "merge",
                                         "export"]


def test_a_stage_placed_nowhere_is_refused_naming_its_plugin(register_stage, write_experiment, capsys):
    class Lost(fx.Stage):
        after = "evaluate_later"

        def run(self, ctx):
            return {}

    register_stage("lost", Lost, "lost-stage")
    exp = config.load(write_experiment(TINY_EXPERIMENT, TINY_ROWS))
    with pytest.raises(PluginError, match="plugin 'lost-stage' places stage 'lost' after 'evaluate_later', which is "
                                          "no stage"):
        declared(exp)


def test_a_wrapper_sees_every_stage_and_a_tryfirst_implementation_runs_one_its_way(register_plugin,
                                                                                     write_experiment):
    """``fx_stage_run`` wraps every stage (its result passes through), and a ``tryfirst`` implementation that
    returns a dict runs a stage in fx's place: here the generate stages, whose samples.md is then never written."""
    seen = []

    class Plugin:
        @fx.hookimpl(wrapper=True)
        def fx_stage_run(self, stage, context):
            result = yield
            seen.append((stage.name, sorted(result)))
            return result

    class Instead:
        @fx.hookimpl(tryfirst=True)
        def fx_stage_run(self, stage, context):
            return {"replaced": True} if stage.name.startswith("generate") else None

    plugins = register_plugin(Instead(), "instead")
    plugins.pm.register(Plugin(), name="wrapper")
    exp = config.load(write_experiment(TINY_EXPERIMENT, TINY_ROWS), ["method.max_steps=2"])
    from fx import pipeline

    folder = pipeline.execute(exp, plugins)
    assert [name for name, _ in seen] == ["load", "evaluate_before", "generate_before", "train", "save",
                                          "evaluate_after", "generate_after"]
    assert dict(seen)["generate_before"] == ["replaced"] and "loss" in dict(seen)["evaluate_after"]
    assert not (folder / "samples.md").exists()


def test_a_stage_without_run_is_refused_naming_its_plugin(register_stage, write_experiment):
    class Idle(fx.Stage):
        after = "train"

    register_stage("idle", Idle, "idle-stage")
    exp = config.load(write_experiment(TINY_EXPERIMENT, TINY_ROWS))
    with pytest.raises(PluginError, match="plugin 'idle-stage' registered stage 'idle', which can't be made: .*run"):
        declared(exp)
