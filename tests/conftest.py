"""Shared fixtures: a tiny random Llama, experiment files written on the fly, and inline plugins."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fx import manager

ROOT = Path(__file__).resolve().parents[1]

# A conversation dataset small enough to train a tiny model on in seconds.
TINY_ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}"}],
     "expect": [str(a + b)]}
    for a in range(1, 7) for b in range(1, 5)
]


@pytest.fixture(autouse=True)
def fresh_plugins():
    """Every test sees plugins built from scratch (an env var or an installed package may have changed)."""
    manager.get.cache_clear()
    yield
    manager.get.cache_clear()


@pytest.fixture
def write_experiment(tmp_path):
    """Write an experiment file (and its data) into tmp_path; returns its path."""

    def write(text: str, rows: list[dict] | None = None, name: str = "exp.toml") -> Path:
        if rows is not None:
            (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        path = tmp_path / name
        path.write_text(text.replace("{out}", str(tmp_path / "runs")))
        return path

    return write


TINY_EXPERIMENT = """
[experiment]
name = "tiny"
seed = 0
output_dir = "{out}"

[model]
source = "random"
architecture = "tiny"
dtype = "float32"

[data]
source = "file"
path = "rows.jsonl"
eval_fraction = 0.25
max_length = 64

[template]
name = "llama2"
system_prompt = "Answer with a number."

[method]
name = "qlora_sft"
max_steps = 12
micro_batch_size = 4
learning_rate = 0.01
optim = "adamw_torch"
gradient_checkpointing = false
warmup_ratio = 0.0
lr_scheduler = "constant"
max_grad_norm = 1.0

[method.lora]
r = 8
alpha = 16
dropout = 0.0
target_modules = "all-linear"

[trackers.jsonl]

[stages.evaluate]
metric = "contains"
max_new_tokens = 4

[stages.generate]
count = 2
max_new_tokens = 4
"""


@pytest.fixture
def tiny_experiment(write_experiment):
    return write_experiment(TINY_EXPERIMENT, TINY_ROWS)


@pytest.fixture
def register_plugin(monkeypatch):
    """Register an inline plugin object for one test (llm's tests/conftest.py pattern); gone after the test."""

    def register(plugin, name: str) -> manager.Plugins:
        base = manager.build()
        base.pm.register(plugin, name=name)
        plugins = manager.Plugins(base.pm, base.versions)  # runs the register hooks again, this plugin included
        monkeypatch.setattr(manager, "get", lambda: plugins)
        return plugins

    return register


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


gpu = pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU")
