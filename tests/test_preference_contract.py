"""The method contract for a third party's preference method: the complete package of docs/plugins.md ("A complete
example: a preference method"), built and installed as a user would, trains on preference pairs with the pieces fx
gives (tokenize_preferences, preference_metrics, paired_trainer), is refused answer rows before anything loads,
resumes a stopped run to the uninterrupted adapter, and rehearses the out-of-memory report with
FX_SIMULATE_OOM_AT_STEP."""

from __future__ import annotations

import json
import re

import pytest

from conftest import (
    GUIDE_PREFERENCE,
    PREF_ROWS,
    TINY_EXPERIMENT,
    TINY_ROWS,
    assert_stopped_run_resumes_to_the_uninterrupted_adapter,
    guide_files,
    importable,
    install_package,
)
from fx import cli
from fx.hooks import manager

pytestmark = pytest.mark.slow

EXPERIMENT = (TINY_EXPERIMENT.replace('name = "qlora_sft"', 'name = "slic"\ndelta = 2.0')
              .replace("max_steps = 12", "max_steps = 8"))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return install_package(guide_files(*GUIDE_PREFERENCE), tmp_path_factory.mktemp("fx-slic"))


@pytest.fixture
def installed(site, monkeypatch):
    return importable(site, monkeypatch)


def run(*args: str) -> int:
    manager.get.cache_clear()
    return cli.main(["run", *args])


def test_the_guide_preference_method_trains_on_pairs(installed, write_experiment, tmp_path):
    path = write_experiment(EXPERIMENT, PREF_ROWS)
    assert run(str(path), "--set", "stages.generate.enabled=false") == 0
    (folder,) = (tmp_path / "runs").iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    assert summary["status"] == "completed" and summary["steps"] == 8 and summary["method"] == "slic"
    assert after["logp_margin"] > before["logp_margin"] and after["chosen_loss"] < before["chosen_loss"]
    records = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "rewards/margins" in r] == list(range(1, 9))  # trl's own metrics


def test_the_guide_preference_method_is_refused_answer_rows(installed, write_experiment, capsys):
    path = write_experiment(EXPERIMENT, TINY_ROWS)
    assert run(str(path)) == 2
    assert "method 'slic' trains on preference pairs" in capsys.readouterr().err


def test_a_stopped_run_of_the_guide_preference_method_resumes_to_the_uninterrupted_adapter(
        installed, write_experiment, tmp_path, register_plugin):
    assert_stopped_run_resumes_to_the_uninterrupted_adapter(write_experiment(EXPERIMENT, PREF_ROWS), tmp_path,
                                                            register_plugin)


def test_the_out_of_memory_report_is_rehearsed_with_an_environment_variable(installed, write_experiment, tmp_path,
                                                                             monkeypatch, capsys):
    path = write_experiment(EXPERIMENT, PREF_ROWS)
    sets = ["--set", "stages.generate.enabled=false", "--set", "stages.evaluate.enabled=false",
            "--set", "checkpoints.every_steps=1"]
    with monkeypatch.context() as rehearsal:
        rehearsal.setenv("FX_SIMULATE_OOM_AT_STEP", "3")
        assert run(str(path), *sets) == 1
    err = capsys.readouterr().err
    (folder,) = (tmp_path / "runs").iterdir()
    assert "out of GPU memory at step 3" in err and "The last checkpoint (step 2) is intact" in err
    assert json.loads((folder / "summary.json").read_text())["status"] == "out_of_memory"
    command = re.search(r"fx run --resume \S+ --set method\.gradient_checkpointing=true", err).group(0)
    assert run(*command.split()[2:]) == 0
    assert json.loads((folder / "summary.json").read_text())["steps"] == 8
    monkeypatch.setenv("FX_SIMULATE_OOM_AT_STEP", "soon")
    assert run(str(path), *sets) == 2
    assert "FX_SIMULATE_OOM_AT_STEP='soon': give the optimizer step" in capsys.readouterr().err
    assert list((tmp_path / "runs").iterdir()) == [folder]  # refused before a run folder was made
