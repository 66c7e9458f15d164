"""The ``fx`` command: run, validate, plugins.

A user's mistake ends with exit code 2 and a line or two saying what is wrong; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from fx.errors import Interrupted, TrainingFailed, UserError


def _quiet_libraries() -> None:
    """Library chatter (progress bars, deprecation notes) would bury fx's own output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    # bitsandbytes says at import that an optional CPU kernel package is absent; its fallback is what runs.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def cmd_run(args) -> int:
    from fx import config, manager, runner

    if (args.file is None) == (args.resume is None):
        raise UserError("give an experiment file, or --resume RUN_DIR (not both)")
    if args.resume is not None:
        if args.set:
            raise UserError("--set can't change a run being resumed; start a new run instead")
        exp = runner.load_run(args.resume)
    else:
        exp = config.load(args.file, args.set)
    _quiet_libraries()
    folder = runner.execute(exp, manager.get(), resume=args.resume)
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


def cmd_data(args) -> int:
    from rich.console import Console

    from fx import config, datareport

    exp = config.load(args.file, args.set)
    _quiet_libraries()
    report = datareport.build(exp, args.examples, args.png)
    datareport.show(exp, report, Console(soft_wrap=True))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fx", description="Parameter-efficient fine-tuning experiments.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run an experiment file")
    run.add_argument("file", type=Path, nargs="?")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last complete checkpoint")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key, e.g. --set method.max_steps=10 (repeatable)")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check experiment files; report every problem at once")
    validate.add_argument("files", type=Path, nargs="+")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    validate.set_defaults(func=cmd_validate)

    plugins = sub.add_parser("plugins", help="list plugins, their versions, what they register and their hooks")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=cmd_plugins)

    data = sub.add_parser("data", help="show rendered training examples (loss-bearing text marked) and token lengths")
    data.add_argument("file", type=Path)
    data.add_argument("--examples", type=int, default=3, metavar="N", help="how many training examples to show (default 3)")
    data.add_argument("--png", type=Path, default=None, metavar="PATH",
                      help="where to write the length histogram (default: OUTPUT_DIR/NAME-lengths.png)")
    data.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    data.set_defaults(func=cmd_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"fx: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        print(f"fx: {exc}", file=sys.stderr)
        return exc.exit_code
    except TrainingFailed as exc:
        print(f"fx: training failed: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
