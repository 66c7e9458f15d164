"""Hostile input: generated experiment files never produce a traceback; pickle weights are refused by default."""

from __future__ import annotations

import json
import shutil
import sys

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY_EXPERIMENT, TINY_ROWS
from fx.cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BASE = tomllib.loads(TINY_EXPERIMENT)
KEYS = [(section, key) for section, table in BASE.items() for key in table if isinstance(table, dict)]

scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=False), st.booleans(),
    st.text(max_size=40), st.sampled_from(["../../etc", "/tmp/../..", "ä😀\u202e", "", " ", "llama2", "nf4"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


@st.composite
def experiments(draw):
    doc = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["set", "add", "drop_key", "drop_section", "deep"]))
        section, key = draw(st.sampled_from(KEYS))
        if action == "set":
            doc.setdefault(section, {})[key] = draw(values)
        elif action == "add":
            doc.setdefault(section, {})[draw(st.text(min_size=1, max_size=12))] = draw(values)
        elif action == "drop_key":
            doc.get(section, {}).pop(key, None)
        elif action == "drop_section":
            doc.pop(section, None)
        else:
            deep = draw(values)
            for _ in range(draw(st.integers(5, 40))):
                deep = {"x": deep}
            doc[draw(st.sampled_from([section, "method", "stages"]))] = deep
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=experiments())
def test_generated_experiments_are_accepted_or_refused_cleanly(doc, tmp_path, capsys):
    path = tmp_path / "fuzz.toml"
    path.write_text(tomli_w.dumps(doc))
    before = set(tmp_path.rglob("*"))
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code in (0, 2)
    if code == 2:
        assert "Traceback" not in err
        assert f"{path}: " in err  # every problem names the file and a key path
    assert set(tmp_path.rglob("*")) == before  # validation writes nothing


def test_pickle_only_weights_are_refused_before_the_run_starts(write_experiment, tmp_path):
    import torch
    from safetensors.torch import load_file

    from fx.plugins.models.random import RandomModel

    tiny = RandomModel(RandomModel.Settings(architecture="tiny", dtype="float32")).path()
    folder = tmp_path / "pickled"
    shutil.copytree(tiny, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    text = TINY_EXPERIMENT.replace('source = "random"\narchitecture = "tiny"\ndtype = "float32"',
                                   f'source = "hf"\nname = "{folder}"')
    path = write_experiment(text, TINY_ROWS)
    assert main(["run", str(path)]) == 2
    assert not (tmp_path / "runs").exists()
    from fx import config
    from fx.data.prepare import prepare

    allowed = config.load(path, ["model.allow_pickle=true"])
    assert prepare(allowed).source.check() == []
