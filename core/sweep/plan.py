"""A sweep file: an experiment with a ``[sweep]`` table naming the keys to vary, their values or ranges, the strategy
(``grid``, ``random``, ``optuna``), the metric and the budget. Its points are checked before anything trains: every
point's experiment must load, and fit the experiment's ``[budget]`` (docs/sweeps.md)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from fx.config.experiment import toml_text
from fx.config.reading import read_toml
from fx.errors import ConfigError, UserError
from fx.settings import Settings

LOWER_IS_BETTER = ("loss", "perplexity", "drop")


class Range(Settings):
    """A range to draw from (random, optuna): ``{low = 1e-5, high = 1e-3, log = true}``; ``integer`` for whole
    numbers (a LoRA rank)."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class SweepSettings(Settings):
    """``[sweep]``: ``parameters`` (also given as quoted dotted keys in [sweep] itself: ``"template.name" = [...]``),
    ``strategy``, ``count`` (points random and optuna draw), ``metric`` (a summary.json path, e.g.
    ``eval_after.loss``), ``direction``, ``max_points``, ``max_minutes``, optuna's ``storage`` (default: a SQLite
    file in the sweep folder) and ``seed``."""

    parameters: dict[str, list[Any] | Range] = Field(default_factory=dict)
    strategy: Literal["grid", "random", "optuna", "list"] = "grid"
    # strategy "list": the points themselves, each its own keys (a method with its own settings, its own data)
    points: list[dict[str, Any]] = Field(default_factory=list, max_length=10_000)
    count: int | None = Field(None, ge=1, le=100_000)
    metric: str = Field("eval_after.loss", min_length=1)
    direction: Literal["minimize", "maximize"] | None = None
    max_points: int | None = Field(None, ge=1, le=100_000)
    max_minutes: float | None = Field(None, gt=0)
    storage: str | None = None
    study: str | None = None
    seed: int = 0

    def keys(self) -> list[str]:
        """The swept keys: the parameters', or every key a listed point sets."""
        return list(self.parameters) or list(dict.fromkeys(k for point in self.points for k in point))

    def goal(self) -> str:
        if self.direction is not None:
            return self.direction
        return "minimize" if self.metric.rsplit(".", 1)[-1].startswith(LOWER_IS_BETTER) else "maximize"


def settings_of(raw: dict[str, Any], path: Path) -> SweepSettings:
    """``[sweep]`` validated, every problem at once (ConfigError)."""
    table = dict(raw.get("sweep") or {})
    if not table:
        raise UserError(f"{path}: no [sweep] table: name the keys to vary, e.g. [sweep.parameters] "
                        "\"template.name\" = [\"llama2\", \"alpaca\"]")
    parameters = dict(table.pop("parameters", {}) or {})
    for key in [k for k in table if "." in k]:  # "template.name" = [...] in [sweep] itself
        parameters[key] = table.pop(key)
    problems: list[str] = []
    try:
        settings = SweepSettings.model_validate({**table, "parameters": parameters})
    except ValidationError as exc:  # each problem with its key path
        raise ConfigError([f"{path}: sweep.{'.'.join(map(str, e['loc']))}: "
                           f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
                           for e in exc.errors()]) from None
    if settings.strategy == "list":
        if not settings.points or not all(settings.points):
            problems.append("sweep: strategy \"list\" needs points, each setting at least one key")
        if settings.parameters:
            problems.append("sweep: strategy \"list\" takes its points as they are; the parameters "
                            f"{', '.join(settings.parameters)} belong to grid, random or optuna")
    elif not settings.parameters:
        problems.append("sweep: no parameters to vary")
    for key, values in settings.parameters.items():
        if isinstance(values, list) and not values:
            problems.append(f"sweep.parameters.{key}: no values (an empty grid)")
        if isinstance(values, Range) and settings.strategy == "grid":
            problems.append(f"sweep.parameters.{key}: a range can't be gridded; give a list of values, or use "
                            "strategy = \"random\" or \"optuna\"")
    if settings.strategy in ("random", "optuna") and settings.count is None and settings.max_points is None:
        problems.append(f"sweep: strategy {settings.strategy!r} needs count (how many points to draw)")
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    return settings


