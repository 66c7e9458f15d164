"""``plots/loss.png``: training and held-out loss, and the learning rate, drawn from what a run logged.

The runner writes it at the end of every run, whatever trackers are configured. Drawn with matplotlib's
object API on the Agg canvas: no display, no pyplot state shared with the user's process.
"""

from __future__ import annotations

import io
from pathlib import Path

from fx.files import write_atomic

History = list[tuple[int, dict[str, float]]]
Series = dict[str, tuple[list[int], list[float]]]


def loss_series(history: History) -> Series:
    """The points to draw: ``train loss``, ``held-out loss`` and ``learning rate`` against the optimizer step."""
    series: Series = {"train loss": ([], []), "held-out loss": ([], []), "learning rate": ([], [])}
    for step, metrics in history:
        for label, key in (("train loss", "loss"), ("held-out loss", "eval_loss"), ("learning rate", "learning_rate")):
            if isinstance(metrics.get(key), (int, float)):
                series[label][0].append(step)
                series[label][1].append(float(metrics[key]))
    return series


def write_loss_plot(history: History, path: Path, title: str) -> Series:
    """Draw the run's loss curves into ``path`` (PNG); return the points as drawn, read back from the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = loss_series(history)
    figure = Figure(figsize=(8, 6), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, lr_ax = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    loss_ax.set_title(title)
    loss_ax.set_ylabel("loss")
    for label, style in (("train loss", dict(marker=".", linewidth=1.2)),
                         ("held-out loss", dict(marker="o", linestyle="--"))):
        steps, values = series[label]
        if steps:
            loss_ax.plot(steps, values, label=label, **style)
    if loss_ax.lines:
        loss_ax.legend()
    else:
        loss_ax.text(0.5, 0.5, "no loss was logged", ha="center", va="center", transform=loss_ax.transAxes)
    loss_ax.grid(alpha=0.3)
    steps, values = series["learning rate"]
    if steps:
        lr_ax.plot(steps, values, label="learning rate", color="tab:green")
    else:
        lr_ax.text(0.5, 0.5, "no learning rate was logged", ha="center", va="center", transform=lr_ax.transAxes)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr_ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return {line.get_label(): ([int(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
            for ax in (loss_ax, lr_ax) for line in ax.lines}
