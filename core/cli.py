"""The ``fx`` command: run, validate, plugins.

A user's mistake ends with exit code 2 and a line or two saying what is wrong; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from fx.errors import UserError


def _quiet_libraries() -> None:
    """Library chatter (progress bars, deprecation notes) would bury fx's own output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def cmd_run(args) -> int:
    from fx import config, manager, memory, runner

    memory.use_expandable_segments()
    exp = config.load(args.file, args.set)
    _quiet_libraries()
    folder = runner.execute(exp, manager.get())
    print(f"run finished: {folder}")
    return 0


def cmd_validate(args) -> int:
    from fx import config
    from fx.errors import ConfigError

    problems = []
    for file in args.files:
        try:
            config.load(file, args.set)
            print(f"{file}: ok")
        except ConfigError as exc:
            problems += exc.problems
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        raise UserError("\n".join(problems))
    return 0


def cmd_plugins(args) -> int:
    from fx import manager

    infos = manager.get().info()
    if args.json:
        print(json.dumps([info.__dict__ for info in infos], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fx plugins")
    for column in ("plugin", "version", "registers", "hooks"):
        table.add_column(column)
    for info in infos:
        table.add_row(info.name, info.version, "\n".join(info.registers), "\n".join(info.hooks))
    Console().print(table)
    return 0


def cmd_plan(args) -> int:
    from fx import config, memory

    exp = config.load(args.file, args.set)
    fitted = memory.plan_experiment(exp, args.budget)
    if args.json:
        out = fitted.summary()
        out["gpus"] = {k: {"name": g.name, "memory_gib": g.memory_gib, "fits": fitted.plan.total <= g.memory_gib * memory.GIB}
                       for k, g in memory.GPUS.items()}
        print(json.dumps(out, indent=2))
    else:
        from rich.console import Console

        Console().print(memory.render(fitted))
    if not fitted.fits:
        raise UserError(memory.refusal(args.file, fitted))
    return 0


def cmd_bench(args) -> int:
    from fx import bench, config, memory

    memory.use_expandable_segments()
    if args.compare and args.file is None and args.result is None:
        raise UserError("--compare needs an experiment file to run or --result with a result to compare")
    if args.result is not None:
        result = bench.read_result(args.result)
    else:
        exp = config.load(args.file, args.set)
        _quiet_libraries()
        result = bench.run(exp, steps=args.steps, warmup=args.warmup, reference=args.reference)
        bench.report(result)
        if args.out:
            bench.write_result(args.out, result)
            print(f"result written to {args.out}")
    if args.compare:
        return bench.compare(bench.read_result(args.compare), result, args.tolerance)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fx", description="Parameter-efficient fine-tuning experiments.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run an experiment file")
    run.add_argument("file", type=Path)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key, e.g. --set method.max_steps=10 (repeatable)")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check experiment files; report every problem at once")
    validate.add_argument("files", type=Path, nargs="+")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    validate.set_defaults(func=cmd_validate)

    plan = sub.add_parser("plan", help="estimate peak GPU memory from the model's config alone; check a budget")
    plan.add_argument("file", type=Path)
    plan.add_argument("--budget", metavar="GPU|GiB",
                      help="t4, a10g, l4, a100-40, a100-80, h100 or a number of GiB (default: the file's [budget])")
    plan.add_argument("--json", action="store_true")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    plan.set_defaults(func=cmd_plan)

    bench = sub.add_parser("bench", help="measure training throughput and memory; compare with a baseline")
    bench.add_argument("file", type=Path, nargs="?")
    bench.add_argument("--steps", type=int, default=20, help="measured optimizer steps (default 20)")
    bench.add_argument("--warmup", type=int, default=3, help="steps run first and not measured (default 3)")
    bench.add_argument("--out", type=Path, help="write the result as JSON")
    bench.add_argument("--compare", type=Path, metavar="BASELINE", help="exit 1 if worse than this result")
    bench.add_argument("--tolerance", type=_percent, default=0.05, help="allowed change, e.g. 5%% (default)")
    bench.add_argument("--reference", action="store_true",
                       help="also run the tutorial's plain transformers/peft/trl recipe and report fx's ratio to it")
    bench.add_argument("--result", type=Path, help="compare this saved result instead of running FILE")
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    bench.set_defaults(func=cmd_bench)

    plugins = sub.add_parser("plugins", help="list plugins, their versions, what they register and their hooks")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=cmd_plugins)
    return p


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage like 5% or 0.05") from None
    if not 0 <= value < 10:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"fx: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
