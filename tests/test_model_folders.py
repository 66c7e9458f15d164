"""Model folders a user points ``model.name`` at that are wrong: each is refused with exit 2 and a line naming the
folder and what is wrong, before the planner (``fx plan``) and in ``fx validate``, never a transformers traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fx.cli import main
from fx.sources.architectures import llama_config

EXPERIMENT = """
[experiment]
name = "folder"
output_dir = "{out}"

[model]
source = "hf"
name = "{model}"

[data]
source = "file"
path = "rows.jsonl"

[template]
name = "llama2"

[method]
name = "qlora_sft"
max_steps = 1
"""


def good(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(llama_config("tiny").to_dict()))
    save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def edit_config(**changes):
    def edit(folder: Path):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


CASES = {
    "empty folder": (lambda f: [p.unlink() for p in f.iterdir()], "has no config.json"),
    "truncated config": (lambda f: (f / "config.json").write_text('{"model_type": "lla'),
                         "config.json: not valid JSON"),
    "config a list": (lambda f: (f / "config.json").write_text("[1]"), "not a JSON object"),
    "hidden_size big": (edit_config(hidden_size="big"), 'hidden_size = "big" is not a positive integer'),
    "hidden_size 0": (edit_config(hidden_size=0), "hidden_size = 0 is not a positive integer"),
    "zero heads": (edit_config(num_attention_heads=0), "num_attention_heads = 0 is not a positive integer"),
    "heads don't divide": (edit_config(num_attention_heads=7, head_dim=None),
                           "not a multiple of num_attention_heads 7"),
    "t5": (edit_config(model_type="t5", is_encoder_decoder=True), "encoder-decoder"),
    "unknown model type": (edit_config(model_type="nonesuch"), "model_type 'nonesuch'"),
    "custom code": (edit_config(model_type="mine", auto_map={"AutoConfig": "configuration_mine.MineConfig"}),
                    "configuration_mine.py"),
    "bad tokenizer.json": (lambda f: (f / "tokenizer.json").write_text("{nope"), "tokenizer.json: not valid JSON"),
    "empty safetensors": (lambda f: (f / "model.safetensors").write_bytes(b""), "not a readable safetensors"),
    "pickle beside a decoy": (lambda f: ((f / "model.safetensors").rename(f / "decoy.safetensors"),
                                         (f / "decoy.safetensors").write_bytes(b""),
                                         (f / "pytorch_model.bin").write_bytes(b"x" * 64)),
                              "decoy.safetensors is not a readable safetensors"),
    "pickle only": (lambda f: ((f / "model.safetensors").unlink(), (f / "pytorch_model.bin").write_bytes(b"x")),
                    "only pickle weights"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "holds no model weights"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("command", ["plan", "validate"])
def test_a_bad_model_folder_is_refused_before_anything_loads(tmp_path, capsys, case, command):
    damage, expected = CASES[case]
    folder = good(tmp_path / "model")
    damage(folder)
    (tmp_path / "rows.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    exp = tmp_path / "exp.toml"
    exp.write_text(EXPERIMENT.replace("{out}", str(tmp_path / "runs")).replace("{model}", str(folder)))
    assert main([command, str(exp)]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(folder) in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_good_model_folder_plans(tmp_path, capsys):
    folder = good(tmp_path / "model")
    exp = tmp_path / "exp.toml"
    exp.write_text(EXPERIMENT.replace("{out}", str(tmp_path / "runs")).replace("{model}", str(folder)))
    assert main(["plan", str(exp)]) == 0, capsys.readouterr().err


def test_a_missing_model_folder_is_named(tmp_path, capsys):
    exp = tmp_path / "exp.toml"
    (tmp_path / "rows.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    exp.write_text(EXPERIMENT.replace("{out}", str(tmp_path / "runs")).replace("{model}", str(tmp_path / "nope")))
    assert main(["validate", str(exp)]) == 2
    assert "no such model folder" in capsys.readouterr().err
