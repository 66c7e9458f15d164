"""One run's shared state, assembled once: the experiment, its plugins (built once, ``exp.built``), its data (prepared
once), the run folder, the record, and the model in memory. Every stage of ``fx run`` reads and writes this; the
commands on a finished run (``fx merge``, ``fx export``) build the same context from the run's folder
(:meth:`Context.finished`) and hand it to the same functions the stages call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fx.config import Experiment
from fx.data.prepare import Prepared, prepare
from fx.errors import UserError
from fx.run.directory import RunDir
from fx.run.record import Record, RunSummary
from fx.run.resume import read_run
from fx.run.run import Run


@dataclass
class Context:
    exp: Experiment
    prep: Prepared
    folder: RunDir
    record: Record
    plugins: Any = None  # the plugin manager whose hooks the run calls; None for a finished run's command
    run: Run | None = None  # what plugins see of the run; None for a finished run's command
    previous: RunSummary | None = None  # the record as the earlier segment left it (a resumed run)
    fitted: Any = None  # the memory plan (fx.training.budget.Fitted), when the experiment could be planned
    cap: float | None = None  # the CUDA allocator's cap in bytes, when a budget set one
    resume_from: Path | None = None  # the checkpoint training continues from
    model: Any = None  # the model in memory: loaded by the load stage, trained by train, freed before a merge
    trained: bool = False  # whether ``model`` holds the trained adapter (after training, or reloaded so)

    method = property(lambda self: self.prep.method)
    source = property(lambda self: self.prep.source)
    tokenizer = property(lambda self: self.prep.tokenizer)
    template = property(lambda self: self.prep.template)
    summary = property(lambda self: self.record.summary)

    @classmethod
    def finished(cls, run_dir: Path, exp: Experiment | None = None) -> Context:
        """The context of a run that has ended (its experiment as the run resolved it, its data prepared again, its
        record read back), for a command on it; nothing in the folder changes until the command records a result."""
        folder = RunDir(run_dir)
        exp = exp or read_run(Path(run_dir))
        summary = folder.read_summary()
        if summary is None:
            raise UserError(f"{run_dir}: the run has no summary.json; run it again (fx run) or resume it "
                            f"(fx run --resume {run_dir})")
        return cls(exp, prepare(exp), folder, Record(folder, summary, timed=False))

    def done(self, stage: str) -> bool:
        """Whether the earlier segment of a resumed run completed ``stage``."""
        entry = self.previous.stages.get(stage) if self.previous is not None else None
        return entry is not None and entry.status == "completed"

    def step(self) -> int:
        """The optimizer step the run stands at (0 before training)."""
        return (self.run.progress.step if self.run is not None else 0) or self.summary.steps or 0
