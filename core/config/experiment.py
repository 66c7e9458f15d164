"""Experiment TOML -> a typed, validated :class:`Experiment`; every problem is collected and reported at once.

An experiment names a plugin in five places (``[model] source``, ``[data] source``, ``[template] name``,
``[method] name``, ``[trackers.<name>]``); the rest of each such section is validated by that plugin's ``Settings``.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from fx.config.built import Built
from fx.config.formats import column_problems
from fx.config.reading import MAX_DEPTH, read_toml, too_deep
from fx.config.sections import (
    BudgetSettings,
    CheckpointSettings,
    DataSettings,
    DistributedSettings,
    ExperimentSettings,
    StagesSettings,
)
from fx.errors import ConfigError, UserError
from fx.hooks import manager
from fx.settings import did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# section -> (the key naming the plugin, the registry kind)
PLUGIN_SECTIONS = {
    "model": ("source", "models"),
    "data": ("source", "datasets"),
    "template": ("name", "templates"),
    "method": ("name", "methods"),
}
# [sweep] belongs to fx sweep (fx.sweep validates it); fx run on a sweep file runs its base experiment
SECTIONS = ("experiment", "model", "data", "template", "method", "trackers", "stages", "checkpoints", "budget",
            "distributed", "sweep")
BARE = re.compile(r"^[A-Za-z0-9_-]+$")  # a TOML key that needs no quotes


@dataclass(frozen=True)
class Selected:
    """A plugin-provided class chosen by an experiment, with its validated settings."""

    name: str
    cls: type
    settings: BaseModel
    plugin: str


@dataclass
class Experiment:
    path: Path
    experiment: ExperimentSettings
    model: Selected
    data: DataSettings
    dataset: Selected
    template: Selected
    method: Selected
    trackers: list[Selected]
    stages: StagesSettings
    checkpoints: CheckpointSettings
    base_dir: Path  # relative paths in the experiment (data files) are relative to this folder
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    # every stage a plugin registered (fx_register_stages), with its [stages.<name>] settings (defaults when absent)
    stage_plugins: list[Selected] = field(default_factory=list)

    @cached_property
    def built(self) -> Built:
        """The plugins this experiment names, each built once (fx.config.built)."""
        return Built(self)

    def resolved(self) -> dict[str, Any]:
        """The experiment with every default filled in, as TOML-ready data (no None values)."""
        out: dict[str, Any] = {"experiment": self.experiment.model_dump()}
        out["model"] = {"source": self.model.name, **self.model.settings.model_dump()}
        out["data"] = {**self.data.model_dump(), **self.dataset.settings.model_dump()}
        out["template"] = {"name": self.template.name, **self.template.settings.model_dump()}
        out["method"] = {"name": self.method.name, **self.method.settings.model_dump()}
        out["trackers"] = {t.name: t.settings.model_dump() for t in self.trackers}
        out["stages"] = {**self.stages.model_dump(), **{s.name: s.settings.model_dump() for s in self.stage_plugins}}
        out["checkpoints"] = self.checkpoints.model_dump()
        if self.budget != BudgetSettings():
            out["budget"] = self.budget.model_dump()
        if self.distributed != DistributedSettings():
            out["distributed"] = self.distributed.model_dump()
        return _drop_none(out)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def toml_text(value: Any, limit: int = 60) -> str:
    """``value`` as TOML spells it (``true``, ``"x"``, ``[1, 2]``), cut to ``limit`` characters."""
    text = _toml(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _toml(value: Any) -> str:
    if value is None:
        return "(unset)"  # TOML has no null: a key left out
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, str):  # a literal string when it can be one, else a basic one (escaped as JSON escapes)
        plain = "'" not in value and all(ch.isprintable() for ch in value)
        return f"'{value}'" if plain else json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_toml, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k if BARE.match(str(k)) else _toml(str(k))} = {_toml(v)}"
                               for k, v in value.items()) + "}"
    return str(value)


def _validate(
    model: type[BaseModel], data: Any, path: str, problems: list[str], known: set[str] | None = None
) -> BaseModel | None:
    """Validate ``data`` against ``model``; append one readable line per problem, prefixed by the key path."""
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a table, got {toml_text(data)}")
        return None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = ".".join(str(p) for p in (path, *err["loc"]) if p != "")
            if err["type"] == "extra_forbidden":
                names = known if known is not None else set(model.model_fields)
                problems.append(f"{loc}: unknown key{did_you_mean(err['loc'][-1], names)}")
            elif err["type"] == "missing":
                problems.append(f"{loc}: required key is missing")
            else:
                msg = err["msg"]
                problems.append(f"{loc}: {msg[:1].lower()}{msg[1:]} (got {toml_text(err.get('input'))})")
        return None


def _select(section: str, data: Any, problems: list[str],
            core: type[BaseModel] | None = None) -> tuple[Selected | None, BaseModel | None]:
    """Validate a section that names a plugin: the naming key picks the class whose Settings check the rest."""
    key, kind = PLUGIN_SECTIONS[section]
    if not isinstance(data, dict):
        problems.append(f"{section}: expected a table, got {toml_text(data)}")
        return None, None
    registry = manager.get()[kind]
    core_fields = set(core.model_fields) if core else {key}
    name = data.get(key)
    core_part = {k: v for k, v in data.items() if k in core_fields}
    plugin_part = {k: v for k, v in data.items() if k not in core_fields}
    core_settings = _validate(core, core_part, section, problems) if core else None
    if name is None:
        problems.append(f"{section}.{key}: required key is missing (one of: {', '.join(registry.names())})")
        return None, core_settings
    if isinstance(name, str) and name not in registry and manager.disabled(name):
        problems.append(f"{section}.{key}: {kind[:-1]} {name!r} is disabled by FX_DISABLE_PLUGINS")
        return None, core_settings
    if not isinstance(name, str) or name not in registry:
        problems.append(
            f"{section}.{key}: unknown {kind[:-1]} {toml_text(name)}{did_you_mean(name, registry.names())}"
            f" (installed: {', '.join(registry.names())})"
        )
        return None, core_settings
    entry = registry[name]
    known = core_fields | set(entry.cls.Settings.model_fields)
    settings = _validate(entry.cls.Settings, plugin_part, section, problems, known)
    if settings is None:
        return None, core_settings
    return Selected(name, entry.cls, settings, entry.plugin), core_settings


def _trackers(data: Any, problems: list[str]) -> list[Selected]:
    if not isinstance(data, dict):
        problems.append(f"trackers: expected a table of tracker names, got {toml_text(data)}")
        return []
    registry = manager.get()["trackers"]
    chosen = []
    for name, settings in data.items():
        if name not in registry and manager.disabled(name):
            problems.append(f"trackers.{name}: tracker {name!r} is disabled by FX_DISABLE_PLUGINS")
            continue
        if name not in registry:
            problems.append(
                f"trackers.{name}: unknown tracker{did_you_mean(name, registry.names())} "
                f"(installed: {', '.join(registry.names())})"
            )
            continue
        entry = registry[name]
        validated = _validate(entry.cls.Settings, settings, f"trackers.{name}", problems)
        if validated is None:
            continue
        check = getattr(entry.cls, "check", None)
        found = check(validated) if check else []
        problems += [f"trackers.{name}: tracker {name!r} {p}" for p in found]
        if not found:
            chosen.append(Selected(name, entry.cls, validated, entry.plugin))
    return chosen


def _stages(data: Any, problems: list[str]) -> tuple[StagesSettings | None, list[Selected]]:
    """``[stages]``: fx's own stages' tables (``StagesSettings``), and each registered plugin stage's table validated
    by its class's ``Settings``."""
    if not isinstance(data, dict):
        problems.append(f"stages: expected a table, got {toml_text(data)}")
        return None, []
    registry = manager.get()["stages"]
    own = set(StagesSettings.model_fields)
    for name in data:
        if name not in own and name not in registry:
            known = sorted(own | set(registry.names()))
            hint = (f"stage {name!r} is disabled by FX_DISABLE_PLUGINS" if manager.disabled(name)
                    else f"unknown stage{did_you_mean(name, known)} (configurable: {', '.join(known)})")
            problems.append(f"stages.{name}: {hint}")
    core = _validate(StagesSettings, {k: v for k, v in data.items() if k in own}, "stages", problems)
    chosen = []
    for name in registry.names():
        entry = registry[name]
        settings = _validate(entry.cls.Settings, data.get(name, {}), f"stages.{name}", problems)
        if settings is not None:
            chosen.append(Selected(name, entry.cls, settings, entry.plugin))
    return core, chosen


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax when it parses (``10``, ``true``, ``[1, 2]``, ``"x"``), else a plain string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        value = None
    if value is None or too_deep(value):
        raise UserError(f"--set {toml_text(text)}: the value nests deeper than {MAX_DEPTH} levels")
    return value


