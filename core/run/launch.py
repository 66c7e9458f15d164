"""``--gpus N``: one fx process per GPU (a rank), started by torch's elastic launcher (what torchrun runs), and how
their ending is reported: one exit code, the rank that failed first and why, and the run's summary saying so even
when the rank that writes it was stopped before it could (docs/distributed.md).

The ranks tell the launcher what it can't see through a folder named by ``FX_LAUNCH_DIR``: rank 0 the run folder it
made, and a rank that fails its status and message.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from fx.errors import UserError
from fx.files import write_atomic
from fx.run.directory import RunDir
from fx.training import distributed
from fx.training.budget import choose_strategy, fit
from fx.training.checkpoints import last_checkpoint
from fx.training.distributed import cpu_test

LAUNCH_DIR = "FX_LAUNCH_DIR"
# how long a signalled rank has to finish its step and write a checkpoint before it is killed
SHUTDOWN_TIMEOUT_S = 900


def rank() -> int:
    """This process's rank (0 alone)."""
    return distributed.launched()[1]


def start(exp, gpus: int | None, argv: list[str]) -> int | None:
    """``--gpus N`` (N > 1): check that ``exp`` can train on N GPUs (exit 2 before anything starts: and a budget that a
    rank's plan exceeds, once, rather than in every rank) and run ``fx <argv>`` (``--gpus`` left out) as N ranks;
    their exit code. None: this process trains, alone or as a rank a launcher started."""
    if gpus is not None and distributed.launched()[0] > 1:
        raise UserError("--gpus starts one process per GPU itself; under torchrun or accelerate launch leave it out")
    if not gpus or gpus == 1:
        return None
    import torch

    strategy = choose_strategy(exp, gpus)
    problems = distributed.problems(exp, gpus, strategy, torch.cuda.device_count())
    if problems:
        raise UserError("\n".join(problems))
    fit(exp, gpus, strategy)
    skip = {i + 1 for i, token in enumerate(argv) if token == "--gpus"}
    return launch([t for i, t in enumerate(argv) if t != "--gpus" and i not in skip and not t.startswith("--gpus=")],
                  gpus)


def as_rank(exp, work):
    """``work()`` in this process's world: one of several ranks when a launcher started it (fx, torchrun,
    ``accelerate launch``), checked as :func:`start` checks it, the process group started for it."""
    size, this, local_rank = distributed.launched()
    if size == 1:
        return work()
    import torch

    strategy = choose_strategy(exp, size)
    problems = distributed.problems(exp, size, strategy, torch.cuda.device_count())
    if problems:
        raise UserError("\n".join(problems))
    with distributed.entered(distributed.World(size, this, local_rank, strategy)):
        return work()


def note_run(folder: Path) -> None:
    """Rank 0: tell the launcher (if fx launched this rank) which run folder the ranks train into."""
    where = os.environ.get(LAUNCH_DIR)
    if where:
        write_atomic(Path(where) / "run", str(folder))


def note_failure(rank: int, status: str, message: str) -> None:
    """A rank that fails: tell the launcher why (``status`` as the summary says it: ``out_of_memory``, ``failed``,
    ``interrupted``, ``refused``), so that it can report the first cause rather than its echoes."""
    where = os.environ.get(LAUNCH_DIR)
    if where:
        write_atomic(Path(where) / f"rank-{rank}.json",
                     json.dumps({"status": status, "message": message, "time": time.time()}))


