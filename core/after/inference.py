"""A finished run, loaded again: its experiment, and its base model with the trained adapter, the way its method
trained it, or the model ``fx merge`` made of it. ``fx generate``, ``fx chat``, ``fx eval`` and ``fx merge`` all
start here; the first three take a run folder or a merged folder."""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fx.after import fidelity
from fx.config import Experiment
from fx.data.formats import to_examples
from fx.data.prepare import metric_problems, prepare
from fx.errors import UserError
from fx.hooks import manager
from fx.quiet import quiet_libraries
from fx.run.context import Context
from fx.run.directory import RunDir
from fx.run.resume import read_run
from fx.sources.folders import folder_problems
from fx.training.devices import choose_threads, device

RECORD = "fx_merged.json"  # written by fx merge into the merged folder: the run it came from, its base and dtype


def release() -> None:
    """Give back the memory of models no longer referenced (the GPU's cache included) before loading another."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def threads() -> None:
    """Choose torch's CPU threads for this machine's load (fx.training.devices.choose_threads), saying so when fewer
    than the cores."""
    note = choose_threads()
    if note:
        print(f"fx: {note}", file=sys.stderr)


def device_map() -> dict[str, Any]:
    return {"": 0} if device() == "cuda" else {"": "cpu"}


def merge_record(folder: Path) -> dict[str, Any] | None:
    """What ``fx merge`` recorded in a merged folder (``run``: the run folder), or None when ``folder`` is no merged
    model. A merged folder that lost its record is still found inside its run (``RUN/merged``)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return None
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        record = None
    if isinstance(record, dict) and RunDir(Path(record.get("run", ""))).is_run():
        return record
    if RunDir(folder.parent).is_run():  # moved together with its run, or merged before records were written
        return {**(record or {}), "run": str(folder.parent)}
    if record is not None:
        raise UserError(f"{folder}: merged from the run {record.get('run')!r}, which is no longer there; fx needs it "
                        "for the template and the held-out rows (load the merged folder with transformers instead)")
    return None


def run_of(folder: Path) -> Path:
    """The run folder of ``folder``: itself, or the run a merged folder came from."""
    record = merge_record(folder)
    return Path(record["run"]) if record else Path(folder)


def experiment(run_dir: Path) -> Experiment:
    """The run's resolved experiment (of a merged folder: its run's), relative paths resolved from the original
    experiment file's folder."""
    return read_run(run_of(run_dir))


def merged_problems(folder: Path) -> list[str]:
    """What is wrong with a merged folder, checked as a model source checks a local folder (fx.sources.folders)."""
    return folder_problems(Path(folder), key=str(folder))


def load_merged(folder: Path, dtype=None):
    """A merged folder loaded with plain transformers, as a user loads it (in eval mode); a damaged one is refused,
    naming the file."""
    from transformers import AutoModelForCausalLM

    problems = merged_problems(folder)
    if problems:
        raise UserError("; ".join(p.split(": ", 1)[1] for p in problems[:3]) + f". Merge again: fx merge "
                        f"{run_of(folder)} --out NEW_FOLDER")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto", device_map=device_map()).eval()


def adapter_dir(run_dir: Path) -> Path:
    """The run's ``adapter/``, checked before anything loads it (UserError saying what is wrong and what to do)."""
    files = RunDir(run_dir)
    if not files.adapter.is_dir():
        summary = files.read_summary()
        status = summary.status if summary is not None else "unknown"
        if status == "completed":
            raise UserError(f"{run_dir}: the run completed, but its adapter/ is gone (moved or deleted); put it back, "
                            "or train the experiment again")
        raise UserError(f"{run_dir}: the run saved no adapter (its status: {status}); train it to the end first: "
                        f"fx run --resume {run_dir}")
    problems = files.adapter_problems()
    if problems:
        raise UserError(f"{files.adapter}: the adapter is damaged ({'; '.join(problems[:3])}); put back an intact "
                        "copy, or train the experiment again")
    return files.adapter


@contextmanager
def fitting(run_dir: Path) -> Iterator[None]:
    """An adapter that doesn't fit the model the run's config.toml names (the file edited after training, or an
    adapter from another run) is refused, naming both, instead of torch's size-mismatch traceback."""
    try:
        yield
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), "")[:200]
        raise UserError(f"{RunDir(run_dir).adapter} does not fit the model {RunDir(run_dir).config} names ({first}): "
                        "was config.toml edited after training, or the adapter copied from another run?") from None


@dataclass
class Loaded:
    """A run ready for inference: the model (base + adapter, eval mode) and what prompts it."""

    exp: Experiment
    source: Any
    tokenizer: Any
    template: Any
    model: Any
    merged: Path | None = None  # the merged folder the model came from; None: the base with the run's adapter


def load_model(exp: Experiment, source, run_dir: Path):
    """The base from the model source, loaded as the run's method trains on it, with the run's adapter."""
    with fitting(run_dir):
        return exp.built.method.load_trained(source, adapter_dir(run_dir))


def load(run_dir: Path, exp: Experiment | None = None) -> Loaded:
    """A run folder's base with its adapter, or a merged folder's model, prompted in the run's template."""
    exp = exp or experiment(run_dir)
    merged = merge_record(run_dir) is not None
    if not merged:
        adapter_dir(run_dir)  # refuse before loading anything
    threads()
    source, tokenizer, template = exp.built.source, exp.built.tokenizer, exp.built.template
    if merged:
        return Loaded(exp, source, tokenizer, template, load_merged(run_dir), Path(run_dir))
    return Loaded(exp, source, tokenizer, template, load_model(exp, source, run_dir))


