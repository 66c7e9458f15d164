"""``fx run``: experiment -> data -> model -> evaluate -> train -> save -> evaluate -> samples -> merge -> summary.

Everything a user can get wrong (the file, the plugins, the data rows, the template) is checked before the
run directory exists, so a refused run leaves nothing behind. Once training starts, a failure still leaves
the directory with what was written so far and a summary that says what happened.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fx import data as fx_data
from fx.config import Experiment
from fx.datareport import length_histogram
from fx.errors import Interrupted, TrainingFailed, UserError
from fx.evaluate import generate
from fx.merge import merge
from fx.plots import write_loss_plot
from fx.run import Run, new_run_dir, peak_rss_gib, write_atomic
from fx.tracking import TrackerHub


@dataclass
class Prepared:
    """What a run needs that can be checked without loading weights."""

    source: Any
    tokenizer: Any
    template: Any
    train: fx_data.Tokenized
    held_out: fx_data.Tokenized
    held_out_examples: list[fx_data.Example]
    train_examples: list[fx_data.Example]


def load_examples(exp: Experiment) -> tuple[list[fx_data.Example], list[fx_data.Example]]:
    """The experiment's rows as examples: the training split and the held-out split."""
    dataset = exp.dataset.cls(exp.dataset.settings, exp.base_dir)
    problems = dataset.check()
    if problems:
        raise UserError("\n".join(f"{exp.path}: {p}" for p in problems))
    train_rows, eval_rows = dataset.load()
    if exp.data.max_rows:
        train_rows = train_rows.select(range(min(exp.data.max_rows, len(train_rows))))
    train = fx_data.to_examples(train_rows, exp.data.format, "data (train)", exp.data.columns)
    held = fx_data.to_examples(eval_rows, exp.data.format, "data (eval)", exp.data.columns) if eval_rows is not None else None
    return fx_data.split(train, held, exp.data.eval_fraction, exp.experiment.seed)


def prepare(exp: Experiment) -> Prepared:
    train, held = load_examples(exp)
    if train[0].is_preference and not exp.method.cls.preference:
        raise UserError(f"{exp.path}: the data are preference pairs (a prompt with chosen and rejected answers), "
                        f"but method {exp.method.name!r} trains on one answer per row; choose a preference method "
                        "or a dataset of answers")
    if exp.method.cls.preference and not all(e.is_preference for e in train + held):
        raise UserError(f"{exp.path}: method {exp.method.name!r} trains on preference pairs (a prompt with chosen and "
                        "rejected answers), but the data have one answer per row; give a dataset in the 'preference' "
                        "or 'sharegpt_preference' format")
    method = exp.method.cls(exp.method.settings, None)
    problems = method.check()
    if problems:
        raise UserError("\n".join(f"{exp.path}: {p}" for p in problems))
    source = exp.model.cls(exp.model.settings)
    problems = source.check()
    if problems:
        raise UserError("\n".join(f"{exp.path}: {p}" for p in problems))
    tokenizer = source.tokenizer()
    template = exp.template.cls(exp.template.settings, tokenizer)
    try:
        train_tok = method.tokenize(train, template, tokenizer, exp.data.max_length)
        held_tok = method.tokenize(held, template, tokenizer, exp.data.max_length)
    except ValueError as exc:
        raise UserError(f"template {exp.template.name!r}: {exc}") from None
    if not train_tok.rows:
        raise UserError(f"{exp.path}: no training row has an answer left within data.max_length = {exp.data.max_length}")
    return Prepared(source, tokenizer, template, train_tok, held_tok, held, train)


def sample_prompts(exp: Experiment, prep: Prepared) -> list[list[dict]]:
    settings = exp.stages.generate
    if settings.prompts:
        return [[{"role": "user", "content": p}] for p in settings.prompts]
    pairs = [fx_data.prompt_of(prep.template, e) for e in prep.held_out_examples]
    return [p[0] for p in pairs if p is not None][: settings.count]


def write_samples(path: Path, prompts: list[list[dict]], before: list[str], after: list[str]) -> None:
    lines = ["# Samples", "", "Greedy answers to held-out prompts, before and after training, in the run's template.", ""]
    for i, (conv, b, a) in enumerate(zip(prompts, before, after), 1):
        lines += [f"## {i}. {conv[-1]['content']}", "", "**Before:**", "", b or "_(empty)_", "", "**After:**", "", a or "_(empty)_", ""]
    write_atomic(path, "\n".join(lines))


def last_checkpoint(folder: Path) -> tuple[Path, int] | None:
    """The newest complete checkpoint in a run: its ``trainer_state.json`` is written last and must parse."""
    found = []
    for ckpt in (folder / "checkpoints").glob("checkpoint-*"):
        try:
            state = json.loads((ckpt / "trainer_state.json").read_text())
            found.append((int(state["global_step"]), ckpt))
        except (OSError, ValueError, KeyError):
            continue  # being written when the run died
    if not found:
        return None
    step, ckpt = max(found)
    return ckpt, step


