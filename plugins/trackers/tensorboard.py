"""Tracker ``tensorboard``: TensorBoard event files in ``<run>/tensorboard``.

Scalars by optimizer step (``train/<metric>``, held-out ``eval/<metric>``), the resolved experiment as
text (``config``) and the summary as text (``summary``). ``tensorboard --logdir runs`` shows every run
in the output folder side by side. Needs the ``tensorboard`` extra: ``pip install 'fx[tensorboard]'``.
"""

from __future__ import annotations

import json

import tomli_w

import fx
from fx.run.tracking import Tracker, needs_extra


def tag(metric: str) -> str:
    """``eval_loss`` -> ``eval/loss``; ``loss`` -> ``train/loss``: TensorBoard groups charts by the prefix."""
    if metric.startswith("eval_"):
        return "eval/" + metric.removeprefix("eval_")
    return "train/" + metric


class TensorBoardTracker(Tracker):
    description = "TensorBoard event files in <run>/tensorboard (scalars, the resolved config as text)"

    @classmethod
    def check(cls, settings) -> list[str]:
        return needs_extra("tensorboard", "tensorboard")

    def start(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.run.dir / "tensorboard"), flush_secs=10)
        self.writer.add_text("config", "```toml\n" + tomli_w.dumps(self.run.config) + "```", global_step=0)
        self.last_step = 0

    def log(self, step, metrics) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(tag(name), value, global_step=step)
        self.last_step = max(self.last_step, step)

    def finish(self, summary, error) -> None:
        self.writer.add_text("summary", "```json\n" + json.dumps(summary, indent=2) + "\n```",
                             global_step=self.last_step)
        self.writer.close()


@fx.hookimpl
def fx_register_trackers(register):
    register("tensorboard", TensorBoardTracker)
