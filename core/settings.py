"""The base of every settings model (core sections and plugins' own), and the did-you-mean of its messages."""

from __future__ import annotations

import difflib

from pydantic import BaseModel, ConfigDict


class Settings(BaseModel):
    """A settings model: unknown keys are errors and values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)



def did_you_mean(word: str, choices) -> str:
    """``; did you mean 'x'?`` for the closest of ``choices``, or an empty string."""
    match = difflib.get_close_matches(str(word), sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""
