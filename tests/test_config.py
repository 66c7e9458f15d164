"""Experiment files: every shipped one validates; every problem is reported at once, with file and key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY_EXPERIMENT
from fx import config
from fx.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "experiments").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_experiment_validates(path):
    exp = config.load(path)
    assert exp.experiment.name
    first = path.read_text().lstrip().splitlines()[0]
    assert first.startswith("#"), "each experiment file opens with a comment saying what it does"
    text = path.read_text()
    assert f"fx run experiments/{path.name}" in text or f"fx bench experiments/{path.name}" in text, \
        "and the exact command that runs it"


def test_defaults_are_filled_in_the_resolved_config(tiny_experiment):
    resolved = config.load(tiny_experiment).resolved()
    assert resolved["method"]["quant_type"] == "nf4"
    assert resolved["method"]["lora"]["r"] == 8
    assert resolved["data"]["format"] == "auto"
    assert resolved["stages"]["evaluate"]["metric"] == "contains"


def test_every_problem_is_reported_at_once(write_experiment):
    path = write_experiment("""
        [experiment]
        name = "x"
        seeed = 1
        [model]
        source = "randm"
        [data]
        source = "file"
        path = "rows.jsonl"
        max_length = "long"
        [method]
        name = "qlora_sft"
        micro_batch_size = -4
        [method.lora]
        rank = 8
        [trackers.consle]
        [stagez]
    """.replace("        ", ""))
    with pytest.raises(ConfigError) as err:
        config.load(path)
    problems = err.value.problems
    text = "\n".join(problems)
    assert all(p.startswith(str(path)) for p in problems)
    assert "experiment.seeed: unknown key; did you mean 'seed'?" in text
    assert "model.source: unknown model 'randm'; did you mean 'random'?" in text
    assert "data.max_length: input should be a valid integer" in text
    assert "method.micro_batch_size: input should be greater than or equal to 1" in text
    assert "method.lora.rank: unknown key" in text
    assert "trackers.consle: unknown tracker; did you mean 'console'?" in text
    assert "stagez: unknown section; did you mean 'stages'?" in text
    assert len(problems) == 7


def test_set_overrides_any_key(tiny_experiment):
    exp = config.load(tiny_experiment, ["method.max_steps=3", "method.lora.r=4", "template.system_prompt=Be brief."])
    assert exp.method.settings.max_steps == 3
    assert exp.method.settings.lora.r == 4
    assert exp.template.settings.system_prompt == "Be brief."


def test_set_with_wrong_type_is_a_config_error(tiny_experiment):
    with pytest.raises(ConfigError, match="^--set 'method.max_steps=many': input should be a valid integer"):
        config.load(tiny_experiment, ["method.max_steps=many"])  # blamed on the --set, not on the file


def test_malformed_set_is_refused(tiny_experiment):
    with pytest.raises(UserError, match="expected KEY.PATH=VALUE"):
        config.load(tiny_experiment, ["method.max_steps"])


def test_strings_are_not_coerced_to_numbers(tiny_experiment):
    with pytest.raises(ConfigError, match="method.learning_rate"):
        config.load(tiny_experiment, ['method.learning_rate="0.1"'])


def test_a_run_that_would_train_nothing_is_refused(tiny_experiment):
    with pytest.raises(ConfigError, match="max_steps=0': value error, 0 steps train nothing: give a number of "
                                          "steps, or -1 to train for `epochs`"):
        config.load(tiny_experiment, ["method.max_steps=0"])


def test_a_toml_file_that_is_not_utf8_is_refused_naming_its_line(write_experiment):
    path = write_experiment(TINY_EXPERIMENT)
    text = path.read_bytes()
    path.write_bytes(text.replace(b'system_prompt = "Answer with a number."', b'system_prompt = "R\xe9ponds."'))
    line = text[:text.index(b"system_prompt")].count(b"\n") + 1
    with pytest.raises(UserError, match=f"not valid TOML: line {line}, column 19: not UTF-8 \\(byte 0xe9\\); save "
                                        "the file as UTF-8"):
        config.load(path)


def test_cpu_threads_leave_the_cores_other_work_keeps_busy(monkeypatch):
    """On a 2-core machine with one core busy elsewhere torch gets one thread (two spin against each other); an
    idle machine keeps one per core, and OMP_NUM_THREADS set by the user is left alone."""
    import os

    import psutil
    import torch

    from fx.training.devices import choose_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(psutil, "cpu_percent", lambda interval: 55.0)
        assert choose_threads() == "1 CPU thread: 1.1 of 2 cores are busy with other work (OMP_NUM_THREADS=N chooses)"
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(psutil, "cpu_percent", lambda interval: 3.0)
        assert choose_threads() is None and torch.get_num_threads() == 2
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setattr(psutil, "cpu_percent", lambda interval: 0.0)
        assert choose_threads() is None and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
