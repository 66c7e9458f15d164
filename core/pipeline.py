"""``fx run``: plan -> data -> run folder -> the declared stages (fx.stages: load, evaluate, generate, train, save,
evaluate, generate, merge, export, and any a plugin adds), walked in order over one context (fx.run.context).

Everything a user can get wrong (the file, the plugins, the data rows, the template, the budget) is checked before
the run folder exists, so a refused run leaves nothing behind. Once training starts, a failure still leaves the
folder with what was written so far and a record (summary.json, history.jsonl) that says what happened.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from fx.config import Experiment
from fx.data.formats import to_row
from fx.data.prepare import Prepared, prepare
from fx.data.report import length_histogram
from fx.errors import Interrupted, UserError, stopping_on_signals
from fx.plan.gpus import GIB
from fx.run import launch
from fx.run.context import Context
from fx.run.directory import RunDir, peak_rss_gib
from fx.run.plots import write_loss_plot
from fx.run.record import SCHEMA_VERSION, DataCounts, Record, RunSummary, Segment
from fx.run.run import Run
from fx.run.tracking import TrackerHub
from fx.stages.builtin import resume_command
from fx.stages.order import declared, preflight, walk
from fx.training import budget, contract, distributed
from fx.training.checkpoints import OPTIMIZER, last_checkpoint, ranks_of
from fx.training.devices import choose_threads


def interrupted_at(run: Run, signum: int = signal.SIGINT) -> str:
    """What a signal outside the checkpointed steps (before or after training, or a second one during it) left, and
    how to go on."""
    where, name = run.current_stage or "setup", signal.Signals(signum).name
    resume = f"Resume with: {resume_command(run.dir)}"
    if where == "train":
        return (f"stopped at once by a second {name} at step {run.step}; the last complete checkpoint is kept. "
                f"{resume}")
    if run.files.adapter.is_dir():
        return f"{name}: interrupted during the {where} stage, after training (the adapter is saved). {resume}"
    return f"{name}: interrupted during the {where} stage, before training; nothing was trained yet. {resume}"


def _measure_peaks(summary: RunSummary) -> None:
    import torch

    cuda = torch.cuda.is_available()
    summary.peak_vram_gib = round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None
    summary.peak_vram_allocated_gib = round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None
    summary.peak_rss_gib = peak_rss_gib()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _summary(exp: Experiment, prep: Prepared, run: Run, previous: RunSummary | None, world) -> RunSummary:
    """This segment's record: a new run's, or a resumed run's as its earlier segment left it (every stage it
    completed, with what it measured), marked running again with a new segment."""
    data = DataCounts(train_rows=len(prep.train.rows), eval_rows=len(prep.held_out.rows),
                      truncated=prep.train.truncated + prep.held_out.truncated,
                      dropped=prep.train.dropped + prep.held_out.dropped)
    segment = Segment(started=_now(), from_step=run.resume_step or 0, to_step=run.resume_step or 0, wall_s=0.0,
                      host=socket.gethostname(), pid=os.getpid())
    if previous is None:
        return RunSummary(name=run.name, status="running", created=datetime.now().isoformat(timespec="seconds"),
                          started=segment.started, segments=[segment], model=exp.model.name, method=exp.method.name,
                          template=exp.template.name, world_size=world.size, data=data)
    earlier = previous.segments or [Segment(started=previous.started, from_step=0, to_step=previous.steps or 0,
                                            wall_s=previous.wall_s)]  # a summary from before segments
    return previous.model_copy(deep=True, update=dict(
        version=SCHEMA_VERSION, status="running", started=segment.started, segments=[*earlier, segment],
        world_size=world.size, data=data, resumed_from_step=run.resume_step, error=None, failed_rank=None,
        plot_error=None, trackers_failed=None))


def execute(exp: Experiment, plugins, resume: Path | None = None) -> Path:
    """Run the experiment (or continue the run in ``resume``); return the run folder."""
    import torch

    started = time.perf_counter()
    fitted = budget.fit(exp)  # refuses a run over its budget before anything is loaded
    exp = fitted.exp if fitted else exp
    prep = prepare(exp)
    stages = declared(exp)  # a plugin's stage placed nowhere is refused before the folder exists
    preflight(exp, stages)  # and so is what would stop a stage after training (an export it can't write)
    contract.simulated_oom_step()  # a rehearsal variable that names no step, likewise
    world = distributed.current()  # on several GPUs, rank 0 alone writes the folder and talks to plugins
    if resume is None:
        made = RunDir.create(Path(exp.experiment.output_dir), exp.experiment.name).path if world.main else None
        folder = RunDir(distributed.share(made))
    else:
        folder = RunDir(resume)
    if world.main:
        launch.note_run(folder.path)
        if world.size == 1 and (note := choose_threads()):
            print(f"fx: {note}", file=sys.stderr)
    previous = folder.read_summary() if resume is not None else None
    found = last_checkpoint(folder.checkpoints) if resume is not None else None
    if found:
        resumable(found[0], world)
        if world.main:
            fresh = not (found[0] / OPTIMIZER).exists()
            print(f"fx: resuming from {found[0].name} (step {found[1]})"
                  + (", with a fresh optimizer state (--reset-optimizer)" if fresh else ""), file=sys.stderr)
    run = Run(folder, exp.resolved(), plugins, resume_step=found[1] if found else None, main=world.main,
              resuming=resume is not None)
    record = Record(folder if world.main else None, _summary(exp, prep, run, previous, world), started_at=started,
                    earlier_wall_s=(previous.wall_s or 0.0) if previous else 0.0)
    summary = record.summary
    if world.size > 1:
        summary.distributed = distributed.describe(world, exp.method.settings)
        if world.main and "message" in summary.distributed:
            print(f"fx: {summary.distributed['message']}", file=sys.stderr)
    record.write()  # a run killed before its end (kill -9 of a rank, say) still has a summary saying what it was
    hub = TrackerHub({t.name: t.cls(t.settings, run) for t in exp.trackers} if world.main else {})
    if world.main:
        plugins.pm.register(hub, name=f"fx.trackers.active.{run.name}")
    ctx = Context(exp, prep, folder, record, plugins, run, previous, fitted, None, found[0] if found else None)
    error: BaseException | None = None
    try:
        with stopping_on_signals():  # from here a signal ends the run with its record saying so
            if world.main:
                folder.write_heldout([to_row(e) for e in prep.held_out_examples])
                folder.write_setup(exp.resolved(), {"experiment_file": str(exp.path.resolve()),
                                                    "base_dir": str(exp.base_dir), "created": summary.created})
                length_histogram(prep.train.lengths + prep.held_out.lengths, exp.data.max_length, folder.lengths,
                                 f"{exp.experiment.name}: template {exp.template.name!r}")
                plugins.hook.fx_run_start(run=run)
            ctx.cap = budget.cap_allocator(fitted)
            if fitted:
                summary.memory_plan = {**fitted.summary(),
                                       "allocator_cap_gib": round(ctx.cap / GIB, 3) if ctx.cap else None}
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            walk(ctx, stages)
        summary.status = "completed"
    except BaseException as exc:
        error = exc
        if isinstance(exc, (KeyboardInterrupt, Interrupted)):
            summary.status = "interrupted"
        elif summary.status == "running":
            summary.status = "failed"
        if summary.status != "interrupted":
            summary.error = f"{type(exc).__name__}: {exc}"[:2000]
        if isinstance(exc, KeyboardInterrupt):
            signum = getattr(exc, "signum", signal.SIGINT)
            raise Interrupted(interrupted_at(run, signum), signum) from None
        raise
    finally:
        segment = summary.segments[-1]
        segment.to_step = max(segment.to_step, run.progress.step)
        record.stop_clock()
        _measure_peaks(summary)
        if world.main:
            _finish(run, record, hub, plugins, error)
        run.close()
    return folder.path


def _finish(run: Run, record: Record, hub: TrackerHub, plugins, error: BaseException | None) -> None:
    summary = record.summary
    try:  # the plot is a view of the run; a plotting failure must not hide how the run itself ended
        write_loss_plot(run.history, run.files.loss_plot, f"{run.name} ({summary.status})")
    except Exception as exc:
        summary.plot_error = f"{type(exc).__name__}: {exc}"
        print(f"fx: could not write plots/loss.png: {summary.plot_error}", file=sys.stderr)
    record.write()
    plugins.hook.fx_run_end(run=run, summary=summary.to_dict(), error=error)
    if hub.failed:
        summary.trackers_failed = hub.failed
        record.write()
    plugins.pm.unregister(hub)


def device_count() -> int:
    import torch

    return torch.cuda.device_count()


def resumable(checkpoint: Path, world: distributed.World) -> None:
    """Refuse a checkpoint this world can't load: FSDP's sharded checkpoints load under FSDP on as many ranks, and
    one process's or DDP's checkpoints anywhere but under FSDP."""
    wrote = ranks_of(checkpoint) or {"world_size": 1, "strategy": None}
    size, strategy = int(wrote["world_size"]), wrote["strategy"]
    if (strategy == "fsdp") == (world.strategy == "fsdp") and (strategy != "fsdp" or size == world.size):
        return
    how = f"--gpus {size} --set distributed.strategy={strategy}" if strategy == "fsdp" else (
        f"--gpus {size}" if size > 1 else "in one process")
    if strategy == "fsdp" and world.size == 1 and (gpus := device_count()) < size:  # advice this machine can't take
        how += f" on a machine with {size} CUDA GPUs (this one has {gpus or 'none'})"
    raise UserError(f"{checkpoint} was written by {size} rank(s) under {strategy or 'one process'}, which this run "
                    f"({world.size} rank(s), {world.strategy or 'one process'}) can't load; resume with {how}")