def load_run(folder: Path, overrides: list[str] = ()) -> Experiment:
    """The experiment a run directory was made from (its resolved ``config.toml``). ``overrides`` (``--set``) may
    change only how the run executes: the budget and the method's execution keys (a token budget after an
    out-of-memory error, say), never what it computes, so the resumed run continues the same training."""
    from fx import config
    from fx.bench import config_diff

    if not (folder / "config.toml").is_file():
        raise UserError(f"{folder}: not a run directory (no config.toml); give a folder that `fx run` made")
    origin = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    base_dir = Path(origin.get("base_dir", folder))
    exp = config.load(folder / "config.toml", base_dir=base_dir)
    if not overrides:
        return exp
    changed = config.load(folder / "config.toml", overrides, base_dir=base_dir)
    allowed = ["budget.*", *(f"method.{key}" for key in exp.method.cls.execution_keys)]
    refused = [d.split(":")[0] for d in config_diff(exp.resolved(), changed.resolved())
               if not (d.startswith("budget.") or d.split(":")[0] in allowed)]
    if refused:
        raise UserError(f"--set can't change {', '.join(refused)} of a run being resumed (it would train something "
                        f"else); a resumed run may change only {', '.join(allowed)}. Start a new run instead")
    return changed


class Summary(dict):
    """``summary.json``, rewritten after every stage so that a killed run still says how far it got."""

    def __init__(self, path: Path, **values):
        super().__init__(**values)
        self.path = path

    def write(self) -> None:
        write_atomic(self.path, json.dumps(self, indent=2) + "\n")