def launch(argv: list[str], ranks: int) -> int:
    """Run ``fx <argv>`` as ``ranks`` processes, one per GPU, and wait for all of them; the exit code to end with.
    SIGINT/SIGTERM are passed on to every rank (they finish the step and checkpoint), and when one rank dies the
    others are stopped."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):  # fx says how the ranks ended; each logger has its own level
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="fx-launch-") as notes:
        os.environ[LAUNCH_DIR] = notes
        if cpu_test():  # test-only: the ranks train on the CPU, whatever GPUs this machine has
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
            os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
        timeout = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S))
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=ranks, run_id=uuid.uuid4().hex,
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              monitor_interval=0.5, shutdown_timeout=timeout)
        try:
            elastic_launch(config, sys.executable)("-m", "fx.cli", *argv)
            return 0
        except ChildFailedError as exc:
            codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        except SignalException as exc:
            codes = {"launcher": 128 + exc.sigval}
        return _report(Path(notes), codes, ranks)


def cause(said: dict[int, dict], killed: dict[int, int], ranks: int) -> tuple[int, str, str] | None:
    """``(rank, status, message)`` of what ended the ranks: a rank out of memory (never an echo of another's
    failure); else a rank killed by a signal (the others then fail in their collectives); else the first rank to
    fail. None when every rank stopped as asked (interrupted) or was refused."""
    failed = sorted((note["time"], rank, note) for rank, note in said.items()
                    if note["status"] not in ("interrupted", "refused"))
    for _, rank, note in failed:
        if note["status"] == "out_of_memory":
            return rank, note["status"], note["message"]
    # the launcher stops the other ranks with SIGTERM (SIGINT passed on): a rank ended by another signal went first
    first = {r: sig for r, sig in killed.items() if sig not in (signal.SIGTERM, signal.SIGINT)} or killed
    if first:
        names = ", ".join(f"{r} ({signal.Signals(sig).name})" for r, sig in sorted(first.items()))
        return (min(first), "failed", f"rank{'s' if len(first) > 1 else ''} {names} of {ranks} ended; the other "
                                      "ranks were stopped")
    if failed:
        _, rank, note = failed[0]
        return rank, note["status"], note["message"]
    return None


def _report(notes: Path, codes: dict[Any, int], ranks: int) -> int:
    """Say what ended the ranks, put it into the run's summary when rank 0 couldn't, and choose the exit code."""
    run = Path((notes / "run").read_text()) if (notes / "run").is_file() else None
    said = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in notes.glob("rank-*.json")}
    killed = {r: -c for r, c in codes.items() if isinstance(r, int) and c < 0 and r not in said}
    found = cause(said, killed, ranks)
    if found is not None and (found[0] != 0 or killed) and run is not None:
        _record(run, *found)  # rank 0 said it itself otherwise
    if found is not None and found[0] not in said:  # a failing rank printed its own message; a killed one couldn't
        last = last_checkpoint(RunDir(run).checkpoints) if run is not None else None
        resume = f" Resume with: fx run --resume {run} --gpus {ranks}" if run is not None else ""
        print(f"fx: {found[2]}. The last complete checkpoint ({'step ' + str(last[1]) if last else 'none yet'}) is "
              f"intact.{resume}", file=sys.stderr)
    values = list(codes.values())
    if found is None and not said and "launcher" in codes and run is not None and _completed(run):
        # the signal came after every rank had finished: nothing was stopped
        print(f"fx: {signal.Signals(codes['launcher'] - 128).name} came after the ranks had finished; the run "
              f"completed: {run}", file=sys.stderr)
        return 0
    if any(c == 2 for c in values):
        return 2
    if found is None and values and all(c > 128 for c in values) and len(set(values)) == 1:
        return values[0]  # every rank stopped by the same signal, with a checkpoint
    return 1


def _completed(run: Path) -> bool:
    summary = RunDir(run).summary_if_readable()
    return summary is not None and summary.status == "completed"


def _record(run: Path, rank: int, status: str, message: str) -> None:
    """The run's summary says what ended it (the launcher writes it once every rank has stopped)."""
    folder = RunDir(run)
    summary = folder.summary_if_readable()  # damaged: what ended the ranks is printed all the same
    if summary is not None:
        summary.status, summary.error, summary.failed_rank = status, message[:2000], rank
        folder.write_summary(summary.to_dict())

