"""After training: the merge stage, and generate, chat, eval, merge and push on a finished run, on the tiny Llama."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys

import pytest
import torch

from conftest import TINY_EXPERIMENT, TINY_ROWS, StageObserver, logits
from fx import cli, config
from fx.after import inference
from fx.data.prepare import prepare
from fx.errors import ConfigError
from fx.plugins.templates.llama2 import Llama2
from fx.plugins.templates.native import Native
from fx.stages import builtin
from fx.training.qlora import QLoraMethod

PROBE = StageObserver.PROBE


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Commands run from another folder than the experiment's: relative data paths must still resolve."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def adapter_model(folder, dtype):
    """The run's adapter on its base loaded in ``dtype``, unmerged: what merging must reproduce."""
    from peft import PeftModel

    exp = inference.experiment(folder)
    base = exp.model.cls(exp.model.settings).load(dtype=dtype)
    return PeftModel.from_pretrained(base, folder / "adapter").eval()


def held_out_ids(folder):
    prep = prepare(inference.experiment(folder))
    return torch.tensor([prep.held_out.rows[0]["input_ids"]])


def assert_equals_adapter_model(merged, reference, ids, dtype):
    """The merged model's logits equal the unmerged adapter model's within a few units of ``dtype``'s precision at
    the logits' scale, while the adapter itself moves them by far more than that."""
    expected = logits(reference, ids)
    with reference.disable_adapter():
        base = logits(reference, ids)
    tolerance = 8 * torch.finfo(dtype).eps * expected.abs().max().item()
    assert (logits(merged, ids) - expected).abs().max().item() <= tolerance
    assert (base - expected).abs().max().item() > 10 * tolerance
    assert torch.equal(logits(merged, ids).argmax(-1), expected.argmax(-1))


def test_saved_adapter_reloads_with_peft_and_reproduces_the_trained_logits(tiny_run):
    """The adapter, put back with plain peft on the base quantised as the method trains on it, is the trained
    model: exactly once its weights are in the dtype they were trained in (trl trains QLoRA adapters in bfloat16;
    fx.training.QLoraMethod.load_trained restores it), and within bfloat16's precision with peft's float32 default."""
    from peft import PeftModel

    _, folder, observer = tiny_run
    trained = observer.trained_logits
    torch.testing.assert_close(logits(inference.load(folder).model, PROBE), trained, rtol=1e-5, atol=1e-5)
    exp = inference.experiment(folder)
    method = exp.method.cls(exp.method.settings)
    reloaded = PeftModel.from_pretrained(method.load_base(exp.model.cls(exp.model.settings)), folder / "adapter").eval()
    tolerance = 8 * torch.finfo(torch.bfloat16).eps * trained.abs().max().item()
    assert (logits(reloaded, PROBE) - trained).abs().max().item() <= tolerance
    with reloaded.disable_adapter():
        assert (logits(reloaded, PROBE) - trained).abs().max().item() > 10 * tolerance


def test_merge_stage_runs_last_and_is_announced(tiny_run):
    _, folder, observer = tiny_run
    assert observer.started == ["load", "evaluate_before", "generate_before", "train", "save", "evaluate_after",
                                "generate_after", "merge"]
    assert observer.trained_model_alive_at_merge is False  # the 4-bit model is freed before the 16-bit load
    assert observer.runs == [("start", folder.name, None), ("end", "completed", None)]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["merge"] == observer.ended["merge"]
    assert summary["merge"]["dtype"] == "float32" and summary["merge"]["path"] == str(folder / "merged")


def test_merged_model_loads_with_plain_transformers_and_behaves_like_the_trained_adapter(tiny_run):
    """The default merge (into the dequantised 4-bit base the adapter was trained against), loaded with plain
    transformers, gives the trained adapter model's held-out contains score and greedy answers: identical in
    float32, and the merge stage's own check in summary.json says so."""
    from transformers import AutoModelForCausalLM

    from fx.after import fidelity

    _, folder, _ = tiny_run
    merged_dir = folder / "merged"
    saved = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in saved and "auto_map" not in saved
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    exp = inference.experiment(folder)
    prep = prepare(exp)
    args = (prep.tokenizer, prep.template, prep.held_out.rows, prep.held_out_examples, exp.stages.evaluate)
    adapter = fidelity.measure(inference.load(folder).model, *args)
    plain = fidelity.measure(merged, *args)
    assert plain["answers"] == adapter["answers"] and len(adapter["answers"]) > 0
    assert (plain["contains_hits"], plain["contains_total"]) == (adapter["contains_hits"], adapter["contains_total"])
    assert plain["loss"] == pytest.approx(adapter["loss"], rel=fidelity.TOLERANCE["float32"]["loss"])
    check = json.loads((folder / "summary.json").read_text())["merge"]["check"]
    assert check["within_tolerance"] and check["same_answers"] == check["answers"] == len(adapter["answers"])
    assert check["merged"]["contains_hits"] == adapter["contains_hits"]