def _measure_peaks(summary: Summary, wall_s: float) -> None:
    import torch

    summary["wall_s"] = round(wall_s, 1)
    cuda = torch.cuda.is_available()
    summary["peak_vram_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None
    summary["peak_vram_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None
    summary["peak_rss_gib"] = peak_rss_gib()


@contextmanager
def _stop_on_signals(run: Run):
    """SIGINT/SIGTERM ask training to finish its step and checkpoint; a second one stops at once."""

    def handler(signum, frame):
        if run.stop_signal is not None:
            raise KeyboardInterrupt
        run.stop_signal = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def execute(exp: Experiment, plugins, resume: Path | None = None) -> Path:
    """Run the experiment (or continue the run in ``resume``); return the run directory."""
    import torch

    from fx import memory

    started = time.perf_counter()
    fitted = memory.fit(exp)  # refuses a run over its budget before anything is loaded
    exp = fitted.exp if fitted else exp
    prep = prepare(exp)
    previous: dict[str, Any] = {}
    if resume is None:
        folder = new_run_dir(Path(exp.experiment.output_dir), exp.experiment.name)
    else:
        folder = resume
        if (folder / "summary.json").is_file():
            previous = json.loads((folder / "summary.json").read_text())
    run = Run(folder.name, folder, exp.resolved(), plugins)
    if resume is not None:
        found = last_checkpoint(folder)
        if found is not None:
            run.resume_from, run.resume_step = found
    created = previous.get("created") or datetime.now().isoformat(timespec="seconds")  # kept across resumptions
    run.write_setup({"experiment_file": str(exp.path.resolve()), "base_dir": str(exp.base_dir), "created": created})
    length_histogram(prep.train.lengths + prep.held_out.lengths, exp.data.max_length, folder / "lengths.png",
                     f"{exp.experiment.name}: template {exp.template.name!r}")
    hub = TrackerHub({t.name: t.cls(t.settings, run) for t in exp.trackers})
    plugins.pm.register(hub, name=f"fx.trackers.active.{folder.name}")
    summary = Summary(
        folder / "summary.json", name=run.name, status="running", created=created,
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=exp.model.name, method=exp.method.name, template=exp.template.name,
        data={"train_rows": len(prep.train.rows), "eval_rows": len(prep.held_out.rows),
              "truncated": prep.train.truncated + prep.held_out.truncated,
              "dropped": prep.train.dropped + prep.held_out.dropped},
    )
    if run.resume_step is not None:
        summary["resumed_from_step"] = run.resume_step
    error: BaseException | None = None
    cap = None
    try:
        plugins.hook.fx_run_start(run=run)
        cap = memory.cap_allocator(fitted)
        if fitted:
            summary["memory_plan"] = {**fitted.summary(), "allocator_cap_gib": round(cap / memory.GIB, 3) if cap else None}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        _stages(exp, prep, run, summary, previous, fitted, cap)
        summary["status"] = "completed"
    except BaseException as exc:
        error = exc
        if isinstance(exc, (KeyboardInterrupt, Interrupted)):
            summary["status"] = "interrupted"
        elif summary["status"] == "running":
            summary["status"] = "failed"
        if summary["status"] != "interrupted":
            summary["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        raise
    finally:
        # wall time adds up across a run and its resumptions
        _measure_peaks(summary, time.perf_counter() - started + previous.get("wall_s", 0))
        try:  # the plot is a view of the run; a plotting failure must not hide how the run itself ended
            write_loss_plot(run.history, folder / "plots" / "loss.png", f"{run.name} ({summary['status']})")
        except Exception as exc:
            summary["plot_error"] = f"{type(exc).__name__}: {exc}"
            print(f"fx: could not write plots/loss.png: {summary['plot_error']}", file=sys.stderr)
        summary.write()
        plugins.hook.fx_run_end(run=run, summary=dict(summary), error=error)
        if hub.failed:
            summary["trackers_failed"] = hub.failed
            summary.write()
        plugins.pm.unregister(hub)
        shutil.rmtree(folder / "adapter.partial", ignore_errors=True)
    return folder


def _stages(exp: Experiment, prep: Prepared, run: Run, summary: Summary, previous: dict[str, Any],
            fitted=None, cap: float | None = None) -> None:
    import torch

    from transformers import set_seed

    set_seed(exp.experiment.seed)  # adapters are initialised at random when the model loads
    method = exp.method.cls(exp.method.settings, run)
    with run.stage("load") as result:
        model = method.load(prep.source, prep.tokenizer)
        result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    evaluating = exp.stages.evaluate.enabled and bool(prep.held_out.rows)

    def evaluate_stage(when: str, step: int) -> None:
        """Held-out measurements into summary.json (``eval_before``/``eval_after``) and to the trackers."""
        with run.stage(f"evaluate_{when}") as result:
            result.update(method.evaluate(model, prep.tokenizer, prep.template, prep.held_out.rows,
                                          prep.held_out_examples, exp.stages.evaluate))
        summary[f"eval_{when}"] = result
        summary.write()
        run.log(step, {f"eval_{k}": v for k, v in result.items() if isinstance(v, (int, float))})
    prompts = sample_prompts(exp, prep) if exp.stages.generate.enabled else []
    if evaluating and "eval_before" in previous:
        summary["eval_before"] = previous["eval_before"]  # measured before the run was interrupted
    elif evaluating:
        evaluate_stage("before", 0)
    before: list[str] = []
    if prompts:
        with run.stage("generate_before"):
            before = generate(model, prep.tokenizer, prep.template, prompts, exp.stages.generate.max_new_tokens)
    with run.stage("train") as result, _stop_on_signals(run):
        try:
            result.update(method.train(model, prep.tokenizer, prep.train.rows, prep.held_out.rows))
        except torch.OutOfMemoryError as exc:
            summary["status"] = "out_of_memory"
            plan = summary.get("memory_plan") or {}
            planned = (f"; planned {plan['total_gib']} GiB, allocator cap {plan.get('allocator_cap_gib')} GiB"
                       if plan else "")
            from fx import memory

            tokens = memory.token_budget_within(fitted, cap) if fitted else None
            last = last_checkpoint(run.dir)
            if tokens and "micro_batch_tokens" in exp.method.cls.execution_keys:
                advice = (f"Continue the same training (same effective batch, same gradient) in passes of at most "
                          f"{tokens} tokens, which the plan fits: fx run --resume {run.dir} "
                          f"--set method.micro_batch_tokens={tokens}")
            else:
                advice = (f"The plan fits no smaller pass here: resume with checkpointing on or more memory "
                          f"(fx run --resume {run.dir} --set method.gradient_checkpointing=true, or "
                          f"--set budget.vram_gib=<GiB>), or shorten data.max_length in a new run")
            raise TrainingFailed(
                f"out of GPU memory at step {run.step + 1}"
                + (f" on a batch of {run.batch_tokens} tokens" if run.batch_tokens else "") + " "
                f"(peak {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved{planned}). The last checkpoint "
                f"({'step ' + str(last[1]) if last else 'none yet'}) is intact. {advice}"
            ) from exc
    summary.update(result)
    summary.write()
    if run.stop_signal is not None:
        name = signal.Signals(run.stop_signal).name
        raise Interrupted(f"stopped by {name} after step {result.get('steps')}; checkpoint written. "
                          f"Resume with: fx run --resume {run.dir}", run.stop_signal)
    with run.stage("save") as result:
        tmp = run.dir / "adapter.partial"
        method.save(model, tmp)
        shutil.rmtree(run.dir / "adapter", ignore_errors=True)
        tmp.rename(run.dir / "adapter")
        result["adapter"] = str(run.dir / "adapter")
    if evaluating:
        evaluate_stage("after", summary.get("steps", 0))
    if prompts:
        with run.stage("generate_after"):
            after = generate(model, prep.tokenizer, prep.template, prompts, exp.stages.generate.max_new_tokens)
        write_samples(run.dir / "samples.md", prompts, before, after)
    if exp.stages.merge.enabled:
        del model  # the 4-bit model leaves memory before the 16-bit base comes in
        with run.stage("merge") as result:
            result.update(merge(exp, run.dir, run.dir / "merged", exp.stages.merge.dtype))
        summary["merge"] = result
        summary.write()
