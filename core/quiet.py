"""Library chatter that says nothing to a user (progress bars, advisory warnings, a note about an optional kernel
package), silenced where fx starts so that fx's own output is what a user reads."""

from __future__ import annotations

import errno
import io
import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    """Library chatter (progress bars, deprecation notes) would bury fx's own output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import transformers

    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


class _Unless(logging.Filter):
    """Drops the log records that begin with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_noise() -> None:
    """Lines every user would see that say nothing to them, dropped before any library is imported: bitsandbytes
    says on CPUs with AVX512-BF16 that an optional kernel package is absent (its fallback is what runs)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _Unless) for f in logger.filters):
        logger.addFilter(_Unless("Failed to load CPU gemm_4bit_forward from kernels-community"))


class Tolerant(io.TextIOBase):
    """A standard stream that carries on when what it writes to has gone (a closed pipe: ``fx run ... | head``; a
    terminal that hung up): from then on its output is dropped instead of raising into the run, which would stop
    training over a line of progress. The run's record and files say everything the output would have."""

    def __init__(self, stream):
        self._stream = stream
        self.gone = False

    def _guard(self, action, default):
        if self.gone:
            return default
        try:
            return action()
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EIO, errno.EBADF, errno.ECONNRESET):
                raise
            self.gone = True
            return default

    def write(self, text: str) -> int:
        return self._guard(lambda: self._stream.write(text), len(text))

    def flush(self) -> None:
        self._guard(self._stream.flush, None)

    def isatty(self) -> bool:
        return self._guard(self._stream.isatty, False)

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name):  # encoding, errors, buffer, ...
        return getattr(self._stream, name)


def tolerate_closed_output() -> None:
    """Standard output and error as :class:`Tolerant` streams (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, Tolerant):
            setattr(sys, name, Tolerant(stream))
