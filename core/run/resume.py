"""The experiment a run directory was made from, and what ``fx run --resume --set`` may change of it."""

from __future__ import annotations

from pathlib import Path

from fx import config
from fx.config import Experiment
from fx.config.diff import differences
from fx.errors import UserError
from fx.run.directory import RunDir


def load_run(folder: Path, overrides: list[str] = ()) -> Experiment:
    """The run's resolved experiment, relative paths resolved from the original experiment file's folder.
    ``overrides`` (``--set``) may change only how the run executes: the budget, ``[distributed]`` and the method's
    execution keys (a token budget after an out-of-memory error, say), never what it computes, so a resumed run
    continues the same training."""
    files = RunDir(folder)
    if not files.is_run():
        raise UserError(f"{folder}: not a run directory (no config.toml); give a folder that `fx run` made")
    base_dir = Path(files.read_origin().get("base_dir", folder))
    exp = config.load(files.config, base_dir=base_dir)
    if not overrides:
        return exp
    changed = config.load(files.config, overrides, base_dir=base_dir)
    allowed = ["budget.*", "distributed.*", *(f"method.{key}" for key in exp.method.cls.execution_keys())]
    refused = [key for key, _, _ in differences(exp.resolved(), changed.resolved())
               if not (key.startswith(("budget.", "distributed.")) or key in allowed)]
    if refused:
        raise UserError(f"--set can't change {', '.join(refused)} of a run being resumed (it would train something "
                        f"else); a resumed run may change only {', '.join(allowed)}. Start a new run instead")
    return changed
