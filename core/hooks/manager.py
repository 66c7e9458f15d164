"""The plugin manager: the built-ins, then third-party plugins from the ``fx`` entry-point group.

Built-ins are registered exactly like third-party plugins. ``FX_DISABLE_PLUGINS=a,b`` blocks plugins by name (a
built-in's short name such as ``llama2`` or its module name, an entry point's name or its module), through pluggy's
own blocking.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata

import pluggy
from pydantic import BaseModel

from fx.errors import PluginError
from fx.hooks import specs

DEFAULT_PLUGINS = (
    "fx.plugins.models.hf",
    "fx.plugins.models.bundled",
    "fx.plugins.models.random",
    "fx.plugins.datasets.file",
    "fx.plugins.datasets.hub",
    "fx.plugins.datasets.synthetic",
    "fx.plugins.templates.llama2",
    "fx.plugins.templates.native",
    "fx.plugins.templates.alpaca",
    "fx.plugins.templates.vicuna",
    "fx.plugins.templates.chatml",
    "fx.plugins.templates.raw",
    "fx.plugins.methods.qlora_sft",
    "fx.plugins.methods.dpo",
    "fx.plugins.methods.orpo",
    "fx.plugins.methods.simpo",
    "fx.plugins.methods.kto",
    "fx.plugins.trackers.console",
    "fx.plugins.trackers.jsonl",
    "fx.plugins.trackers.csv",
    "fx.plugins.trackers.tensorboard",
    "fx.plugins.trackers.mlflow",
)

# registry kind -> the register-callback hook that fills it
KINDS = {
    "templates": "fx_register_templates",
    "methods": "fx_register_methods",
    "trackers": "fx_register_trackers",
    "models": "fx_register_models",
    "datasets": "fx_register_datasets",
}

NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


@dataclass
class Entry:
    name: str
    cls: type
    plugin: str


@dataclass
class PluginInfo:
    name: str
    version: str
    hooks: list[str] = field(default_factory=list)
    registers: list[str] = field(default_factory=list)


class Registry:
    """Named things of one kind (templates, methods, ...), and which plugin registered each."""

    def __init__(self, kind: str):
        self.kind = kind
        self.entries: dict[str, Entry] = {}

    def register_for(self, plugin: str):
        def register(name: str, cls: type) -> None:
            if not isinstance(name, str) or not NAME.match(name):
                raise PluginError(f"plugin {plugin!r} registered {self.kind[:-1]} {name!r}: a name is lowercase "
                                  "letters, digits, '-' or '_'")
            settings = getattr(cls, "Settings", None)
            if not inspect.isclass(cls) or not (inspect.isclass(settings) and issubclass(settings, BaseModel)):
                raise PluginError(f"plugin {plugin!r} registered {self.kind[:-1]} {name!r}, which is not a class "
                                  "with a pydantic `Settings` model")
            if name in self.entries:
                first = self.entries[name].plugin
                raise PluginError(f"{self.kind[:-1]} {name!r} is registered twice: by plugin {first!r} and by "
                                  f"plugin {plugin!r}")
            self.entries[name] = Entry(name, cls, plugin)

        return register

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> Entry:
        return self.entries[name]

    def names(self) -> list[str]:
        return sorted(self.entries)


class Plugins:
    """The plugin manager and the registries its register hooks filled."""

    def __init__(self, pm: pluggy.PluginManager, versions: dict[str, str]):
        self.pm = pm
        self.hook = pm.hook
        self.versions = versions
        self.registries = {kind: Registry(kind) for kind in KINDS}
        for kind, hook_name in KINDS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                register = self.registries[kind].register_for(impl.plugin_name)
                try:
                    impl.function(register=register)
                except PluginError:
                    raise
                except Exception as exc:
                    raise PluginError(f"plugin {impl.plugin_name!r} failed in {hook_name}: {exc}") from exc

    def __getitem__(self, kind: str) -> Registry:
        return self.registries[kind]

    def info(self) -> list[PluginInfo]:
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue  # blocked
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            registers = [f"{kind[:-1]}:{e.name}" for kind, reg in self.registries.items()
                         for e in reg.entries.values() if e.plugin == name]
            infos.append(PluginInfo(name, self.versions.get(name, ""), hooks, sorted(registers)))
        return infos


def blocked_names() -> set[str]:
    return {n.strip() for n in os.environ.get("FX_DISABLE_PLUGINS", "").split(",") if n.strip()}


def _block(pm: pluggy.PluginManager, blocked: set[str]) -> None:
    """Block the named plugins in pluggy; a built-in may be named by its short name, an entry point by its module."""
    for module in DEFAULT_PLUGINS:
        if module.rsplit(".", 1)[-1] in blocked:
            pm.set_blocked(module)
    for ep in metadata.entry_points(group="fx"):
        if ep.value in blocked:
            pm.set_blocked(ep.name)
    for name in blocked:
        pm.set_blocked(name)


def build() -> Plugins:
    """A fresh plugin manager: built-ins, entry points, then ``check_pending``."""
    from fx import __version__

    pm = pluggy.PluginManager("fx")
    pm.add_hookspecs(specs)
    _block(pm, blocked_names())
    versions: dict[str, str] = {}
    for module in DEFAULT_PLUGINS:
        if not pm.is_blocked(module):
            pm.register(importlib.import_module(module), name=module)
            versions[module] = __version__
    # pluggy loads the entry points; one name at a time, so that an error can name the plugin that caused it
    for name in sorted({ep.name for ep in metadata.entry_points(group="fx")}):
        try:
            pm.load_setuptools_entrypoints("fx", name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r}: {exc}") from exc
        except Exception as exc:
            raise PluginError(f"plugin {name!r} could not be imported: {type(exc).__name__}: {exc}") from exc
    for plugin, dist in pm.list_plugin_distinfo():
        versions[pm.get_name(plugin)] = dist.version
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {pm.get_name(exc.plugin)!r}: {exc}") from exc
    return Plugins(pm, versions)


@lru_cache(maxsize=1)
def get() -> Plugins:
    """The process-wide plugins (built once)."""
    return build()
