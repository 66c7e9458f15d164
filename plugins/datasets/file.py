"""Dataset source ``file``: a local json, jsonl, csv or parquet file, read by ``datasets``.

``datasets`` converts a file to Arrow in a cache folder before reading it; fx gives it a temporary folder inside
fx's cache and keeps the table in memory, so no copy of a user's data is left behind (in ``~/.cache/huggingface`` or
anywhere else).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from pydantic import Field, field_validator

import fx
from fx.errors import UserError
from fx.sources import DatasetSource, cache_dir

LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class FileDataset(DatasetSource):
    description = "a local .json/.jsonl/.csv/.parquet file (paths relative to the experiment file; ~ is your home)"

    class Settings(DatasetSource.Settings):
        path: str = Field(min_length=1, max_length=4096)
        eval_path: str | None = Field(None, min_length=1, max_length=4096)

        @field_validator("path", "eval_path")
        @classmethod
        def _no_nul(cls, value: str | None) -> str | None:
            if value is not None and "\0" in value:
                raise ValueError("a path can't hold a NUL character")
            return value

    def _files(self) -> dict[str, tuple[str, Path]]:
        files = {"data.path": self.settings.path}
        if self.settings.eval_path:
            files["data.eval_path"] = self.settings.eval_path
        return {key: (value, _absolute(self.base_dir / Path(value).expanduser())) for key, value in files.items()}

    def check(self) -> list[str]:
        problems = []
        for key, (value, path) in self._files().items():
            try:
                if path.suffix.lower() not in LOADERS:
                    problems.append(f"{key}: {value!r} is not a .json, .jsonl, .csv or .parquet file")
                elif not path.is_file():
                    problems.append(f"{key}: no such file {value!r} (looked in {path.parent})")
                elif path.stat().st_size == 0:
                    problems.append(f"{key}: {value!r} is empty")
            except OSError as exc:  # a name too long, a link loop, no permission
                problems.append(f"{key}: cannot read {value!r}: {exc.strerror or exc}")
        return problems

    def origin(self, held_out: bool = False) -> str:
        key = "data.eval_path" if held_out else "data.path"
        _, path = self._files().get(key, (None, None))
        return f"{path} ({key})" if path else super().origin(held_out)

    def _read(self, key: str, path: Path):
        import datasets

        if LOADERS[path.suffix.lower()] == "json":
            _refuse_non_object_lines(key, path)

        logger = logging.getLogger("datasets")  # its loaders log a failed parse (a broken log call, at times) and
        level = logger.level  # then raise: the raise is reported here, in one line naming the file
        logger.setLevel(logging.CRITICAL + 1)
        try:
            with tempfile.TemporaryDirectory(dir=_scratch(), prefix="datasets-") as scratch:
                rows = datasets.load_dataset(LOADERS[path.suffix.lower()], data_files=str(path), split="train",
                                             cache_dir=scratch, keep_in_memory=True)
            return _exact_expect(rows, path)
        except Exception as exc:  # datasets raises many types for unreadable files: each names the file here
            first = (str(exc).splitlines() or [""])[0][:300]
            raise UserError(f"{key}: cannot read {path}: {type(exc).__name__}: {first}") from None
        finally:
            logger.setLevel(level)

    def load(self):
        problems = self.check()
        if problems:
            raise UserError("\n".join(problems))
        files = self._files()
        train = self._read("data.path", files["data.path"][1])
        held_out = self._read("data.eval_path", files["data.eval_path"][1]) if "data.eval_path" in files else None
        return train, held_out


def _refuse_non_object_lines(key: str, path: Path) -> None:
    """JSON Lines whose rows are not objects (``null``, ``1``) crash pyarrow's reader (a segmentation fault, no
    exception): such a line is refused first, naming it. A file that is one JSON array is read by Python's parser."""
    try:
        with open(path, "rb") as fh:
            for number, line in enumerate(fh, 1):
                start = line.lstrip()[:1]
                if number == 1 and start == b"[":
                    return
                if start and start != b"{":
                    raise UserError(f"{key}: {path}, line {number}: not a JSON object (each line of a .jsonl file is "
                                    "one row, {...})")
    except OSError as exc:
        raise UserError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def _exact_expect(rows, path: Path):
    """An ``expect`` column that mixes strings and lists is kept by datasets' JSON reader as JSON text and decoded
    back loosely ("84" comes back as 84, "true" as True): such a column is read again from the file exactly, each
    plain string as a one-string list."""
    feature = rows.features.get("expect") if LOADERS[path.suffix.lower()] == "json" else None
    if feature is None or type(feature).__name__ != "Json":
        return rows
    text = path.read_text(encoding="utf-8", errors="replace")
    raw = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines()
                                                                     if line.strip()]
    values = [[v] if isinstance(v, str) else v for v in (row.get("expect") for row in raw)]
    if len(values) != len(rows) or not all(v is None or isinstance(v, list) for v in values):
        return rows  # other kinds of values: each row's check says what is wrong with its own
    return rows.remove_columns("expect").add_column("expect", values)


def _absolute(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a link loop: check() says so, naming the file
        return path.absolute()


def _scratch() -> Path:
    folder = cache_dir() / "tmp"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@fx.hookimpl
def fx_register_datasets(register):
    register("file", FileDataset)
