"""What a user gives the command line that is wrong ends with exit 2 and a line saying what, never a traceback:
budgets that aren't numbers, a data file that plugins' own check() finds missing, an output folder that can't be
made, an OS error on a user's file; ``~`` in an output folder is the home folder."""

from __future__ import annotations

import pytest

from conftest import TINY_EXPERIMENT, TINY_ROWS
from fx import config
from fx.cli import main


@pytest.mark.parametrize("budget", ["abc", "nan", "inf", "-3", "0", ""])
def test_a_budget_that_is_not_a_gpu_or_a_size_is_refused(tiny_experiment, capsys, budget):
    with pytest.raises(SystemExit) as exit:
        main(["plan", str(tiny_experiment), "--budget", budget])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "a number of GiB" in err and "Traceback" not in err
    assert "nan GiB" not in err


def test_validate_runs_each_plugins_own_check(write_experiment, capsys):
    path = write_experiment(TINY_EXPERIMENT)  # no rows.jsonl written
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "data.path: no such file 'rows.jsonl'" in err


def test_validate_passes_a_good_file(tiny_experiment, capsys):
    assert main(["validate", str(tiny_experiment)]) == 0
    assert "ok" in capsys.readouterr().out


def test_an_output_dir_that_is_a_file_is_refused(write_experiment, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file, not a folder")
    path = write_experiment(TINY_EXPERIMENT, TINY_ROWS)
    assert main(["run", str(path), "--set", f"experiment.output_dir={tmp_path / 'taken'}"]) == 2
    err = capsys.readouterr().err
    assert "experiment.output_dir: cannot make a run folder" in err and "Traceback" not in err
    assert (tmp_path / "taken").read_text() == "a file, not a folder"


def test_tilde_in_output_dir_is_the_home_folder(tiny_experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    exp = config.load(tiny_experiment, ["experiment.output_dir=~/runs"])
    assert exp.experiment.output_dir == str(tmp_path / "home" / "runs")


def test_a_nul_in_output_dir_is_refused(tiny_experiment, capsys):
    assert main(["validate", str(tiny_experiment), "--set", 'experiment.output_dir="a\\u0000b"']) == 2
    assert "NUL" in capsys.readouterr().err


def test_an_os_error_on_a_users_file_is_one_line(tiny_experiment, capsys, monkeypatch):
    from fx import cli

    def full(args):
        raise OSError(28, "No space left on device", "/data/runs/x/adapter")

    monkeypatch.setattr(cli, "cmd_validate", full)
    assert main(["validate", str(tiny_experiment)]) == 2
    assert capsys.readouterr().err == "fx: error: /data/runs/x/adapter: No space left on device\n"
