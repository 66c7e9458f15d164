"""Training for real: 4-bit QLoRA on a tiny random Llama; loss falls, labels are masked, the adapter reloads."""

from __future__ import annotations

import json

import pytest
import torch

from fx import config
from fx.data.prepare import prepare
from fx.evaluation import heldout_loss


def test_run_directory_holds_everything(tiny_run):
    _, folder, _ = tiny_run
    for name in ("config.toml", "env.json", "metrics.jsonl", "summary.json", "samples.md",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (folder / name).is_file(), name
    summary = json.loads((folder / "summary.json").read_text())
    for key in ("eval_before", "eval_after", "train_tokens_per_s", "peak_vram_gib", "peak_rss_gib", "steps", "wall_s"):
        assert key in summary
    assert summary["status"] == "completed" and summary["steps"] == 12
    assert summary["peak_vram_gib"] is None  # CPU
    env = json.loads((folder / "env.json").read_text())
    assert env["libraries"]["transformers"] and env["libraries"]["bitsandbytes"]
    assert config.load(folder / "config.toml").method.settings.max_steps == 12  # the resolved config reloads


def test_loss_falls(tiny_run):
    _, folder, _ = tiny_run
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] - 0.5
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s and "step" in s]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_only_answer_tokens_carry_loss(tiny_run):
    exp, _, _ = tiny_run
    prep = prepare(exp)
    row = prep.train.rows[0]
    answer = prep.train_examples[0].messages[-1]["content"]
    trained = prep.tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert trained == f" {answer} {prep.tokenizer.eos_token}"  # llama2 closes answers with the model's end token
    assert row["labels"][0] == -100


def test_base_is_4bit_and_only_lora_trains(tiny_run):
    exp, folder, _ = tiny_run
    import bitsandbytes as bnb

    method = exp.method.cls(exp.method.settings)
    prep = prepare(exp)
    model = method.load(prep.source, prep.tokenizer)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_adapter_reloads_and_reproduces_logits(tiny_run):
    """The saved adapter, put back on the base with plain peft, gives the trained model's logits."""
    from peft import PeftModel

    exp, folder, _ = tiny_run
    prep = prepare(exp)
    method = exp.method.cls(exp.method.settings)
    ids = torch.tensor([prep.held_out.rows[0]["input_ids"]])

    base = method.load_base(prep.source)  # 4-bit as in training, in the same weight layout (keep_4bit_layout)
    reloaded = PeftModel.from_pretrained(base, folder / "adapter").eval()
    with torch.no_grad():
        logits = reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            base_logits = reloaded(input_ids=ids).logits
    assert not torch.allclose(logits, base_logits, atol=1e-3), "the adapter changes the model"
    summary = json.loads((folder / "summary.json").read_text())
    assert heldout_loss(reloaded, prep.held_out.rows, prep.tokenizer.pad_token_id)["loss"] == pytest.approx(
        summary["eval_after"]["loss"], abs=1e-3)
