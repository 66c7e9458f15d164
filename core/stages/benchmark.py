"""The benchmark stage: general ability before and after training, through lm-evaluation-harness (fx.harness), so
that a run says what its fine-tune cost as well as what it gained (docs/evaluation.md)."""

from __future__ import annotations

import sys
from typing import Any

from fx import harness
from fx.errors import UserError
from fx.run.record import BenchmarkRecord, TaskScore
from fx.stages.base import Stage
from fx.training import distributed


def summarise(record: BenchmarkRecord) -> BenchmarkRecord:
    """The general scores, the drop and whether it exceeds ``max_drop``, from the tasks' scores."""
    scores = {w: {t: s.model_dump() for t, s in (getattr(record, w) or {}).items()} for w in ("before", "after")}
    before, after = harness.general(scores["before"]), harness.general(scores["after"])
    drop = round(before - after, 4) if before is not None and after is not None else None
    over = drop > record.max_drop if drop is not None and record.max_drop is not None else None
    return record.model_copy(update={"general_before": before, "general_after": after, "drop": drop, "over": over})


def marked(record: BenchmarkRecord) -> str:
    """``general: 0.710 -> 0.520 (-27%)``, with the mark of a drop over max_drop."""
    text = f"general: {harness.line(record.general_before, record.general_after)}"
    if record.over:
        text += f"; the drop of {record.drop:.3f} exceeds max_drop {record.max_drop:g}"
    return text


class Benchmark(Stage):
    """Harness tasks on the model in memory into the record (``benchmark``) and to the trackers."""

    needs = ("model",)
    records = ("benchmark",)

    def __init__(self, when: str):
        super().__init__()
        self.when, self.name = when, f"benchmark_{when}"
        self.description = (f"general ability {when} training: lm-evaluation-harness tasks, fx_probe by default "
                            "([stages.benchmark], the fx[eval] extra)")

    def enabled(self, ctx) -> bool:
        # on several ranks the harness would run once per rank (and not at all on a sharded model): fx eval RUN
        # --tasks measures the finished run instead (docs/evaluation.md)
        return ctx.exp.stages.benchmark.enabled and distributed.current().size == 1

    def check(self, exp) -> list[str]:
        settings = exp.stages.benchmark
        if not settings.enabled or self.when != "before":  # checked once
            return []
        try:
            return [f"stages.benchmark: {p}" for p in harness.unknown(settings.tasks)]
        except UserError as exc:
            return [f"stages.benchmark: {exc}"]

    def run(self, ctx) -> dict[str, Any]:
        settings = ctx.exp.stages.benchmark
        ctx.model.eval()
        scores = harness.evaluate(ctx.model, ctx.tokenizer, ctx.template, settings.tasks, settings.limit,
                                  settings.chat, settings.batch_size, ctx.exp.experiment.seed)
        record = ctx.summary.benchmark or BenchmarkRecord(tasks=settings.tasks, limit=settings.limit,
                                                          max_drop=settings.max_drop)
        record = summarise(record.model_copy(update={self.when: {t: TaskScore(**s) for t, s in scores.items()}}))
        ctx.summary.benchmark = record
        numbers = {f"benchmark_{t}": s["score"] for t, s in scores.items()}
        general = record.general_before if self.when == "before" else record.general_after
        if general is not None:
            numbers["benchmark_general"] = general
        if record.drop is not None:
            numbers["benchmark_drop"] = record.drop
        ctx.run.log((ctx.summary.steps or 0) if self.when == "after" else 0, numbers)
        if record.over:
            print(f"fx: {marked(record)}", file=sys.stderr)
        return {k.removeprefix("benchmark_"): v for k, v in numbers.items()}

    def record(self, ctx, result: dict[str, Any]) -> None:
        pass  # the typed field was filled by run()
