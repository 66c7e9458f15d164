"""Methods ``orpo`` and ``simpo`` for real on a tiny random Llama (4-bit, LoRA, trl's ORPOTrainer and CPOTrainer): the
adapter moves, trl's metrics reach the trackers, one copy of the weights and no reference model, rows fed as fx
tokenized them, a stopped run resumes to the uninterrupted adapter, the planner's account and the T4 verdicts."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import PREF_ROWS, ROOT, TINY_EXPERIMENT, assert_stopped_run_resumes_to_the_uninterrupted_adapter
from fx import config
from fx.cli import main
from fx.data.prepare import prepare
from fx.plan import cost
from fx.training import budget, contract
from fx.training.method import Session

METHODS = ["orpo", "simpo"]
# metrics trl logs every step, besides loss, learning rate and grad norm
TRL_METRICS = {"orpo": ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                        "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"),
               "simpo": ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                         "logps/chosen", "logps/rejected")}


def experiment(name: str) -> str:
    return (TINY_EXPERIMENT.replace('name = "qlora_sft"', f'name = "{name}"').replace("max_steps = 12", "max_steps = 8")
            + "\n[trackers.csv]\n")


@pytest.fixture(scope="module", params=METHODS)
def finished(request, train_tiny):
    return request.param, *train_tiny(request.param, experiment(request.param), PREF_ROWS,
                                      overrides=["stages.generate.enabled=false"])


def test_a_run_moves_the_preference_and_logs_trl_metrics_to_every_tracker(finished):
    name, _, folder = finished
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 8 and summary["train_tokens"] > 0
    before, after = summary["eval_before"], summary["eval_after"]
    for key in ("logp_accuracy", "logp_accuracy_per_token", "logp_margin", "chosen_loss", "contains"):
        assert key in before and key in after, key
    assert "reward_accuracy" not in after  # no reference model, so no implicit reward against one
    assert after["logp_margin"] > before["logp_margin"] and after["chosen_loss"] < before["chosen_loss"]
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    trained = [s for s in steps if "rewards/margins" in s]
    assert [s["step"] for s in trained] == list(range(1, 9))
    for key in TRL_METRICS[name]:
        assert all(key in s for s in trained), key
    assert all(s["tokens_per_s"] > 0 for s in trained)
    header = (folder / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"rewards/margins", "eval_logp_accuracy"} <= set(header)


def test_fx_eval_reproduces_eval_after(finished, capsys):
    _, _, folder = finished
    assert main(["eval", str(folder)]) == 0
    measured = json.loads(capsys.readouterr().out)["metrics"]
    after = json.loads((folder / "summary.json").read_text())["eval_after"]
    assert measured["logp_margin"] == pytest.approx(after["logp_margin"], abs=1e-3)
    assert measured["logp_accuracy"] == after["logp_accuracy"]


@pytest.mark.parametrize("name", METHODS)
def test_one_copy_of_the_weights_no_reference_and_the_adapter_moves(write_experiment, name):
    import bitsandbytes as bnb

    exp = config.load(write_experiment(experiment(name), PREF_ROWS))
    prep = prepare(exp)
    method = exp.method.cls(exp.method.settings)
    model = method.load(prep.source, prep.tokenizer)
    base_linears = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = contract.build(method, model, prep.tokenizer, prep.train.rows,
                                 Session(output_dir=Path(tmp), seed=0, max_steps=3))
        trainer.train()
    assert trainer.state.global_step == 3 and trainer.state.num_input_tokens_seen > 0
    assert getattr(trainer, "ref_model", None) is None and list(model.peft_config) == ["default"]
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == base_linears
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora)  # no second adapter either
    assert any("lora_B" in n and not torch.equal(p.detach(), lora[n]) for n, p in model.named_parameters() if n in lora)


def test_trl_trains_on_the_rows_fx_tokenized(write_experiment):
    from fx.plugins.methods.orpo import ORPO

    exp = config.load(write_experiment(experiment("orpo"), PREF_ROWS))
    prep = prepare(exp)
    method = ORPO(exp.method.settings)
    model = method.load(prep.source, prep.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = method.trainer(model, prep.tokenizer, prep.train.rows, Session(output_dir=Path(tmp), seed=0))
    fed, row = trainer.train_dataset[0], prep.train.rows[0]
    assert fed["chosen_input_ids"] == row["prompt_ids"] + row["chosen_ids"]
    assert fed["rejected_labels"] == [-100] * len(row["prompt_ids"]) + row["rejected_ids"]
    assert fed["prompt_input_ids"] == row["prompt_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_a_stopped_run_resumes_to_the_uninterrupted_adapter(write_experiment, tmp_path, register_plugin, name):
    path = write_experiment(experiment(name), PREF_ROWS)
    assert_stopped_run_resumes_to_the_uninterrupted_adapter(path, tmp_path, register_plugin)


@pytest.mark.parametrize("name", METHODS)
def test_plan_has_both_answers_no_reference_and_the_whole_logits(write_experiment, name):
    exp = config.load(write_experiment(experiment(name), PREF_ROWS))
    dpo = config.load(write_experiment(experiment("dpo"), PREF_ROWS, name="dpo.toml"))
    plan, dpo_plan = budget.plan_experiment(exp).plan, budget.plan_experiment(dpo).plan
    assert plan.work.sequences == 2 and plan.work.tokens == dpo_plan.work.tokens
    assert not plan.work.reference_forward and plan.work.log_softmaxes == (1.5 if name == "orpo" else 1.0)
    names = {c.name for c in plan.components}
    assert "reference forward" not in names and "reference forward" in {c.name for c in dpo_plan.components}
    loss = next(c for c in plan.components if c.name == "logits and loss")
    assert "float32 log-softmaxes" in loss.note
    n, vocab, d = plan.work.tokens, plan.arch.vocab, cost.dtype_bytes(plan.work.compute_dtype)
    assert loss.bytes >= n * vocab * (d + 4 * plan.work.log_softmaxes)  # the logits, then the float32 log-softmaxes


@pytest.mark.parametrize("name", METHODS + ["kto"])
def test_fx_plan_gives_each_bench_a_t4_verdict(name, capsys):
    assert main(["plan", str(ROOT / "experiments" / f"llama2_{name}_bench.toml")]) == 0
    out = capsys.readouterr().out
    assert "fits the t4 budget" in out
    assert ("reference forward" in out) == (name == "kto")


def test_fx_bench_measures_an_orpo_experiment(write_experiment, tmp_path):
    out = tmp_path / "result.json"
    assert main(["bench", str(write_experiment(experiment("orpo"), PREF_ROWS)), "--steps", "2", "--warmup", "1",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    r = data["results"]
    assert r["measured_steps"] == 2 and r["tokens"] == sum(r["step_tokens"]) > 0
    assert data["plan"]["workload"]["sequences"] == 2 and not data["plan"]["workload"]["reference_forward"]


@pytest.mark.parametrize("assignment, key", [("method.beta=0", "method.beta"), ("method.gamma=-1", "method.gamma"),
                                             ("method.nll_weight=\"x\"", "method.nll_weight"),
                                             ("method.padding_free=true", "padding_free")])
def test_bad_simpo_settings_end_with_exit_2_naming_the_key(write_experiment, capsys, assignment, key):
    assert main(["plan", str(write_experiment(experiment("simpo"), PREF_ROWS)), "--set", assignment]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err


def test_simpo_is_cpo_with_the_simpo_loss_and_no_nll_term(write_experiment):
    exp = config.load(write_experiment(experiment("simpo"), PREF_ROWS))
    prep = prepare(exp)
    method = exp.method.cls(exp.method.settings)
    model = method.load(prep.source, prep.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = method.trainer(model, prep.tokenizer, prep.train.rows, Session(output_dir=Path(tmp), seed=0))
    assert type(trainer).__mro__[1].__name__ == "CPOTrainer"
    assert (trainer.loss_type, trainer.cpo_alpha, trainer.beta, trainer.simpo_gamma) == ("simpo", 0.0, 2.0, 1.0)
    assert not trainer.args.bf16 and not trainer.args.gradient_checkpointing  # fx's choices, not trl's defaults
