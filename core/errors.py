"""Errors a user can cause. The CLI prints them in a line or two and exits with code 2."""

from __future__ import annotations

import signal
import threading
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A mistake in what the user gave fx (a file, a key, a plugin name): exit code 2, no traceback."""

    exit_code = 2


class ConfigError(UserError):
    """Every problem found in an experiment file, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class PluginError(UserError):
    """A plugin that cannot be loaded or does not follow the hook specifications; names the plugin."""


class Interrupted(Exception):
    """A run stopped by SIGINT/SIGTERM after writing a checkpoint; the message says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a closed terminal, a dropped SSH connection) outside training's steps: the run stops where
    it is, as Ctrl-C stops it, and says so (during training the step finishes and is checkpointed first)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stopping_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP stop the work where it is, as SIGINT does (:class:`Stopped`), so that what is under way
    cleans up after itself (temporary files, a run's record saying ``interrupted``) instead of dying mid-write;
    training's steps handle them their own way (fx.training.contract). The main thread only (where signals land)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class TrainingFailed(Exception):
    """Training broke (out of memory, say) after the run directory existed: exit code 1, what was written is kept."""

    exit_code = 1


# bidirectional overrides and isolates reorder what a terminal shows
_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: control characters from a user's data or file names (escape sequences,
    carriage returns, line separators, bidi overrides) are shown as ``\\x1b``-style escapes instead of acting."""
    return "".join(ascii(ch)[1:-1] if (ch not in "\n\t" and unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"))
                   or ch in _BIDI else ch for ch in text)
