"""Trackers watch a run. Each one configured in ``[trackers.<name>]`` is isolated: one that raises is
reported once and switched off, and the run and the other trackers carry on."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from fx import settings
from fx.hooks.specs import hookimpl


class Tracker:
    """Base class of tracker plugins; override the methods you need."""

    description = ""

    class Settings(settings.Settings):
        pass

    def __init__(self, settings: Settings, run):
        self.settings = settings
        self.run = run

    @classmethod
    def check(cls, settings: Settings) -> list[str]:
        """Problems that would stop this tracker, found before the run starts (a missing optional library).

        Each is reported with the experiment's other problems (exit code 2); the run does not start.
        """
        return []

    def start(self) -> None: ...

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def stage_start(self, stage: str) -> None: ...

    def stage_end(self, stage: str, result: dict[str, Any]) -> None: ...

    def finish(self, summary: dict[str, Any], error: BaseException | None) -> None: ...


def needs_extra(extra: str, *modules: str) -> list[str]:
    """A problem line naming the pip extra to install when any of ``modules`` cannot be imported."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return []
    return [f"needs {', '.join(missing)} (not installed): pip install 'fx[{extra}]'"]


class TrackerHub:
    """A plugin, registered for the length of one run, that forwards the lifecycle hooks to its trackers."""

    def __init__(self, trackers: dict[str, Tracker]):
        self.trackers = trackers
        self.failed: dict[str, str] = {}
        self.started = False  # a run stopped before it started (a signal while its folder was written) ends quietly

    def _each(self, method: str, *args) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # a tracker must never take the run down
                del self.trackers[name]
                self.failed[name] = f"{type(exc).__name__}: {exc}"
                print(f"fx: tracker {name!r} failed in {method}() and is switched off: {self.failed[name]}",
                      file=sys.stderr)

    @hookimpl
    def fx_run_start(self, run) -> None:
        self.started = True
        self._each("start")

    @hookimpl
    def fx_log(self, run, step, metrics) -> None:
        self._each("log", step, metrics)

    @hookimpl
    def fx_stage_start(self, run, stage) -> None:
        self._each("stage_start", stage)

    @hookimpl
    def fx_stage_end(self, run, stage, result) -> None:
        self._each("stage_end", stage, result)

    @hookimpl
    def fx_run_end(self, run, summary, error) -> None:
        if self.started:
            self._each("finish", summary, error)
