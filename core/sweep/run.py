"""``fx sweep``: a sweep file's points, each an ordinary run (its own folder, config.toml, resumable) started as its
own ``fx run`` process, one at a time on a CPU and one per local GPU at once; their state in ``sweep.json``, so that
``fx sweep --resume DIR`` goes on where a killed sweep stopped (finished points kept, an interrupted point resumed
from its checkpoint, nothing trained twice). With ``optuna`` the points come from an Optuna study in relational
storage (a SQLite file by default), which several ``fx sweep`` processes, on several machines, can share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fx import config
from fx.errors import Interrupted, UserError
from fx.files import write_atomic
from fx.run.directory import RunDir
from fx.run.record import alive
from fx.sweep import plan
from fx.sweep.plan import SweepSettings

STATE = "sweep.json"
DONE = ("completed", "failed", "out_of_memory")  # a point that ended this way is not run again


@dataclass
class Point:
    index: int
    values: dict[str, Any]
    status: str = "pending"  # pending, running, completed, failed, interrupted, out_of_memory
    run: str | None = None
    value: float | None = None
    trial: int | None = None


@dataclass
class Sweep:
    folder: Path
    file: Path
    sets: list[str]
    settings: SweepSettings
    name: str
    points: list[Point] = field(default_factory=list)
    wall_s: float = 0.0
    stopped: str | None = None

    def save(self) -> None:
        data = {"version": 1, "file": str(self.file), "sets": self.sets, "name": self.name,
                "settings": self.settings.model_dump(mode="json"), "wall_s": round(self.wall_s, 1),
                "stopped": self.stopped, "points": [asdict(p) for p in self.points]}
        write_atomic(self.folder / STATE, json.dumps(data, indent=2) + "\n")

    def point_name(self, point: Point) -> str:
        return f"{self.name}-p{point.index:02d}"


def is_sweep(folder: Path) -> bool:
    return (Path(folder) / STATE).is_file()


def load(folder: Path) -> Sweep:
    folder = Path(folder)
    try:
        data = json.loads((folder / STATE).read_text())
        points = [Point(**p) for p in data["points"]]
        settings = SweepSettings.model_validate(data["settings"])
        return Sweep(folder, Path(data["file"]), list(data["sets"]), settings, data["name"], points,
                     float(data.get("wall_s") or 0))
    except FileNotFoundError:
        raise UserError(f"{folder}: not a sweep folder (no {STATE})") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{folder / STATE}: not a sweep state fx can read ({exc})") from None


def create(file: Path, sets: list[str]) -> Sweep:
    """Check every point (exit 2 with every problem before anything trains), then make the sweep's folder."""
    file = Path(file).resolve()
    _, settings = plan.read(file)
    exp = config.load(file, sets)
    problems = plan.check(file, settings, sets)
    if problems:
        raise UserError("\n".join(problems))
    if settings.strategy == "optuna":
        _optuna()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path(exp.experiment.output_dir) / f"{exp.experiment.name}-sweep-{stamp}"
    folder.mkdir(parents=True, exist_ok=False)
    sweep = Sweep(folder.resolve(), file, list(sets), settings, exp.experiment.name)
    if settings.strategy != "optuna":
        sweep.points = [Point(i, values) for i, values in enumerate(plan.points(settings))]
    sweep.save()
    return sweep


