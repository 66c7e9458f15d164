"""Method ``dpo``: DPO on a tiny random Llama for real (4-bit, LoRA, trl's DPOTrainer); the reference stays the base
(or the SFT policy it starts from); preference rows tokenized as generation prompts; settings, metrics, planner."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import (
    PREF_ROWS,
    ROOT,
    TINY_EXPERIMENT,
    TINY_ROWS,
    assert_stopped_run_resumes_to_the_uninterrupted_adapter,
)
from fx import config, pipeline
from fx.cli import main
from fx.data.prepare import prepare
from fx.hooks import manager
from fx.plan import cost
from fx.training import budget, contract
from fx.training.method import Session

DPO_EXPERIMENT = (TINY_EXPERIMENT.replace('name = "qlora_sft"', 'name = "dpo"\nbeta = 0.1')
                  .replace("max_steps = 12", "max_steps = 8") + "\n[trackers.csv]\n")


def dpo_experiment(write_experiment, extra: str = "", rows=PREF_ROWS):
    text = DPO_EXPERIMENT.replace("[method.lora]", extra + "\n[method.lora]") if extra else DPO_EXPERIMENT
    return write_experiment(text, rows)


@pytest.fixture(scope="module")
def dpo_run(train_tiny):
    return train_tiny("dpo", DPO_EXPERIMENT, PREF_ROWS)


def test_dpo_run_reports_preference_accuracy_before_and_after(dpo_run):
    _, folder = dpo_run
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 8
    before, after = summary["eval_before"], summary["eval_after"]
    for key in ("reward_accuracy", "reward_margin", "logp_accuracy", "logp_accuracy_per_token", "logp_margin",
                "chosen_loss", "contains"):
        assert key in before and key in after, key
    # a fresh adapter is the reference: every implicit reward margin is exactly 0 before training
    assert before["reward_accuracy"] == 0 and before["reward_margin"] == 0
    assert after["reward_margin"] > 0 and after["reward_accuracy"] > 0.5
    assert after["logp_margin"] > before["logp_margin"]
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()


def test_trl_preference_metrics_reach_the_trackers(dpo_run):
    _, folder = dpo_run
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    trained = [s for s in steps if "rewards/margins" in s]
    assert [s["step"] for s in trained] == list(range(1, 9))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected", "loss"):
        assert all(key in s for s in trained), key
    assert trained[-1]["rewards/margins"] > trained[0]["rewards/margins"]
    header = (folder / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"rewards/margins", "rewards/accuracies", "eval_reward_accuracy"} <= set(header)


def test_saved_adapter_is_the_policy_alone_and_fx_eval_reproduces_eval_after(dpo_run, capsys):
    from safetensors import safe_open

    _, folder = dpo_run
    with safe_open(str(folder / "adapter" / "adapter_model.safetensors"), framework="pt") as saved:
        names = list(saved.keys())
    assert names and not any(".ref." in n for n in names)
    assert main(["eval", str(folder)]) == 0
    measured = json.loads(capsys.readouterr().out)["metrics"]
    after = json.loads((folder / "summary.json").read_text())["eval_after"]
    assert measured["reward_margin"] == pytest.approx(after["reward_margin"], abs=1e-3)
    assert measured["logp_accuracy"] == after["logp_accuracy"] and measured["pairs"] == after["pairs"]


def trained_by_bench_api(exp, steps: int = 3):
    """The model before and after ``steps`` optimizer steps through ``method.trainer`` as ``fx bench`` calls it."""
    prep = prepare(exp)
    method = exp.method.cls(exp.method.settings)
    from transformers import set_seed

    set_seed(0)
    model = method.load(prep.source, prep.tokenizer)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        trainer = contract.build(method, model, prep.tokenizer, prep.train.rows,
                                 Session(output_dir=Path(tmp), seed=0, max_steps=steps))
        return prep, method, model, trainer


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_training_moves_the_adapter_and_leaves_the_reference_fixed(write_experiment, checkpointing):
    exp = config.load(dpo_experiment(write_experiment), [f"method.gradient_checkpointing={checkpointing}"])
    prep, method, model, trainer = trained_by_bench_api(exp)
    assert "ref" not in model.peft_config  # the reference is the base with the adapter off, not a second adapter
    ids = torch.tensor([prep.held_out.rows[0]["prompt_ids"] + prep.held_out.rows[0]["chosen_ids"]])
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n and p.dtype == torch.float32 for n, p in lora.items())
    model.eval()
    with torch.no_grad(), method.reference(model):
        reference_before = model(input_ids=ids).logits
    trainer.train()
    assert trainer.state.global_step == 3
    assert model.is_gradient_checkpointing == (checkpointing == "true")  # as fx set it, after the reference passes
    changed = [n for n, p in model.named_parameters() if n in lora and not torch.equal(p.detach(), lora[n])]
    assert any("lora_B" in n for n in changed)
    model.eval()
    with torch.no_grad():
        with method.reference(model):
            reference_after = model(input_ids=ids).logits
        policy = model(input_ids=ids).logits
    assert torch.equal(reference_before, reference_after)
    assert not torch.allclose(policy, reference_after, atol=1e-4)


def test_preference_rows_are_tokenized_as_generation_prompts_with_closed_answers(write_experiment):
    from fx.data.templating import encode_prompt

    exp = config.load(dpo_experiment(write_experiment))
    prep = prepare(exp)
    row, example = prep.train.rows[0], prep.train_examples[0]
    tok = prep.tokenizer
    assert row["prompt_ids"] == encode_prompt(tok, prep.template.prompt(example.messages))
    assert tok.decode(row["chosen_ids"]) == f" {example.chosen} {tok.eos_token}"  # llama2 closes answers with EOS
    assert tok.decode(row["rejected_ids"]) == f" {example.rejected} {tok.eos_token}"
    limited = exp.method.cls(exp.method.cls.Settings(max_prompt_length=5, max_completion_length=2))
    short = limited.tokenize(prep.train_examples[:1], prep.template, tok, 64).rows[0]
    assert short["prompt_ids"] == row["prompt_ids"][-5:]  # a long prompt keeps its end, next to the answer
    assert short["chosen_ids"] == row["chosen_ids"][:2] and short["rejected_ids"] == row["rejected_ids"][:2]


def test_init_adapter_starts_from_an_sft_run_and_keeps_it_as_the_reference(write_experiment, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    sft = config.load(write_experiment(TINY_EXPERIMENT, TINY_ROWS, name="sft.toml"),
                      ["method.max_steps=2", "stages.evaluate.enabled=false", "stages.generate.enabled=false"])
    sft_run = pipeline.execute(sft, manager.get())
    exp = config.load(dpo_experiment(write_experiment),
                      [f'method.init_adapter="{sft_run}"', "method.learning_rate=0.05"])
    prep, method, model, trainer = trained_by_bench_api(exp, steps=2)
    saved = load_file(str(sft_run / "adapter" / "adapter_model.safetensors"))
    ref = {n: p for n, p in model.named_parameters() if ".ref." in n}
    assert ref and not any(p.requires_grad for p in ref.values())
    ids = torch.tensor([prep.held_out.rows[0]["prompt_ids"] + prep.held_out.rows[0]["chosen_ids"]])
    sft_model = PeftModel.from_pretrained(method.load_base(prep.source), sft_run / "adapter").eval()
    with torch.no_grad():
        sft_logits = sft_model(input_ids=ids).logits
    trainer.train()
    model.eval()
    with torch.no_grad():
        with method.reference(model):
            reference = model(input_ids=ids).logits
        policy = model(input_ids=ids).logits
    assert torch.allclose(reference, sft_logits, atol=1e-5)  # the reference is the SFT policy, unchanged
    assert not torch.allclose(policy, sft_logits, atol=1e-4)  # the policy started there and moved
    assert len(saved) == len(ref)
    for name, tensor in saved.items():  # the SFT weights sit unchanged under the name "ref"
        assert torch.equal(ref[name.replace(".weight", ".ref.weight")].detach().to(tensor.dtype), tensor)


def test_init_adapter_that_is_not_a_run_is_refused_before_anything_runs(write_experiment, tmp_path, capsys):
    path = dpo_experiment(write_experiment, f'init_adapter = "{tmp_path / "nowhere"}"')
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "method.init_adapter" in err and "nowhere" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("assignment, key", [("method.loss_type=\"sigmoidal\"", "method.loss_type"),
                                             ("method.beta=0", "method.beta"),
                                             ("method.beta=\"high\"", "method.beta"),
                                             ("method.max_prompt_length=0", "method.max_prompt_length"),
                                             ("method.loss_type=\"exo_pair\"", "label_smoothing")])
def test_bad_settings_end_with_exit_2_naming_the_key(write_experiment, capsys, assignment, key):
    path = dpo_experiment(write_experiment)
    assert main(["run", str(path), "--set", assignment]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err


def test_loss_types_are_the_ones_trl_accepts():
    from trl import DPOConfig

    from fx.plugins.methods.dpo import LOSS_TYPES

    documented = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    listed = documented.split("Possible values are:")[1].split(". If")[0]
    assert sorted(LOSS_TYPES) == sorted(v.strip(" `'") for v in listed.split(","))


def test_data_with_one_answer_per_row_is_refused_for_dpo(write_experiment, capsys):
    path = write_experiment(DPO_EXPERIMENT, TINY_ROWS)
    assert main(["run", str(path)]) == 2
    assert "preference pairs" in capsys.readouterr().err


def test_plan_counts_both_answers_and_the_reference_forward(write_experiment):
    sft = config.load(write_experiment(TINY_EXPERIMENT, TINY_ROWS))
    dpo = config.load(dpo_experiment(write_experiment), ["method.lora.dropout=0.0"])
    sft_plan, dpo_plan = budget.plan_experiment(sft).plan, budget.plan_experiment(dpo).plan
    assert dpo_plan.work.tokens == 2 * sft_plan.work.tokens and dpo_plan.work.reference_forward
    assert dpo_plan.total > sft_plan.total
    names = {c.name for c in dpo_plan.components}
    assert "reference forward" in names and "reference forward" not in {c.name for c in sft_plan.components}
    from dataclasses import replace

    from_sft = cost.plan(dpo_plan.arch, replace(dpo_plan.work, reference_adapter=True))
    n_lora, _ = cost.lora_params(dpo_plan.arch, dpo_plan.work)
    assert from_sft.total - dpo_plan.total == pytest.approx(n_lora * 4)  # a frozen fp32 copy


def test_fx_plan_gives_the_dpo_bench_a_t4_verdict(capsys):
    assert main(["plan", str(ROOT / "experiments" / "llama2_dpo_bench.toml")]) == 0
    out = capsys.readouterr().out
    assert "fits the t4 budget" in out and "reference forward" in out


def test_synthetic_preference_rows():
    from pathlib import Path

    from fx.plugins.datasets.synthetic import SyntheticDataset

    source = SyntheticDataset(SyntheticDataset.Settings(rows=50, preference=True, mean_prompt_tokens=40,
                                                        mean_tokens=60), Path("."))
    rows, held = source.load()
    assert held is None and rows.column_names == ["prompt", "chosen", "rejected"] and len(rows) == 50
    words = [len(r["chosen"].split()) for r in rows]
    assert 40 < sum(words) / len(words) < 80
    assert any(r["chosen"] != r["rejected"] for r in rows)


def test_fx_bench_measures_a_dpo_experiment(write_experiment, tmp_path, capsys):
    path = dpo_experiment(write_experiment)
    out = tmp_path / "result.json"
    assert main(["bench", str(path), "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    r = data["results"]
    assert r["measured_steps"] == 2 and r["tokens"] == sum(r["step_tokens"]) > 0
    assert data["plan"]["workload"]["sequences"] == 2 and data["plan"]["workload"]["reference_forward"]
    assert main(["bench", str(path), "--reference", "--steps", "1"]) == 2
    assert "preference pairs" in capsys.readouterr().err


@pytest.mark.parametrize("assignment", ["method.padding_free=true", "method.micro_batch_tokens=256"])
def test_sft_only_speed_levers_are_refused_for_dpo(write_experiment, capsys, assignment):
    path = dpo_experiment(write_experiment)
    assert main(["plan", str(path), "--set", assignment]) == 2
    assert assignment.split("=")[0].removeprefix("method.") in capsys.readouterr().err


def test_an_interrupted_dpo_run_resumes_to_the_uninterrupted_result(write_experiment, tmp_path, register_plugin):
    assert_stopped_run_resumes_to_the_uninterrupted_adapter(dpo_experiment(write_experiment), tmp_path, register_plugin)


def test_shipped_smollm2_pairs_train_on_the_generation_prompt_and_close_with_eos():
    from fx.data.templating import encode_prompt

    prep = prepare(config.load(ROOT / "experiments" / "smollm2_dpo.toml"))
    assert len(prep.train.rows) == 150 and len(prep.held_out.rows) == 30 and prep.train.truncated == 0
    tok = prep.tokenizer
    for row, example in zip(prep.train.rows + prep.held_out.rows, prep.train_examples + prep.held_out_examples):
        assert row["prompt_ids"] == encode_prompt(tok, prep.template.prompt(example.messages))
        assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tok.eos_token_id
    assert not ({e.messages[-1]["content"] for e in prep.train_examples}
                & {e.messages[-1]["content"] for e in prep.held_out_examples})


def test_merging_a_dpo_run_checks_the_chosen_answers_and_the_models_own_preference(dpo_run, tmp_path):
    """A merged model has no adapter to switch off, so the reward accuracy (policy against reference) can't be
    compared; the merge check measures the loss on each pair's chosen answer and which answer of each pair the model
    finds the more likely, the adapter model's equal to its eval_after, the float32 merge's identical."""
    from fx.after import fidelity, inference
    from fx.after.merge import merge

    _, folder = dpo_run
    result = merge(inference.finished(folder), tmp_path / "merged", "float32")
    check, after = result["check"], json.loads((folder / "summary.json").read_text())["eval_after"]
    assert result["base"] == "trained" and check["within_tolerance"], check
    assert check["adapter"]["loss"] == pytest.approx(after["chosen_loss"], rel=1e-3)
    assert check["adapter"]["logp_accuracy"] == check["merged"]["logp_accuracy"] == after["logp_accuracy"]
    assert check["logp_accuracy_gap"] == 0 and check["same_answers"] == check["answers"] > 0
    assert "reward_accuracy" not in check["merged"]
    assert any("preferred answer the more likely" in line for line in fidelity.lines(result))
