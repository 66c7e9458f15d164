"""Library chatter that says nothing to a user (progress bars, advisory warnings, a note about an optional kernel
package), silenced where fx starts so that fx's own output is what a user reads."""

from __future__ import annotations

import logging
import os
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
