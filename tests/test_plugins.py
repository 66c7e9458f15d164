"""The plugin system: built-ins, a real installed third-party package, duplicates, unknown hooks, blocking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fx
from fx.data.templating import Rendered, Template
from fx.errors import PluginError
from fx.hooks import manager

FX = [sys.executable, "-m", "fx.cli"]


def fx_cli(*args, env=None, cwd=None):
    return subprocess.run([*FX, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)


def test_builtins_register_every_kind():
    plugins = manager.build()
    assert {"llama2", "native"} <= set(plugins["templates"].names())
    assert "qlora_sft" in plugins["methods"].names()
    assert {"console", "jsonl"} <= set(plugins["trackers"].names())
    assert {"hf", "bundled", "random"} <= set(plugins["models"].names())
    assert {"file", "hub"} <= set(plugins["datasets"].names())
    assert plugins["templates"]["llama2"].plugin == "fx.plugins.templates.llama2"


class Shout(Template):
    def render(self, messages):
        text = "".join(m["content"].upper() for m in messages)
        return Rendered(text, ())

    def prompt(self, messages):
        return self.render(messages).text


def test_duplicate_name_is_refused_naming_both_plugins():
    class Dup:
        @fx.hookimpl
        def fx_register_templates(self, register):
            register("llama2", Shout)

    pm = manager.build().pm
    pm.register(Dup(), name="dup-plugin")
    with pytest.raises(PluginError, match=r"'llama2' is registered twice.*fx\.plugins\.templates\.llama2.*dup-plugin"):
        manager.Plugins(pm, {})


def test_registering_something_without_settings_is_refused():
    class Bad:
        @fx.hookimpl
        def fx_register_methods(self, register):
            register("nothing", object)

    pm = manager.build().pm
    pm.register(Bad(), name="bad-plugin")
    with pytest.raises(PluginError, match="bad-plugin.*not a class with a pydantic `Settings`"):
        manager.Plugins(pm, {})


def test_inline_plugin_is_selectable_from_an_experiment(register_plugin, tiny_experiment):
    class ShoutPlugin:
        @fx.hookimpl
        def fx_register_templates(self, register):
            register("shout", Shout)

    register_plugin(ShoutPlugin(), "shout-plugin")
    from fx import config

    exp = config.load(tiny_experiment, ["template.name=shout"])
    assert exp.template.cls is Shout and exp.template.plugin == "shout-plugin"


def test_inline_model_and_dataset_sources_feed_a_run(register_plugin, write_experiment):
    """A model source and a dataset source of a plugin's own: the experiment selects them by name, validates their
    keys, and its rows come from the one, tokenized by the other's tokenizer."""
    import datasets
    from conftest import TINY_EXPERIMENT
    from fx import config
    from fx.data.prepare import prepare
    from fx.plugins.models.random import RandomModel

    class Tiny(fx.ModelSource):
        class Settings(fx.ModelSource.Settings):
            size: str = "tiny"

        def path(self):
            return RandomModel(RandomModel.Settings(architecture=self.settings.size, dtype="float32")).path()

    class Sums(fx.DatasetSource):
        class Settings(fx.DatasetSource.Settings):
            rows: int = 8

        def load(self):
            rows = [{"messages": [{"role": "user", "content": f"{a} + {a}?"},
                                  {"role": "assistant", "content": str(2 * a)}], "expect": [str(2 * a)]}
                    for a in range(self.settings.rows)]
            return datasets.Dataset.from_list(rows), None

    class Sources:
        @fx.hookimpl
        def fx_register_models(self, register):
            register("tiny-source", Tiny)

        @fx.hookimpl
        def fx_register_datasets(self, register):
            register("sums", Sums)

    plugins = register_plugin(Sources(), "sources")
    assert plugins["models"]["tiny-source"].plugin == "sources" and plugins["datasets"]["sums"].plugin == "sources"
    text = (TINY_EXPERIMENT.replace('source = "random"\narchitecture = "tiny"\ndtype = "float32"',
                                    'source = "tiny-source"')
            .replace('source = "file"\npath = "rows.jsonl"', 'source = "sums"\nrows = 12'))
    prep = prepare(config.load(write_experiment(text)))
    assert isinstance(prep.source, Tiny) and len(prep.train.rows) + len(prep.held_out.rows) == 12
    assert prep.tokenizer.decode(prep.train.rows[0]["input_ids"]).startswith(prep.tokenizer.bos_token + "[INST]")
    with pytest.raises(fx.UserError, match="data.rows: input should be a valid integer"):
        config.load(write_experiment(text.replace("rows = 12", 'rows = "many"')))