def set_key(assignment: str) -> str:
    """The dotted key an ``a.b.c=value`` assignment sets."""
    return assignment.partition("=")[0].strip()


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to the raw experiment data."""
    key, sep, value = assignment.partition("=")
    parts = key.strip().split(".")
    shown = toml_text(assignment)
    if not sep or not all(parts):
        raise UserError(f"--set {shown}: expected KEY.PATH=VALUE, e.g. --set method.max_steps=10")
    if len(parts) > MAX_DEPTH:
        raise UserError(f"--set {shown}: a key {len(parts)} levels deep; fx's keys nest at most {MAX_DEPTH}")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {shown}: {part!r} is not a table")
        node = child
    node[parts[-1]] = parse_value(value.strip())


def _blame(problems: list[str], path: Path, overrides: dict[str, str]) -> list[str]:
    """Each problem prefixed with where it came from: the ``--set`` that set its key, else the file."""
    out = []
    for problem in problems:
        key, _, rest = problem.partition(": ")
        cause = next((a for k, a in overrides.items()
                      if key == k or key.startswith(k + ".") or k.startswith(key + ".")), None)
        if cause is None:
            out.append(f"{path}: {problem}")
        else:
            out.append(f"--set {toml_text(cause)}: {rest if key == set_key(cause) else problem}")
    return out


def from_dict(raw: dict[str, Any], path: Path, base_dir: Path | None = None,
              overrides: dict[str, str] | None = None) -> Experiment:
    """Validate raw experiment data; raise ConfigError naming every problem with the file and key path.

    ``base_dir`` is where relative paths start (default: the file's folder; a run's saved config passes the
    folder of the experiment file it was made from). ``overrides``: the dotted keys ``--set`` set, and the
    assignment that set each, so that a problem there is blamed on the ``--set``."""
    if too_deep(raw):
        raise UserError(f"{path}: tables or arrays nest deeper than {MAX_DEPTH} levels")
    raw = copy.deepcopy(raw)
    problems: list[str] = []
    for key in raw:
        if key not in SECTIONS:
            problems.append(f"{key}: unknown section{did_you_mean(key, SECTIONS)}")
    for key in ("experiment", "model", "data", "method"):
        if key not in raw:
            problems.append(f"{key}: required section is missing")
    experiment = _validate(ExperimentSettings, raw.get("experiment", {}), "experiment", problems)
    model, _ = _select("model", raw.get("model", {}), problems)
    dataset, data = _select("data", raw.get("data", {}), problems, core=DataSettings)
    if data is not None:
        problems += column_problems(data.format, data.columns)
    template, _ = _select("template", raw.get("template", {"name": "native"}), problems)
    method, _ = _select("method", raw.get("method", {}), problems)
    trackers = _trackers(raw.get("trackers", {"console": {}, "jsonl": {}}), problems)
    stages, stage_plugins = _stages(raw.get("stages", {}), problems)
    checkpoints = _validate(CheckpointSettings, raw.get("checkpoints", {}), "checkpoints", problems)
    budget = _validate(BudgetSettings, raw.get("budget", {}), "budget", problems)
    distributed = _validate(DistributedSettings, raw.get("distributed", {}), "distributed", problems)
    if problems:
        raise ConfigError(_blame(problems, path, overrides or {}))
    base = Path(base_dir) if base_dir is not None else path.resolve().parent
    return Experiment(path, experiment, model, data, dataset, template, method, trackers, stages, checkpoints, base,
                      raw, budget, distributed, stage_plugins)


def check(exp: Experiment) -> list[str]:
    """What each plugin the experiment names finds wrong before anything loads (``check()`` of its dataset source,
    model source and method; trackers are checked as the file is read), each line naming the file."""
    found = [*exp.built.dataset.check(), *exp.built.source.check(), *exp.built.method.check()]
    return [f"{exp.path}: {p}" for p in found]


def load(path: str | Path, overrides: list[str] = (), base_dir: Path | None = None) -> Experiment:
    path = Path(path)
    raw = read_toml(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    return from_dict(raw, path, base_dir, {set_key(a): a for a in overrides})
