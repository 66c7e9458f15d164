"""Reading an experiment file: a regular, sane, UTF-8 TOML file or a UserError naming the file (and the line)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

from fx.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_DEPTH = 32  # tables and arrays nested deeper are refused (fx's own keys nest at most 4 levels)
MAX_BYTES = 1 << 24  # an experiment file is a few KiB; anything over 16 MiB is not one


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` nests tables or arrays more than ``limit`` levels deep (walked without recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= limit:
                return True
            stack += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return False


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML file at ``path``; UserError (naming the file) for anything that is not a readable, sane TOML file. A
    FIFO or device is refused without being opened for reading, so it cannot hang fx."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UserError(f"{path}: no such experiment file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not an experiment file") from None
    except (OSError, ValueError) as exc:  # a link loop, a name too long, a NUL byte, no permission
        raise UserError(f"{path}: cannot read the experiment file: {_reason(exc)}") from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd)
        if stat.S_ISDIR(mode.st_mode):
            raise UserError(f"{path}: is a directory, not an experiment file")
        if not stat.S_ISREG(mode.st_mode):
            raise UserError(f"{path}: not a regular file (a FIFO, device or socket); give a TOML file")
        if mode.st_size > MAX_BYTES:
            raise UserError(f"{path}: {mode.st_size} bytes is too large for an experiment file")
        try:
            data = fh.read(MAX_BYTES + 1)
        except OSError as exc:
            raise UserError(f"{path}: cannot read the experiment file: {_reason(exc)}") from None
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UserError(f"{path}: not valid TOML: line {line}, column {column}: not UTF-8 (byte "
                        f"0x{data[exc.start]:02x}); save the file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raw = None
    if raw is None or too_deep(raw):
        raise UserError(f"{path}: tables or arrays nest deeper than {MAX_DEPTH} levels; an experiment needs a few")
    return raw