PACKAGE = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "fx-shout"
        version = "1.2.3"

        [project.entry-points.fx]
        shout = "fx_shout"
    """,
    "fx_shout.py": """
        import fx
        from fx.data.templating import Rendered, Template


        class Shout(Template):
            def render(self, messages):
                text = "".join(m["content"].upper() for m in messages)
                return Rendered(text, ((0, len(text)),))

            def prompt(self, messages):
                return self.render(messages).text


        @fx.hookimpl
        def fx_register_templates(register):
            register("shout", Shout)
    """,
}


@pytest.fixture(scope="module")
def installed_package(tmp_path_factory):
    """Build and install a third-party plugin package into a folder put on PYTHONPATH."""
    root = tmp_path_factory.mktemp("pkg")
    src, target = root / "src", root / "site"
    src.mkdir()
    for name, text in PACKAGE.items():
        (src / name).write_text(textwrap.dedent(text))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, capture_output=True)
    return target


def test_installed_package_is_discovered_through_its_entry_point(installed_package):
    out = fx_cli("plugins", "--json", env={"PYTHONPATH": str(installed_package)})
    assert out.returncode == 0, out.stderr
    plugins = {p["name"]: p for p in json.loads(out.stdout)}
    assert plugins["shout"]["version"] == "1.2.3"
    assert plugins["shout"]["registers"] == ["template:shout"]
    assert plugins["shout"]["hooks"] == ["fx_register_templates"]


def test_disabled_plugins_are_not_loaded(installed_package):
    out = fx_cli("plugins", "--json", env={"PYTHONPATH": str(installed_package), "FX_DISABLE_PLUGINS": "shout,llama2"})
    names = {p["name"] for p in json.loads(out.stdout)}
    assert "shout" not in names and "fx.plugins.templates.llama2" not in names
    assert "fx.plugins.templates.native" in names


def _entry_point_package(tmp_path: Path, code: str) -> Path:
    """A plugin 'installed' by its dist-info alone, for import-error and bad-hook cases."""
    (tmp_path / "broken_plugin.py").write_text(textwrap.dedent(code))
    info = tmp_path / "broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fx]\nbroken = broken_plugin\n")
    return tmp_path


def test_unknown_hook_fails_loudly_naming_the_plugin(tmp_path):
    path = _entry_point_package(tmp_path, """
        import fx

        @fx.hookimpl
        def fx_register_templatez(register):
            pass
    """)
    out = fx_cli("plugins", env={"PYTHONPATH": str(path)})
    assert out.returncode == 2
    assert "plugin 'broken'" in out.stderr and "fx_register_templatez" in out.stderr
    assert "Traceback" not in out.stderr


def test_import_error_names_the_plugin(tmp_path):
    path = _entry_point_package(tmp_path, "import does_not_exist_anywhere\n")
    out = fx_cli("plugins", "--json", env={"PYTHONPATH": str(path)})
    assert out.returncode == 2
    assert "plugin 'broken'" in out.stderr and "does_not_exist_anywhere" in out.stderr
    assert "Traceback" not in out.stderr
    assert "FX_DISABLE_PLUGINS=broken" in out.stderr  # how to skip it
    listed = {p["name"]: p for p in json.loads(out.stdout)}  # fx plugins still lists everything, the broken one too
    assert "does_not_exist_anywhere" in listed["broken"]["broken"] and "fx.plugins.methods.qlora_sft" in listed
    skipped = fx_cli("plugins", "--json", env={"PYTHONPATH": str(path), "FX_DISABLE_PLUGINS": "broken"})
    assert skipped.returncode == 0 and "broken" not in {p["name"] for p in json.loads(skipped.stdout)}


def test_plugins_table_lists_versions_and_hooks():
    out = fx_cli("plugins", "--json")
    assert out.returncode == 0
    by_name = {p["name"]: p for p in json.loads(out.stdout)}
    assert by_name["fx.plugins.methods.qlora_sft"]["version"] == fx.__version__
    assert by_name["fx.plugins.methods.qlora_sft"]["registers"] == ["method:qlora_sft"]
