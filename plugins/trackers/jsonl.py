"""Tracker ``jsonl``: every logged step and stage as one JSON line in ``metrics.jsonl``, flushed as it comes,
and the run's summary as the last line (``{"summary": {...}}``)."""

from __future__ import annotations

import json
import time

from pydantic import Field

import fx
from fx.run.tracking import Tracker


class JsonlTracker(Tracker):
    description = "metrics.jsonl in the run directory: one line per logged step"

    class Settings(Tracker.Settings):
        filename: str = Field("metrics.jsonl", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

    def start(self) -> None:
        path = self.run.dir / self.settings.filename
        if self.run.resume_step is not None and path.is_file():
            # steps after the checkpoint are trained again: drop their first records so each step appears once
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line).get("step", -1) <= self.run.resume_step]
            path.write_text("".join(kept))
        self.file = open(path, "a", encoding="utf-8")

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        self.file.flush()

    def log(self, step, metrics) -> None:
        self._write({"step": step, **metrics})

    def stage_end(self, stage, result) -> None:
        self._write({"stage": stage,
                     **{k: v for k, v in result.items() if isinstance(v, (int, float, str, type(None)))}})

    def finish(self, summary, error) -> None:
        self._write({"summary": summary})
        self.file.close()


@fx.hookimpl
def fx_register_trackers(register):
    register("jsonl", JsonlTracker)