def grid(settings: SweepSettings) -> list[dict[str, Any]]:
    keys = list(settings.parameters)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(settings.parameters[k] for k in keys))]


def draw(settings: SweepSettings, rng: random.Random) -> dict[str, Any]:
    """One random point: a value of each list, a number from each range (log-uniform where ``log``)."""
    import math

    point = {}
    for key, values in settings.parameters.items():
        if isinstance(values, list):
            point[key] = rng.choice(values)
        else:
            x = (math.exp(rng.uniform(math.log(values.low), math.log(values.high))) if values.log
                 else rng.uniform(values.low, values.high))
            point[key] = round(x) if values.integer else float(f"{x:.4g}")
    return point


def points(settings: SweepSettings) -> list[dict[str, Any]]:
    """The points grid and random run, in order, up to ``max_points`` (optuna asks its study instead)."""
    if settings.strategy == "grid":
        found = grid(settings)
    elif settings.strategy == "list":
        found = [dict(point) for point in settings.points]
    else:
        rng = random.Random(settings.seed)
        found = [draw(settings, rng) for _ in range(settings.count or settings.max_points or 0)]
    return found[: settings.max_points] if settings.max_points else found


def overrides(point: dict[str, Any]) -> list[str]:
    """``--set`` assignments for a point: ``template.name='alpaca'``."""
    return [f"{key}={toml_text(value, limit=10_000)}" for key, value in point.items()]


def representatives(settings: SweepSettings) -> list[dict[str, Any]]:
    """Points that between them hold every listed value and each range's ends: what is checked before a random or
    optuna sweep starts (every point, for a grid)."""
    if settings.strategy in ("grid", "list"):
        return points(settings)
    first = {k: (v[0] if isinstance(v, list) else (round(v.low) if v.integer else v.low))
             for k, v in settings.parameters.items()}
    out = [first]
    for key, values in settings.parameters.items():
        others = values[1:] if isinstance(values, list) else [round(values.high) if values.integer else values.high]
        out += [{**first, key: value} for value in others]
    return out


def check(path: Path, settings: SweepSettings, base: list[str]) -> list[str]:
    """Every problem of the points :func:`representatives` names: keys fx doesn't know, values of the wrong type
    (each said once, as ``sweep: <key>: ...``), a point whose plan is over the experiment's ``[budget]`` (the point
    named)."""
    import copy

    from fx.config.experiment import apply_override, from_dict, set_key
    from fx.plan.fit import refusal
    from fx.training.budget import plan_ranks

    raw = read_toml(path)
    for assignment in base:
        apply_override(raw, assignment)
    problems: list[str] = []
    for point in representatives(settings):
        label = ", ".join(f"{k}={toml_text(v)}" for k, v in point.items())
        data = copy.deepcopy(raw)
        try:
            for assignment in overrides(point):
                apply_override(data, assignment)
            exp = from_dict(data, path, None, {set_key(a): a for a in base})
        except ConfigError as exc:
            for problem in exc.problems:
                text = f"{path}: sweep: {problem.removeprefix(f'{path}: ')}"
                if text not in problems:
                    problems.append(text)
            continue
        except UserError as exc:
            problems.append(f"{path}: sweep: point {label}: {str(exc).removeprefix(f'{path}: ')}")
            continue
        if exp.budget.gib() is not None:
            fitted = plan_ranks(exp, None, 1)
            if not fitted.fits:
                problems.append(f"{path}: sweep: point {label} is over the budget: "
                                + refusal(path, fitted).splitlines()[0].removeprefix(f"{path}: "))
    return problems


def read(path: Path) -> tuple[dict[str, Any], SweepSettings]:
    raw = read_toml(path)
    return raw, settings_of(raw, path)