def metric_of(summary: dict[str, Any], path: str) -> float | None:
    """The value at a dotted summary path (``eval_after.loss``, ``benchmark.general_after``), when it is a number."""
    value: Any = summary
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("strategy = \"optuna\" needs Optuna: pip install 'fx[sweep]' (or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def study(sweep: Sweep):
    optuna = _optuna()
    settings = sweep.settings
    storage = settings.storage or f"sqlite:///{sweep.folder / 'study.db'}"
    name = settings.study or sweep.name
    try:
        existing = len(optuna.load_study(study_name=name, storage=storage).trials)
    except KeyError:  # no such study yet
        existing = 0
    # a process that joins a study draws with its own seed: two processes never replay each other's draws
    sampler = optuna.samplers.TPESampler(seed=settings.seed + existing)
    return optuna.create_study(study_name=name, storage=storage, direction=settings.goal(), sampler=sampler,
                               load_if_exists=True)


def ask(the_study, settings: SweepSettings) -> tuple[int, dict[str, Any]]:
    trial = the_study.ask()
    values = {}
    for key, spec in settings.parameters.items():
        if isinstance(spec, list):
            values[key] = trial.suggest_categorical(key, spec)
        elif spec.integer:
            values[key] = trial.suggest_int(key, round(spec.low), round(spec.high), log=spec.log)
        else:
            values[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
    return trial.number, values


def run_folder(sweep: Sweep, point: Point) -> Path | None:
    found = sorted(p for p in sweep.folder.glob(f"{sweep.point_name(point)}-*") if RunDir(p).is_run())
    return found[-1] if found else None


def _command(sweep: Sweep, point: Point) -> list[str]:
    fx = [sys.executable, "-m", "fx.cli", "run"]
    folder = run_folder(sweep, point)
    if folder is not None:  # an interrupted point: continue from its checkpoint
        return [*fx, "--resume", str(folder)]
    sets = [*sweep.sets, *plan.overrides(point.values), f"experiment.output_dir={json.dumps(str(sweep.folder))}",
            f"experiment.name={json.dumps(sweep.point_name(point))}"]
    return [*fx, str(sweep.file), *(x for s in sets for x in ("--set", s))]


def _start(sweep: Sweep, point: Point, gpu: int | None) -> subprocess.Popen:
    logs = sweep.folder / "logs"
    logs.mkdir(exist_ok=True)
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    with (logs / f"{sweep.point_name(point)}.log").open("a") as log:
        # its own session: Ctrl-C reaches the sweep alone, which passes it on once (a second would stop the point
        # mid-step, without its checkpoint)
        proc = subprocess.Popen(_command(sweep, point), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    point.status = "running"
    sweep.save()
    print(f"fx sweep: point {point.index} {_label(point)} started"
          + (f" on GPU {gpu}" if gpu is not None else ""), flush=True)
    return proc


def _label(point: Point) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.values.items())


def _finish(sweep: Sweep, point: Point, code: int, the_study) -> None:
    folder = run_folder(sweep, point)
    point.run = str(folder) if folder is not None else None
    found = RunDir(folder).summary_if_readable() if folder is not None else None
    summary = found.to_dict() if found is not None else None
    status = (summary or {}).get("status") or ("completed" if code == 0 else "failed")
    point.status = "interrupted" if code > 128 and status != "completed" else status
    point.value = metric_of(summary or {}, sweep.settings.metric)
    if the_study is not None and point.trial is not None and point.status != "interrupted":
        import optuna

        if point.status == "completed" and point.value is not None:
            the_study.tell(point.trial, point.value)
        else:
            the_study.tell(point.trial, state=optuna.trial.TrialState.FAIL)
    sweep.save()
    shown = f"{sweep.settings.metric} {point.value:.4g}" if point.value is not None else "no metric"
    print(f"fx sweep: point {point.index} {point.status}: {shown} ({point.run or 'no run folder'})", flush=True)


def _next(sweep: Sweep, the_study, active: set[int]) -> Point | None:
    for point in sweep.points:
        # running and not started here: the point of a sweep that died while it ran
        if point.status in ("pending", "interrupted", "running") and point.index not in active:
            return point
    settings = sweep.settings
    if the_study is None:
        return None
    limit = min(x for x in (settings.count, settings.max_points) if x is not None)
    if len(sweep.points) >= (settings.max_points or limit) or len(the_study.trials) >= limit:
        return None
    trial, values = ask(the_study, settings)
    point = Point(len(sweep.points), values, trial=trial)
    sweep.points.append(point)
    return point


def _last_segment(folder: Path):
    summary = RunDir(folder).summary_if_readable()
    if summary is None or summary.status != "running" or not summary.segments:
        return None
    return summary.segments[-1]


def slots() -> list[int | None]:
    """One point at a time per local GPU; one at a time on a CPU."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return list(range(count)) if count else [None]


def execute(sweep: Sweep) -> Sweep:
    """Run the sweep's points to its end or budget; Ctrl-C (or SIGTERM) stops every running point after its
    checkpoint and ends with :class:`Interrupted` naming ``fx sweep --resume``."""
    for point in sweep.points:  # a sweep killed outright leaves its points' processes running on their own
        folder = run_folder(sweep, point) if point.status == "running" else None
        last = _last_segment(folder) if folder is not None else None
        if last is not None and alive(last.host, last.pid):
            raise UserError(f"point {point.index}'s run still runs (process {last.pid}): {folder}; let it end or "
                            "stop it, then resume the sweep")
    the_study = study(sweep) if sweep.settings.strategy == "optuna" else None
    free, running = slots(), {}
    began, before = time.monotonic(), sweep.wall_s
    sweep.stopped = None
    try:
        while True:
            while free:
                if sweep.settings.max_minutes and before + time.monotonic() - began >= sweep.settings.max_minutes * 60:
                    sweep.stopped = f"max_minutes {sweep.settings.max_minutes:g} reached"
                    break
                point = _next(sweep, the_study, {p.index for p, _ in running.values()})
                if point is None:
                    break
                gpu = free.pop(0)
                running[gpu] = (point, _start(sweep, point, gpu))
            if not running:
                break
            for gpu, (point, proc) in list(running.items()):
                if proc.poll() is not None:
                    del running[gpu]
                    free.append(gpu)
                    _finish(sweep, point, proc.returncode, the_study)
            time.sleep(0.2)
    except KeyboardInterrupt as exc:  # Ctrl-C, or fx.errors.Stopped (SIGTERM, SIGHUP)
        signum = getattr(exc, "signum", signal.SIGINT)
        _stop(sweep, running, the_study)
        sweep.wall_s = before + time.monotonic() - began
        sweep.stopped = "interrupted"
        sweep.save()
        raise Interrupted(f"sweep stopped; its running points checkpointed. Resume with: fx sweep --resume "
                          f"{sweep.folder}", signum) from None
    sweep.wall_s = before + time.monotonic() - began
    sweep.save()
    return sweep


def _stop(sweep: Sweep, running: dict, the_study) -> None:
    """Pass one SIGINT to every running point (each finishes its step and checkpoints), and wait for them; a second
    Ctrl-C passes a second one (they stop at once)."""
    for _, proc in running.values():
        proc.send_signal(signal.SIGINT)
    while running:
        try:
            for gpu, (point, proc) in list(running.items()):
                proc.wait()
                del running[gpu]
                _finish(sweep, point, proc.returncode, the_study)
        except KeyboardInterrupt:
            for _, proc in running.values():
                proc.send_signal(signal.SIGINT)
