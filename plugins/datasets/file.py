"""Dataset source ``file``: a local json, jsonl, csv or parquet file, read by ``datasets``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

import fx
from fx.errors import UserError
from fx.sources import DatasetSource

LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class FileDataset(DatasetSource):
    description = "a local .json/.jsonl/.csv/.parquet file (paths relative to the experiment file)"

    class Settings(DatasetSource.Settings):
        path: str = Field(min_length=1, max_length=4096)
        eval_path: str | None = Field(None, min_length=1, max_length=4096)

    def _files(self) -> dict[str, tuple[str, Path]]:
        files = {"data.path": self.settings.path}
        if self.settings.eval_path:
            files["data.eval_path"] = self.settings.eval_path
        return {key: (value, (self.base_dir / value).resolve()) for key, value in files.items()}

    def check(self) -> list[str]:
        problems = []
        for key, (value, path) in self._files().items():
            if path.suffix.lower() not in LOADERS:
                problems.append(f"{key}: {value!r} is not a .json, .jsonl, .csv or .parquet file")
            elif not path.is_file():
                problems.append(f"{key}: no such file {value!r} (looked in {path.parent})")
        return problems

    def _read(self, key: str, path: Path):
        import datasets

        try:
            return datasets.load_dataset(LOADERS[path.suffix.lower()], data_files=str(path), split="train")
        except Exception as exc:  # datasets raises many types for unreadable files
            raise UserError(f"{key}: cannot read {path}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None

    def load(self):
        problems = self.check()
        if problems:
            raise UserError("\n".join(problems))
        files = self._files()
        train = self._read("data.path", files["data.path"][1])
        held_out = self._read("data.eval_path", files["data.eval_path"][1]) if "data.eval_path" in files else None
        return train, held_out


@fx.hookimpl
def fx_register_datasets(register):
    register("file", FileDataset)
