"""The dataset formats an experiment may name, and the columns (or turn keys) each has, which ``data.columns`` may
map to a file's own names. ``fx.data.formats`` converts rows of each format."""

from __future__ import annotations

from dataclasses import dataclass

from fx.settings import did_you_mean


@dataclass(frozen=True)
class Columns:
    columns: tuple[str, ...]  # every one must be in the file
    optional: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()  # the keys inside each turn of a conversation column

    @property
    def names(self) -> tuple[str, ...]:
        """Every name ``data.columns`` may map for this format."""
        return self.columns + self.optional + self.keys


# In detection order: the first format whose columns are all in the file wins.
FORMATS: dict[str, Columns] = {
    "sharegpt_preference": Columns(("conversations", "chosen", "rejected"), keys=("from", "value")),
    "preference": Columns(("prompt", "chosen", "rejected"), keys=("role", "content")),
    "unpaired": Columns(("prompt", "completion", "label"), keys=("role", "content")),
    "messages": Columns(("messages",), keys=("role", "content")),
    "sharegpt": Columns(("conversations",), keys=("from", "value")),
    "alpaca": Columns(("instruction", "output"), optional=("input",)),
    "text": Columns(("text",)),
}


def column_problems(fmt: str, columns: dict[str, str]) -> list[str]:
    """``data.columns`` keys that no format (or not the declared one) has; one line each."""
    known = set(FORMATS[fmt].names) if fmt in FORMATS else {n for f in FORMATS.values() for n in f.names}
    where = f"the {fmt!r} format" if fmt in FORMATS else "any format"
    return [f"data.columns.{key}: {where} has no column {key!r}{did_you_mean(key, known)} "
            f"(it has: {', '.join(sorted(known))})" for key in columns if key not in known]
