"""The speed levers change how a batch runs, never what it computes: padding-free batches train exactly like
padded ones, packed rows never attend to each other, and a token budget gives the whole batch's gradient."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_EXPERIMENT
from fx import cli

# rows of clearly different lengths, so that padding and packing differ
ROWS = [
    {"messages": [{"role": "user", "content": "Count: " + " ".join(str(k) for k in range(n))},
                  {"role": "assistant", "content": " ".join(str(k) for k in range(n, n + 1 + n % 5))}]}
    for n in range(1, 17)
]


def train(write_experiment, tmp_path: Path, name: str, *sets: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    path = write_experiment(TINY_EXPERIMENT, ROWS, name=f"{name}.toml")
    out = tmp_path / name
    args = ["run", str(path), "--set", f"experiment.output_dir={out}", "--set", "method.max_steps=4",
            "--set", "data.eval_fraction=0.0", "--set", "stages.evaluate.enabled=false",
            "--set", "stages.generate.enabled=false"]
    for assignment in sets:
        args += ["--set", assignment]
    assert cli.main(args) == 0
    (folder,) = out.iterdir()
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and "step" in r]
    return losses, load_file(folder / "adapter" / "adapter_model.safetensors")


def assert_same_training(a, b, rtol=1e-4, atol=1e-5):
    (losses_a, adapter_a), (losses_b, adapter_b) = a, b
    assert len(losses_a) == len(losses_b) == 4
    assert losses_a == pytest.approx(losses_b, rel=rtol)
    assert adapter_a.keys() == adapter_b.keys()
    for key in adapter_a:
        torch.testing.assert_close(adapter_a[key], adapter_b[key], rtol=rtol, atol=atol)


def test_padding_free_trains_exactly_like_padded_batches(write_experiment, tmp_path):
    padded = train(write_experiment, tmp_path, "padded", "method.padding_free=false")
    packed = train(write_experiment, tmp_path, "packed", "method.padding_free=true")
    assert_same_training(padded, packed)


def test_token_budget_gives_the_whole_batch_gradient(write_experiment, tmp_path):
    """One batch of 4 rows, the same 4 rows as 2 x 2 with accumulation, and 4 rows cut by a token budget so small
    that every row goes alone: the same losses and the same adapter."""
    whole = train(write_experiment, tmp_path, "whole", "method.micro_batch_size=4")
    accumulated = train(write_experiment, tmp_path, "accumulated", "method.micro_batch_size=2",
                        "method.gradient_accumulation_steps=2")
    budget = train(write_experiment, tmp_path, "budget", "method.micro_batch_size=4", "method.micro_batch_tokens=8")
    assert_same_training(whole, accumulated)
    assert_same_training(whole, budget)


def test_packed_rows_never_attend_to_each_other():
    """Two rows packed into one sequence with restarting position ids give each row's own logits; the same packed
    sequence under an all-ones mask (rows attending across) does not, so the check has teeth. Training runs
    without a KV cache (transformers detects packed rows only then), as fx and trl train."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    first, second = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        alone = torch.cat([model(input_ids=first, use_cache=False).logits,
                           model(input_ids=second, use_cache=False).logits], dim=1)
        ids = torch.cat([first, second], dim=1)
        positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        leaking = model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids),
                        use_cache=False).logits
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaking[:, 7:], alone[:, 7:], atol=1e-3)


def test_split_micro_batches_cuts_between_rows():
    from fx.training.microbatch import split_micro_batches

    lengths = [5, 3, 6, 2]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.arange(positions.numel())[None]
    starts = torch.tensor([0, 5, 8, 14, 16], dtype=torch.int32)
    packed = {"input_ids": ids, "labels": ids.clone(), "position_ids": positions,
              "cu_seq_lens_q": starts, "cu_seq_lens_k": starts, "max_length_q": 6, "max_length_k": 6}
    parts = split_micro_batches(packed, 9)
    assert [p["input_ids"].shape[1] for p in parts] == [8, 8]  # 5+3, then 6+2
    assert torch.equal(torch.cat([p["input_ids"] for p in parts], dim=1), ids)
    assert parts[1]["cu_seq_lens_q"].tolist() == [0, 6, 8] and parts[1]["max_length_q"] == 6
    assert len(split_micro_batches(packed, 4)) == 4  # a row longer than the budget goes alone

    mask = torch.tensor([[1] * 5 + [0], [1] * 3 + [0] * 3, [1] * 6, [1] * 2 + [0] * 4])
    padded = {"input_ids": torch.ones(4, 6, dtype=torch.long), "labels": torch.ones(4, 6, dtype=torch.long),
              "attention_mask": mask}
    parts = split_micro_batches(padded, 12)
    assert [tuple(p["input_ids"].shape) for p in parts] == [(2, 5), (2, 6)]  # 2 x 5 <= 12; then 6 and 2, padded to 6
    assert sum(int(p["attention_mask"].sum()) for p in parts) == int(mask.sum())


def test_liger_is_off_without_a_gpu_and_refused_when_insisted_on(tiny_experiment, capsys):
    assert cli.main(["validate", str(tiny_experiment), "--set", "method.liger=true"]) == 0  # valid settings
    code = cli.main(["run", str(tiny_experiment), "--set", "method.liger=true", "--set", "method.max_steps=1"])
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert code == 2
    assert "method.liger = true needs a CUDA GPU" in capsys.readouterr().err


def test_planner_counts_the_token_budget(write_experiment):
    from fx import config
    from fx.training.budget import plan_experiment

    path = write_experiment(TINY_EXPERIMENT, ROWS)
    rows = plan_experiment(config.load(path, ["method.micro_batch_size=8"]))
    budget = plan_experiment(config.load(path, ["method.micro_batch_size=8", "method.micro_batch_tokens=100"]))
    assert rows.plan.work.tokens == 8 * 64
    assert budget.plan.work.tokens == 100
    assert budget.plan.total < rows.plan.total
