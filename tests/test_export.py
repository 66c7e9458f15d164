"""``fx export`` and the export stage on the tiny Llama: GGUF read back by transformers' own GGUF reader (tensor
names, layout, tokenizer, chat template), the Modelfile's Go template rendered as Ollama renders it, the check after
every export, and bad input refused with nothing written."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from conftest import StageObserver, logits
from fx import cli
from fx.after import export_check, gguf_file, inference
from fx.data.ollama import Wrapping, probe
from fx.errors import UserError
from fx.hooks import manager
from fx.plugins.templates.llama2 import CHAT_TEMPLATE as LLAMA2_JINJA
from fx.plugins.templates.native import Native
from gotemplate import ollama_prompt

BUILT_INS = ["llama2", "alpaca", "vicuna", "chatml", "native", "raw"]
TWO_TURNS = [{"role": "user", "content": "What is 1 plus 2?"}, {"role": "assistant", "content": "3"},
             {"role": "user", "content": "And \"2 plus 2\"?\nSay it."}]


def gguf_fields(path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {}
    for key, field in reader.fields.items():
        if not key.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")):
            fields[key] = field.contents()
    return fields, {t.name: t.tensor_type.name for t in reader.tensors}


def summary(folder):
    return json.loads((folder / "summary.json").read_text())


@pytest.fixture(scope="module")
def exported_f32(tiny_run, tmp_path_factory):
    _, folder, _ = tiny_run
    out = tmp_path_factory.mktemp("export") / "tiny.gguf"
    assert cli.main(["export", str(folder), "--quant", "f32", "--out", str(out)]) == 0
    return folder, out


def test_gguf_loads_back_as_the_merged_model(exported_f32):
    from transformers import AutoModelForCausalLM

    folder, out = exported_f32
    merged = AutoModelForCausalLM.from_pretrained(folder / "merged", dtype=torch.float32).eval()
    back = export_check.load_gguf(out)
    ids = StageObserver.PROBE
    assert (logits(back, ids) - logits(merged, ids)).abs().max().item() < 1e-5  # names and rotary layout right
    fields, tensors = gguf_fields(out)
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 0
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight",
            "blk.1.attn_k.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"} <= set(tensors)
    assert len(tensors) == 2 + 1 + 2 * 9
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.add_bos_token"] is False  # fx's templates write the BOS themselves


def test_the_files_chat_template_renders_as_the_run_template(exported_f32):
    from transformers import AutoTokenizer

    folder, out = exported_f32
    exp = inference.experiment(folder)
    tokenizer = exp.model.cls(exp.model.settings).tokenizer()
    template = exp.template.cls(exp.template.settings, tokenizer)
    fields, _ = gguf_fields(out)
    assert fields["tokenizer.chat_template"] == template.chat_template()
    from_file = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    prompt = from_file.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    assert prompt == template.prompt(TWO_TURNS)
    assert from_file(prompt, add_special_tokens=False)["input_ids"] == tokenizer(prompt, add_special_tokens=False)[
        "input_ids"]


def test_the_check_is_recorded_in_the_run(exported_f32):
    folder, out = exported_f32
    entry = next(e for e in summary(folder)["exports"] if e["out"] == str(out))
    check = entry["check"]
    assert check["passed"] is True and check["problems"] == []
    assert check["answers"]["same"] == check["answers"]["total"] > 0 and check["answers"]["first_divergence"] is None
    assert check["loss_difference"] <= export_check.TOLERANCE["f32"]
    assert check["tokenizer"]["same"] == check["tokenizer"]["total"] > 0
    assert entry["merge"]["reused"] is True  # the run's merged/ folder was the input


def test_answers_may_differ_only_by_the_share_each_quantisation_allows():
    assert export_check.answers_problem("f32", 29, 30) == (
        "1 of 30 greedy answers differ from the adapter's, over the 0% allowed for f32")
    assert export_check.answers_problem("f16", 29, 30) is None  # a near-tie flipped by rounding to 11 bits
    assert "4 of 30" in export_check.answers_problem("f16", 26, 30)
    assert export_check.answers_problem("q8_0", 24, 30) is None and export_check.answers_problem("q8_0", 23, 30)
    assert export_check.answers_problem("q4_0", 0, 30) is None  # held to its loss alone


def test_q8_0_within_its_tolerance(tiny_run, tmp_path, capsys):
    _, folder, _ = tiny_run
    out = tmp_path / "q8.gguf"
    assert cli.main(["export", str(folder), "--quant", "q8_0", "--out", str(out)]) == 0
    assert "check passed" in capsys.readouterr().out
    _, tensors = gguf_fields(out)
    assert tensors["blk.0.attn_q.weight"] == "Q8_0" and tensors["blk.0.attn_norm.weight"] == "F32"
    check = next(e for e in summary(folder)["exports"] if e["out"] == str(out))["check"]
    assert check["passed"] and 0 < check["loss_difference"] <= export_check.TOLERANCE["q8_0"]


def test_a_failed_check_is_loud(tiny_run, tmp_path, monkeypatch, capsys):
    _, folder, _ = tiny_run
    monkeypatch.setitem(export_check.TOLERANCE, "q4_0", 0.0)
    out = tmp_path / "q4.gguf"
    assert cli.main(["export", str(folder), "--quant", "q4_0", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "CHECK FAILED" in err and "over the 0% allowed for q4_0" in err
    assert out.is_file()  # the export itself is whole; its check says it differs
    check = next(e for e in summary(folder)["exports"] if e["out"] == str(out))["check"]
    assert check["passed"] is False and check["problems"]


def test_ollama_folder(tiny_run, tmp_path):
    _, folder, _ = tiny_run
    out = tmp_path / "ollama"
    assert cli.main(["export", str(folder), "--format", "ollama", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    text = (out / "Modelfile").read_text()
    exp = inference.experiment(folder)
    template = exp.template.cls(exp.template.settings, exp.model.cls(exp.model.settings).tokenizer())
    go = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M).group(1)
    assert "FROM ./model.gguf" in text.splitlines()
    assert f'PARAMETER stop "{template.stop}"' in text.splitlines()
    assert system == exp.template.settings.system_prompt
    assert ollama_prompt(go, TWO_TURNS, system) == template.prompt(TWO_TURNS)


@pytest.mark.parametrize("name", BUILT_INS)
@pytest.mark.parametrize("system", [None, 'Be "brief".\nVery brief. ünï'])
def test_every_built_in_describes_itself_for_ollama(name, system, tiny_run):
    """The Go template, rendered as Ollama does for a two-turn conversation (Modelfile SYSTEM first), is fx's
    prompt character for character, and so is the Jinja chat template."""
    exp = inference.experiment(tiny_run[1])
    tokenizer = exp.model.cls(exp.model.settings).tokenizer()
    cls = manager.get()["templates"][name].cls
    template = cls(cls.Settings(system_prompt=system), tokenizer)
    go = template.ollama_template()
    for turns in (TWO_TURNS[:1], TWO_TURNS):
        assert ollama_prompt(go, turns, system) == template.prompt(turns)
        assert tokenizer.apply_chat_template(turns, chat_template=template.chat_template(), tokenize=False,
                                             add_generation_prompt=True) == template.prompt(turns)
    done = [*TWO_TURNS, {"role": "assistant", "content": "4"}]
    assert tokenizer.apply_chat_template(done, chat_template=template.chat_template(), tokenize=False) \
        == template.render(done).text


def test_native_finds_chatml_and_refuses_what_it_cannot_describe(tiny_run):
    exp = inference.experiment(tiny_run[1])
    tokenizer = exp.model.cls(exp.model.settings).tokenizer()  # the bundled model's, cut: SmolLM2's ChatML
    found = probe(Native(Native.Settings(), tokenizer)._chat, "native")
    assert found.user == ("<|im_start|>user\n", "<|im_end|>\n") and found.generation == "<|im_start|>assistant\n"
    assert "named SmolLM" in found.no_system  # SmolLM2's default system prompt, where a conversation has none
    tokenizer.chat_template = LLAMA2_JINJA  # the system prompt lives inside the first user turn: no fixed wrapping
    with pytest.raises(UserError, match="cannot reproduce it; choose an explicit template"):
        Native(Native.Settings(), tokenizer).ollama_template()


def test_a_template_without_a_description_gets_a_clear_message(tiny_run, tmp_path, register_plugin, capsys):
    import fx
    from fx.plugins.templates.chatml import ChatML

    class Plain(fx.Template):
        render = ChatML.render
        prompt = ChatML.prompt
        _build = ChatML._build

    class Plugin:
        @fx.hookimpl
        def fx_register_templates(self, register):
            register("plain", Plain)

    _, folder, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(folder, run, ignore=shutil.ignore_patterns("merged", "checkpoints", "export"))
    (run / "config.toml").write_text((run / "config.toml").read_text().replace('name = "llama2"', 'name = "plain"'))
    register_plugin(Plugin(), "plain")
    assert cli.main(["export", str(run), "--format", "ollama", "--out", str(tmp_path / "o")]) == 2
    assert "template Plain: this template can't describe itself for Ollama" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*")) and not (run / "merged").exists()


def test_wrapping_refuses_text_go_would_read():
    with pytest.raises(UserError, match="Go template"):
        Wrapping(system=("", ""), no_system="{{ .Evil }}", user=("", ""), assistant=("", ""), generation="").go()


def nothing_written(folder, out):
    return not out.exists() and not list(out.parent.glob(f".{out.name}*")) and not list(
        out.parent.glob(".fx-export-*")) and not list(folder.glob("export"))


def test_bad_input_exits_2_with_nothing_written(tiny_run, tmp_path, monkeypatch, capsys):
    _, folder, _ = tiny_run
    out = tmp_path / "x.gguf"
    assert cli.main(["export", str(folder), "--quant", "q4_k_m", "--out", str(out)]) == 2
    assert "--quant 'q4_k_m': the gguf package cannot write it" in capsys.readouterr().err
    assert nothing_written(folder, out)

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(folder / "config.toml", unfinished)
    summary = json.loads((folder / "summary.json").read_text())
    (unfinished / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    assert cli.main(["export", str(unfinished), "--out", str(out)]) == 2
    assert "saved no adapter (its status: interrupted)" in capsys.readouterr().err
    assert nothing_written(unfinished, out)

    from transformers import GPT2Config

    from fx.plugins.models.random import RandomModel
    monkeypatch.setattr(RandomModel, "config", lambda self: GPT2Config())
    assert cli.main(["export", str(folder), "--out", str(out)]) == 2
    assert "architecture 'gpt2': the GGUF exporter knows llama only" in capsys.readouterr().err
    assert nothing_written(folder, out)
    monkeypatch.undo()

    out.write_text("keep")
    assert cli.main(["export", str(folder), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "keep"


def test_a_failed_write_leaves_nothing(tiny_run, tmp_path, monkeypatch, capsys):
    _, folder, _ = tiny_run
    out = tmp_path / "half.gguf"

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(gguf_file, "_data", broken)
    # an OS error is one line and exit 2 (cli.main, issue 20), and the half-written file is gone
    assert cli.main(["export", str(folder), "--out", str(out)]) == 2
    assert "fx: error: disk full" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_quant_names_are_one_list():
    from fx.config.sections import GGUF_QUANTS

    assert tuple(gguf_file.QUANTS) == GGUF_QUANTS == tuple(export_check.TOLERANCE)


def test_export_stage(train_tiny):
    """The stage after training, merge off: the model is merged for the export into a folder removed after it."""
    observer = StageObserver()
    exp, folder = train_tiny("tiny-export", overrides=["stages.export.enabled=true", 'stages.export.format="ollama"',
                                                       'stages.export.quant="q8_0"'], plugins=[(observer, "observer")])
    assert observer.started[-1] == "export" and "merge" not in observer.started
    entry = summary(folder)["exports"][0]
    assert entry["format"] == "ollama" and entry["quant"] == "q8_0" and entry["check"]["passed"] is True
    assert entry["merge"]["reused"] is False and not (folder / "merged").exists()
    assert sorted(p.name for p in (folder / "export").iterdir()) == ["ollama-q8_0"]
    assert (folder / "export" / "ollama-q8_0" / "Modelfile").is_file()
