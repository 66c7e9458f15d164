"""A finished run, loaded again: its experiment, and its base model with the trained adapter, the way its method
trained it. ``fx generate``, ``fx chat``, ``fx eval`` and ``fx merge`` all start here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fx.config import Experiment
from fx.data.formats import to_examples
from fx.data.prepare import prepare
from fx.errors import UserError
from fx.hooks import manager
from fx.run.directory import RunDir
from fx.run.resume import read_run


def experiment(run_dir: Path) -> Experiment:
    """The run's resolved experiment, relative paths resolved from the original experiment file's folder."""
    return read_run(Path(run_dir))


def adapter_dir(run_dir: Path) -> Path:
    files = RunDir(run_dir)
    if not files.adapter.is_dir():
        status = files.read_summary().get("status", "unknown")
        raise UserError(f"{run_dir}: the run saved no adapter (its status: {status}); train it to the end first")
    return files.adapter


@dataclass
class Loaded:
    """A run ready for inference: the model (base + adapter, eval mode) and what prompts it."""

    exp: Experiment
    source: Any
    tokenizer: Any
    template: Any
    model: Any


def load_model(exp: Experiment, source, run_dir: Path):
    """The base from the model source, loaded as the run's method trains on it, with the run's adapter."""
    return exp.method.cls(exp.method.settings).load_trained(source, adapter_dir(run_dir))


def load(run_dir: Path, exp: Experiment | None = None) -> Loaded:
    exp = exp or experiment(run_dir)
    adapter_dir(run_dir)  # refuse before loading anything
    source = exp.model.cls(exp.model.settings)
    tokenizer = source.tokenizer()
    template = exp.template.cls(exp.template.settings, tokenizer)
    return Loaded(exp, source, tokenizer, template, load_model(exp, source, run_dir))


def held_out(loaded: Loaded, data: Path):
    """Every row of ``data`` (any format the ``file`` dataset reads) as held-out rows, in the run's template."""
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
    try:
        method = loaded.exp.method.cls(loaded.exp.method.settings)
        tokenized = method.tokenize(examples, loaded.template, loaded.tokenizer, loaded.exp.data.max_length)
    except ValueError as exc:
        raise UserError(f"template {loaded.exp.template.name!r}: {exc}") from None
    return tokenized, examples


def evaluate_run(run_dir: Path, data: Path | None = None) -> dict[str, Any]:
    """The held-out metrics of a finished run: on its own held-out rows (as ``eval_after`` measured them), or on
    every row of ``data``."""
    exp = experiment(run_dir)
    adapter_dir(run_dir)
    if data is None:
        prep = prepare(exp)
        if not prep.held_out.rows:
            raise UserError(f"{run_dir}: the run has no held-out rows; give some with --data FILE")
        model = load_model(exp, prep.source, run_dir)
        tokenizer, template, rows, examples = prep.tokenizer, prep.template, prep.held_out, prep.held_out_examples
    else:
        loaded = load(run_dir, exp)
        rows, examples = held_out(loaded, data)
        if not rows.rows:
            raise UserError(f"--data {data}: no row has an answer left within data.max_length = {exp.data.max_length}")
        model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.template
    method = exp.method.cls(exp.method.settings)
    metrics = method.evaluate(model, tokenizer, template, rows.rows, examples, exp.stages.evaluate)
    return {"run": str(run_dir), "data": str(data) if data else "held-out rows of the run", "rows": len(rows.rows),
            "metrics": metrics}
