"""Tracker ``console``: a line as each stage starts and as it ends (with its time and what it measured), a rich
progress bar while training (step/total, loss, learning rate, tokens/s, peak VRAM on a GPU, ETA) and a closing table.
When stderr is not a terminal (redirected to a log file, under nohup or a scheduler) there is no bar to redraw: plain
lines instead, the first step's at once, then one every ``every_steps`` steps or ``every_s`` seconds, whichever
comes first, and the last step's."""

from __future__ import annotations

import time

from pydantic import Field

import fx
from fx.run.tracking import Tracker


class ConsoleTracker(Tracker):
    description = "a progress bar while training (a line every N steps into a log file) and a summary table at the end"

    class Settings(fx.Settings):
        every_steps: int = Field(10, ge=1, le=10**9)  # with stderr redirected: a progress line every this many steps
        every_s: float = Field(60.0, gt=0, le=86400)  # ... and at least this often (seconds)

    def start(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.progress = None
        self.lines = not self.console.is_terminal
        self.began: dict[str, float] = {}
        self.printed: float | None = None  # when the last progress line was printed (lines mode)
        self.console.print(f"[bold]fx[/bold] run [cyan]{self.run.name}[/cyan] -> {self.run.dir}")

    def stage_start(self, stage) -> None:
        self.began[stage] = time.perf_counter()
        if stage == "train" and self.lines:
            self.clock = (time.perf_counter(), self.run.step)
            self.console.print("train ...", highlight=False, markup=False)
        elif stage == "train":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), console=self.console, transient=False,
            )
            self.task = self.progress.add_task("train", total=self.run.max_steps, info="")
            self.progress.start()
        else:
            self.console.print(f"[dim]{stage} ...[/dim]")

    def log(self, step, metrics) -> None:
        if "loss" not in metrics or (self.progress is None and not self.lines):
            return
        info = f"loss {metrics['loss']:.4f}"
        if "learning_rate" in metrics:
            info += f"  lr {metrics['learning_rate']:.2e}"
        if "rewards/margins" in metrics:  # preference training (trl's DPOTrainer)
            info += f"  margin {metrics['rewards/margins']:.3f}  reward acc {metrics.get('rewards/accuracies', 0):.2f}"
        if "tokens_per_s" in metrics:
            info += f"  {metrics['tokens_per_s']:.0f} tok/s"
        if "peak_vram_gib" in metrics:
            info += f"  peak VRAM {metrics['peak_vram_gib']:.2f} GiB"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, total=self.run.max_steps, info=info)
        elif self.due(step):
            self.printed = time.perf_counter()
            self.console.print(f"train {step}/{self.run.max_steps}  {info}{self.eta(step)}", highlight=False,
                               markup=False, soft_wrap=True)

    def due(self, step: int) -> bool:
        """Whether a progress line is due: the first step's, every ``every_steps`` steps, ``every_s`` seconds after
        the last line, and the last step's."""
        return (self.printed is None or step % self.settings.every_steps == 0 or step == self.run.max_steps
                or time.perf_counter() - self.printed >= self.settings.every_s)

    def eta(self, step: int) -> str:
        """The time left at this process's pace so far (a resumed run counts from its checkpoint)."""
        started, first = self.clock
        done, total = step - first, self.run.max_steps
        if done <= 0 or not total:
            return ""
        left = (time.perf_counter() - started) / done * (total - step)
        return f"  ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"

    def stage_end(self, stage, result) -> None:
        if stage == "train" and self.progress is not None:
            self.progress.stop()
            self.progress = None
        began = self.began.pop(stage, None)
        took = time.perf_counter() - began if began is not None else 0.0
        shown = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not k.endswith(("_hits", "_total"))}
        measured = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        self.console.print(f"{stage} done in {_duration(took)}" + (f": {measured}" if measured else ""),
                           highlight=False, markup=False, soft_wrap=True)

    def finish(self, summary, error) -> None:
        from rich.table import Table

        if self.progress is not None:
            self.progress.stop()
        table = Table(title=f"{self.run.name} ({summary.get('status')})")
        table.add_column("measure")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
        for key in [k for k in {**before, **after} if not k.endswith(("_hits", "_total"))]:
            table.add_row(f"held-out {key}", _fmt(before.get(key)), _fmt(after.get(key)))
        bench = summary.get("benchmark") or {}
        for task in bench.get("tasks", []):
            scores = [(bench.get(w) or {}).get(task) for w in ("before", "after")]
            if any(scores):
                metric = next(s for s in scores if s)["metric"]
                table.add_row(f"{task} {metric}", *(_score(s) for s in scores))
        if len(bench.get("tasks", [])) > 1:
            table.add_row("general", _fmt(bench.get("general_before")), _fmt(bench.get("general_after")))
        if bench.get("drop") is not None:
            before = bench.get("general_before")
            share = f" ({bench['drop'] / before:.0%})" if before else ""
            table.add_row("general drop", "", f"{bench['drop']:.3f}{share}" + (
                f" > max_drop {bench['max_drop']:g}" if bench.get("over") else ""))
        for key in ("steps", "train_loss", "train_tokens_per_s", "wall_s", "peak_vram_gib", "peak_rss_gib"):
            if summary.get(key) is not None:
                table.add_row(key, "", _fmt(summary[key]))
        self.console.print(table)


def _duration(seconds: float) -> str:
    """``4.2 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(seconds // 60)
    return f"{minutes} min {int(seconds % 60):02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _score(score) -> str:
    """``0.433 ± 0.022``: a harness score with its standard error."""
    if not score:
        return "-"
    return f"{score['score']:.3f}" + (f" ± {score['stderr']:.3f}" if score.get("stderr") is not None else "")


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@fx.hookimpl
def fx_register_trackers(register):
    register("console", ConsoleTracker)
