"""Base class of training methods, and the device and precision choices every method shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fx.config import Strict


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(choice: str):
    """``auto``: float32 on CPU (bf16 on a CPU without native bf16 measured ~15x slower), bfloat16 on GPUs
    that support it, float16 on T4-class GPUs."""
    import torch

    if choice != "auto":
        return getattr(torch, choice)
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Method:
    """A way to train: loads the model it needs from a model source, trains it, saves what it learned.

    ``run`` is None when the method is built to load a finished run (``fx eval``, ``fx generate``, ``fx chat``).
    """

    description = ""
    preference = False  # True for a method that trains on preference rows (Example.chosen / Example.rejected)
    # settings that change how a step executes (speed, memory), never what it computes: `fx bench --compare`
    # ignores them and `fx run --resume` may change them (after an out-of-memory error, say)
    execution_keys: tuple[str, ...] = ()

    class Settings(Strict):
        pass

    def __init__(self, settings: Settings, run):
        self.settings = settings
        self.run = run

    def check(self) -> list[str]:
        """Problems with the settings that need the file system (a path that must exist), one line each naming
        the key; checked before a run directory is made."""
        return []

    def tokenize(self, examples, template, tokenizer, max_length: int):
        """The rows this method trains on (:class:`fx.data.Tokenized`): by default, each conversation's ids and
        labels with loss on the answers. ValueError for a row the method can't use."""
        from fx import data

        return data.tokenize(examples, template, tokenizer, max_length)

    def evaluate(self, model, tokenizer, template, rows, examples, settings) -> dict[str, Any]:
        """Held-out measurements of ``model`` on tokenized ``rows`` (from :meth:`tokenize`) and their examples,
        before and after training; by default held-out loss and the ``[stages.evaluate]`` metric."""
        from fx.evaluate import evaluate

        return evaluate(model, tokenizer, template, rows, examples, settings)[0]

    def load(self, source, tokenizer):
        """The model, ready to train (quantised, adapters attached)."""
        raise NotImplementedError

    def workload(self, max_length: int, bf16: bool | None = None):
        """The run's shape for the memory planner (:class:`fx.memory.Workload`), or None when this method
        can't be planned; ``bf16`` says whether the target GPU computes in bfloat16 (None: this machine's)."""
        return None

    def train(self, model, tokenizer, train_rows: list[dict], eval_rows: list[dict]) -> dict[str, Any]:
        """Train ``model`` in place on tokenized rows; log through ``self.run.log``; return what was measured."""
        raise NotImplementedError

    def save(self, model, folder: Path) -> None:
        """Write what was learned (an adapter) so that it can be loaded without fx."""
        raise NotImplementedError

    def load_trained(self, source, folder: Path):
        """The trained model for inference: the base as :meth:`load` prepares it, with what :meth:`save` wrote
        into ``folder`` in place of fresh adapters; in eval mode."""
        raise NotImplementedError


def keep_4bit_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 rewrites a Linear4bit's weight into another layout the first
    time it runs in eval mode without gradients, and its training path then reads that layout as the original:
    measured here, an evaluation before training made 3 optimizer steps turn held-out loss 4.0 into 16.5.
    One layout for evaluation and training costs some CPU inference speed and keeps the numbers right.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
