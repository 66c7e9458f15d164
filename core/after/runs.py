"""``fx runs``: past runs read back from their record (``config.toml``, ``summary.json``, ``history.jsonl``).

A folder is a run when it holds a ``config.toml``; anything else in the output folder (an MLflow store,
a TensorBoard log) is passed over.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fx.config.diff import differences, flatten
from fx.errors import UserError
from fx.run.directory import RunDir
from fx.run.record import alive
from fx.settings import did_you_mean

LOWER_IS_BETTER = {"loss", "perplexity", "chosen_loss"}
PREFERENCE = ("reward_accuracy", "logp_accuracy")  # a preference method's held-out measures (fx.evaluation)
SORT_KEYS = ("date", "name", "model", "method", "steps", "final", "best", "tokens_s", "vram", "status")


@dataclass
class RunRow:
    """One line of ``fx runs``."""

    path: Path
    name: str
    date: datetime  # when the run was created (a resumed run keeps its first start)
    model: str
    method: str
    status: str
    steps: int | None
    metric: str  # the held-out metric the experiment chose (``loss`` when it chose none)
    final: float | None  # its value after training
    best: float | None  # its best value over every held-out evaluation of the run
    tokens_s: float | None
    vram: float | None  # peak GiB reserved on the GPU; None on CPU
    preference: dict[str, float]  # a preference run's reward/log-probability accuracy after training
    results: dict[str, float]  # what plugins' stages recorded: ``<stage>.<key>`` -> number


def read_run(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's resolved config and its summary as JSON data (empty when the run never wrote one), read through
    the record's schema (UserError naming the file when it doesn't fit)."""
    files = RunDir(folder)
    summary = files.read_summary()
    return files.read_config(), summary.to_dict() if summary is not None else {}


def model_label(config: dict[str, Any]) -> str:
    """``hf:meta-llama/Llama-2-7b-hf``, ``random:tiny``: the source and what it loads."""
    model = config.get("model", {})
    source = model.get("source", "?")
    detail = model.get("name") or model.get("architecture")
    return f"{source}:{detail}" if detail else source


def eval_points(folder: Path, summary: dict[str, Any], metric: str) -> list[float]:
    """Every held-out value of ``metric`` the run measured, every segment's: its history, else the summary's."""
    points = [float(m[f"eval_{metric}"]) for _, m in RunDir(folder).read_history()
              if isinstance(m.get(f"eval_{metric}"), (int, float))]
    if not points:
        for key in ("eval_before", "eval_after"):
            value = (summary.get(key) or {}).get(metric)
            if isinstance(value, (int, float)):
                points.append(float(value))
    return points


def row(folder: Path) -> RunRow:
    try:
        config, summary = read_run(folder)
    except UserError as exc:  # one damaged run is listed as such, not a reason to list none
        print(f"fx: {exc}", file=sys.stderr)
        config, summary = RunDir(folder).read_config(), {"status": "unreadable"}
    after = summary.get("eval_after") or {}
    metric = config.get("stages", {}).get("evaluate", {}).get("metric", "none")
    if metric == "none":  # the held-out loss; a preference run measures its reward accuracy instead
        measured = {**(summary.get("eval_before") or {}), **after}
        metric = "loss" if "loss" in measured or "reward_accuracy" not in measured else "reward_accuracy"
    points = eval_points(folder, summary, metric)
    final = after.get(metric)
    best = (min if metric in LOWER_IS_BETTER else max)(points) if points else None
    created = summary.get("created") or RunDir(folder).read_origin().get("created") or summary.get("started")
    status = summary.get("status", "unknown")
    last = (summary.get("segments") or [{}])[-1]
    if status == "running" and alive(last.get("host"), last.get("pid")) is False:
        status = "died"  # no process holds it: killed (kill -9, out of host memory) before it could say so
    date = (datetime.fromisoformat(created) if created
            else datetime.fromtimestamp(RunDir(folder).config.stat().st_mtime, timezone.utc))
    return RunRow(
        path=folder, name=summary.get("name", folder.name), date=date, model=model_label(config),
        method=config.get("method", {}).get("name", "?"), status=status,
        steps=summary.get("steps"), metric=metric, final=final, best=best,
        tokens_s=summary.get("train_tokens_per_s"), vram=summary.get("peak_vram_gib"),
        preference={k: after[k] for k in PREFERENCE if isinstance(after.get(k), (int, float))},
        results={**general(summary), **{f"{stage}.{k}": v for stage, values in (summary.get("results") or {}).items()
                                         for k, v in values.items() if _measure(v)}},
    )


def general(summary: dict[str, Any]) -> dict[str, float]:
    """The benchmark stage's general score after training (else before) and its drop: ``fx runs`` columns."""
    bench = summary.get("benchmark") or {}
    score = bench.get("general_after") if bench.get("general_after") is not None else bench.get("general_before")
    out = {"general": score} if score is not None else {}
    if bench.get("drop") is not None:
        out["general.drop"] = bench["drop"]
    return out


