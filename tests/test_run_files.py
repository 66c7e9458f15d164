"""Every file fx reads from a run folder is checked before use: a damaged adapter (against its manifest, or read far
enough to tell for one saved before manifests), an adapter that doesn't fit the model config.toml names, a run whose
held-out data has gone, a checkpoint manifest that lists nothing: each is refused with exit 2 naming the file and what
to do, and nothing is written. A run whose export stage can't be written is refused before training; a closed
pipe never stops a run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import TINY_EXPERIMENT, TINY_ROWS
from fx import cli, config, pipeline
from fx.files import MANIFEST
from fx.training import checkpoints

pytestmark = pytest.mark.slow

COMMANDS = (["merge"], ["export", "--quant", "f32"], ["eval"], ["generate", "--prompt", "hi"])


@pytest.fixture
def copy(tiny_run, tmp_path):
    """A copy of the finished tiny run (merged/ left out), to damage."""
    _, folder, _ = tiny_run
    target = tmp_path / folder.name
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("merged", "export"))
    return target


def refused(folder, capsys) -> list[str]:
    """Each command on the run: exit 2, and its message; nothing merged or exported."""
    messages = []
    for command in COMMANDS:
        assert cli.main([command[0], str(folder), *command[1:]]) == 2, command
        messages.append(capsys.readouterr().err)
    assert not (folder / "merged").exists() and not (folder / "export").exists()
    assert "Traceback" not in "".join(messages)
    return messages


@pytest.mark.parametrize("damage", ["junk", "truncated", "empty"])
def test_a_damaged_adapter_is_refused_by_every_command(copy, capsys, damage):
    weights = copy / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"junk": os.urandom(len(data)), "truncated": data[: len(data) // 2], "empty": b""}[damage])
    for message in refused(copy, capsys):
        assert f"{copy / 'adapter'}: the adapter is damaged (adapter_model.safetensors: " in message
        assert "put back an intact copy, or train the experiment again" in message


def test_an_edited_adapter_config_is_refused(copy, capsys):
    config_file = copy / "adapter" / "adapter_config.json"
    config_file.write_text(config_file.read_text().replace('"r": 8', '"r": 4'))
    for message in refused(copy, capsys):
        assert "adapter_config.json: its contents changed after it was written" in message


def test_an_adapter_saved_before_manifests_is_read_far_enough_to_tell(copy, capsys):
    """With no manifest (a run from before fx wrote one), a cut-short weights file is still refused, and an adapter
    config that disagrees with its weights gives a clear refusal instead of torch's size-mismatch traceback."""
    (copy / "adapter" / MANIFEST).unlink()
    weights = copy / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    assert cli.main(["eval", str(copy)]) == 2
    assert f"adapter_model.safetensors: cut short ({len(data) - 100} bytes of {len(data)})" in capsys.readouterr().err
    weights.write_bytes(data)
    config_file = copy / "adapter" / "adapter_config.json"
    config_file.write_text(config_file.read_text().replace('"r": 8', '"r": 4'))
    assert cli.main(["eval", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"{copy / 'adapter'} does not fit the model {copy / 'config.toml'} names (size mismatch" in err
    assert "Traceback" not in err


def test_an_adapter_for_another_architecture_is_refused(copy, capsys):
    """config.toml edited to name another architecture after training: the adapter doesn't fit its model."""
    text = (copy / "config.toml").read_text()
    (copy / "config.toml").write_text(text.replace('architecture = "tiny"', 'architecture = "smollm2-135m"'))
    assert cli.main(["eval", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "size mismatch" in err and "Traceback" not in err


def test_an_export_whose_held_out_data_has_gone_is_refused_before_writing(copy, tmp_path, capsys):
    elsewhere = tmp_path / "moved"
    elsewhere.mkdir()
    origin = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**origin, "base_dir": str(elsewhere)}))
    out = tmp_path / "x.gguf"
    assert cli.main(["export", str(copy), "--out", str(out)]) == 2
    assert "rows.jsonl" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*")) and not list(tmp_path.glob(".fx-export-*"))


def test_a_checkpoint_manifest_that_lists_nothing_does_not_verify(tmp_path):
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    (folder / MANIFEST).write_text(json.dumps({"step": 5, "files": {}}))
    found = checkpoints.inspect(folder)
    assert not found.verified
    assert found.problems == [f"{MANIFEST} lists no trainer_state.json and no the model's weights: it describes no "
                              "checkpoint that can be resumed"]
    checkpoints.write_manifest(folder, 5, None)
    assert checkpoints.inspect(folder).problems[0].endswith("lists no the model's weights: it describes no checkpoint "
                                                            "that can be resumed")


def test_an_export_stage_that_cant_be_written_is_refused_before_training(write_experiment, tmp_path, monkeypatch,
                                                                         capsys):
    """A Llama 3.1-style model (llama3 rope scaling), which the GGUF exporter can't write yet."""
    from fx.plugins.models.random import RandomModel

    plain = RandomModel.config

    def scaled(self):
        found = plain(self)
        found.rope_parameters = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
        return found

    monkeypatch.setattr(RandomModel, "config", scaled)
    path = write_experiment(TINY_EXPERIMENT + "\n[stages.export]\nenabled = true\n", TINY_ROWS)
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: stages.export: rope scaling 'llama3': the GGUF exporter writes unscaled rotary" in err
    assert not (tmp_path / "runs").exists()  # no run folder: nothing was trained


def test_a_closed_output_never_stops_a_run(write_experiment, tmp_path):
    """``fx run ... | head`` ending, or a terminal gone: the run goes on to its end with its record complete."""
    path = write_experiment(TINY_EXPERIMENT.replace("[trackers.jsonl]\n", "[trackers.console]\nevery_steps = 1\n"),
                            TINY_ROWS)
    proc = subprocess.Popen([sys.executable, "-m", "fx.cli", "run", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.wait(timeout=600) == 0
    (folder,) = (tmp_path / "runs").iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 12 and summary["eval_after"]


def test_a_third_party_stage_check_refuses_before_the_run_folder(register_stage, write_experiment, tmp_path):
    """Stage.check() is every stage's: a plugin stage that can't run in this experiment says so before training."""
    import fx

    class NeedsGpu(fx.Stage):
        after = "train"

        def check(self, exp):
            return ["stages.needs_gpu: this stage needs a CUDA GPU"]

        def run(self, ctx):
            return {}

    plugins = register_stage("needs_gpu", NeedsGpu, "needs-gpu")
    path = write_experiment(TINY_EXPERIMENT, TINY_ROWS)
    with pytest.raises(fx.UserError, match="stages.needs_gpu: this stage needs a CUDA GPU"):
        pipeline.execute(config.load(path), plugins)
    assert not (tmp_path / "runs").exists()


def test_an_out_that_cannot_be_written_is_named_as_given(copy, capsys):
    """An --out where nothing can be made: the message names the path given, not a temporary name fx made up."""
    assert cli.main(["export", str(copy), "--quant", "f32", "--out", "/proc/model.gguf"]) == 2
    err = capsys.readouterr().err
    assert "fx: error: /proc/model.gguf: No such file or directory" in err and ".fx-export-" not in err


def test_a_damaged_merged_folder_is_refused_and_not_reused_by_an_export(tiny_run, tmp_path, capsys):
    _, folder, _ = tiny_run
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("export"))
    weights = copy / "merged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    assert cli.main(["eval", str(copy / "merged")]) == 2
    err = capsys.readouterr().err
    # the merged folder's record names the run it was merged from: the original, which this folder was copied from
    assert "model.safetensors is not a readable safetensors file" in err and f"fx merge {folder} --out" in err
    assert cli.main(["export", str(copy), "--quant", "f32"]) == 0
    capsys.readouterr()
    merge = json.loads((copy / "summary.json").read_text())["exports"][-1]["merge"]
    assert merge["reused"] is False and merge["not_reused"].startswith(f"{copy / 'merged'} is damaged")
