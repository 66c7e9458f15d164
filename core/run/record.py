"""What a run measured, owned by core: ``summary.json`` (a typed, versioned :class:`RunSummary`) and
``history.jsonl`` (every logged step and evaluation, one JSON object a line), written whatever trackers are on.

Trackers observe a run; every reader of a run (``fx runs``, ``--compare``, the loss plot, ``--resume``, ``fx merge``
and ``fx export``) reads this record. A summary is validated when it is written and when it is read back: a field
this version of fx doesn't know is refused, naming the file. A summary written before the record had a version (fx
before schema 1) has the same fields and reads as it is; such a run's history is read from the jsonl tracker's
``metrics.jsonl``, where it was kept then.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fx.errors import UserError
from fx.files import write_atomic

SCHEMA_VERSION = 1
Scalar = float | int | str | bool | None  # a measured value, as JSON holds it
Metrics = dict[str, Scalar]  # name -> value: loss, perplexity, the task metric with its _hits and _total
Status = Literal["running", "completed", "failed", "interrupted", "out_of_memory"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Segment(_Strict):
    """One process's part of a run (a resumed run adds one)."""

    started: str = Field(description="when the process started, UTC, ISO 8601")
    from_step: int = Field(description="the optimizer step it started from (its checkpoint's; 0 for the first)")
    to_step: int = Field(description="the last optimizer step it logged")
    wall_s: float | None = Field(None, description="its wall time in seconds")
    host: str | None = Field(None, description="the machine its process ran on")
    pid: int | None = Field(None, description="its process (rank 0's), so that a run left 'running' by a process that "
                                              "died can be told from one that runs")


class DataCounts(_Strict):
    train_rows: int = Field(description="training rows after tokenisation")
    eval_rows: int = Field(description="held-out rows after tokenisation")
    truncated: int = Field(description="rows cut to data.max_length")
    dropped: int = Field(description="rows left out (no answer token within data.max_length)")


class StageEntry(_Strict):
    """How a stage the run walked ended."""

    status: Literal["completed", "failed", "interrupted"]
    wall_s: float = Field(description="the stage's wall time in seconds")


class Samples(_Strict):
    """The greedy answers behind samples.md."""

    prompts: list[str] = Field(description="the last user turn of each sampled conversation")
    origin: str = Field(description="where the prompts came from")
    before: list[str] | None = Field(None, description="answers before training (generate_before)")
    after: list[str] | None = Field(None, description="answers after training (generate_after)")


class TaskScore(_Strict):
    """One lm-evaluation-harness task's (or group's) score."""

    metric: str = Field(description="the harness's metric, e.g. acc")
    score: float = Field(description="its value")
    stderr: float | None = Field(None, description="its standard error, as the harness computes it")
    n: int | None = Field(None, description="the items scored")


class BenchmarkRecord(_Strict):
    """General ability before and after training (the benchmark stage, fx.harness)."""

    tasks: list[str] = Field(description="the harness tasks, in [stages.benchmark] order")
    limit: float | None = Field(None, description="items per task (a fraction below 1); null: every item")
    before: dict[str, TaskScore] | None = Field(None, description="each task's score before training")
    after: dict[str, TaskScore] | None = Field(None, description="each task's score after training")
    general_before: float | None = Field(None, description="the mean of the tasks' scores before training")
    general_after: float | None = Field(None, description="the mean of the tasks' scores after training")
    drop: float | None = Field(None, description="general_before - general_after (positive: ability lost)")
    max_drop: float | None = Field(None, description="[stages.benchmark] max_drop, the drop the run may have")
    over: bool | None = Field(None, description="whether the drop exceeds max_drop (the run is marked)")


