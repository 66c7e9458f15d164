"""The plugin manager: the built-ins, then third-party plugins from the ``fx`` entry-point group.

Built-ins are registered exactly like third-party plugins. ``FX_DISABLE_PLUGINS=a,b`` blocks plugins by name (a
built-in's short name such as ``llama2`` or its module name, an entry point's name or its module), through pluggy's
own blocking. A plugin that can't be loaded (an import error, an unknown hook, a clash of names) is named with how to
skip it; ``fx plugins`` builds with ``keep_broken`` so that it can still list everything, the broken one included.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata

import pluggy
from pydantic import BaseModel

from fx.errors import PluginError
from fx.hooks import specs
from fx.settings import did_you_mean

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
    "stages": "fx_register_stages",
}

NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


@dataclass
class Entry:
    name: str
    cls: type
    plugin: str


# libraries a plugin should import inside the functions that use them: each costs seconds at every fx start
HEAVY = ("torch", "transformers", "datasets", "trl", "peft", "bitsandbytes", "accelerate")
SLOW_IMPORT_S = 0.5


@dataclass
class PluginInfo:
    name: str
    version: str
    hooks: list[str] = field(default_factory=list)
    registers: list[str] = field(default_factory=list)
    broken: str = ""  # why the plugin is not loaded, and how to skip it
    import_s: float | None = None  # how long importing it took (None: not imported by this process's build)
    heavy: list[str] = field(default_factory=list)  # HEAVY libraries its import brought in

    def cost(self) -> str:
        """What importing the plugin costs every fx command, and what to do when that is a lot."""
        if self.import_s is None:
            return ""
        said = f"{self.import_s:.2f} s"
        if self.heavy:
            return (f"{said}, imports {', '.join(self.heavy)} at start-up: import them inside the functions that "
                    "use them (docs/plugins.md)")
        return said + (" (slow)" if self.import_s > SLOW_IMPORT_S else "")


class Imports:
    """How long each plugin's import took and which heavy libraries it brought in (fx plugins shows it)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.heavy: dict[str, list[str]] = {}

    def timed(self, name: str, load) -> None:
        before = {m for m in HEAVY if m in sys.modules}
        started = time.perf_counter()
        try:
            load()
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 3)
            self.heavy[name] = [m for m in HEAVY if m in sys.modules and m not in before]


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
    """The plugin manager and the registries its register hooks filled. ``broken``: plugin name -> why it could not
    be loaded (kept only when built with ``keep_broken``; otherwise the first one raises PluginError)."""

    def __init__(self, pm: pluggy.PluginManager, versions: dict[str, str], broken: dict[str, str] | None = None,
                 keep_broken: bool = False, imports: Imports | None = None):
        self.pm = pm
        self.imports = imports or Imports()
        self.hook = pm.hook
        self.versions = versions
        self.broken = dict(broken or {})
        self.registries = {kind: Registry(kind) for kind in KINDS}
        for kind, hook_name in KINDS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                if impl.plugin_name in self.broken:
                    continue
                register = self.registries[kind].register_for(impl.plugin_name)
                try:
                    try:
                        impl.function(register=register)
                    except PluginError:
                        raise
                    except Exception as exc:
                        raise PluginError(f"plugin {impl.plugin_name!r} failed in {hook_name}: "
                                          f"{type(exc).__name__}: {exc}") from exc
                except PluginError as exc:
                    if not keep_broken:
                        raise PluginError(f"{exc}{skip_hint(impl.plugin_name)}") from exc
                    self.broken[impl.plugin_name] = f"{exc}{skip_hint(impl.plugin_name)}"

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
            infos.append(PluginInfo(name, self.versions.get(name, ""), hooks, sorted(registers),
                                    self.broken.get(name, ""), self.imports.seconds.get(name),
                                    self.imports.heavy.get(name, [])))
        listed = {info.name for info in infos}
        infos += [PluginInfo(name, self.versions.get(name, ""), broken=why) for name, why in self.broken.items()
                  if name not in listed]
        return infos


def blocked_names() -> set[str]:
    return {n.strip() for n in os.environ.get("FX_DISABLE_PLUGINS", "").split(",") if n.strip()}


