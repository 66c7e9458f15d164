"""Tracker ``csv``: ``metrics.csv`` (one row per logged step or evaluation, one column per metric) and
``summary.csv`` (the run's summary as ``key,value`` rows), for spreadsheets and pandas.

Rows are appended and flushed as they come. Metrics appear over a run (held-out metrics before the first
training step), so when a step brings a metric no earlier row had, the file is rewritten once with the wider
header (write, then rename) and earlier rows get empty cells there.
"""

from __future__ import annotations

import csv
import io
import time
from typing import Any

import fx
from fx.config.diff import flatten
from fx.files import write_atomic
from fx.run.tracking import Tracker


def _line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


class CsvTracker(Tracker):
    description = "metrics.csv (a row per logged step, a column per metric) and summary.csv in the run directory"

    def start(self) -> None:
        self.path = self.run.dir / "metrics.csv"
        self.columns = ["time", "step"]
        self.rows: list[dict[str, Any]] = []
        write_atomic(self.path, _line(self.columns))
        self.file = open(self.path, "a", encoding="utf-8")

    def log(self, step, metrics) -> None:
        row = {"time": round(time.time(), 3), "step": step, **metrics}
        self.rows.append(row)
        new = [key for key in row if key not in self.columns]
        if new:
            self.columns += new
            self.file.close()
            write_atomic(self.path, _line(self.columns)
                         + "".join(_line([r.get(c, "") for c in self.columns]) for r in self.rows))
            self.file = open(self.path, "a", encoding="utf-8")
        else:
            self.file.write(_line([row.get(c, "") for c in self.columns]))
            self.file.flush()

    def finish(self, summary, error) -> None:
        self.file.close()
        write_atomic(self.run.dir / "summary.csv",
                     "".join(_line(pair) for pair in [("key", "value"), *flatten(summary).items()]))


@fx.hookimpl
def fx_register_trackers(register):
    register("csv", CsvTracker)