def base(file: Path, overrides: list[str] | None = None) -> Loaded:
    """An experiment's model before training, loaded as its method loads it to train (a new adapter changes
    nothing yet): what a run's "before" measures, without a run (``--base``)."""
    from fx import config

    exp = config.load(file, overrides or [])
    threads()
    model = exp.built.method.load(exp.built.source, exp.built.tokenizer)
    model.eval()
    return Loaded(exp, exp.built.source, exp.built.tokenizer, exp.built.template, model)


def held_out(loaded: Loaded, data: Path, settings=None):
    """Every row of ``data`` (any format the ``file`` dataset reads) as held-out rows, in the run's template;
    ``settings``: the [stages.evaluate] to score them with (default: the run's)."""
    data = Path(data)
    if not data.is_file():
        raise UserError(f"--data {data}: no such file")
    datasets = manager.get()["datasets"]
    if "file" not in datasets:
        raise UserError("--data needs the built-in 'file' dataset plugin, which is disabled (FX_DISABLE_PLUGINS)")
    cls = datasets["file"].cls
    source = cls(cls.Settings(path=str(data.resolve())), Path.cwd())
    problems = source.check()
    if problems:
        raise UserError(f"--data {data}: " + "; ".join(p.split(": ", 1)[-1] for p in problems))
    examples = to_examples(source.load()[0], "auto", f"--data {data}")
    problems = metric_problems(settings or loaded.exp.stages.evaluate, examples, f"--data {data}")
    if problems:
        raise UserError("\n".join(problems) + " (--metric none scores the loss alone)")
    try:
        tokenized = loaded.exp.built.method.tokenize(examples, loaded.template, loaded.tokenizer,
                                                     loaded.exp.data.max_length)
    except ValueError as exc:
        raise UserError(f"template {loaded.exp.template.name!r}: {exc}") from None
    return tokenized, examples


def evaluate_run(run_dir: Path, data: Path | None = None, metric: str | None = None,
                 loaded: Loaded | None = None) -> dict[str, Any]:
    """The held-out metrics of a finished run, or of a merged folder, or of ``loaded`` (an experiment's base,
    :func:`base`): on the run's own held-out rows (as ``eval_after`` measured them), or on every row of ``data``;
    ``metric``: the task metric instead of the run's. A merged model is measured method-independently
    (fx.after.fidelity: answer loss, the task metric), as ``fx merge`` checks it."""
    untrained = loaded is not None
    exp = loaded.exp if untrained else experiment(run_dir)
    settings = exp.stages.evaluate.model_copy(update={"metric": metric}) if metric else exp.stages.evaluate
    merged = not untrained and merge_record(run_dir) is not None
    if not untrained and not merged:
        adapter_dir(run_dir)
    if data is None:
        threads()  # (load() chooses them for --data)
        prep = prepare(exp)
        if not prep.held_out.rows:
            raise UserError(f"{run_dir}: {'the experiment' if untrained else 'the run'} has no held-out rows; give "
                            "some with --data FILE")
        problems = metric_problems(settings, prep.held_out_examples, f"{run_dir}: held-out rows")
        if problems:
            raise UserError("\n".join(problems))
        model = (loaded.model if untrained else load_merged(run_dir) if merged
                 else load_model(exp, prep.source, run_dir))
        tokenizer, template, rows, examples = prep.tokenizer, prep.template, prep.held_out, prep.held_out_examples
    else:
        loaded = loaded or load(run_dir, exp)
        rows, examples = held_out(loaded, data, settings)
        if not rows.rows:
            raise UserError(f"--data {data}: no row has an answer left within data.max_length = {exp.data.max_length}")
        model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.template
    if merged:
        metrics = fidelity.measure(model, tokenizer, template, rows.rows, examples, settings)
        del metrics["answers"]
    else:
        metrics = exp.built.method.evaluate(model, tokenizer, template, rows.rows, examples, settings)
    what = "base, untrained" if untrained else f"merged: {run_dir}" if merged else "adapter"
    return {"run" if not untrained else "experiment": str(run_dir if untrained else run_of(run_dir)), "model": what,
            "data": str(data) if data else "held-out rows", "rows": len(rows.rows), "metrics": metrics}


def finished(run_dir: Path) -> Context:
    """The context of a finished run for a command on it (``fx merge``, ``fx export``): a run that saved no adapter
    is refused before its data are prepared."""
    exp = experiment(run_dir)
    adapter_dir(run_dir)
    quiet_libraries()
    threads()
    return Context.finished(run_dir, exp)


def trained_measure(ctx) -> dict[str, Any] | None:
    """The trained adapter model measured on the run's held-out rows as a merged or exported model is
    (:func:`fx.after.fidelity.measure`, the greedy answers included), or None when the run has no held-out rows. The
    run's record keeps it: measured once (on the trained model in memory when there is one, else on the saved adapter
    loaded as the method trains it), then reused by every merge and export check of the run."""
    if ctx.summary.adapter_heldout is not None:
        return ctx.summary.adapter_heldout
    prep = ctx.prep
    if not (prep.held_out.rows or prep.held_out_examples):
        return None
    model = ctx.model if ctx.trained and ctx.model is not None else load_model(ctx.exp, ctx.source, ctx.folder.path)
    measured = fidelity.measure(model, prep.tokenizer, prep.template, prep.held_out.rows, prep.held_out_examples,
                                ctx.exp.stages.evaluate)
    del model
    release()
    ctx.summary.adapter_heldout = measured
    ctx.record.write()
    return measured
