"""Every hook is documented, in its specification and in docs/plugins.md, with every parameter; and tested.
(datasette's tests/test_docs.py does the same for its hooks.)"""

from __future__ import annotations

import inspect
import types

import pytest

from conftest import ROOT
from fx.hooks import specs

GUIDE = (ROOT / "docs" / "plugins.md").read_text()
TESTS = {path: path.read_text() for path in (ROOT / "tests").rglob("*.py") if path.name != "test_docs.py"}


def hooks(module) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(module).items()
            if name.startswith("fx_") and callable(fn) and hasattr(fn, "fx_spec")}


def undocumented(module, guide: str) -> list[str]:
    """Hooks, or hook parameters, that the specification's docstring or the guide leaves out."""
    out = []
    for name, signature in hooks(module).items():
        doc = inspect.getdoc(getattr(module, name)) or ""
        params = list(signature.parameters)
        out += [f"{name}: no ':param {p}:' in its docstring" for p in params if f":param {p}:" not in doc]
        if f"`{name}({', '.join(params)})`" not in guide:
            out.append(f"{name}: docs/plugins.md has no `{name}({', '.join(params)})`")
    return out


def test_the_hooks_are_found():
    assert set(hooks(specs)) == {"fx_register_templates", "fx_register_methods", "fx_register_trackers",
                                 "fx_register_models", "fx_register_datasets", "fx_register_stages", "fx_run_start",
                                 "fx_log", "fx_stage_start", "fx_stage_run", "fx_stage_end", "fx_run_end"}


def test_every_hook_and_parameter_is_documented():
    assert undocumented(specs, GUIDE) == []


def test_an_undocumented_hook_or_parameter_is_caught():
    module = types.ModuleType("planted")

    @specs.hookspec
    def fx_planted(run, extra):
        """A planted hook.

        :param run: the run.
        """

    module.fx_planted = fx_planted
    assert undocumented(module, GUIDE) == ["fx_planted: no ':param extra:' in its docstring",
                                           "fx_planted: docs/plugins.md has no `fx_planted(run, extra)`"]


@pytest.mark.parametrize("name", sorted(hooks(specs)))
def test_every_hook_has_a_test(name):
    assert any(f"def {name}(" in text for text in TESTS.values()), f"no test implements {name}"
