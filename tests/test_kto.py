"""Method ``kto`` for real on a tiny random Llama (4-bit, LoRA, trl's KTOTrainer) and its data: unpaired rows (prompt,
completion, label) as a format with clear messages for rows that don't fit, preference pairs turned into them with
``data.unpair``, the reference kept as the base with the adapter off, the KL batch built as trl builds it, metrics,
resuming, the planner."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

import datasets
from conftest import (
    PREF_ROWS,
    TINY_EXPERIMENT,
    TINY_ROWS,
    UNPAIRED_ROWS,
    assert_stopped_run_resumes_to_the_uninterrupted_adapter,
)
from fx import config
from fx.cli import main
from fx.data.formats import to_examples
from fx.data.prepare import load_examples, prepare
from fx.errors import UserError
from fx.training import budget, contract
from fx.training.method import Session

KTO_EXPERIMENT = (TINY_EXPERIMENT.replace('name = "qlora_sft"', 'name = "kto"\nbeta = 0.1')
                  .replace("max_steps = 12", "max_steps = 8") + "\n[trackers.csv]\n")


def kto_experiment(write_experiment, rows=UNPAIRED_ROWS, text=KTO_EXPERIMENT):
    return write_experiment(text, rows)


@pytest.fixture(scope="module")
def kto_run(train_tiny):
    return train_tiny("kto", KTO_EXPERIMENT, UNPAIRED_ROWS, overrides=["stages.generate.enabled=false"])


# -- data -----------------------------------------------------------------------------------------------------------

def test_unpaired_rows_are_detected_in_both_shapes():
    [plain] = to_examples(datasets.Dataset.from_list([{"prompt": "Q", "completion": "good", "label": True}]),
                          "auto", "data")
    [conversational] = to_examples(datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "bad"}],
         "label": False}]), "auto", "data")
    assert (plain.messages, plain.completion, plain.label, plain.kind) == (
        [{"role": "user", "content": "Q"}], "good", True, "unpaired")
    assert (conversational.completion, conversational.label) == ("bad", False)


def test_rows_that_dont_fit_are_reported_by_number():
    with pytest.raises(UserError) as caught:
        to_examples(datasets.Dataset.from_list([
            {"prompt": "Q", "completion": "a", "label": True},
            {"prompt": "Q", "completion": "a", "label": None},
            {"prompt": "", "completion": "a", "label": False},
            {"prompt": "Q", "completion": "  ", "label": False},
        ]), "unpaired", "data (train)")
    message = str(caught.value)
    assert "3 row(s) don't fit the 'unpaired' format" in message
    assert "row 2: 'label' must be true (a desirable answer) or false (an undesirable one), not None" in message
    assert "row 3: 'prompt' must be a non-empty string" in message and "row 4: 'completion'" in message


def test_a_label_given_as_text_is_refused_with_what_it_was(write_experiment, capsys):
    path = kto_experiment(write_experiment, [{**r, "label": "yes"} for r in UNPAIRED_ROWS])
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not 'yes'" in err and "'label' must be true" in err and "Traceback" not in err


def test_pairs_are_refused_for_kto_with_the_option_that_converts_them(write_experiment, capsys):
    assert main(["run", str(kto_experiment(write_experiment, PREF_ROWS))]) == 2
    err = capsys.readouterr().err
    assert "the data are preference pairs" in err and "set data.unpair = true" in err and "Traceback" not in err


def test_data_unpair_makes_two_rows_of_each_pair_after_the_split(write_experiment):
    exp = config.load(kto_experiment(write_experiment, PREF_ROWS), ["data.unpair=true"])
    train, held = load_examples(exp)
    assert len(train) + len(held) == 2 * len(PREF_ROWS) and all(e.kind == "unpaired" for e in train + held)
    assert [(e.completion, e.label) for e in train[:2]] == [(train[0].completion, True), ("I do not know.", False)]
    assert train[0].messages == train[1].messages
    assert not {e.messages[0]["content"] for e in train} & {e.messages[0]["content"] for e in held}
    rows = prepare(exp).train.rows
    assert rows[0]["label"] is True and rows[1]["label"] is False and rows[0]["prompt_ids"] == rows[1]["prompt_ids"]


def test_unpair_on_rows_that_are_not_pairs_is_refused(write_experiment, capsys):
    path = write_experiment(TINY_EXPERIMENT, TINY_ROWS)
    assert main(["run", str(path), "--set", "data.unpair=true"]) == 2
    assert "data.unpair = true turns preference pairs into unpaired rows, but the data have one answer per row" \
        in capsys.readouterr().err


@pytest.mark.parametrize("method", ["qlora_sft", "dpo"])
def test_unpaired_rows_are_refused_for_other_methods(write_experiment, capsys, method):
    path = write_experiment(TINY_EXPERIMENT.replace('name = "qlora_sft"', f'name = "{method}"'), UNPAIRED_ROWS)
    assert main(["run", str(path)]) == 2
    assert "the data are unpaired rows" in capsys.readouterr().err


def test_rows_are_tokenized_as_generation_prompts_with_closed_answers(write_experiment):
    from fx.data.templating import encode_prompt

    prep = prepare(config.load(kto_experiment(write_experiment)))
    row, example = prep.train.rows[0], prep.train_examples[0]
    tok = prep.tokenizer
    assert row["prompt_ids"] == encode_prompt(tok, prep.template.prompt(example.messages))
    assert tok.decode(row["completion_ids"]) == f" {example.completion} {tok.eos_token}"
    assert row["label"] is example.label


def test_fx_data_shows_each_row_with_its_rating(write_experiment, capsys):
    assert main(["data", str(kto_experiment(write_experiment)), "--examples", "3"]) == 0
    out = capsys.readouterr().out
    assert "unpaired rows" in out and "(desirable)" in out and "(undesirable)" in out


# -- training -------------------------------------------------------------------------------------------------------

def test_a_run_moves_the_rewards_apart_and_logs_trl_metrics(kto_run):
    _, folder = kto_run
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 8
    before, after = summary["eval_before"], summary["eval_after"]
    for key in ("label_accuracy", "reward_desirable", "reward_undesirable", "desirable_loss", "contains"):
        assert key in before and key in after, key
    # a fresh adapter is the reference: every implicit reward is exactly 0 before training
    assert before["label_accuracy"] == 0 and before["reward_desirable"] == before["reward_undesirable"] == 0
    assert after["reward_desirable"] > after["reward_undesirable"] and after["label_accuracy"] > 0.5
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    trained = [s for s in steps if "kl" in s]
    assert [s["step"] for s in trained] == list(range(1, 9))
    for key in ("loss", "tokens_per_s"):
        assert all(key in s for s in trained), key
    # trl logs a kind's rewards and log-probabilities only for a micro-batch that holds rows of that kind
    assert all("rewards/chosen" in s or "rewards/rejected" in s for s in trained)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert any(key in s for s in trained), key
    assert {"kl", "eval_label_accuracy"} <= set((folder / "metrics.csv").read_text().splitlines()[0].split(","))


def test_fx_eval_reproduces_eval_after(kto_run, capsys):
    _, folder = kto_run
    assert main(["eval", str(folder)]) == 0
    measured = json.loads(capsys.readouterr().out)["metrics"]
    after = json.loads((folder / "summary.json").read_text())["eval_after"]
    assert measured["reward_desirable"] == pytest.approx(after["reward_desirable"], abs=1e-3)
    assert measured["label_accuracy"] == after["label_accuracy"]


def test_training_moves_the_adapter_the_reference_stays_the_base_and_kl_pairs_neighbours(write_experiment):
    exp = config.load(kto_experiment(write_experiment))
    prep = prepare(exp)
    method = exp.method.cls(exp.method.settings)
    model = method.load(prep.source, prep.tokenizer)
    row = prep.held_out.rows[0]
    ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    with torch.no_grad(), method.reference(model):
        reference_before = model(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as tmp:
        trainer = contract.build(method, model, prep.tokenizer, prep.train.rows,
                                 Session(output_dir=Path(tmp), seed=0, max_steps=3))
        data = trainer.train_dataset
        assert trainer.args.train_sampling_strategy == "sequential"
        assert data[1]["KL_completion_ids"] == data[0]["completion_ids"]  # the answer of the row before
        assert data[0]["KL_completion_ids"] == data[3]["completion_ids"]  # the first takes its micro-batch's last
        assert sorted(map(tuple, data["prompt_ids"])) == sorted(tuple(r["prompt_ids"]) for r in prep.train.rows)
        trainer.train()
    assert "ref" not in model.peft_config and getattr(trainer, "ref_model", None) is None
    assert any("lora_B" in n and not torch.equal(p.detach(), lora[n]) for n, p in model.named_parameters() if n in lora)
    model.eval()
    with torch.no_grad():
        with method.reference(model):
            reference_after = model(input_ids=ids).logits
        policy = model(input_ids=ids).logits
    assert torch.equal(reference_before, reference_after)
    assert not torch.allclose(policy, reference_after, atol=1e-4)


@pytest.mark.slow
def test_a_stopped_run_resumes_to_the_uninterrupted_adapter(write_experiment, tmp_path, register_plugin):
    assert_stopped_run_resumes_to_the_uninterrupted_adapter(kto_experiment(write_experiment), tmp_path, register_plugin)


# -- settings and the planner ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("assignment, key", [("method.loss_type=\"ktoo\"", "method.loss_type"),
                                             ("method.micro_batch_size=1", "micro_batch_size >= 2"),
                                             ("method.group_by_length=true", "group_by_length = false"),
                                             ("method.desirable_weight=0", "method.desirable_weight"),
                                             ("method.lora.init=\"pissa\"", "method.lora.init")])
def test_bad_settings_end_with_exit_2_naming_the_key(write_experiment, capsys, assignment, key):
    assert main(["run", str(kto_experiment(write_experiment)), "--set", assignment]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err


def test_apo_zero_unpaired_has_no_kl_batch_and_any_order(write_experiment):
    exp = config.load(kto_experiment(write_experiment),
                      ['method.loss_type="apo_zero_unpaired"', "method.micro_batch_size=1"])
    prep = prepare(exp)
    method = exp.method.cls(exp.method.settings)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = method.trainer(method.load(prep.source, prep.tokenizer), prep.tokenizer, prep.train.rows,
                                 Session(output_dir=Path(tmp), seed=0))
    assert "KL_completion_ids" not in trainer.train_dataset.column_names
    assert trainer.args.train_sampling_strategy == "random"
    assert not budget.plan_experiment(exp).plan.work.kl_forward


def test_plan_has_one_answer_per_row_the_reference_and_the_kl_batch(write_experiment):
    sft = budget.plan_experiment(config.load(write_experiment(TINY_EXPERIMENT, TINY_ROWS, name="sft.toml"))).plan
    kto = budget.plan_experiment(config.load(kto_experiment(write_experiment), ["method.lora.dropout=0.0"])).plan
    assert kto.work.tokens == sft.work.tokens and kto.work.reference_forward and kto.work.kl_forward
    note = next(c.note for c in kto.components if c.name == "reference forward")
    assert "KL batch" in note


def test_merging_a_kto_run_checks_the_desirable_answers(kto_run, tmp_path):
    """KTO's held-out rows are unpaired: the merge check's loss is on the desirable answers (eval_after's
    desirable_loss), and with each prompt asked once there is no pair to take a preference accuracy over."""
    from fx.after import inference
    from fx.after.merge import merge

    _, folder = kto_run
    result = merge(inference.finished(folder), tmp_path / "merged", "float32")
    check, after = result["check"], json.loads((folder / "summary.json").read_text())["eval_after"]
    assert check["within_tolerance"], check
    assert check["adapter"]["loss"] == pytest.approx(after["desirable_loss"], rel=1e-3)
    assert check["merged"]["loss"] == pytest.approx(check["adapter"]["loss"], rel=2e-3)
    assert "logp_accuracy" not in check["merged"] and check["same_answers"] == check["answers"] > 0
