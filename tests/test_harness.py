"""General ability through lm-evaluation-harness: fx's probe is the files its script writes; the benchmark stage
runs the probe on the tiny model before and after training into the record, the trackers and ``fx runs``; max_drop
marks a run that lost more than it allows (the stage's record, and ``fx eval --tasks``'s exit code); ``fx eval
--data --metric`` scores other rows with another metric; ``--base`` evaluates an experiment's untrained model."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_EXPERIMENT
from fx import config, harness
from fx.run.record import BenchmarkRecord, TaskScore
from fx.stages.benchmark import marked, summarise

pytest.importorskip("lm_eval")

BENCH = ["stages.benchmark.enabled=true", "stages.benchmark.limit=4"]


def test_the_probe_is_what_its_script_writes():
    spec = importlib.util.spec_from_file_location("make_probe", ROOT / "scripts" / "make_probe.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rng = random.Random(20261208)
    for name, rows in (("multiple_choice", script.multiple_choice(rng)), ("generated", script.generated(rng))):
        shipped = [json.loads(line) for line in (harness.PROBE / f"{name}.jsonl").read_text().splitlines()]
        assert shipped == rows
    assert len(script.FACTS) >= 100 and all(len(set(f[1:])) == 4 for f in script.FACTS)  # four distinct choices
    mc = [json.loads(line) for line in (harness.PROBE / "multiple_choice.jsonl").read_text().splitlines()]
    assert len(mc) + len(rows) >= 300 and {r["kind"] for r in mc} == {"fact", "arithmetic", "reading"}


def test_a_generated_answer_is_scored_by_its_words():
    from fx.harness.probe.utils import score

    assert score({"answers": ["Paris"]}, ["Paris."])["acc"] == 1.0
    assert score({"answers": ["27"]}, ["27 is the answer"])["acc"] == 1.0
    assert score({"answers": ["27"]}, ["270"])["acc"] == 0.0
    assert score({"answers": ["RIVER"], "case": True}, ["river"])["acc"] == 0.0
    assert score({"answers": ["Washington, D.C."]}, ["washington d.c"])["acc"] == 1.0


def test_unknown_tasks_are_named_with_a_close_match():
    assert harness.unknown(["fx_probe", "fx_prob"], harness.task_manager(["fx_probe"])) == [
        "unknown task 'fx_prob' (did you mean 'fx_probe'?)"]


@pytest.fixture(scope="module")
def benchmarked(train_tiny):
    return train_tiny("benchmarked", overrides=BENCH)


def test_the_benchmark_stage_records_the_probe_before_and_after_training(benchmarked, capsys):
    from fx.after.runs import row

    _, folder = benchmarked
    summary = json.loads((folder / "summary.json").read_text())
    bench = summary["benchmark"]
    assert bench["tasks"] == ["fx_probe"] and bench["limit"] == 4
    for when in ("before", "after"):
        probe = bench[when]["fx_probe"]
        assert probe["metric"] == "acc" and 0.0 <= probe["score"] <= 1.0 and probe["n"] == 8  # 4 of each subtask
        assert probe["stderr"] is not None
        assert bench[f"general_{when}"] == probe["score"]
    assert bench["drop"] == pytest.approx(bench["general_before"] - bench["general_after"], abs=1e-4)
    assert summary["stages"]["benchmark_before"]["status"] == "completed"
    history = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]
    logged = [(h["step"], h["benchmark_fx_probe"]) for h in history if "benchmark_fx_probe" in h]
    assert logged == [(0, bench["before"]["fx_probe"]["score"]), (12, bench["after"]["fx_probe"]["score"])]
    tracked = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert any("benchmark_general" in t for t in tracked)  # the jsonl tracker got them too
    assert row(folder).results["general"] == bench["general_after"]


def test_max_drop_marks_a_run_that_lost_more_than_it_allows():
    scores = {"fx_probe": TaskScore(metric="acc", score=0.7, stderr=0.02, n=400)}
    lost = {"fx_probe": TaskScore(metric="acc", score=0.5, stderr=0.02, n=400)}
    record = summarise(BenchmarkRecord(tasks=["fx_probe"], max_drop=0.1, before=scores, after=lost))
    assert record.over and record.drop == pytest.approx(0.2)
    assert marked(record) == "general: 0.700 -> 0.500 (-29%); the drop of 0.200 exceeds max_drop 0.1"
    assert summarise(record.model_copy(update={"max_drop": 0.25})).over is False


def fx(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fx.cli", *args], capture_output=True, text=True, timeout=900)


def test_fx_eval_tasks_exits_1_when_the_run_fell_more_than_max_drop(benchmarked):
    exp, folder = benchmarked
    summary = json.loads((folder / "summary.json").read_text())
    summary["benchmark"]["general_before"] = 1.0  # as though the model had answered everything before
    (folder / "summary.json").write_text(json.dumps(summary))
    try:
        done = fx("eval", str(folder), "--tasks", "fx_probe", "--limit", "4", "--max-drop", "0.05")
        assert done.returncode == 1, done.stderr
        out = json.loads(done.stdout)
        assert out["general_before"] == 1.0 and out["drop"] == pytest.approx(1.0 - out["general"], abs=1e-4)
        assert "more than max_drop 0.05" in done.stderr
        unknown = fx("eval", str(folder), "--tasks", "fx_prob")
        assert unknown.returncode == 2 and "did you mean 'fx_probe'" in unknown.stderr
    finally:
        summary["benchmark"]["general_before"] = summary["benchmark"]["before"]["fx_probe"]["score"]
        (folder / "summary.json").write_text(json.dumps(summary))


def test_fx_eval_data_scores_rows_with_another_metric_and_the_base_without_a_run(benchmarked, tmp_path):
    exp, folder = benchmarked
    rows = tmp_path / "plain.jsonl"  # no expect: the run's contains metric can't score them
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                                     {"role": "assistant", "content": f"{i}"}]}) + "\n"
                            for i in range(3)))
    refused = fx("eval", str(folder), "--data", str(rows))
    assert refused.returncode == 2 and "--metric none" in refused.stderr
    scored = fx("eval", str(folder), "--data", str(rows), "--metric", "none")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["rows"] == 3 and "loss" in json.loads(scored.stdout)["metrics"]
    base = fx("eval", str(exp.path), "--base", "--data", str(rows), "--metric", "none")
    assert base.returncode == 0, base.stderr
    assert json.loads(base.stdout)["model"] == "base, untrained"
    said = fx("generate", str(exp.path), "--base", "--prompt", "What is 2 + 2?", "--max-new-tokens", "3")
    assert said.returncode == 0 and said.stdout.strip(), said.stderr


def test_a_benchmark_of_an_unknown_task_is_refused_before_training(write_experiment):
    from fx.stages.order import declared, preflight

    exp = config.load(write_experiment(TINY_EXPERIMENT, []), ["stages.benchmark.enabled=true",
                                                             'stages.benchmark.tasks=["fx_probe", "arc_eazy"]'])
    with pytest.raises(Exception, match="stages.benchmark: unknown task 'arc_eazy' \\(did you mean 'arc_easy'"):
        preflight(exp, declared(exp))
