"""A run as plugins see it (the ``run`` argument of the lifecycle hooks), and its ``summary.json``."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fx.run.directory import RunDir
from fx.training.contract import Progress


class Run:
    """What a plugin sees of a run: read-only facts, and the training progress as it goes."""

    def __init__(self, folder: RunDir, config: dict[str, Any], plugins, resume_step: int | None = None,
                 main: bool = True):
        self.files = folder
        self._config = config
        self._plugins = plugins
        self._main = main  # on several GPUs only rank 0's run calls the plugins' hooks
        self._resume_step = resume_step
        self.progress = Progress()
        self.history: list[tuple[int, dict[str, float]]] = []  # every fx_log call, in order (plots/loss.png)
        self.current_stage: str | None = None  # the stage under way, None between stages

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
            self._plugins.hook.fx_log(run=self, step=step, metrics=metrics)

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


class Summary(dict):
    """``summary.json``, rewritten after every stage so that a killed run still says how far it got (by rank 0 alone
    on several GPUs: ``folder`` None on the others). Each write brings ``wall_s`` up to date: the wall time of every
    segment of the run (a resumed run adds ``earlier_wall_s``, its earlier segments', to this one's, counted from
    ``started_at``), and the last of ``segments``' own."""

    def __init__(self, folder: RunDir | None, started_at: float | None = None, earlier_wall_s: float = 0.0,
                 **values):
        super().__init__(**values)
        self.folder = folder
        self.started_at = time.perf_counter() if started_at is None else started_at
        self.earlier_wall_s = earlier_wall_s
        self.stopped_at: float | None = None

    def stop_clock(self) -> None:
        """The run has ended: later writes (what the trackers did at its end) keep its wall time as it is now, the
        one ``fx_run_end`` was given."""
        self.stopped_at = time.perf_counter()

    def write(self) -> None:
        elapsed = (self.stopped_at or time.perf_counter()) - self.started_at
        self["wall_s"] = round(self.earlier_wall_s + elapsed, 1)
        if self.get("segments"):
            self["segments"][-1]["wall_s"] = round(elapsed, 1)
        if self.folder is not None:
            self.folder.write_summary(self)
