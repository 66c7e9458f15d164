"""A run's folder: the one place that knows its layout, writes its files atomically and reads a run back."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import tomli_w

from fx.errors import UserError
from fx.files import MANIFEST, atomic_folder, drop_placeholder_card, listing, mismatches, write_atomic
from fx.run.record import History, RunSummary, parse_summary, read_history
from fx.sources.folders import safetensors_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LIBRARIES = ("fx", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "pluggy",
             "pydantic")


class RunDir:
    """The files of one run. ``config.toml`` (the resolved experiment) makes a folder a run."""

    def __init__(self, path: Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.toml")  # the resolved experiment, reloadable
    env = property(lambda self: self.path / "env.json")  # library versions and hardware
    origin = property(lambda self: self.path / "run.json")  # where the experiment file was, when it was made
    summary = property(lambda self: self.path / "summary.json")
    adapter = property(lambda self: self.path / "adapter")
    checkpoints = property(lambda self: self.path / "checkpoints")
    samples = property(lambda self: self.path / "samples.md")
    lengths = property(lambda self: self.path / "lengths.png")
    loss_plot = property(lambda self: self.path / "plots" / "loss.png")
    merged = property(lambda self: self.path / "merged")
    metrics = property(lambda self: self.path / "metrics.jsonl")  # the jsonl tracker's default file
    history = property(lambda self: self.path / "history.jsonl")  # every logged step, written by core
    heldout = property(lambda self: self.path / "heldout.jsonl")  # the held-out rows, readable by `fx eval --data`

    @classmethod
    def create(cls, output_dir: Path, name: str) -> RunDir:
        """A new, empty run folder ``<output_dir>/<name>-<timestamp>``."""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            for n in range(1000):
                folder = output_dir / (f"{name}-{stamp}" + (f"-{n}" if n else ""))
                try:
                    folder.mkdir()
                    return cls(folder)
                except FileExistsError:
                    continue
        except OSError as exc:  # a file of that name, no permission, a name too long
            raise UserError(f"experiment.output_dir: cannot make a run folder in {output_dir}: "
                            f"{exc.strerror or exc}") from None
        raise RuntimeError(f"cannot create a run folder in {output_dir}")

    def is_run(self) -> bool:
        return self.config.is_file()

    def write_setup(self, config: dict[str, Any], origin: dict[str, Any]) -> None:
        write_atomic(self.config, tomli_w.dumps(config))
        write_atomic(self.env, json.dumps(environment(), indent=2) + "\n")
        write_atomic(self.origin, json.dumps(origin, indent=2) + "\n")

    def write_heldout(self, rows: list[dict[str, Any]]) -> None:
        """The held-out rows the run measures itself on, one JSON object a line (fx.data.formats.to_row)."""
        write_atomic(self.heldout, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_atomic(self.summary, json.dumps(summary, indent=2) + "\n")

    def read_config(self) -> dict[str, Any]:
        try:
            return tomllib.loads(self.config.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{self.path}: not a readable fx run ({exc})") from None

    def read_summary(self) -> RunSummary | None:
        """The summary, validated against its schema (UserError naming the file when it is no JSON or doesn't fit),
        or None when the run never wrote one."""
        try:
            data = json.loads(self.summary.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # fx writes it whole (atomically): anything else is damage
            raise UserError(f"{self.summary}: not a summary fx can read ({exc}); move it aside to go on without "
                            "it") from None
        return parse_summary(data, self.summary)

    def summary_if_readable(self) -> RunSummary | None:
        """The summary, or None when there is none or it is damaged: for a reader that only looks (a launcher, a
        sweep) and leaves saying what is damaged to the commands that use the run."""
        try:
            return self.read_summary()
        except UserError:
            return None

    def read_history(self) -> History:
        """Every logged step and evaluation, in order (fx.run.record)."""
        return read_history(self.history, legacy=self.metrics)

    def read_origin(self) -> dict[str, Any]:
        try:
            return json.loads(self.origin.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def save_adapter(self, save) -> Path:
        """``save(folder)`` writes the adapter into a new folder, which then replaces ``adapter/``."""
        with atomic_folder(self.adapter, replace=True) as tmp:
            save(tmp)
            drop_placeholder_card(tmp)
            write_atomic(tmp / MANIFEST, json.dumps({"files": listing(tmp)}, indent=1) + "\n")  # last
        return self.adapter

    def adapter_problems(self) -> list[str]:
        """What is wrong with ``adapter/``, each naming the file: against its manifest (size and SHA-256 of every
        file); an adapter saved before manifests were written, its config and weights read far enough to tell."""
        folder = self.adapter
        try:
            files = json.loads((folder / MANIFEST).read_text())["files"]
            if not isinstance(files, dict):
                raise ValueError("no files")
        except FileNotFoundError:
            config = folder / "adapter_config.json"
            weights = sorted(folder.glob("*.safetensors"))
            problems = [] if _json_object(config) else [f"{config.name}: missing or not a JSON object"]
            problems += [f"{w.name}: {why}" for w in weights if (why := safetensors_problem(w))]
            return problems + ([] if weights or list(folder.glob("*.bin")) else ["no weights (*.safetensors)"])
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            return [f"{MANIFEST}: unreadable ({exc})"]
        weights = any(name.endswith((".safetensors", ".bin")) for name in files)
        missing = [n for n in ("adapter_config.json",) if n not in files] + ([] if weights else ["weights"])
        if missing:
            return [f"{MANIFEST} lists no {' and no '.join(missing)}"]
        return [f"{name}: {problem}" for name, problem in mismatches(folder, files).items()]



def environment() -> dict[str, Any]:
    """Library versions and hardware, so a run can be repeated and its numbers read in context."""
    import torch

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    hardware: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "cuda": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),  # torch's CPU threads (fx.training.devices.choose_threads)
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        hardware.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        gpu_capability=f"{props.major}.{props.minor}", cuda_version=torch.version.cuda)
    return {"libraries": versions, "hardware": hardware}


def _json_object(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # ru_maxrss is KiB on Linux
