"""A run: its directory, what it has measured so far, and the calls that reach plugins while it goes on."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from contextlib import contextmanager
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import tomli_w

LIBRARIES = ("fx", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "pluggy", "pydantic")


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write beside the target, then rename: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        tmp.write_text(content)
    os.replace(tmp, path)


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
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        hardware.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        gpu_capability=f"{props.major}.{props.minor}", cuda_version=torch.version.cuda)
    return {"libraries": versions, "hardware": hardware}


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # ru_maxrss is KiB on Linux


def new_run_dir(output_dir: Path, name: str) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        folder = output_dir / (f"{name}-{stamp}" + (f"-{n}" if n else ""))
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a run folder in {output_dir}")


class Run:
    """What plugins see of a run (the ``run`` argument of the lifecycle hooks)."""

    def __init__(self, name: str, folder: Path, config: dict[str, Any], plugins):
        self.name = name
        self.dir = folder
        self.config = config
        self.plugins = plugins
        self.max_steps: int | None = None  # known once the method has planned its training
        self.checkpoint_every: int = config.get("checkpoints", {}).get("every_steps", 0)
        self.checkpoint_keep: int = config.get("checkpoints", {}).get("keep", 2)
        self.resume_from: Path | None = None  # a checkpoint folder to continue from
        self.resume_step: int | None = None  # the optimizer step that checkpoint holds
        self.stop_signal: int | None = None  # set by SIGINT/SIGTERM: finish the step, checkpoint, stop
        self.step = 0  # optimizer steps done
        self.batch_tokens: int | None = None  # tokens in the batch being trained on (for OOM reports)
        self.history: list[tuple[int, dict[str, float]]] = []  # every fx_log call, in order (plots/loss.png)

    def write_setup(self, origin: dict[str, Any]) -> None:
        """``config.toml`` (resolved), ``env.json`` and ``run.json`` (where the experiment came from)."""
        write_atomic(self.dir / "config.toml", tomli_w.dumps(self.config))
        write_atomic(self.dir / "env.json", json.dumps(environment(), indent=2) + "\n")
        write_atomic(self.dir / "run.json", json.dumps(origin, indent=2) + "\n")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Send metrics to every plugin; on a GPU, add the peak memory reserved so far (``peak_vram_gib``)."""
        import torch

        if torch.cuda.is_available():
            metrics = {**metrics, "peak_vram_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}
        self.history.append((step, dict(metrics)))
        self.plugins.hook.fx_log(run=self, step=step, metrics=metrics)

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Announce a stage to plugins; what the body puts in the yielded dict is the stage's result."""
        self.plugins.hook.fx_stage_start(run=self, stage=name)
        result: dict[str, Any] = {}
        yield result
        self.plugins.hook.fx_stage_end(run=self, stage=name, result=result)
