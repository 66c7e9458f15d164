"""``fx eval --tasks``: general ability (lm-evaluation-harness tasks, fx.harness) of a finished run, a merged
folder or an experiment's untrained base, compared with what the run measured before training."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fx import harness
from fx.after import inference
from fx.errors import UserError
from fx.run.directory import RunDir


def before_of(run_dir: Path, tasks: list[str], limit: float | None) -> float | None:
    """The run's general score before training, when its benchmark stage measured the same tasks and items."""
    summary = RunDir(inference.run_of(run_dir)).summary_if_readable()
    bench = summary.benchmark if summary is not None else None
    if bench is None or bench.tasks != tasks or bench.limit != limit:
        return None
    return bench.general_before


def benchmark(path: Path, tasks: list[str] | None, limit: float | None, max_drop: float | None,
              untrained: bool = False, overrides: list[str] | None = None) -> tuple[dict[str, Any], str | None]:
    """Each task's score and the general score of the run (or merged folder, or with ``untrained`` the experiment
    file's base); and, when the general score fell from the run's own "before" by more than ``max_drop`` (default:
    the run's [stages.benchmark] max_drop), the sentence that says so."""
    harness.require()
    loaded = inference.base(path, overrides) if untrained else inference.load(path)
    settings = loaded.exp.stages.benchmark
    tasks = tasks or settings.tasks
    limit = settings.limit if limit is None else None if limit == 0 else limit  # 0: every item (--limit all)
    if limit is not None and limit >= 1:
        limit = int(limit)
    scores = harness.evaluate(loaded.model, loaded.tokenizer, loaded.template, tasks, limit, settings.chat,
                              settings.batch_size, loaded.exp.experiment.seed)
    out: dict[str, Any] = {"model": "base, untrained" if untrained else str(path), "limit": limit, "tasks": scores,
                           "general": harness.general(scores)}
    before = None if untrained else before_of(path, tasks, limit)
    if before is None or out["general"] is None:
        return out, None
    allowed = max_drop if max_drop is not None else settings.max_drop
    out["general_before"], out["drop"] = before, round(before - out["general"], 4)
    out["max_drop"] = allowed
    if allowed is not None and out["drop"] > allowed:
        return out, (f"general ability {harness.line(before, out['general'])}: it fell by {out['drop']:.3f}, more "
                     f"than max_drop {allowed:g}")
    return out, None


def command(args) -> int:
    """``fx eval``: held-out rows (the run's, or ``--data`` with ``--metric``), or with ``--tasks`` general
    ability; exit 1 when the general score fell by more than max_drop."""
    if args.tasks is not None or args.limit is not None or args.max_drop is not None:
        if args.data is not None or args.metric is not None:
            raise UserError("--tasks (general ability) and --data/--metric (rows of a file) are separate evaluations")
        out, over = benchmark(args.run_dir, args.tasks, args.limit, args.max_drop, args.base, args.set)
        print(json.dumps(out, indent=2))
        if over:
            print(f"fx: {over}", file=sys.stderr)
        return 1 if over else 0
    loaded = inference.base(args.run_dir, args.set) if args.base else None
    print(json.dumps(inference.evaluate_run(args.run_dir, args.data, args.metric, loaded), indent=2))
    return 0
