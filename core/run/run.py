"""A run as plugins see it (the ``run`` argument of the lifecycle hooks). What it logs goes to every plugin and into
the run's ``history.jsonl`` (fx.run.record), whatever trackers are on."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fx.run.directory import RunDir
from fx.run.record import append_history, keep_history_until
from fx.training.contract import Progress


class Run:
    """What a plugin sees of a run: read-only facts, and the training progress as it goes."""

    def __init__(self, folder: RunDir, config: dict[str, Any], plugins, resume_step: int | None = None,
                 main: bool = True, resuming: bool = False):
        self.files = folder
        self._config = config
        self._plugins = plugins
        self._main = main  # on several GPUs only rank 0's run calls the plugins' hooks
        self._resume_step = resume_step
        self.progress = Progress()
        # every fx_log call of every segment, in order (plots/loss.png): a resumed run's history up to its checkpoint
        self.history: list[tuple[int, dict[str, float]]] = []
        self.current_stage: str | None = None  # the stage under way, None between stages
        self._history_file = None
        if main:
            if resuming:  # the steps after the checkpoint (all of them, with none) are trained again
                self.history = keep_history_until(folder.history, resume_step or 0, legacy=folder.metrics)
            self._history_file = open(folder.history, "a", encoding="utf-8")

    name = property(lambda self: self.files.path.name)
    dir = property(lambda self: self.files.path)  # the run's folder; its parent is the experiment's output_dir
    config = property(lambda self: self._config)  # the resolved experiment, every default filled in
    resume_step = property(lambda self: self._resume_step)  # the checkpoint's step when the run resumes, else None
    max_steps = property(lambda self: self.progress.max_steps)  # known once training starts
    step = property(lambda self: self.progress.step)  # optimizer steps done

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask training to stop after the step in progress, with a checkpoint, as SIGTERM does."""
        self.progress.stop_signal = signum

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Send metrics to every plugin; on a GPU, add the peak memory reserved so far (``peak_vram_gib``)."""
        import torch

        if torch.cuda.is_available():
            metrics = {**metrics, "peak_vram_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}
        self.history.append((step, dict(metrics)))
        if self._main:
            append_history(self._history_file, step, metrics)
            self._plugins.hook.fx_log(run=self, step=step, metrics=metrics)

    def close(self) -> None:
        """The run has ended: its history file is closed."""
        if self._history_file is not None:
            self._history_file.close()
            self._history_file = None

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Announce a stage to plugins; what the body puts in the yielded dict is the stage's result."""
        self.current_stage = name  # from before the plugins hear of it to after they heard its end
        if self._main:
            self._plugins.hook.fx_stage_start(run=self, stage=name)
        result: dict[str, Any] = {}
        yield result
        if self._main:
            self._plugins.hook.fx_stage_end(run=self, stage=name, result=result)
        self.current_stage = None
