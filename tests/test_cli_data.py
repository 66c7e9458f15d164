"""``fx data``: rendered examples with the loss marked, length statistics that match training's, a histogram."""

from __future__ import annotations

import statistics

import pytest
from rich.console import Console

from conftest import ROOT, TINY_EXPERIMENT, TINY_ROWS
from fx import config
from fx.cli import main
from fx.data import report as datareport
from fx.data.prepare import load_examples
from fx.data.tokenize import tokenize


def test_fx_data_on_the_shipped_experiment(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    png = tmp_path / "out" / "quill.png"
    assert main(["data", str(ROOT / "experiments" / "smollm2_qlora.toml"), "--examples", "1", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n⟦I'm Quill" in out
    assert "<|im_end|>⟧" in out
    assert "210 rendered rows: min" in out and "truncated at data.max_length = 256: 0 of 210 rows" in out
    assert png.read_bytes().startswith(b"\x89PNG")
    assert not list(tmp_path.glob("out/.*.tmp"))


PREFERENCE_BENCHES = ("dpo_bench", "orpo_bench", "simpo_bench", "kto_bench")  # 1,000 synthetic pairs to tokenize


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow)
                                  if any(b in p.name for b in PREFERENCE_BENCHES) else p
                                  for p in sorted((ROOT / "experiments").glob("*.toml"))], ids=lambda p: p.name)
def test_fx_data_on_every_shipped_experiment(path, tmp_path, capsys):
    raw = config.read_toml(path)
    if raw["model"]["source"] == "hf" or raw["data"]["source"] == "hub":
        pytest.skip("its model or data come from the Hugging Face hub, which tests don't reach")
    png = tmp_path / "lengths.png"
    assert main(["data", str(path), "--examples", "1", "--png", str(png)]) == 0
    assert "⟧" in capsys.readouterr().out and png.read_bytes().startswith(b"\x89PNG")


def test_fx_data_of_a_random_architecture_writes_its_tokenizer_not_its_weights(tmp_path, monkeypatch, capsys):
    """llama2-70b's random weights are 129 GiB: looking at the data must not make them."""
    from fx.plugins.models.random import RandomModel

    def write(self, folder):
        raise AssertionError(f"fx data wrote the weights {folder}")

    monkeypatch.setattr(RandomModel, "_write", write)
    path = ROOT / "experiments" / "llama2_70b_fsdp.toml"
    assert main(["data", str(path), "--examples", "1", "--png", str(tmp_path / "lengths.png")]) == 0
    assert "⟧" in capsys.readouterr().out


def test_stats_match_what_training_sees(write_experiment, tmp_path, capsys):
    """Truncation and dropped-row counts are the ones tokenization for training produces."""
    path = write_experiment(TINY_EXPERIMENT.replace("max_length = 64", "max_length = 24"), TINY_ROWS)
    exp = config.load(path)
    report = datareport.build(exp, 2, None)
    train, held = load_examples(exp)
    tokenizer = exp.model.cls(exp.model.settings).tokenizer()
    tokenized = tokenize(train + held, exp.template.cls(exp.template.settings, tokenizer), tokenizer, 24)
    s = report.stats
    assert (s.rows, s.truncated, s.unanswered) == (len(TINY_ROWS), tokenized.truncated, tokenized.dropped)
    assert s.truncated > 0
    assert (s.min, s.median, s.max) == (min(tokenized.lengths), statistics.median(tokenized.lengths),
                                        max(tokenized.lengths))
    assert report.histogram == tmp_path / "runs" / "tiny-lengths.png" and report.histogram.is_file()
    label, pieces, cut = report.examples[0]
    assert cut and label == "train example 1"
    datareport.show(exp, report, Console(soft_wrap=True))
    assert "truncated at data.max_length = 24" in capsys.readouterr().out


DPO = TINY_EXPERIMENT.replace('name = "qlora_sft"', 'name = "dpo"')


def test_fx_data_shows_both_answers_of_a_preference_pair(write_experiment, tmp_path, capsys):
    pairs = [{"prompt": f"What is {a}+1?", "chosen": str(a + 1), "rejected": str(a)} for a in range(8)]
    path = write_experiment(DPO, pairs)
    assert main(["data", str(path), "--examples", "1", "--png", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "train example 1 (chosen)" in out and "train example 1 (rejected)" in out
    assert "[/INST]⟦ 1 " in out and "[/INST]⟦ 0 " in out  # each answer carries the loss, after the prompt
    assert "preference pairs" in out and "8 pairs (prompt + the longer answer)" in out


def test_fx_data_on_pairs_counts_what_the_preference_method_cuts_and_drops(write_experiment, tmp_path, capsys):
    """A prompt longer than data.max_length is dropped by a plain cut, but kept (its end) under the method's own
    method.max_prompt_length: fx data reports what the run will train on, not what a plain cut would do."""
    from fx.data.prepare import prepare

    long = " ".join(["word"] * 60)
    pairs = [{"prompt": f"{long} What is {a}+1?", "chosen": str(a + 1), "rejected": str(a)} for a in range(8)]
    path = write_experiment(DPO.replace("max_length = 64", "max_length = 32")
                            .replace("[method.lora]", "max_prompt_length = 24\n\n[method.lora]"), pairs)
    report = datareport.build(config.load(path), 1, tmp_path / "h.png")
    prep = prepare(config.load(path, ['stages.evaluate.metric="none"']))
    assert report.stats.unanswered == prep.train.dropped + prep.held_out.dropped == 0
    assert report.stats.truncated == prep.train.truncated + prep.held_out.truncated == 8
    assert main(["data", str(path), "--png", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "method.max_prompt_length = 24: 8 of 8 rows" in out and "would be dropped" not in out
    without = path.read_text().replace("max_prompt_length = 24\n", "")
    path.write_text(without)
    assert datareport.build(config.load(path), 1, tmp_path / "h.png").stats.unanswered == 8  # no room for answers


def test_fx_data_refuses_pairs_for_a_method_that_trains_on_answers(write_experiment, capsys):
    pairs = [{"prompt": f"What is {a}+1?", "chosen": str(a + 1), "rejected": str(a)} for a in range(8)]
    assert main(["data", str(write_experiment(TINY_EXPERIMENT, pairs))]) == 2
    assert "method 'qlora_sft' trains on one answer per row" in capsys.readouterr().err


def test_fx_data_names_malformed_rows(write_experiment, capsys):
    bad = [dict(r) for r in TINY_ROWS]
    bad[3] = {"messages": [{"role": "user", "content": "hi"}], "expect": []}
    bad[9] = {"messages": [{"role": "robot", "content": "hi"}], "expect": []}
    assert main(["data", str(write_experiment(TINY_EXPERIMENT, bad))]) == 2
    err = capsys.readouterr().err
    assert "2 row(s) don't fit the 'messages' format" in err
    assert "row 4: the last message must be the assistant's answer" in err
    assert "row 10: messages[0] must have a 'role'" in err
