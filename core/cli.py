"""The ``fx`` command: run, validate, plugins; generate, chat, eval, merge, export and push for a finished run.

A user's mistake ends with exit code 2 and a line or two saying what is wrong; no traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from fx.bench.compare import percent
from fx.errors import Interrupted, Stopped, TrainingFailed, UserError, printable, stopping_on_signals
from fx.quiet import quiet_libraries, silence_noise, tolerate_closed_output


def cmd_run(args) -> int:
    from fx import config, pipeline
    from fx.hooks import manager
    from fx.run import launch
    from fx.run.resume import load_run
    from fx.training.budget import use_expandable_segments

    use_expandable_segments()
    tolerate_closed_output()  # a closed pipe or terminal never stops training
    if (args.file is None) == (args.resume is None):
        raise UserError("give an experiment file, or --resume RUN_DIR (not both)")
    if args.reset_optimizer and args.resume is None:
        raise UserError("--reset-optimizer goes with --resume RUN_DIR")
    exp = (load_run(args.resume, args.set, reset_optimizer=args.reset_optimizer) if args.resume is not None
           else config.load(args.file, args.set))
    if (launched := launch.start(exp, args.gpus, args.argv)) is not None:
        return launched
    quiet_libraries()
    folder = launch.as_rank(exp, lambda: pipeline.execute(exp, manager.get(), resume=args.resume))
    if launch.rank() == 0:
        print(f"run finished: {folder}")
    return 0


def cmd_validate(args) -> int:
    from fx import config
    from fx.errors import ConfigError

    problems = []
    for file in args.files:
        try:
            found = config.check(config.load(file, args.set))  # every plugin's own check()
            if found:
                raise UserError("\n".join(found))
            print(f"{file}: ok")
        except ConfigError as exc:
            problems += exc.problems
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        raise UserError("\n".join(problems))
    return 0


def cmd_plugins(args) -> int:
    from fx.hooks import manager

    infos = manager.build(keep_broken=True).info()  # a broken plugin is listed, not fatal
    if args.json:
        print(json.dumps([info.__dict__ for info in infos], indent=2))
    else:
        manager.show(infos)
    broken = [info.broken for info in infos if info.broken]
    if broken:
        raise UserError("\n".join(broken))
    return 0


def cmd_data(args) -> int:
    from rich.console import Console

    from fx import config
    from fx.data import report as data_report

    exp = config.load(args.file, args.set)
    quiet_libraries()
    report = data_report.build(exp, args.examples, args.png)
    data_report.show(exp, report, Console(soft_wrap=True))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def cmd_generate(args) -> int:
    from fx.after import inference
    from fx.evaluation import generate

    exp = None if args.base else inference.experiment(args.run_dir)
    quiet_libraries()
    loaded = inference.base(args.run_dir, args.set) if args.base else inference.load(args.run_dir, exp)
    exp = loaded.exp
    max_new_tokens = args.max_new_tokens or exp.stages.generate.max_new_tokens
    conversations = [[{"role": "user", "content": p}] for p in args.prompt]
    for prompt, answer in zip(args.prompt,
                              generate(loaded.model, loaded.tokenizer, loaded.template, conversations, max_new_tokens)):
        if len(args.prompt) > 1:
            print(f"> {prompt}")
        print(answer)
    return 0


def cmd_chat(args) -> int:
    from fx.after import inference
    from fx.after.chat import chat

    exp = inference.experiment(args.run_dir)
    quiet_libraries()
    loaded = inference.load(args.run_dir, exp)
    print(f"fx chat: {args.run_dir} (template {exp.template.name}); 'exit' or Ctrl-D ends", file=sys.stderr)
    chat(loaded, args.max_new_tokens or exp.stages.generate.max_new_tokens)
    return 0


def cmd_eval(args) -> int:
    from fx.after import general

    quiet_libraries()
    return general.command(args)


def cmd_merge(args) -> int:
    from fx.after import fidelity, inference
    from fx.after.merge import merge, record

    ctx = inference.finished(args.run_dir)
    result = merge(ctx, args.out or args.run_dir / "merged", args.dtype, base=args.base)
    record(ctx, result)
    fidelity.report(result)
    return 0


def cmd_export(args) -> int:
    from fx.after import inference
    from fx.after.export import export, record, report

    ctx = inference.finished(args.run_dir)
    result = export(ctx, args.format, args.quant, args.out)
    record(ctx, result)
    print(f"exported ({result['format']}, {result['quant']}, {result['size_gib']} GiB): {result['out']}")
    print(report(result), file=sys.stderr if result["check"]["passed"] is False else sys.stdout)
    return 1 if result["check"]["passed"] is False else 0


def cmd_push(args) -> int:
    from fx.after.publish import push

    print(f"pushed: {push(args.run_dir, args.repo)}")
    return 0


def cmd_runs(args) -> int:
    from fx.after import runs

    runs.show(args.dir, args.sort, args.reverse, args.compare)
    return 0


def cmd_plan(args) -> int:
    from fx import config
    from fx.plan.fit import refusal
    from fx.plan.gpus import GIB, GPUS
    from fx.training.budget import auto_checkpointing, plan_ranks

    exp = config.load(args.file, args.set)
    fitted = auto_checkpointing(plan_ranks(exp, args.budget, args.gpus or 1))
    if args.json:
        out = fitted.summary()
        out["gpus"] = {k: {"name": g.name, "memory_gib": g.memory_gib, "fits": fitted.plan.total <= g.memory_gib * GIB}
                       for k, g in GPUS.items()}
        print(json.dumps(out, indent=2))
    else:
        from rich.console import Console

        from fx.plan.render import render

        Console().print(render(fitted))
    if not fitted.fits:
        raise UserError(refusal(args.file, fitted))
    return 0


def cmd_bench(args) -> int:
    from fx.bench.command import command

    return command(args)


def cmd_sweep(args) -> int:
    from fx.sweep.command import command

    quiet_libraries()
    return command(args)


def cmd_report(args) -> int:
    from fx.sweep.report import command

    return command(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fx", description="Parameter-efficient fine-tuning experiments.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run an experiment file")
    run.add_argument("file", type=Path, nargs="?")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue a run from its newest checkpoint that verifies")
    run.add_argument("--reset-optimizer", action="store_true",
                     help="with --resume: continue from a checkpoint whose optimizer state is missing or damaged, "
                          "with a fresh one")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key, e.g. --set method.max_steps=10 (repeatable)")
    run.add_argument("--gpus", type=_positive, metavar="N", help="one process per GPU ([distributed] strategy)")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check experiment files; report every problem at once")
    validate.add_argument("files", type=Path, nargs="+")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    validate.set_defaults(func=cmd_validate)

    plan = sub.add_parser("plan", help="estimate peak GPU memory from the model's config alone; check a budget")
    plan.add_argument("file", type=Path)
    plan.add_argument("--budget", metavar="GPU|GiB", type=_budget,
                      help="t4, a10g, l4, a100-40, a100-80, h100 or a number of GiB (default: the file's [budget])")
    plan.add_argument("--json", action="store_true")
    plan.add_argument("--gpus", type=_positive, metavar="N", help="plan one rank of N GPUs; the budget is per GPU")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    plan.set_defaults(func=cmd_plan)

    bench = sub.add_parser("bench", help="measure training throughput and memory; compare with a baseline")
    bench.add_argument("file", type=Path, nargs="?")
    bench.add_argument("--steps", type=int, default=20, help="measured optimizer steps (default 20)")
    bench.add_argument("--warmup", type=int, default=3, help="steps run first and not measured (default 3)")
    bench.add_argument("--out", type=Path, help="write the result as JSON")
    bench.add_argument("--compare", type=Path, metavar="BASELINE", help="exit 1 if worse than this result")
    bench.add_argument("--tolerance", type=percent, default=0.05, help="allowed change, e.g. 5%% (default)")
    bench.add_argument("--reference", action="store_true",
                       help="also run the tutorial's plain transformers/peft/trl recipe and report fx's ratio to it")
    bench.add_argument("--result", type=Path, help="compare this saved result instead of running FILE")
    bench.add_argument("--profile", type=Path, metavar="FILE",
                       help="profile the first measured steps with torch.profiler; write the operator table to FILE")
    bench.add_argument("--gpus", type=_positive, metavar="N", help="measure N GPUs, one process each")
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    bench.set_defaults(func=cmd_bench)

    plugins = sub.add_parser("plugins", help="list plugins, their versions, what they register and their hooks")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=cmd_plugins)

    data = sub.add_parser("data", help="show rendered training examples (loss-bearing text marked) and token lengths")
    data.add_argument("file", type=Path)
    data.add_argument("--examples", type=int, default=3, metavar="N",
                      help="how many training examples to show (default 3)")
    data.add_argument("--png", type=Path, default=None, metavar="PATH",
                      help="where to write the length histogram (default: OUTPUT_DIR/NAME-lengths.png)")
    data.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    data.set_defaults(func=cmd_data)

    gen = sub.add_parser("generate", help="answer prompts with a finished run's model, in its template")
    gen.add_argument("run_dir", type=Path, metavar="RUN_DIR|MERGED_DIR")
    gen.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="a user turn (repeatable)")
    gen.add_argument("--max-new-tokens", type=_positive, metavar="N", help="default: the run's [stages.generate]")
    _base(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="talk to a finished run's model; the conversation is kept, in its template")
    chat.add_argument("run_dir", type=Path, metavar="RUN_DIR|MERGED_DIR")
    chat.add_argument("--max-new-tokens", type=_positive, metavar="N",
                      help="per answer; default: the run's [stages.generate]")
    chat.set_defaults(func=cmd_chat)

    ev = sub.add_parser("eval", help="held-out loss, perplexity and task metric of a finished run or merged model")
    ev.add_argument("run_dir", type=Path, metavar="RUN_DIR|MERGED_DIR")
    ev.add_argument("--data", type=Path, metavar="FILE", help="evaluate on every row of this file instead")
    ev.add_argument("--metric", choices=("none", "contains", "exact_match"), help="default: the run's")
    ev.add_argument("--tasks", type=lambda t: [x for x in t.split(",") if x], metavar="T1,T2",
                    help="general ability: lm-evaluation-harness tasks (default: [stages.benchmark], fx_probe)")
    ev.add_argument("--limit", type=lambda t: 0.0 if t == "all" else float(t), metavar="N",
                    help="items per task (a fraction below 1; all: every item)")
    ev.add_argument("--max-drop", type=float, metavar="X", help="exit 1 when the general score fell more than X")
    _base(ev)
    ev.set_defaults(func=cmd_eval)

    mg = sub.add_parser("merge", help="merge a run's adapter into its base, save a plain transformers model and "
                                      "check it against the adapter on the held-out rows")
    mg.add_argument("run_dir", type=Path)
    mg.add_argument("--out", type=Path, metavar="DIR", help="default: RUN_DIR/merged")
    mg.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
                    help="auto: bfloat16 (float16 on older GPUs); float32 on CPU, where fp16 matmuls are slow")
    mg.add_argument("--base", choices=("trained", "original"), default="trained",
                    help="trained (default): the base the adapter was trained against (QLoRA: the 4-bit weights, "
                         "dequantised); original: the model source's own weights (the check shows what that costs)")
    mg.set_defaults(func=cmd_merge)

    ex = sub.add_parser("export", help="a run's model as GGUF (llama.cpp) or for Ollama, checked against the adapter")
    ex.add_argument("run_dir", type=Path)
    ex.add_argument("--format", choices=("gguf", "ollama"), default="gguf")
    ex.add_argument("--quant", default="f16", metavar="TYPE", help="f32 f16 bf16 q8_0 q5_1 q5_0 q4_1 q4_0 (f16)")
    ex.add_argument("--out", type=Path, metavar="PATH", help="a .gguf file, or a new folder for ollama")
    ex.set_defaults(func=cmd_export)

    push = sub.add_parser("push", help="publish a run's merged model (else its adapter) on the Hugging Face hub")
    push.add_argument("run_dir", type=Path)
    push.add_argument("--repo", required=True, metavar="NAME", help="hub repository, e.g. you/quill-135m")
    push.set_defaults(func=cmd_push)

    from fx.after.runs import SORT_KEYS

    runs = sub.add_parser("runs", help="a table of past runs; --compare shows two runs' config differences and metrics")
    runs.add_argument("dir", type=Path, nargs="?", default=Path("runs"), help="an output folder (default: runs)")
    runs.add_argument("--sort", default="date", metavar="KEY", help=f"one of: {', '.join(SORT_KEYS)} (default: date)")
    runs.add_argument("--reverse", action="store_true", help="sort in descending order")
    runs.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="two runs, by name in DIR or by path")
    runs.set_defaults(func=cmd_runs)

    sweep = sub.add_parser("sweep", help="run the points of a sweep file ([sweep]: grid, random or optuna), each a run")
    sweep.add_argument("file", type=Path, nargs="?")
    sweep.add_argument("--resume", type=Path, metavar="SWEEP_DIR", help="go on with a stopped sweep")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every point")
    sweep.set_defaults(func=cmd_sweep)

    report = sub.add_parser("report", help="one static HTML page comparing runs or a sweep's points")
    report.add_argument("paths", type=Path, nargs="+", metavar="RUN|SWEEP_DIR|DIR")
    report.add_argument("--out", type=Path, metavar="HTML", help="default: report.html in the sweep or run folder")
    report.set_defaults(func=cmd_report)
    return p


def _base(command) -> None:
    command.add_argument("--base", action="store_true", help="the argument is an experiment file: its model before "
                                                             "training, as its method loads it")
    command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --base")


def _budget(text: str) -> str:
    from fx.plan.gpus import budget_gib

    try:
        budget_gib(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def main(argv: list[str] | None = None) -> int:
    """The one place where fx's errors become what a user reads (control characters from their input escaped) and
    an exit code: 2 for a mistake in what they gave, 1 for a failed training, 128+signal for a stopped one."""
    silence_noise()
    args = parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # what the ranks --gpus launches run again
    from fx.run.launch import note_failure, rank
    this = rank()  # on several GPUs, rank 0 says what every rank would; each tells the launcher how it ended
    try:
        with stopping_on_signals():  # SIGTERM, SIGHUP: what is under way cleans up, as after Ctrl-C
            return args.func(args)
    except (UserError, Interrupted) as exc:
        note_failure(this, "refused" if isinstance(exc, UserError) else "interrupted", str(exc))
        if this == 0:
            print(f"fx: {'error: ' if isinstance(exc, UserError) else ''}{printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except TrainingFailed as exc:
        note_failure(this, getattr(exc, "status", "failed"), str(exc))
        print(f"fx: training failed: {printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C, or fx.errors.Stopped (SIGTERM, SIGHUP) outside a run's own handling
        note_failure(this, "interrupted", "interrupted")
        print(f"fx: interrupted{f' by {exc}' if isinstance(exc, Stopped) else ''}", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    except OSError as exc:  # the OS refused a file of the user's (disk full, no permission, a name too long)
        where = f"{exc.filename}: " if exc.filename else ""
        message = printable(where + (exc.strerror or str(exc)))
        note_failure(this, "refused", message)
        if this == 0:
            print(f"fx: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, or a rank whose peer died: the launcher reports the first cause
        note_failure(this, "failed", f"rank {this}: {type(exc).__name__}: {exc}"[:2000])
        raise


if __name__ == "__main__":
    sys.exit(main())
