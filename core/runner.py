"""``fx run``: experiment -> data -> model -> evaluate -> train -> save -> evaluate -> samples -> summary.

Everything a user can get wrong (the file, the plugins, the data rows, the template) is checked before the
run directory exists, so a refused run leaves nothing behind. Once training starts, a failure still leaves
the directory with what was written so far and a summary that says what happened.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fx import data as fx_data
from fx.config import Experiment
from fx.errors import OutOfMemory, UserError
from fx.evaluate import evaluate, generate
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


def prepare(exp: Experiment) -> Prepared:
    dataset = exp.dataset.cls(exp.dataset.settings, exp.base_dir)
    problems = dataset.check()
    if problems:
        raise UserError("\n".join(f"{exp.path}: {p}" for p in problems))
    train_rows, eval_rows = dataset.load()
    if exp.data.max_rows:
        train_rows = train_rows.select(range(min(exp.data.max_rows, len(train_rows))))
    train = fx_data.to_examples(train_rows, exp.data.format, "data (train)")
    held = fx_data.to_examples(eval_rows, exp.data.format, "data (eval)") if eval_rows is not None else None
    train, held = fx_data.split(train, held, exp.data.eval_fraction, exp.experiment.seed)
    source = exp.model.cls(exp.model.settings)
    tokenizer = source.tokenizer()
    template = exp.template.cls(exp.template.settings, tokenizer)
    try:
        train_tok = fx_data.tokenize(train, template, tokenizer, exp.data.max_length)
        held_tok = fx_data.tokenize(held, template, tokenizer, exp.data.max_length)
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


def execute(exp: Experiment, plugins) -> Path:
    """Run the experiment; return its directory."""
    import torch

    from fx import memory

    started = time.perf_counter()
    fitted = memory.fit(exp)  # refuses a run over its budget before anything is loaded
    exp = fitted.exp if fitted else exp
    prep = prepare(exp)
    folder = new_run_dir(Path(exp.experiment.output_dir), exp.experiment.name)
    run = Run(folder.name, folder, exp.resolved(), plugins)
    run.write_setup()
    trackers = {t.name: t.cls(t.settings, run) for t in exp.trackers}
    hub = TrackerHub(trackers)
    plugins.pm.register(hub, name=f"fx.trackers.active.{folder.name}")
    summary: dict[str, Any] = {
        "name": run.name, "status": "running",
        "model": f"{exp.model.name}", "method": exp.method.name, "template": exp.template.name,
        "data": {"train_rows": len(prep.train.rows), "eval_rows": len(prep.held_out.rows),
                 "truncated": prep.train.truncated + prep.held_out.truncated,
                 "dropped": prep.train.dropped + prep.held_out.dropped},
    }
    error: BaseException | None = None
    cap = None
    try:
        plugins.hook.fx_run_start(run=run)
        cap = memory.cap_allocator(fitted)
        if fitted:
            summary["memory_plan"] = {**fitted.summary(), "allocator_cap_gib": round(cap / memory.GIB, 3) if cap else None}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        method = exp.method.cls(exp.method.settings, run)
        with run.stage("load") as result:
            model = method.load(prep.source, prep.tokenizer)
            result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        evaluate_settings, generate_settings = exp.stages.evaluate, exp.stages.generate
        prompts = sample_prompts(exp, prep) if generate_settings.enabled else []
        before: list[str] = []
        if evaluate_settings.enabled and prep.held_out.rows:
            with run.stage("evaluate_before") as result:
                result.update(evaluate(model, prep.tokenizer, prep.template, prep.held_out.rows, prep.held_out_examples, evaluate_settings)[0])
            summary["eval_before"] = result
            run.log(0, {f"eval_{k}": v for k, v in result.items() if isinstance(v, (int, float))})
        if prompts:
            with run.stage("generate_before"):
                before = generate(model, prep.tokenizer, prep.template, prompts, generate_settings.max_new_tokens)
        with run.stage("train") as result:
            result.update(method.train(model, prep.tokenizer, prep.train.rows, prep.held_out.rows))
        summary.update(result)
        with run.stage("save") as result:
            tmp = folder / "adapter.partial"
            method.save(model, tmp)
            tmp.rename(folder / "adapter")
            result["adapter"] = str(folder / "adapter")
        if evaluate_settings.enabled and prep.held_out.rows:
            with run.stage("evaluate_after") as result:
                result.update(evaluate(model, prep.tokenizer, prep.template, prep.held_out.rows, prep.held_out_examples, evaluate_settings)[0])
            summary["eval_after"] = result
            run.log(summary.get("steps", 0), {f"eval_{k}": v for k, v in result.items() if isinstance(v, (int, float))})
        if prompts:
            with run.stage("generate_after"):
                after = generate(model, prep.tokenizer, prep.template, prompts, generate_settings.max_new_tokens)
            write_samples(folder / "samples.md", prompts, before, after)
        summary["status"] = "completed"
    except torch.OutOfMemoryError as exc:
        error, summary["status"] = exc, "failed"
        summary["error"] = memory.out_of_memory(cap, exc)
        raise OutOfMemory(summary["error"]) from None
    except KeyboardInterrupt as exc:
        error, summary["status"] = exc, "interrupted"
        raise
    except BaseException as exc:
        error, summary["status"] = exc, "failed"
        summary["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        summary["wall_s"] = round(time.perf_counter() - started, 1)
        summary["peak_vram_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3) if torch.cuda.is_available() else None
        summary["peak_vram_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None
        summary["peak_rss_gib"] = peak_rss_gib()
        write_atomic(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
        plugins.hook.fx_run_end(run=run, summary=summary, error=error)
        if hub.failed:
            summary["trackers_failed"] = hub.failed
            write_atomic(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
        plugins.pm.unregister(hub)
        shutil.rmtree(folder / "adapter.partial", ignore_errors=True)
    return folder
