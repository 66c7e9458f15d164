"""Experiment TOML -> a typed, validated :class:`Experiment`; every problem is collected and reported at once.

An experiment names a plugin in five places (``[model] source``, ``[data] source``, ``[template] name``,
``[method] name``, ``[trackers.<name>]``); the rest of each such section is validated by that plugin's ``Settings``.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from fx.config.formats import column_problems
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
SECTIONS = ("experiment", "model", "data", "template", "method", "trackers", "stages", "checkpoints", "budget",
            "distributed")


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

    def resolved(self) -> dict[str, Any]:
        """The experiment with every default filled in, as TOML-ready data (no None values)."""
        out: dict[str, Any] = {"experiment": self.experiment.model_dump()}
        out["model"] = {"source": self.model.name, **self.model.settings.model_dump()}
        out["data"] = {**self.data.model_dump(), **self.dataset.settings.model_dump()}
        out["template"] = {"name": self.template.name, **self.template.settings.model_dump()}
        out["method"] = {"name": self.method.name, **self.method.settings.model_dump()}
        out["trackers"] = {t.name: t.settings.model_dump() for t in self.trackers}
        out["stages"] = self.stages.model_dump()
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


def _fmt_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _validate(
    model: type[BaseModel], data: Any, path: str, problems: list[str], known: set[str] | None = None
) -> BaseModel | None:
    """Validate ``data`` against ``model``; append one readable line per problem, prefixed by the key path."""
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a table, got {_fmt_value(data)}")
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
                problems.append(f"{loc}: {err['msg'].lower()} (got {_fmt_value(err.get('input'))})")
        return None


def _select(section: str, data: Any, problems: list[str],
            core: type[BaseModel] | None = None) -> tuple[Selected | None, BaseModel | None]:
    """Validate a section that names a plugin: the naming key picks the class whose Settings check the rest."""
    key, kind = PLUGIN_SECTIONS[section]
    if not isinstance(data, dict):
        problems.append(f"{section}: expected a table, got {_fmt_value(data)}")
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
    if not isinstance(name, str) or name not in registry:
        problems.append(
            f"{section}.{key}: unknown {kind[:-1]} {_fmt_value(name)}{did_you_mean(name, registry.names())}"
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
        problems.append(f"trackers: expected a table of tracker names, got {_fmt_value(data)}")
        return []
    registry = manager.get()["trackers"]
    chosen = []
    for name, settings in data.items():
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


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax when it parses (``10``, ``true``, ``[1, 2]``, ``"x"``), else a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to the raw experiment data."""
    key, sep, value = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise UserError(f"--set {assignment!r}: expected KEY.PATH=VALUE, e.g. --set method.max_steps=10")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {assignment!r}: {part!r} is not a table")
        node = child
    node[parts[-1]] = parse_value(value.strip())


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"{path}: no such experiment file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not an experiment file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None


def from_dict(raw: dict[str, Any], path: Path, base_dir: Path | None = None) -> Experiment:
    """Validate raw experiment data; raise ConfigError naming every problem with the file and key path.

    ``base_dir`` is where relative paths start (default: the file's folder; a run's saved config passes the
    folder of the experiment file it was made from)."""
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
    stages = _validate(StagesSettings, raw.get("stages", {}), "stages", problems)
    checkpoints = _validate(CheckpointSettings, raw.get("checkpoints", {}), "checkpoints", problems)
    budget = _validate(BudgetSettings, raw.get("budget", {}), "budget", problems)
    distributed = _validate(DistributedSettings, raw.get("distributed", {}), "distributed", problems)
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    base = Path(base_dir) if base_dir is not None else path.resolve().parent
    return Experiment(path, experiment, model, data, dataset, template, method, trackers, stages, checkpoints, base,
                      raw, budget, distributed)


def load(path: str | Path, overrides: list[str] = (), base_dir: Path | None = None) -> Experiment:
    path = Path(path)
    raw = read_toml(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    return from_dict(raw, path, base_dir)
