"""Start-up stays light with third-party plugins installed: with the guide's example packages installed (a method, a
preference method, a stage), a refused ``fx validate``, ``fx plan`` and ``fx run`` import no torch, and ``fx plugins``
shows what each plugin's import costs, flagging one that imports a heavy library at start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import GUIDE_METHOD, GUIDE_PREFERENCE, GUIDE_STAGE, TINY_EXPERIMENT, guide_files, install_package

pytestmark = pytest.mark.slow

# runs one fx command and says whether torch was imported, and the exit code
PROBE = """import sys
from fx.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("TORCH" if "torch" in sys.modules else "LIGHT", code)
"""
HEAVY_PLUGIN = """import torch  # at module level: every fx command pays for it

import fx


@fx.hookimpl
def fx_register_templates(register):
    pass
"""
HEAVY_PROJECT = """[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "fx-heavy"
version = "0.1.0"

[project.entry-points.fx]
heavy = "fx_heavy"
"""


@pytest.fixture(scope="module")
def guides(tmp_path_factory) -> str:
    """A PYTHONPATH with the guide's three example packages installed."""
    sites = [install_package(guide_files(*guide), tmp_path_factory.mktemp(name))
             for name, guide in (("method", GUIDE_METHOD), ("preference", GUIDE_PREFERENCE), ("stage", GUIDE_STAGE))]
    return os.pathsep.join(map(str, sites))


def probe(pythonpath: str, *args: str) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": pythonpath}, timeout=300)
    return out.stdout.strip().splitlines()[-1], out.stdout + out.stderr


@pytest.mark.parametrize("command", ["validate", "plan", "run"])
def test_a_refusal_imports_no_torch_with_the_guide_plugins_installed(guides, tmp_path, command):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_EXPERIMENT.replace("seed = 0", 'seed = "zero"').replace("{out}", str(tmp_path / "runs")))
    last, output = probe(guides, command, str(bad))
    assert last == "LIGHT 2", output
    assert "experiment.seed" in output


def test_fx_plugins_shows_each_import_and_flags_a_heavy_one(guides, tmp_path_factory):
    heavy = install_package({"pyproject.toml": HEAVY_PROJECT, "fx_heavy.py": HEAVY_PLUGIN},
                            tmp_path_factory.mktemp("heavy"))
    pythonpath = os.pathsep.join([guides, str(heavy)])
    out = subprocess.run([sys.executable, "-m", "fx.cli", "plugins", "--json"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": pythonpath}, timeout=300)
    plugins = {p["name"]: p for p in json.loads(out.stdout)}
    assert {"anchored", "slic", "startswith", "heavy"} <= set(plugins)
    assert all(p["import_s"] is not None and p["heavy"] == [] for name, p in plugins.items() if name != "heavy")
    assert plugins["heavy"]["heavy"] == ["torch"]
    table = subprocess.run([sys.executable, "-m", "fx.cli", "plugins"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": pythonpath, "COLUMNS": "240"}, timeout=300).stdout
    assert "imports torch at start-up: import them inside the functions that use them" in table