def disabled(name: str) -> bool:
    """Whether ``FX_DISABLE_PLUGINS`` blocks the plugin that registers ``name``: a third party's entry point of that
    name, or a built-in (each registers its module's short name: ``fx.plugins.templates.llama2`` -> ``llama2``)."""
    blocked = blocked_names()
    return name in blocked or any(m in blocked for m in DEFAULT_PLUGINS if m.rsplit(".", 1)[-1] == name)


def _distribution(name: str) -> str | None:
    for ep in metadata.entry_points(group="fx"):
        if ep.name == name and ep.dist is not None:
            return ep.dist.name
    return None


def skip_hint(name: str) -> str:
    """How to run fx without the plugin ``name``."""
    dist = _distribution(name)
    short = name.rsplit(".", 1)[-1] if name in DEFAULT_PLUGINS else name
    return (f" (FX_DISABLE_PLUGINS={short} skips it" + (f"; pip uninstall {dist} removes it)" if dist else ")"))


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


def _unknown_hooks(pm: pluggy.PluginManager) -> dict[str, str]:
    """Plugin name -> the hooks it implements that fx has no specification for, with a did-you-mean."""
    known = [name for name in pm.hook.__dict__ if not name.startswith("_") and getattr(pm.hook, name).has_spec()]
    found: dict[str, str] = {}
    for name in sorted(pm.hook.__dict__):
        caller = getattr(pm.hook, name)
        if name.startswith("_") or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if not impl.optionalhook:
                found.setdefault(impl.plugin_name, f"plugin {impl.plugin_name!r} implements {name!r}, which is not an "
                                                   f"fx hook{did_you_mean(name, known)}")
    return found


def build(keep_broken: bool = False) -> Plugins:
    """A fresh plugin manager: built-ins, entry points, then every hook checked against the specs. A plugin that
    fails raises PluginError naming it and how to skip it; with ``keep_broken`` it is left out and listed in
    ``Plugins.broken`` instead (``fx plugins``)."""
    from fx import __version__

    pm = pluggy.PluginManager("fx")
    pm.add_hookspecs(specs)
    _block(pm, blocked_names())
    versions: dict[str, str] = {}
    broken: dict[str, str] = {}

    def fail(name: str, message: str, exc: BaseException | None = None) -> None:
        if not keep_broken:
            raise PluginError(message + skip_hint(name)) from exc
        broken[name] = message + skip_hint(name)
        if pm.has_plugin(name):
            pm.unregister(name=name)

    imports = Imports()
    for module in DEFAULT_PLUGINS:
        if not pm.is_blocked(module):
            imports.timed(module, lambda m=module: pm.register(importlib.import_module(m), name=m))
            versions[module] = __version__
    # pluggy loads the entry points; one name at a time, so that an error can name the plugin that caused it
    for name in sorted({ep.name for ep in metadata.entry_points(group="fx")}):
        try:
            imports.timed(name, lambda n=name: pm.load_setuptools_entrypoints("fx", name=n))
        except pluggy.PluginValidationError as exc:
            fail(name, f"plugin {name!r}: {exc}", exc)
        except Exception as exc:
            fail(name, f"plugin {name!r} could not be imported: {type(exc).__name__}: {exc}", exc)
    for plugin, dist in pm.list_plugin_distinfo():
        versions[pm.get_name(plugin)] = dist.version
    for name, message in _unknown_hooks(pm).items():
        fail(name, message)
    return Plugins(pm, versions, broken, keep_broken, imports)


@lru_cache(maxsize=1)
def get() -> Plugins:
    """The process-wide plugins (built once)."""
    return build()


def show(infos: list[PluginInfo]) -> None:
    """``fx plugins``: one row per plugin."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or redirected: whole names, not cells cut to 80 columns
        console = Console(width=max(console.width, 240))
    table = Table(title="fx plugins")
    for column in ("plugin", "version", "registers", "hooks", "import"):
        table.add_column(column, no_wrap=column not in ("hooks", "import"), overflow="fold")
    for info in infos:
        table.add_row(info.name, info.version, "broken" if info.broken else "\n".join(info.registers),
                      "\n".join(info.hooks), info.cost())
    console.print(table)