def test_fx_merge_bfloat16(tiny_run, tmp_path, elsewhere):
    from transformers import AutoModelForCausalLM

    _, folder, _ = tiny_run
    out = tmp_path / "bf16"
    assert cli.main(["merge", str(folder), "--out", str(out), "--dtype", "bfloat16", "--base", "original"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.bfloat16
    assert_equals_adapter_model(merged, adapter_model(folder, torch.bfloat16), held_out_ids(folder), torch.bfloat16)
    assert not list(tmp_path.glob(".bf16.partial"))


def test_merged_tokenizer_prompts_in_the_run_template(tiny_run):
    from transformers import AutoTokenizer

    _, folder, _ = tiny_run
    exp = inference.experiment(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder / "merged")
    template = exp.template.cls(exp.template.settings, tokenizer)
    conversation = [{"role": "user", "content": "What is 1 plus 2?"}, {"role": "assistant", "content": "3"},
                    {"role": "user", "content": "And 2 plus 2?"}]
    prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert prompt == template.prompt(conversation)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token  # the tiny model's: the template closes turns with them
    assert prompt.startswith(f"{bos}[INST] <<SYS>>\nAnswer with a number.\n<</SYS>>\n\n"
                             f"What is 1 plus 2? [/INST] 3 {eos}")


@pytest.mark.parametrize("cls", [Llama2, Native])
@pytest.mark.parametrize("system", [None, 'Be "brief".\nVery brief. ünï'])
def test_chat_template_renders_like_the_template(cls, system, tiny_run):
    """The Jinja a template writes for transformers renders conversations and prompts exactly as fx does."""
    exp = inference.experiment(tiny_run[1])
    tokenizer = exp.model.cls(exp.model.settings).tokenizer()
    template = cls(cls.Settings(system_prompt=system), tokenizer)
    chat = template.chat_template()
    turns = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Two?"}]
    assert tokenizer.apply_chat_template(turns, chat_template=chat, tokenize=False, add_generation_prompt=True) \
        == template.prompt(turns)
    done = [*turns, {"role": "assistant", "content": "Two."}]
    assert tokenizer.apply_chat_template(done, chat_template=chat, tokenize=False) == template.render(done).text


def test_eval_reproduces_eval_after(tiny_run, elsewhere, capsys):
    _, folder, _ = tiny_run
    assert cli.main(["eval", str(folder)]) == 0
    measured = json.loads(capsys.readouterr().out)["metrics"]
    after = json.loads((folder / "summary.json").read_text())["eval_after"]
    assert measured["loss"] == pytest.approx(after["loss"], abs=1e-3)
    assert measured["contains_hits"] == after["contains_hits"] and measured["contains_total"] == after["contains_total"]


def test_eval_and_generate_accept_the_merged_folder(tiny_run, elsewhere, capsys):
    """`fx eval` and `fx generate` on RUN/merged measure the merged model in the run's template: the run's own
    held-out numbers and answers (float32 merge into the trained base)."""
    _, folder, _ = tiny_run
    assert cli.main(["eval", str(folder / "merged")]) == 0
    measured = json.loads(capsys.readouterr().out)["metrics"]
    after = json.loads((folder / "summary.json").read_text())["eval_after"]
    assert measured["loss"] == pytest.approx(after["loss"], rel=2e-3)
    assert measured["contains_hits"] == after["contains_hits"] and measured["contains_total"] == after["contains_total"]
    prompt = "What is 2 plus 3?"
    assert cli.main(["generate", str(folder), "--prompt", prompt]) == 0
    from_adapter = capsys.readouterr().out
    assert cli.main(["generate", str(folder / "merged"), "--prompt", prompt]) == 0
    assert capsys.readouterr().out == from_adapter


def test_eval_on_another_file(tiny_run, elsewhere, capsys):
    _, folder, _ = tiny_run
    (elsewhere / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS[:5]))
    assert cli.main(["eval", str(folder), "--data", "other.jsonl"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == 5 and result["metrics"]["contains_total"] == 5 and result["metrics"]["loss"] > 0


def test_generate_gives_the_runs_own_answers(tiny_run, capsys):
    """Greedy answers of the reloaded run equal the ones the run wrote into samples.md after training."""
    _, folder, _ = tiny_run
    samples = (folder / "samples.md").read_text()
    prompts = re.findall(r"^## \d+\. (.*)$", samples, re.M)
    answers = re.findall(r"\*\*After:\*\*\n\n(.*?)\n", samples)
    assert len(prompts) == len(answers) == 2
    args = ["generate", str(folder)] + [a for p in prompts for a in ("--prompt", p)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    answers = ["" if a == "_(empty)_" else a for a in answers]  # samples.md marks an empty answer
    assert out == [line for p, a in zip(prompts, answers) for line in (f"> {p}", a)]


def test_chat_keeps_the_conversation_in_the_template(tiny_run, monkeypatch, capsys):
    _, folder, _ = tiny_run
    prompts = []
    original = Llama2.prompt
    monkeypatch.setattr(Llama2, "prompt",
                        lambda self, messages: prompts.append(original(self, messages)) or prompts[-1])
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 1 plus 2?\nWhat is 3 plus 1?\n"))
    assert cli.main(["chat", str(folder), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    streamed = re.findall(r"assistant> (.*)\n", out)
    assert len(prompts) == 2 and len(streamed) == 2
    exp = inference.experiment(folder)
    template = exp.template.cls(exp.template.settings, exp.model.cls(exp.model.settings).tokenizer())
    first = [{"role": "user", "content": "What is 1 plus 2?"}, {"role": "assistant", "content": streamed[0].strip()}]
    assert prompts[0] == template.prompt(first[:1])
    assert prompts[1] == template.render(first).text + f"{template.bos}[INST] What is 3 plus 1? [/INST]"


def test_not_a_run(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_run_without_adapter(tiny_run, tmp_path, capsys):
    _, folder, _ = tiny_run
    failed = tmp_path / "failed"
    failed.mkdir()
    shutil.copy(folder / "config.toml", failed)
    summary = json.loads((folder / "summary.json").read_text())
    (failed / "summary.json").write_text(json.dumps({**summary, "status": "failed"}))
    for command in (["eval", str(failed)], ["chat", str(failed)], ["merge", str(failed)]):
        assert cli.main(command) == 2
        assert "saved no adapter (its status: failed)" in capsys.readouterr().err


def test_merge_refuses_to_overwrite(tiny_run, capsys):
    _, folder, _ = tiny_run
    assert cli.main(["merge", str(folder)]) == 2
    assert "merged already exists" in capsys.readouterr().err


def test_push_without_an_account_says_so(tiny_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    _, folder, _ = tiny_run
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
    assert cli.main(["push", str(folder), "--repo", "someone/tiny"]) == 2
    assert "needs a Hugging Face account" in capsys.readouterr().err


def test_merge_dtype_is_checked(write_experiment):
    path = write_experiment(TINY_EXPERIMENT + '\n[stages.merge]\nenabled = true\ndtype = "float8"\n', TINY_ROWS)
    with pytest.raises(ConfigError, match=r"stages\.merge\.dtype"):
        config.load(path)
    assert config.load(write_experiment(TINY_EXPERIMENT, TINY_ROWS)).stages.merge.enabled is False


def test_merge_without_a_chat_template_saves_none(tiny_run, tmp_path, monkeypatch):
    """A template that can't write itself as Jinja leaves the merged tokenizer without one, never the tokenizer's
    own (which the run did not train on)."""
    from transformers import AutoTokenizer

    _, folder, _ = tiny_run
    monkeypatch.setattr(Llama2, "chat_template", lambda self: None)
    assert cli.main(["merge", str(folder), "--out", str(tmp_path / "plain")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "plain").chat_template is None


def test_generation_takes_end_ids_given_as_a_list(tiny_run):
    """A generation config may hold its end-of-sequence ids as a list (as the model's does on a GPU after training,
    transformers 5.17): generation stops on them all and answers as with the single id."""
    from fx.evaluation import generate

    _, folder, _ = tiny_run
    loaded = inference.load(folder)
    prompts = [[{"role": "user", "content": "What is 1 plus 2?"}], [{"role": "user", "content": "What is 4 plus 1?"}]]
    single = generate(loaded.model, loaded.tokenizer, loaded.template, prompts, 4)
    loaded.model.generation_config.eos_token_id = [loaded.tokenizer.eos_token_id]
    assert generate(loaded.model, loaded.tokenizer, loaded.template, prompts, 4) == single


def test_heldout_jsonl_holds_the_held_out_rows_and_fx_eval_reads_it(tiny_run, elsewhere, capsys):
    """heldout.jsonl lists the rows the run measured itself on (none of them trained on), in a form `fx eval --data`
    reads back to the run's own eval_after."""
    from fx.data.formats import to_row

    exp, folder, _ = tiny_run
    prep = prepare(exp)
    written = [json.loads(line) for line in (folder / "heldout.jsonl").read_text().splitlines()]
    assert written == [to_row(e) for e in prep.held_out_examples] and len(written) == len(prep.held_out.rows) > 0
    trained = {json.dumps(e.messages) for e in prep.train_examples}
    assert not any(json.dumps(row["messages"]) in trained for row in written)
    assert all(row["expect"] for row in written)  # the other columns kept: what contains scores
    assert cli.main(["eval", str(folder), "--data", str(folder / "heldout.jsonl")]) == 0
    measured = json.loads(capsys.readouterr().out)["metrics"]
    after = json.loads((folder / "summary.json").read_text())["eval_after"]
    assert measured["loss"] == pytest.approx(after["loss"], rel=1e-4)
    assert (measured["contains_hits"], measured["contains_total"]) == (after["contains_hits"], after["contains_total"])


def test_samples_md_says_where_its_prompts_came_from(tiny_run, write_experiment):
    exp, folder, _ = tiny_run
    prep = prepare(exp)
    samples = (folder / "samples.md").read_text()
    count = exp.stages.generate.count
    assert (f"The prompts are the first {count} of the run's {len(prep.held_out_examples)} held-out rows "
            "(heldout.jsonl), up to `[stages.generate] count`.") in samples
    first = prep.held_out_examples[0].messages[-2]["content"]  # the user's turn before the held-out answer
    assert f"## 1. {first}" in samples
    assert f"at most {exp.stages.generate.max_new_tokens} new tokens" in samples
    given = config.load(write_experiment(TINY_EXPERIMENT, TINY_ROWS),
                        ['stages.generate.prompts=["Who are you?", "What is 1 plus 1?"]'])
    prompts, origin = builtin.sample_prompts(given, prepare(given))
    assert [p[-1]["content"] for p in prompts] == ["Who are you?", "What is 1 plus 1?"]
    assert origin == "the 2 prompts of the experiment's `[stages.generate] prompts`"


def test_checkpoints_and_adapter_keep_no_placeholder_model_card(tiny_run):
    """peft writes an empty model card beside every adapter it saves (trl one for the trainer); fx removes them, so
    that nothing published from a run claims to describe it."""
    _, folder, _ = tiny_run
    saved = [folder / "adapter", *sorted((folder / "checkpoints").glob("checkpoint-*"))]
    assert len(saved) >= 2 and all((f / "adapter_model.safetensors").is_file() for f in saved)
    assert not [f for f in saved if (f / "README.md").exists()]


def test_only_placeholder_model_cards_are_dropped(tmp_path):
    from fx.files import drop_placeholder_card

    empty, written = tmp_path / "empty", tmp_path / "written"
    empty.mkdir(), written.mkdir()
    (empty / "README.md").write_text("# Model Card\n\n- **Developed by:** [More Information Needed]\n")
    (written / "README.md").write_text("# quill-135m\n\nSmolLM2-135M trained by fx to answer as Quill.\n")
    drop_placeholder_card(empty), drop_placeholder_card(written), drop_placeholder_card(tmp_path / "missing")
    assert not (empty / "README.md").exists() and (written / "README.md").is_file()


def test_sigint_before_training_says_how_to_resume(tiny_experiment, tmp_path, monkeypatch, capsys):
    """A SIGINT while the model loads (no checkpoint yet): exit 130, the summary says interrupted, and the message
    names the stage and the command that resumes the run, which accepts the folder."""
    import os
    import signal

    from fx.run.resume import load_run

    load = QLoraMethod.load

    def interrupted_load(self, source, tokenizer):
        os.kill(os.getpid(), signal.SIGINT)  # Python's own handler: KeyboardInterrupt at the next instruction
        return load(self, source, tokenizer)

    monkeypatch.setattr(QLoraMethod, "load", interrupted_load)
    # Python's default SIGINT handler, whatever an earlier test in this process left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert cli.main(["run", str(tiny_experiment)]) == 128 + signal.SIGINT
    finally:
        signal.signal(signal.SIGINT, previous)
    (folder,) = (tmp_path / "runs").iterdir()
    err = capsys.readouterr().err
    assert ("interrupted during the load stage, before training; nothing was trained yet. "
            f"Resume with: fx run --resume {folder}") in err and "Traceback" not in err
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted" and not (folder / "adapter").exists()
    assert load_run(folder).experiment.name == "tiny"
