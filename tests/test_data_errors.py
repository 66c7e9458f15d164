"""Data files a user gives that are wrong: each ends with exit 2 and a line naming the file (and row), never a
traceback; text from a dataset never reaches the terminal as escape codes; nothing is cached outside fx's cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_EXPERIMENT, TINY_ROWS
from fx.cli import main

# the tokenizer comes from the `random` source, so these run without the hub and without training


def fx_data(path: Path, capsys, *extra) -> tuple[int, str, str]:
    code = main(["data", str(path), "--examples", "1", *extra])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"),
    (b"\xff\xfe\x00garbage\x80\x81\n", "line 1: not a JSON object"),
    (b'{"messages": [{"role": "user", "content": "hi"}]\n', "cannot read"),  # a truncated row
    (b"null\n", "line 1: not a JSON object"),  # pyarrow's reader dies of a segmentation fault on these
    (b'{"prompt": "a", "completion": "b"}\n\n7\n', "line 3: not a JSON object"),
])
def test_a_bad_data_file_is_named_with_exit_2(write_experiment, tmp_path, capsys, content, expected):
    path = write_experiment(TINY_EXPERIMENT)
    (tmp_path / "rows.jsonl").write_bytes(content)
    code, _, err = fx_data(path, capsys)
    assert code == 2, err
    assert expected in err and "rows.jsonl" in err and "Traceback" not in err


def test_a_bad_row_names_the_file_and_the_row(write_experiment, tmp_path, capsys):
    rows = TINY_ROWS[:5] + [{"messages": [{"role": "user", "content": "no answer"}]}] + TINY_ROWS[5:]
    path = write_experiment(TINY_EXPERIMENT, rows)
    code, _, err = fx_data(path, capsys)
    assert code == 2, err
    assert str(tmp_path / "rows.jsonl") in err and "data.path" in err and "row 6" in err


def test_a_nul_in_a_data_path_is_refused(write_experiment, capsys):
    path = write_experiment(TINY_EXPERIMENT.replace('path = "rows.jsonl"', 'path = "rows\\u0000.jsonl"'), TINY_ROWS)
    assert main(["validate", str(path)]) == 2
    assert "NUL" in capsys.readouterr().err


def test_tilde_in_a_data_path_is_the_home_folder(write_experiment, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    (home / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    path = write_experiment(TINY_EXPERIMENT.replace('path = "rows.jsonl"', 'path = "~/mine.jsonl"'))
    code, out, err = fx_data(path, capsys, "--png", str(tmp_path / "l.png"))
    assert code == 0, err
    assert not (tmp_path / "~").exists()


def test_dataset_text_never_reaches_the_terminal_as_escape_codes(write_experiment, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": f"red \x1b[31mALERT\x1b[0m \x1b]0;title\x07 {k}"},
                          {"role": "assistant", "content": "ok\r"}]} for k in range(20)]
    path = write_experiment(TINY_EXPERIMENT, rows)
    code, out, err = fx_data(path, capsys, "--png", str(tmp_path / "l.png"))
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\\x1b[31mALERT" in out


def test_png_at_a_folder_is_refused_before_any_work(write_experiment, tmp_path, capsys):
    path = write_experiment(TINY_EXPERIMENT, TINY_ROWS)
    code, _, err = fx_data(path, capsys, "--png", str(tmp_path))
    assert code == 2 and "is a folder" in err and "Traceback" not in err


def test_reading_a_data_file_leaves_no_copy_in_the_home_cache(write_experiment, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("FX_CACHE", str(tmp_path / "fxcache"))
    path = write_experiment(TINY_EXPERIMENT, TINY_ROWS)
    code, _, err = fx_data(path, capsys, "--png", str(tmp_path / "l.png"))
    assert code == 0, err
    assert not list(home.rglob("*.arrow")) and not list((tmp_path / "fxcache").rglob("*.arrow"))


def test_an_expect_column_of_strings_and_lists_keeps_every_string(write_experiment, tmp_path, capsys):
    """datasets' JSON reader stores a column that mixes strings and lists as JSON and decodes a string that looks
    like JSON into another type ("84" into 84, "true" into True): the file is read back exactly, a plain string
    taken as a one-string list."""
    rows = [{**r, "expect": r["expect"] if i % 2 else r["expect"][0]} for i, r in enumerate(TINY_ROWS)]
    rows[0]["expect"], rows[2]["expect"] = "true", "[1]"
    path = write_experiment(TINY_EXPERIMENT, rows)
    from fx import config
    from fx.data.formats import expected
    from fx.data.prepare import load_examples

    train, held = load_examples(config.load(path))
    got = {e.messages[0]["content"]: expected(e) for e in train + held}
    want = {r["messages"][0]["content"]: r["expect"] if isinstance(r["expect"], list) else [r["expect"]] for r in rows}
    assert got == want
    code, _, err = fx_data(path, capsys)
    assert code == 0, err
