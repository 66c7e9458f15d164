"""The package's layers: imports only go down (function-level imports included), no module imports in a circle, a
plugin never imports another plugin, and no module is over 400 lines. The checker is shown to fail on a planted
upward import."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from conftest import ROOT

# Bottom to top: a module may import its own layer's modules and those of the layers below it.
LAYERS = [
    ("fx.errors", "fx.files", "fx.settings", "fx.quiet"),
    ("fx.hooks",),
    ("fx.plan",),
    ("fx.config",),
    ("fx.sources",),
    ("fx.data",),
    ("fx.evaluation", "fx.harness"),
    ("fx.training",),
    ("fx.run",),
    ("fx.after",),
    ("fx.stages",),
    ("fx.pipeline", "fx.bench", "fx.sweep"),
    ("fx.cli",),
]
MAX_LINES = 400


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package ``fx`` (``core/``) and of ``fx.plugins`` (``plugins/``), by dotted name."""
    found = {}
    for top, package in (("core", "fx"), ("plugins", "fx.plugins")):
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imported(path: Path, known: set[str]) -> set[str]:
    """The known modules ``path`` imports anywhere in it (``from a import b`` counts ``a.b`` when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def layer(module: str) -> int | None:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def problems(root: Path) -> list[str]:
    found = modules(root)
    known = set(found)
    graph = {name: imported(path, known) - {name, "fx", "fx.plugins"} for name, path in found.items()}
    out = []
    for name, deps in sorted(graph.items()):
        if name == "fx":
            continue  # the plugin API re-exports what plugins use
        plugin = name == "fx.plugins" or name.startswith("fx.plugins.")
        if not plugin and layer(name) is None:
            out.append(f"{name}: in no layer")
        for dep in sorted(deps):
            if plugin and dep.startswith("fx.plugins."):
                out.append(f"{name} imports {dep}: a plugin never reaches into another plugin")
            elif not plugin and dep.startswith("fx.plugins."):
                out.append(f"{name} imports {dep}: fx reaches its built-ins through the plugin manager only")
            elif not plugin and layer(dep) is not None and layer(name) is not None and layer(dep) > layer(name):
                out.append(f"{name} imports {dep}: an upward import")
    out += [f"import circle: {' -> '.join(c)}" for c in circles(graph)]
    out += [f"{path.relative_to(root)}: {n} lines" for path in found.values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES]
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_only_go_down():
    assert problems(ROOT) == []


def test_the_check_fails_on_an_upward_import_a_circle_and_a_plugin_reaching_into_another(tmp_path):
    for top in ("core", "plugins"):
        shutil.copytree(ROOT / top, tmp_path / top)

    def plant(path: str, line: str) -> None:
        file = tmp_path / path
        file.write_text(file.read_text() + f"\n\ndef _planted():\n    {line}  # noqa\n")

    plant("core/config/experiment.py", "from fx.training.budget import fit")
    plant("core/files.py", "from fx.config import load")
    plant("core/training/microbatch.py", "from fx.training.contract import train")  # contract imports microbatch
    plant("plugins/methods/dpo.py", "from fx.plugins.methods.qlora_sft import QLoraSFT")
    found = problems(tmp_path)
    for expected in ("fx.config.experiment imports fx.training.budget: an upward import",
                     "fx.files imports fx.config: an upward import",
                     "fx.plugins.methods.dpo imports fx.plugins.methods.qlora_sft: a plugin never reaches into another "
                     "plugin",
                     "import circle: fx.training.contract -> fx.training.microbatch"):
        assert expected in found
    assert problems(ROOT) == []  # what was planted, not the tree, made it fail
