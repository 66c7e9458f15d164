"""Rows from a dataset source -> conversations -> token ids and labels, through the experiment's template.

Rows that do not fit the format are reported with their row numbers (all of them, up to a limit), never
crashed on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

from fx.errors import UserError
from fx.templating import Message, Rendered, Template, encode

MAX_REPORTED = 20
ROLES = {"system", "user", "assistant"}


@dataclass
class Example:
    """One training row: a conversation, or a pre-formatted text. ``extra`` keeps the row's other columns."""

    messages: list[Message] | None = None
    text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _messages(row: dict[str, Any]) -> Example:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must have a role (system/user/assistant) and a string content")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's answer")
    if not any(m["role"] == "user" for m in out):
        raise ValueError("there is no user message")
    return Example(messages=out, extra={k: v for k, v in row.items() if k != "messages"})


def _text(row: dict[str, Any]) -> Example:
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("'text' must be a non-empty string")
    return Example(text=text, extra={k: v for k, v in row.items() if k != "text"})


FORMATS: dict[str, tuple[str, Callable[[dict[str, Any]], Example]]] = {
    "messages": ("messages", _messages),
    "text": ("text", _text),
}


def detect_format(columns: list[str], where: str) -> str:
    for name, (column, _) in FORMATS.items():
        if column in columns:
            return name
    raise UserError(
        f"{where}: cannot tell the dataset's format from its columns {columns}; set data.format "
        f"(one of: {', '.join(FORMATS)})"
    )


def to_examples(rows, fmt: str, where: str) -> list[Example]:
    """Convert every row; raise one UserError listing the rows that don't fit (row numbers from 1)."""
    if fmt == "auto":
        fmt = detect_format(list(rows.column_names), where)
    convert = FORMATS[fmt][1]
    examples, bad = [], []
    for index, row in enumerate(rows):
        try:
            examples.append(convert(row))
        except ValueError as exc:
            bad.append(f"  row {index + 1}: {exc}")
    if bad:
        more = f"\n  ... and {len(bad) - MAX_REPORTED} more" if len(bad) > MAX_REPORTED else ""
        raise UserError(f"{where}: {len(bad)} row(s) don't fit the {fmt!r} format:\n" + "\n".join(bad[:MAX_REPORTED]) + more)
    if not examples:
        raise UserError(f"{where}: the dataset has no rows")
    return examples


def split(train: list[Example], held_out: list[Example] | None, fraction: float, seed: int):
    """The held-out split: given by the source, or a seeded ``fraction`` carved off the training rows."""
    if held_out is not None or fraction == 0:
        return train, held_out or []
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n = max(1, round(len(train) * fraction))
    if n >= len(train):
        raise UserError(f"data.eval_fraction = {fraction} leaves no training rows out of {len(train)}")
    held = set(order[:n])
    return [e for i, e in enumerate(train) if i not in held], [e for i, e in enumerate(train) if i in held]


def render(template: Template, example: Example):
    if example.messages is not None:
        return template.render(example.messages)
    messages = template.parse_text(example.text)
    if messages is not None:
        return template.render(messages)
    return Rendered(example.text, ((0, len(example.text)),))


@dataclass
class Tokenized:
    rows: list[dict[str, list[int]]]
    truncated: int
    dropped: int  # rows left with no loss-bearing token after truncation


def tokenize(examples: list[Example], template: Template, tokenizer, max_length: int) -> Tokenized:
    rows, truncated, dropped = [], 0, 0
    for example in examples:
        rendered = render(template, example)
        row, length = encode(tokenizer, rendered, max_length)
        truncated += length > max_length
        if all(label == -100 for label in row["labels"]):
            dropped += 1
            continue
        rows.append(row)
    return Tokenized(rows, truncated, dropped)


def prompt_of(template: Template, example: Example) -> tuple[list[Message], str] | None:
    """The conversation up to the last answer, and that answer; None for text rows the template can't parse."""
    messages = example.messages if example.messages is not None else template.parse_text(example.text)
    if not messages or messages[-1]["role"] != "assistant":
        return None
    return messages[:-1], messages[-1]["content"]