class RunSummary(_Strict):
    """``summary.json``. Unknown fields are refused; a field the run has not measured (yet) is null."""

    version: int = Field(SCHEMA_VERSION, description="the schema's version; absent in summaries before schema 1")
    name: str = Field(description="the run folder's name")
    status: Status = Field(description="running, completed, failed, interrupted or out_of_memory")
    created: str = Field(description="when the run was first started, local time, ISO 8601 (kept across resumes)")
    started: str = Field(description="when this segment started, UTC, ISO 8601")
    segments: list[Segment] = Field(default_factory=list, description="one per process that trained the run")
    model: str = Field(description="[model] source")
    method: str = Field(description="[method] name")
    template: str = Field(description="[template] name")
    world_size: int = Field(1, description="processes (GPUs) that trained it")
    data: DataCounts | None = None
    resumed_from_step: int | None = Field(None, description="the checkpoint's step when the run was resumed")
    stages: dict[str, StageEntry] = Field(default_factory=dict,
                                          description="every stage walked, in order, and how it ended")
    trainable_params: int | None = Field(None, description="parameters the method trains (the load stage)")
    steps: int | None = Field(None, description="optimizer steps trained, resumed segments included")
    train_loss: float | None = Field(None, description="mean training loss over every step of the run")
    train_loss_since_resume: float | None = Field(None, description="mean training loss of this segment's steps")
    train_tokens: int | None = Field(None, description="tokens trained on, every segment")
    train_tokens_per_s: float | None = Field(None, description="real (unpadded) tokens per second, this segment")
    train_wall_s: float | None = Field(None, description="this segment's training wall time in seconds")
    cuda_graphs: dict[str, Any] | None = Field(None, description="CUDA-graph captures and replays (GPU only)")
    memory_plan: dict[str, Any] | None = Field(None, description="the memory planner's plan (fx plan --json)")
    distributed: dict[str, Any] | None = Field(None, description="the strategy and batch of a run on several GPUs")
    per_rank: list[dict[str, Any]] | None = Field(None, description="each rank's peak memory (several GPUs)")
    eval_before: Metrics | None = Field(None, description="held-out measurements before training")
    eval_after: Metrics | None = Field(None, description="held-out measurements after training")
    samples: Samples | None = None
    benchmark: BenchmarkRecord | None = None
    adapter_heldout: dict[str, Any] | None = Field(
        None, description="the trained adapter model measured as fx.after.fidelity measures a merged or exported one "
                          "(answers included), reused by every later merge and export check")
    merge: dict[str, Any] | None = Field(None, description="the last merge and its check (fx.after.merge)")
    exports: list[dict[str, Any]] = Field(default_factory=list,
                                          description="each export and its check, one per output path")
    results: dict[str, Metrics] = Field(default_factory=dict,
                                        description="what each third-party stage recorded, by stage name")
    peak_vram_gib: float | None = Field(None, description="peak GPU memory reserved (null on a CPU)")
    peak_vram_allocated_gib: float | None = Field(None, description="peak GPU memory allocated (null on a CPU)")
    peak_rss_gib: float | None = Field(None, description="peak resident memory of the process")
    wall_s: float | None = Field(None, description="wall time of every segment, in seconds")
    error: str | None = Field(None, description="what ended a run that failed")
    failed_rank: int | None = Field(None, description="the rank that failed first (several GPUs)")
    plot_error: str | None = Field(None, description="why plots/loss.png could not be drawn")
    trackers_failed: dict[str, str] | None = Field(None, description="trackers switched off, and why")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_summary(data: Any, where: Path | str) -> RunSummary:
    """A summary read back; UserError naming ``where`` and the fields that don't fit the schema."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: not a run summary (expected a JSON object)")
    if isinstance(data.get("version"), int) and data["version"] > SCHEMA_VERSION:
        raise UserError(f"{where}: written by a newer fx (summary schema {data['version']}; this fx reads up to "
                        f"{SCHEMA_VERSION}); upgrade fx to read it")
    legacy = "version" not in data
    try:
        summary = RunSummary.model_validate({**data, "version": data.get("version", 0)} if legacy else data)
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc']))}: {'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}"
                    for e in exc.errors()[:5]]
        raise UserError(f"{where}: not a summary fx can read ({'; '.join(problems)})") from None
    return summary


def alive(host: str | None, pid: int | None) -> bool | None:
    """Whether the process a run's last segment names (``Segment.host``, ``Segment.pid``) still runs: None when that
    can't be told from here (another machine, or a summary from before segments named their process)."""
    if pid is None or host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that number
        return True
    return True


class Record:
    """A run's ``summary.json`` (``folder`` None on ranks other than 0: nothing is written). While the run goes on
    (``timed``) each :meth:`write` brings ``wall_s`` up to date: the earlier segments' wall time (``earlier_wall_s``)
    plus this one's, counted from ``started_at``, and the last segment's own. A command on a finished run records
    its result with ``timed`` False: the run's wall time stays as the run left it."""

    def __init__(self, folder, summary: RunSummary, started_at: float | None = None, earlier_wall_s: float = 0.0,
                 timed: bool = True):
        self.folder = folder
        self.summary = summary
        self.started_at = time.perf_counter() if started_at is None else started_at
        self.earlier_wall_s = earlier_wall_s
        self.stopped_at: float | None = None
        self.timed = timed

    def stop_clock(self) -> None:
        """The run has ended: later writes (what the trackers did at its end) keep its wall time as it is now."""
        self.stopped_at = time.perf_counter()

    def write(self) -> None:
        if self.timed:
            elapsed = (self.stopped_at or time.perf_counter()) - self.started_at
            self.summary.wall_s = round(self.earlier_wall_s + elapsed, 1)
            if self.summary.segments:
                self.summary.segments[-1].wall_s = round(elapsed, 1)
        if self.folder is not None:
            self.folder.write_summary(self.summary.to_dict())


History = list[tuple[int, dict[str, Any]]]


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Each whole record of a history file with its line; a partial line (a run killed while writing it) is passed
    over."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append((line, record))
    return out


def read_history(path: Path, legacy: Path | None = None) -> History:
    """``(step, metrics)`` for every record of a history file, in order. ``legacy``: the file to read when ``path``
    doesn't exist (a run from before the record kept its history: the jsonl tracker's file)."""
    found = path if path.is_file() or legacy is None else legacy
    return [(r["step"], {k: v for k, v in r.items() if k not in ("step", "time")}) for _, r in _records(found)]


def keep_history_until(path: Path, step: int, legacy: Path | None = None) -> History:
    """A resumed run trains the steps after its checkpoint again: the records after ``step`` are dropped (and a
    partial last line), so each step appears once; what is kept is returned. ``legacy``: as for
    :func:`read_history` (a run from before history.jsonl gets one, from its jsonl tracker's file)."""
    found = path if path.is_file() or legacy is None else legacy
    write_atomic(path, "".join(line + "\n" for line, r in _records(found) if r["step"] <= step))
    return read_history(path)


def append_history(handle, step: int, metrics: dict[str, Any]) -> None:
    """One record, flushed at once, so that a killed run keeps every step it logged."""
    handle.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}, default=str) + "\n")
    handle.flush()
