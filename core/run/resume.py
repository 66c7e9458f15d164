"""The experiment a run directory was made from, the checkpoint it continues from, and what a resumed run may change.

A resumed run continues the same training: ``--set`` and edits to the run's ``config.toml`` may change only how it
executes (``budget.*``, ``distributed.*``, the method's execution keys such as a token budget after an out-of-memory
error) and what watches it (``trackers.*``, ``checkpoints.*``), never what it computes. The checkpoint is the newest
one that verifies (fx.training.checkpoints); newer ones that don't are set aside and named.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fx import config
from fx.config import Experiment
from fx.config.diff import differences
from fx.config.experiment import toml_text
from fx.errors import UserError
from fx.run.directory import RunDir
from fx.training import checkpoints
from fx.training.distributed import launched

CHANGEABLE = ("budget.", "distributed.", "trackers.", "checkpoints.")


def unchangeable(before: dict, after: dict, execution_keys: tuple[str, ...]) -> list[tuple[str, object, object]]:
    """``(key, before, after)`` for each key that differs between two resolved experiments and that a resumed run
    may not change."""
    allowed = {f"method.{key}" for key in execution_keys}
    return [(key, old, new) for key, old, new in differences(before, after)
            if not key.startswith(CHANGEABLE) and key not in allowed]


def _allowed(exp: Experiment) -> str:
    return ", ".join([f"{prefix}*" for prefix in CHANGEABLE] + [f"method.{k}" for k in exp.method.cls.execution_keys()])


def _base_dir(files: RunDir, folder: Path) -> Path:
    if not files.is_run():
        raise UserError(f"{folder}: not a run directory (no config.toml); give a folder that `fx run` made")
    origin = files.read_origin().get("base_dir")
    return Path(origin) if isinstance(origin, str) else Path(folder)


def read_run(folder: Path) -> Experiment:
    """The run's resolved experiment, relative paths resolved from the original experiment file's folder (what
    ``fx eval``, ``fx generate``, ``fx chat`` and ``fx merge`` read; nothing in the folder changes)."""
    files = RunDir(folder)
    return config.load(files.config, base_dir=_base_dir(files, folder))


def load_run(folder: Path, overrides: list[str] = (), reset_optimizer: bool = False) -> Experiment:
    """The experiment of the run to resume, with ``overrides`` (``--set``); its checkpoints made ready to resume
    from (see the module's docstring). With ``reset_optimizer`` the newest checkpoint whose optimizer state is
    missing or damaged is used, with a fresh one."""
    files = RunDir(folder)
    base_dir = _base_dir(files, folder)
    summary = files.read_summary()
    if summary is not None and summary.status == "completed":
        raise UserError(f"{folder}: the run completed; there is nothing to resume (fx eval measures it again, a new "
                        "run trains again)")
    exp = config.load(files.config, base_dir=base_dir)
    keys = exp.method.cls.execution_keys()
    if overrides:
        changed = config.load(files.config, overrides, base_dir=base_dir)
        refused = unchangeable(exp.resolved(), changed.resolved(), keys)
        if refused:
            names = ", ".join(key for key, _, _ in refused)
            raise UserError(f"--set can't change {names} of a run being resumed (it would train something else); a "
                            f"resumed run may change only {_allowed(exp)}. Start a new run instead")
        exp = changed
    choice = checkpoints.choose(files.checkpoints, reset_optimizer)
    refusal = choice.refusal()
    if refusal:
        raise UserError(f"{folder}: can't resume: {refusal}")
    chosen = choice.checkpoint
    if chosen is not None and chosen.config is not None:
        edited = unchangeable(chosen.config, exp.resolved(), keys)
        if edited:
            changes = ", ".join(f"{key} ({toml_text(old)} -> {toml_text(new)})" for key, old, new in edited)
            raise UserError(f"{files.config} differs from what {chosen.path.name} was trained with: {changes}; a "
                            f"resumed run continues the same training and may change only {_allowed(exp)}. Undo the "
                            "edit, or start a new run")
    if launched()[1] != 0:
        return exp  # a rank other than 0: rank 0 (or the --gpus launcher, before any rank started) readies the folder
    for rejected in choice.rejected:
        aside = checkpoints.set_aside(rejected)
        print(f"fx: {rejected.path.name} does not verify ({'; '.join(rejected.problems[:3])}); set aside as "
              f"{aside}", file=sys.stderr)
    if chosen is not None and reset_optimizer:
        checkpoints.reset_optimizer(chosen)
    return exp  # "resuming from" is said by the run, once everything it checks has passed (fx.pipeline)
