"""Bad input ends with exit code 2, a short message naming what and where, no traceback and no run directory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import TINY_EXPERIMENT, TINY_ROWS


def fx(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fx.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def assert_refused(out, *needles):
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) <= 12


CASES = {
    "wrong type": ("method.micro_batch_size", '[method]\nmicro_batch_size = "four"', None),
    "unknown key": ("did you mean 'learning_rate'", "[method]\nlearning_rat = 0.1", None),
    "unknown plugin": ("unknown template 'lama2'; did you mean 'llama2'", '[template]\nname = "lama2"', None),
}


def _edit(base: str, patch: str) -> str:
    """Replace keys of one section of the tiny experiment with the patch's."""
    section, line = patch.split("\n", 1)
    key = line.split("=")[0].strip()
    lines = base.splitlines()
    start = lines.index(section)
    lines.insert(start + 1, line)
    return "\n".join(other for i, other in enumerate(lines)
                     if not (i > start + 1 and other.split("=")[0].strip() == key and other != line))


@pytest.mark.parametrize("case", CASES)
def test_config_mistakes_exit_2(case, write_experiment, tmp_path):
    needle, patch, _ = CASES[case]
    path = write_experiment(_edit(TINY_EXPERIMENT, patch), TINY_ROWS)
    out = fx("run", str(path))
    assert_refused(out, needle, str(path))
    assert not (tmp_path / "runs").exists()


def test_missing_data_file(write_experiment, tmp_path):
    path = write_experiment(TINY_EXPERIMENT)
    out = fx("run", str(path))
    assert_refused(out, "data.path: no such file 'rows.jsonl'")
    assert not (tmp_path / "runs").exists()


def test_malformed_toml(write_experiment, tmp_path):
    path = write_experiment("[experiment\nname = 'x'\n")
    assert_refused(fx("run", str(path)), "not valid TOML", "line 1")


def test_missing_experiment_file(tmp_path):
    assert_refused(fx("run", str(tmp_path / "nope.toml")), "no such experiment file")


def test_unreadable_rows_are_listed_by_number(write_experiment, tmp_path):
    rows = list(TINY_ROWS)
    rows[2] = {"messages": [{"role": "user", "content": "hi"}]}
    rows[5] = {"messages": "not a list"}
    path = write_experiment(TINY_EXPERIMENT, rows)
    out = fx("run", str(path))
    assert_refused(out, "2 row(s) don't fit the 'messages' format",
                   "row 3: the last message must be the assistant's answer",
                   "row 6: 'messages' must be a non-empty list")
    assert not (tmp_path / "runs").exists()


def test_validate_reports_every_file(write_experiment, tmp_path):
    good = write_experiment(TINY_EXPERIMENT, TINY_ROWS, name="good.toml")
    bad = write_experiment(TINY_EXPERIMENT.replace('name = "qlora_sft"', 'name = "qlora"'), name="bad.toml")
    out = fx("validate", str(good), str(bad))
    assert_refused(out, f"{bad}: method.name: unknown method 'qlora'; did you mean 'qlora_sft'?")
    assert f"{good}: ok" in out.stdout


def test_contains_without_an_expect_column_is_refused_before_the_run(write_experiment, tmp_path):
    """metric = "contains" scores each held-out answer against its row's expect strings: rows without them would
    measure nothing, and the run would say it measured contains."""
    rows = [{"messages": r["messages"]} for r in TINY_ROWS]
    out = fx("run", str(write_experiment(TINY_EXPERIMENT, rows)))
    assert_refused(out, "stages.evaluate.metric = 'contains' scores each answer against its row's 'expect' column",
                   "add an 'expect' column to them (docs/data.md) or set stages.evaluate.metric to 'exact_match' or "
                   "'none'")
    assert not (tmp_path / "runs").exists()


def test_malformed_expect_is_refused_by_row(write_experiment, tmp_path):
    rows = [{**r, "expect": [int(r["expect"][0])]} for r in TINY_ROWS]  # numbers, not strings
    out = fx("run", str(write_experiment(TINY_EXPERIMENT, rows)))
    assert_refused(out, "held-out row 1: 'expect' must be a non-empty string or a list of non-empty strings, not [")
    assert not (tmp_path / "runs").exists()