def collect(directory: Path, sort: str = "date", reverse: bool = False) -> list[RunRow]:
    """Every run in ``directory``, sorted by ``sort`` (runs without that value last, whichever the order)."""
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory (give the experiment's output_dir, e.g. fx runs runs)")
    if sort not in SORT_KEYS:
        raise UserError(f"--sort {sort!r}: one of {', '.join(SORT_KEYS)}{did_you_mean(sort, SORT_KEYS)}")
    rows = [row(p) for p in sorted(directory.iterdir()) if RunDir(p).is_run()]
    present = [r for r in rows if getattr(r, sort) is not None]
    absent = [r for r in rows if getattr(r, sort) is None]
    return sorted(present, key=lambda r: getattr(r, sort), reverse=reverse) + absent


def resolve(directory: Path, name: str) -> Path:
    """A run given as a path, or by its name inside ``directory``."""
    for candidate in (Path(name), directory / name):
        if RunDir(candidate).is_run():
            return candidate
    known = [p.name for p in directory.iterdir() if RunDir(p).is_run()] if directory.is_dir() else []
    raise UserError(f"{name}: no such run in {directory}{did_you_mean(name, known)}")


def _measure(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compare(a: Path, b: Path) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]], int]:
    """``(config keys whose values differ, the summaries' measures and status that differ, how many measures are
    equal)``, the rows as ``(key, value in a, value in b)``."""
    (config_a, summary_a), (config_b, summary_b) = read_run(a), read_run(b)
    config_rows = differences(config_a, config_b)
    flat_a, flat_b = flatten(summary_a), flatten(summary_b)
    keys = list(flat_a) + [k for k in flat_b if k not in flat_a]
    measures = [(k, flat_a.get(k), flat_b.get(k)) for k in keys
                if k in ("status", "error") or _measure(flat_a.get(k)) or _measure(flat_b.get(k))]
    metric_rows = [row for row in measures if row[1] != row[2]]
    return config_rows, metric_rows, len(measures) - len(metric_rows)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# the columns fx runs leaves out first when its table is wider than the terminal, in that order
SPARE = ("created", "model", "metric", "VRAM GiB", "best", "tokens/s", "method")


def _console():
    """A console for tables: the terminal's width; piped or redirected, ``COLUMNS`` when set, else whole rows."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=max(console.width, 240))
    return console


def _fitting(console, title: str, columns: list[str], numeric: set[str], rows: list[list[str]]):
    """The table of ``rows`` with as many of ``columns`` as fit the console (the SPARE ones left out first), the
    columns left out, and the width the whole table needs."""
    from rich import box
    from rich.measure import Measurement
    from rich.table import Table

    shown, hidden, whole = list(columns), [], None
    while True:
        table = Table(title=title, box=box.SIMPLE_HEAD)
        for column in shown:
            table.add_column(column, justify="right" if column in numeric else "left", no_wrap=True)
        for row in rows:
            table.add_row(*(cell for column, cell in zip(columns, row) if column in shown))
        spare = [c for c in (*SPARE, *columns[::-1]) if c in shown and c not in ("name", "status")]
        width = Measurement.get(console, console.options.update_width(100_000), table).maximum
        whole = whole or width
        if width <= console.width or not spare:
            return table, hidden, whole
        shown.remove(spare[0])
        hidden.append(spare[0])


def show(directory: Path, sort: str = "date", reverse: bool = False, pair: list[str] | None = None) -> None:
    """``fx runs``: the table of the runs in ``directory``, or with ``pair`` (two run names) their differences. A table
    wider than the terminal leaves columns out and says which, and how to see them."""
    from rich import box
    from rich.table import Table

    console = _console()
    if pair:
        a, b = (resolve(directory, name) for name in pair)
        config_rows, metric_rows, equal = compare(a, b)
        for title, rows in ((f"config differences ({len(config_rows)})", config_rows),
                            (f"measures that differ ({len(metric_rows)}; {equal} equal, not shown)", metric_rows)):
            table = Table(title=title, box=box.SIMPLE_HEAD)
            for column in ("key", a.name, b.name):
                table.add_column(column, justify="left" if column == "key" else "right", overflow="fold")
            for key, left, right in rows:
                table.add_row(key, _cell(left), _cell(right))
            console.print(table)
        return
    rows = collect(directory, sort, reverse)
    if not rows:
        print(f"no runs in {directory}")
        return
    preference = [k for k in PREFERENCE if any(k in r.preference for r in rows)]  # only when a run has them
    results = sorted({k for r in rows for k in r.results})  # plugins' stages' numbers, likewise
    columns = ["name", "created", "model", "method", "status", "steps", "metric", "final", "best", *preference,
               *results, "tokens/s", "VRAM GiB"]
    cells = [[r.name, r.date.astimezone().strftime("%Y-%m-%d %H:%M"), r.model, r.method, r.status, _cell(r.steps),
              r.metric, _cell(r.final), _cell(r.best), *(_cell(r.preference.get(k)) for k in preference),
              *(_cell(r.results.get(k)) for k in results), _cell(r.tokens_s), _cell(r.vram)] for r in rows]
    numeric = {"steps", "final", "best", *preference, *results, "tokens/s", "VRAM GiB"}
    table, hidden, whole = _fitting(console, f"runs in {directory} (sorted by {sort}{', reversed' if reverse else ''})",
                             columns, numeric, cells)
    console.print(table)
    if hidden:
        console.print(f"{len(hidden)} column(s) left out to fit {console.width} columns: {', '.join(hidden)}; a "
                      f"terminal {whole} wide (or COLUMNS={whole} fx runs ...) shows them all", highlight=False)
