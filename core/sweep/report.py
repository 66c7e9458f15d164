"""``fx report``: runs, or a sweep's points, on one self-contained static HTML page (no server, no network, no script;
figures drawn by matplotlib as inline SVG): the config keys that differ, held-out metrics and general ability before
and after with the best run marked, loss curves overlaid, the cost of each run, every run's samples side by side per
prompt, and for a sweep the metric against each swept key. It reads runs only through their record."""

from __future__ import annotations

import html
import io
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fx.config.diff import flatten
from fx.errors import UserError
from fx.run.directory import RunDir
from fx.sweep import run as sweeps

SAME_ANYWAY = ("experiment.name", "experiment.output_dir", "experiment.description")
COST = (("train_wall_s", "train s"), ("wall_s", "run s"), ("train_tokens_per_s", "tokens/s"),
        ("peak_vram_gib", "peak VRAM GiB"), ("peak_rss_gib", "peak RSS GiB"))
STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}
th{background:#f4f4f4;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{background:#e8f6e8;font-weight:600}.answer{white-space:pre-wrap;max-width:40em}
figure{margin:1em 0}.figures{display:flex;flex-wrap:wrap;gap:1em}figure svg{max-width:100%;height:auto}
.muted{color:#777}"""


@dataclass
class Entry:
    folder: Path
    name: str
    config: dict[str, Any]
    summary: dict[str, Any]
    history: list[tuple[int, dict[str, Any]]]
    values: dict[str, Any]  # a sweep point's swept values


def collect(paths: list[Path]) -> tuple[list[Entry], Any]:
    """The runs ``paths`` name (runs, sweep folders, folders of runs) and the sweep when one sweep is given."""
    entries, sweep = [], None
    for path in paths:
        if sweeps.is_sweep(path):
            sweep = sweeps.load(path)
            for point in sweep.points:
                folder = sweeps.run_folder(sweep, point)
                if folder is not None:
                    entries.append(_entry(folder, point.values))
        elif RunDir(path).is_run():
            entries.append(_entry(path, {}))
        elif Path(path).is_dir():
            found = [_entry(p, {}) for p in sorted(Path(path).iterdir()) if RunDir(p).is_run()]
            if not found:
                raise UserError(f"{path}: no runs in it")
            entries += found
        else:
            raise UserError(f"{path}: not a run, a sweep folder or a folder of runs")
    if not entries:
        raise UserError("no runs to report")
    return entries, sweep if len(paths) == 1 else None


def _entry(folder: Path, values: dict[str, Any]) -> Entry:
    run = RunDir(folder)
    summary = run.read_summary()
    return Entry(Path(folder), Path(folder).name, run.read_config(), summary.to_dict() if summary else {},
                 run.read_history(), values)


def differing(entries: list[Entry]) -> list[str]:
    flat = [flatten(e.config) for e in entries]
    keys = sorted(set().union(*flat))
    return [k for k in keys if k not in SAME_ANYWAY and len({repr(f.get(k)) for f in flat}) > 1]


def _esc(value: Any) -> str:
    if value is None:
        return '<span class="muted">-</span>'
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _figure(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    svg = buf.getvalue()
    return "<figure>" + svg[svg.index("<svg"):] + "</figure>"


def loss_figure(entries: list[Entry]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    drawn = False
    for i, entry in enumerate(entries):
        color = f"C{i % 10}"
        train = [(s, m["loss"]) for s, m in entry.history if isinstance(m.get("loss"), (int, float))]
        held = [(s, m["eval_loss"]) for s, m in entry.history if isinstance(m.get("eval_loss"), (int, float))]
        if train:
            ax.plot(*zip(*train), color=color, linewidth=1.2, label=f"{entry.name} train")
            drawn = True
        if held:
            ax.plot(*zip(*held), color=color, linestyle="--", marker="o", label=f"{entry.name} held-out")
            drawn = True
    if not drawn:
        plt.close(fig)
        return '<p class="muted">no losses recorded</p>'
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _figure(fig)


def key_figures(entries: list[Entry], sweep, metric: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for key in sweep.settings.keys():
        points = [(e.values.get(key), sweeps.metric_of(e.summary, metric)) for e in entries]
        points = [(x, y) for x, y in points if y is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 3))
        xs = [x for x, _ in points]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            ax.scatter(xs, [y for _, y in points])
            if min(xs) > 0 and max(xs) / min(xs) > 20:
                ax.set_xscale("log")
        else:
            labels = list(dict.fromkeys(str(x) for x in xs))
            ax.scatter([labels.index(str(x)) for x in xs], [y for _, y in points])
            ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        out.append(_figure(fig))
    return "".join(out)


def _metric_of(entries: list[Entry], sweep) -> tuple[str, str]:
    if sweep is not None:
        return sweep.settings.metric, sweep.settings.goal()
    for path in ("eval_after.contains", "eval_after.exact_match", "eval_after.reward_accuracy", "eval_after.loss"):
        if any(sweeps.metric_of(e.summary, path) is not None for e in entries):
            return path, "minimize" if path.endswith("loss") else "maximize"
    return "train_loss", "minimize"


def render(entries: list[Entry], sweep=None) -> str:
    metric, goal = _metric_of(entries, sweep)
    scored = [(sweeps.metric_of(e.summary, metric), e) for e in entries]
    scored = [(v, e) for v, e in scored if v is not None]
    best = (min if goal == "minimize" else max)(scored, key=lambda x: x[0])[1] if scored else None
    keys = differing(entries)
    title = f"fx report: {sweep.name} sweep" if sweep is not None else f"fx report: {len(entries)} run(s)"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='muted'>{len(entries)} run(s); best by <b>{html.escape(metric)}</b> ({goal}); written "
             f"{datetime.now().isoformat(timespec='seconds')} by fx report</p>"]
    parts.append("<h2>What differs</h2>" + _table(
        ["run", *keys], [[e.name, *(flatten(e.config).get(k) for k in keys)] for e in entries], entries, best)
        if keys else "<h2>What differs</h2><p class='muted'>the runs' configs are the same</p>")
    parts.append("<h2 id='results'>Results</h2>" + results_table(entries, best, metric))
    parts.append("<h2>Loss curves</h2>" + loss_figure(entries))
    if sweep is not None and len(entries) > 1:
        parts.append(f"<h2>{html.escape(metric)} against each swept key</h2><div class='figures'>"
                     + key_figures(entries, sweep, metric) + "</div>")
    parts.append("<h2>Cost</h2>" + _table(["run", *(label for _, label in COST)],
                                          [[e.name, *(e.summary.get(k) for k, _ in COST)] for e in entries],
                                          entries, best))
    parts.append("<h2 id='samples'>Samples</h2>" + samples(entries))
    parts.append("</body></html>")
    return "\n".join(parts)


def results_table(entries: list[Entry], best, metric: str) -> str:
    measures = []
    for e in entries:
        for when in ("eval_before", "eval_after"):
            for k in e.summary.get(when) or {}:
                if not k.endswith(("_hits", "_total")) and k not in measures:
                    measures.append(k)
    general = any(e.summary.get("benchmark") for e in entries)  # the benchmark stage's general ability
    head = ["run", "status", *(f"held-out {m}" for m in measures), *(["general"] if general else []), "train loss",
            "steps", metric]
    rows = []
    for e in entries:
        before, after = e.summary.get("eval_before") or {}, e.summary.get("eval_after") or {}
        bench = e.summary.get("benchmark") or {}
        rows.append([e.name + (" ★" if e is best else ""), e.summary.get("status"),
                     *(_change(before.get(m), after.get(m)) for m in measures),
                     *([_change(bench.get("general_before"), bench.get("general_after"))] if general else []),
                     e.summary.get("train_loss"), e.summary.get("steps"), sweeps.metric_of(e.summary, metric)])
    return _table(head, rows, entries, best)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _change(before: Any, after: Any) -> str | None:
    if before is None and after is None:
        return None
    if before is None or after is None:
        return _fmt(after if after is not None else before)
    return f"{_fmt(before)} → {_fmt(after)}"


def _table(head: list[str], rows: list[list[Any]], entries: list[Entry], best) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for entry, row in zip(entries, rows):
        cells = "".join(f"<td class='n'>{_esc(v)}</td>" if isinstance(v, (int, float)) else f"<td>{_esc(v)}</td>"
                        for v in row)
        out.append(f"<tr{' class=best' if entry is best else ''}>{cells}</tr>")
    return "".join(out) + "</table>"


def samples(entries: list[Entry]) -> str:
    """Per prompt, every run's answer after training (and the first run's before), side by side."""
    prompts = list(dict.fromkeys(p for e in entries for p in (e.summary.get("samples") or {}).get("prompts", [])))
    if not prompts:
        return "<p class='muted'>no samples recorded</p>"
    out = []
    for prompt in prompts:
        rows = []
        for e in entries:
            found = e.summary.get("samples") or {}
            if prompt in found.get("prompts", []):
                i = found["prompts"].index(prompt)
                if not rows and found.get("before"):
                    rows.append(f"<tr><td>before training ({html.escape(e.name)})</td><td class='answer'>"
                                f"{html.escape(found['before'][i])}</td></tr>")
                answer = (found.get("after") or [None] * (i + 1))[i]
                shown = _esc(answer) if answer else "<span class='muted'>(empty)</span>"
                rows.append(f"<tr><td>{html.escape(e.name)}</td><td class='answer'>{shown}</td></tr>")
        out.append(f"<h3>{html.escape(prompt)}</h3><table class='samples'><tr><th>run</th><th>answer</th></tr>"
                   + "".join(rows) + "</table>")
    return "".join(out)


def command(args) -> int:
    """``fx report PATH... [--out HTML]``."""
    from fx.files import write_atomic

    entries, sweep = collect(args.paths)
    first = args.paths[0]
    # one sweep, run or folder: its report.html; several: report.html here
    out = args.out or (Path(first) / "report.html" if len(args.paths) == 1 else Path("report.html"))
    write_atomic(out, render(entries, sweep))
    print(f"report: {out} ({len(entries)} run(s))", file=sys.stdout)
    return 0
