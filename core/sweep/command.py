"""``fx sweep``'s command: run or resume a sweep, then its points in a table, the best marked."""

from __future__ import annotations


def best(sweep):
    """The completed point with the best metric (None when no point measured it)."""
    done = [p for p in sweep.points if p.status == "completed" and p.value is not None]
    if not done:
        return None
    pick = min if sweep.settings.goal() == "minimize" else max
    return pick(done, key=lambda p: p.value)


def command(args) -> int:
    """``fx sweep FILE [--set ...]`` or ``fx sweep --resume DIR``: run the points, then a table of them, the best
    marked; exit 1 when a point failed."""
    from fx.errors import UserError
    from fx.sweep import run

    if (args.file is None) == (args.resume is None):
        raise UserError("give a sweep file, or --resume SWEEP_DIR (not both)")
    if args.resume is not None and args.set:
        raise UserError("--set goes with a sweep file; a resumed sweep keeps its own")
    sweep = run.load(args.resume) if args.resume is not None else run.create(args.file, args.set)
    print(f"fx sweep: {sweep.folder} ({sweep.settings.strategy}, metric {sweep.settings.metric}, "
          f"{sweep.settings.goal()})", flush=True)
    run.execute(sweep)
    top = best(sweep)
    for point in sweep.points:
        value = f"{point.value:.4g}" if point.value is not None else "-"
        mark = "  <- best" if point is top else ""
        print(f"  p{point.index:02d}  {point.status:<13} {sweep.settings.metric} {value:<10} {run._label(point)}{mark}")
    if sweep.stopped:
        print(f"fx sweep: stopped early: {sweep.stopped}")
    print(f"report: fx report {sweep.folder}")
    return 1 if any(p.status in ("failed", "out_of_memory") for p in sweep.points) else 0
