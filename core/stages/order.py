"""The declared list of stages and the one loop that walks it.

fx's own stages come in the order of fx.stages.builtin.BUILTIN; each stage a plugin registers goes before or after
the stage it names. The loop announces each enabled stage to the plugins (``fx_stage_start``/``fx_stage_end``), runs
it through the ``fx_stage_run`` hook (which plugins may wrap), records how it ended in the run's summary
(``stages``), and passes over a stage that a resumed run's earlier segment completed, unless the stage is one that
always runs (it builds what later stages need in memory).
"""

from __future__ import annotations

import time
from typing import Any

from fx.errors import Interrupted, PluginError, UserError
from fx.run.record import StageEntry
from fx.stages.base import Stage
from fx.stages.builtin import BUILTIN
from fx.training import distributed


def declared(exp) -> list[Stage]:
    """The stages of ``exp``'s run, in order: fx's own and every registered plugin stage (each with its
    ``[stages.<name>]`` settings), whether enabled or not. PluginError for a stage placed nowhere."""
    stages: list[Stage] = list(BUILTIN)
    pending = list(exp.stage_plugins)
    while pending:
        placed = []
        for chosen in pending:
            cls = chosen.cls
            if not (isinstance(cls, type) and issubclass(cls, Stage)):
                raise PluginError(f"plugin {chosen.plugin!r} registered stage {chosen.name!r}, which is not a "
                                  "subclass of fx.Stage")
            if (cls.before is None) == (cls.after is None):
                raise PluginError(f"plugin {chosen.plugin!r} registered stage {chosen.name!r}: set exactly one of "
                                  "`before` and `after` to the name of the stage it goes next to")
            names = [s.name for s in stages]
            anchor = cls.before or cls.after
            if anchor in names:
                try:
                    stage = cls(chosen.settings)
                except TypeError as exc:  # run() left abstract, or a constructor of its own
                    raise PluginError(f"plugin {chosen.plugin!r} registered stage {chosen.name!r}, which can't be "
                                      f"made: {exc}") from None
                stage.name = chosen.name
                stages.insert(names.index(anchor) + (0 if cls.before else 1), stage)
                placed.append(chosen)
        if not placed:
            chosen = pending[0]
            where = "before" if chosen.cls.before else "after"
            raise PluginError(f"plugin {chosen.plugin!r} places stage {chosen.name!r} {where} "
                              f"{chosen.cls.before or chosen.cls.after!r}, which is no stage (the stages: "
                              f"{', '.join(s.name for s in stages)})")
        pending = [c for c in pending if c not in placed]
    return stages


def preflight(exp, stages: list[Stage]) -> None:
    """Every stage's own check (:meth:`Stage.check`), before the run folder exists: UserError with every problem."""
    problems = [problem for stage in stages for problem in stage.check(exp)]
    if problems:
        raise UserError("\n".join(f"{exp.path}: {p}" for p in problems))


def _run(stage: Stage, context) -> dict[str, Any]:
    """fx's own implementation of ``fx_stage_run``."""
    return stage.run(context) or {}


def walk(ctx, stages: list[Stage]) -> None:
    """Run each enabled stage of ``stages`` in order on the run's context."""
    main = distributed.current().main
    for stage in stages:
        if (stage.main_only and not main) or not stage.enabled(ctx):
            continue
        if stage.done(ctx):
            continue  # the earlier segment of a resumed run completed it; its results are in the record
        _one(ctx, stage)


def _one(ctx, stage: Stage) -> None:
    """Announce ``stage``, run it through the ``fx_stage_run`` hook, and record how it ended."""
    started = time.perf_counter()

    def ended(status: str) -> None:
        entry = StageEntry(status=status, wall_s=round(time.perf_counter() - started, 2))
        ctx.summary.stages = {**ctx.summary.stages, stage.name: entry}

    try:
        with ctx.run.stage(stage.name) as result:
            result.update(ctx.plugins.hook.fx_stage_run.call_extra([_run], {"stage": stage, "context": ctx}) or {})
            stage.record(ctx, result)
            ended("completed")
            ctx.record.write()
    except BaseException as exc:  # in the stage's work, or in a plugin hearing of it: a resumed run runs it again
        ended("interrupted" if isinstance(exc, (KeyboardInterrupt, Interrupted)) else "failed")
        raise


def describe() -> str:
    """fx's own stages as a Markdown table, in order (docs/plugins.md, "Stages", is this table)."""
    rows = ["| stage | what it does | reads | records in summary.json |", "| --- | --- | --- | --- |"]
    for stage in BUILTIN:
        rows.append(f"| `{stage.name}` | {stage.description} | {', '.join(stage.needs) or '-'} | "
                    f"{', '.join(f'`{r}`' for r in stage.records) or '-'} |")
    return "\n".join(rows)
