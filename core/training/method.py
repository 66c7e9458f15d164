"""The method contract: what a training method provides, what it is given, and what fx does around it.

docs/plugins.md ("Writing a method") is the guide, with a complete third-party method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fx import settings
from fx.training.settings import execution_keys


@dataclass(frozen=True)
class Session:
    """What a method's trainer is told of the run it trains in. Read-only: fx owns the run."""

    output_dir: Path  # where the trainer writes its checkpoints (a temporary folder under fx bench)
    seed: int
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: none (fx also checkpoints the last step)
    checkpoint_keep: int | None = None  # how many of the newest checkpoints are kept
    max_steps: int | None = None  # train exactly this many optimizer steps (fx bench); None: as the settings say


class Method(ABC):
    """A way to train a model. A method provides:

    * ``Settings``: its keys of ``[method]`` (a pydantic model; subclass the shared ones in ``fx.training.settings``);
    * :meth:`load`: the model, ready to train;
    * :meth:`trainer`: a ``transformers.Trainer`` (trl's included) for that model and the tokenized rows;
    * :meth:`workload`: the run's shape for the memory planner;
    * :meth:`save` and :meth:`load_trained`: what it learned, written and loaded back.

    fx drives the trainer (``fx.training.contract``), so every method gets, with no code of its own: checkpoints
    every ``[checkpoints] every_steps`` and at the last step, ``fx run --resume`` from the last complete checkpoint,
    SIGINT/SIGTERM finishing the step with a checkpoint, the out-of-memory report (with the token budget to resume
    with, when its settings have ``micro_batch_tokens``), real-token counting, logging to every tracker, budgets and
    the allocator cap, ``fx plan`` and ``fx bench``.

    QLoRA methods subclass :class:`fx.training.QLoraMethod`, which provides all but :meth:`trainer`.
    """

    description = ""
    preference = False  # True: trains on preference rows (Example.chosen / Example.rejected)
    # how it trains on several GPUs (docs/distributed.md): "ddp" works for any trainer; "fsdp" needs a model FSDP can
    # shard (fx.QLoraMethod's 4-bit loading provides it)
    strategies: tuple[str, ...] = ("ddp",)
    unpaired = False  # True: trains on unpaired rows (Example.completion / Example.label)

    class Settings(settings.Settings):
        pass

    def __init__(self, settings: Settings):
        self.settings = settings

    @classmethod
    def execution_keys(cls) -> tuple[str, ...]:
        """Keys of ``[method]`` that change how a step executes, never what it computes: ``fx bench --compare``
        compares across them and ``fx run --resume --set`` may change them."""
        return execution_keys(cls.Settings)

    # -- what a method must provide ---------------------------------------------------------------------------------

    @abstractmethod
    def load(self, source, tokenizer):
        """The model to train, from a model source (:class:`fx.ModelSource`): quantised, adapters attached."""

    @abstractmethod
    def trainer(self, model, tokenizer, rows: list[dict[str, Any]], session: Session):
        """A ``transformers.Trainer`` that trains ``model`` on ``rows`` (from :meth:`tokenize`); its arguments
        take their output folder, seed, checkpoint interval and step count from ``session``
        (:meth:`fx.training.QLoraMethod.trainer_args` fills them in). fx adds its callbacks and trains it."""

    @abstractmethod
    def save(self, model, folder: Path) -> None:
        """Write what was learned (an adapter) into ``folder`` so that it loads without fx."""

    @abstractmethod
    def load_trained(self, source, folder: Path):
        """The trained model for inference: the base as :meth:`load` prepares it, with what :meth:`save` wrote into
        ``folder`` in place of fresh adapters; in eval mode."""

    def workload(self, max_length: int, bf16: bool | None = None):
        """The run's shape for the memory planner (:class:`fx.plan.shapes.Workload`), or None: the method can't be
        planned (``fx plan`` says so, and a ``[budget]`` can't be held). ``bf16``: whether the target GPU computes in
        bfloat16 (None: this machine's)."""
        return None

    # -- what a method may override ---------------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Problems with the settings found before a run directory is made (a combination that can't work, a path
        that must exist), one line each naming the key."""
        return []

    def tokenize(self, examples, template, tokenizer, max_length: int):
        """The rows :meth:`trainer` and :meth:`evaluate` receive (:class:`fx.data.tokenize.Tokenized`): by default
        each conversation's ``input_ids`` and ``labels``, loss on the answers. ValueError for a row it can't use."""
        from fx.data.tokenize import tokenize

        return tokenize(examples, template, tokenizer, max_length)

    def merge_base(self, source, dtype):
        """The base ``fx merge`` adds the saved adapter into: the weights the adapter was trained against, as a plain
        (unquantised) transformers model in ``dtype``. By default the model source's own weights; a method that
        trains on a changed base (quantised, say) returns that base, so that the merged model is the trained one."""
        from fx.training.devices import device

        return source.load(dtype=dtype, device_map={"": 0} if device() == "cuda" else {"": "cpu"})

    def evaluate(self, model, tokenizer, template, rows, examples, settings) -> dict[str, Any]:
        """Held-out measurements of ``model`` on tokenized ``rows`` and their examples, before and after training and
        in ``fx eval``: by default the held-out loss and the ``[stages.evaluate]`` metric."""
        from fx.evaluation import evaluate

        return evaluate(model, tokenizer, template, rows, examples, settings)[0]
