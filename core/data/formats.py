"""Rows from a dataset source -> examples (a conversation, a text, a preference pair, or an unpaired row: one answer
marked desirable or not), and the held-out split.

Rows that do not fit the format are reported with their row numbers (all of them, up to a limit), never crashed on.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fx.config.formats import FORMATS, column_problems
from fx.data.templating import Message
from fx.errors import UserError

MAX_REPORTED = 20
ROLES = {"system", "user", "assistant"}
# sharegpt's speakers; "user"/"assistant" appear in many sharegpt-style files too
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Example:
    """One row: a conversation, or a pre-formatted text. ``extra`` keeps the row's other columns.

    A preference row's ``messages`` is the prompt conversation (ending with the user's turn) and ``chosen``
    and ``rejected`` are the two answers to it. An unpaired row's ``messages`` is the prompt conversation and
    ``completion`` one answer to it, desirable or not (``label``).
    """

    messages: list[Message] | None = None
    text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: bool | None = None

    @property
    def is_preference(self) -> bool:
        return self.chosen is not None

    @property
    def is_unpaired(self) -> bool:
        return self.completion is not None

    @property
    def kind(self) -> str:
        """What the row trains: ``pairs`` (two answers), ``unpaired`` (one answer and its label) or ``answers``."""
        return "pairs" if self.is_preference else "unpaired" if self.is_unpaired else "answers"


def expected(example: Example) -> list[str] | None:
    """What the ``contains`` metric looks for in the answer to this row: its ``expect`` column, a list of strings (or
    one string) that must all appear; None when the row has none."""
    value = example.extra.get("expect")
    if isinstance(value, str):
        return [value]
    return list(value) if value else None


def expect_problem(example: Example) -> str | None:
    """Why a row's ``expect`` can't be scored (not a string or a list of non-empty strings), or None."""
    value = example.extra.get("expect")
    if value is None or value == [] or (isinstance(value, str) and value.strip()):
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return None
    return f"'expect' must be a non-empty string or a list of non-empty strings, not {value!r:.60}"


def to_row(example: Example) -> dict[str, Any]:
    """The example as a row that the ``file`` dataset reads back (messages, text, preference or unpaired format),
    its other columns kept."""
    if example.is_preference:
        head = {"prompt": example.messages, "chosen": example.chosen, "rejected": example.rejected}
    elif example.is_unpaired:
        head = {"prompt": example.messages, "completion": example.completion, "label": example.label}
    elif example.messages is not None:
        head = {"messages": example.messages}
    else:
        head = {"text": example.text}
    return {**head, **example.extra}


Names = Callable[[str], str]  # a format's column or key name -> the file's name for it (data.columns)


def _turns(value: Any, column: str, role: str, text: str, roles: dict[str, str]) -> list[Message]:
    """A list of turns (dicts with a role key and a text key) as messages; ValueError naming the first bad turn."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{column!r} must be a non-empty list")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or turn.get(role) not in roles or not isinstance(turn.get(text), str):
            raise ValueError(f"{column}[{i}] must have a {role!r} (one of: {', '.join(roles)}) and a string {text!r}")
        out.append({"role": roles[turn[role]], "content": turn[text]})
    if not any(m["role"] == "user" for m in out):
        raise ValueError(f"{column!r} has no user message")
    return out


def _answered(messages: list[Message]) -> list[Message]:
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's answer")
    return messages


def _asking(messages: list[Message], column: str) -> list[Message]:
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last message of {column!r} must be the user's (answers go in their own columns)")
    return messages


def _string(row: dict[str, Any], column: str, optional: bool = False) -> str:
    value = row.get(column)
    if optional and value is None:
        return ""
    if not isinstance(value, str) or (not optional and not value.strip()):
        raise ValueError(f"{column!r} must be a{'' if optional else ' non-empty'} string")
    return value


def _rest(row: dict[str, Any], *used: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in used}


def _messages(row: dict[str, Any], n: Names) -> Example:
    column = n("messages")
    messages = _turns(row.get(column), column, n("role"), n("content"), {r: r for r in ROLES})
    return Example(messages=_answered(messages), extra=_rest(row, column))


def _sharegpt(row: dict[str, Any], n: Names) -> Example:
    column = n("conversations")
    messages = _turns(row.get(column), column, n("from"), n("value"), SHAREGPT_ROLES)
    return Example(messages=_answered(messages), extra=_rest(row, column))


def _alpaca(row: dict[str, Any], n: Names) -> Example:
    instruction, extra, output = n("instruction"), n("input"), n("output")
    user = {"role": "user", "content": _string(row, instruction)}
    if _string(row, extra, optional=True).strip():
        user["input"] = row[extra]
    answer = {"role": "assistant", "content": _string(row, output)}
    return Example(messages=[user, answer], extra=_rest(row, instruction, extra, output))


def _text(row: dict[str, Any], n: Names) -> Example:
    column = n("text")
    return Example(text=_string(row, column), extra=_rest(row, column))


def _answer(row: dict[str, Any], column: str, key: str, value_key: str, speakers: set[str]) -> str:
    """A preference answer: a string, or one assistant turn (a dict, or a list holding one dict)."""
    value = row.get(column)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get(key) not in speakers:
            raise ValueError(f"{column!r} must be the assistant's turn ({key} one of: {', '.join(sorted(speakers))})")
        value = value.get(value_key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{column!r} must be a non-empty answer (a string or one assistant turn)")
    return value


def _prompt(row: dict[str, Any], n: Names) -> list[Message]:
    """A prompt column: a string (the user's turn) or a list of messages ending with the user's."""
    prompt = n("prompt")
    value = row.get(prompt)
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return _asking(_turns(value, prompt, n("role"), n("content"), {r: r for r in ROLES}), prompt)
    raise ValueError(f"{prompt!r} must be a non-empty string or a list of messages")


def _preference(row: dict[str, Any], n: Names) -> Example:
    prompt, chosen, rejected = n("prompt"), n("chosen"), n("rejected")
    messages = _prompt(row, n)
    answers = [_answer(row, c, n("role"), n("content"), {"assistant"}) for c in (chosen, rejected)]
    return Example(messages=messages, chosen=answers[0], rejected=answers[1],
                   extra=_rest(row, prompt, chosen, rejected))


def _unpaired(row: dict[str, Any], n: Names) -> Example:
    prompt, completion, label = n("prompt"), n("completion"), n("label")
    messages = _prompt(row, n)
    answer = _answer(row, completion, n("role"), n("content"), {"assistant"})
    value = row.get(label)
    if not isinstance(value, bool):
        raise ValueError(f"{label!r} must be true (a desirable answer) or false (an undesirable one), not {value!r}")
    return Example(messages=messages, completion=answer, label=value, extra=_rest(row, prompt, completion, label))


def _sharegpt_preference(row: dict[str, Any], n: Names) -> Example:
    column, chosen, rejected = n("conversations"), n("chosen"), n("rejected")
    messages = _asking(_turns(row.get(column), column, n("from"), n("value"), SHAREGPT_ROLES), column)
    speakers = {k for k, v in SHAREGPT_ROLES.items() if v == "assistant"}
    answers = [_answer(row, c, n("from"), n("value"), speakers) for c in (chosen, rejected)]
    return Example(messages=messages, chosen=answers[0], rejected=answers[1],
                   extra=_rest(row, column, chosen, rejected))


# format -> the function that turns one row of it into an Example (fx.config.formats lists each one's columns)
CONVERTERS: dict[str, Callable[[dict[str, Any], Names], Example]] = {
    "sharegpt_preference": _sharegpt_preference,
    "preference": _preference,
    "unpaired": _unpaired,
    "messages": _messages,
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "text": _text,
}


def _each(rows):
    """The rows as dicts, read from a ``datasets.Dataset`` a batch at a time (row by row costs ~0.2 ms each)."""
    if not hasattr(rows, "iter"):
        yield from rows
        return
    for batch in rows.iter(batch_size=1024):
        names = list(batch)
        for values in zip(*(batch[name] for name in names)):
            yield dict(zip(names, values))


def detect_format(columns: list[str], where: str) -> str:
    for name, spec in FORMATS.items():
        if all(c in columns for c in spec.columns):
            return name
    raise UserError(
        f"{where}: cannot tell the dataset's format from its columns {columns}; set data.format "
        f"(one of: {', '.join(FORMATS)}) and, if the names differ, data.columns"
    )


def to_examples(rows, fmt: str, where: str, columns: dict[str, str] | None = None) -> list[Example]:
    """Convert every row; raise one UserError listing the rows that don't fit (row numbers from 1).

    ``columns`` maps a format's names to the file's (``{"instruction": "question"}``).
    """
    columns = dict(columns or {})
    problems = column_problems(fmt, columns)
    if problems:
        raise UserError("\n".join(problems))
    present = list(rows.column_names)
    renamed = {actual: name for name, actual in columns.items()}
    if fmt == "auto":
        fmt = detect_format([renamed.get(c, c) for c in present], where)
        problems = column_problems(fmt, columns)
        if problems:
            raise UserError("\n".join(problems))
    spec, convert = FORMATS[fmt], CONVERTERS[fmt]
    missing = [c for c in spec.columns if columns.get(c, c) not in present]
    if missing:
        names = ", ".join(repr(columns.get(c, c)) for c in missing)
        raise UserError(f"{where}: the {fmt!r} format needs the column(s) {names}; the file has {present} "
                        f"(map other names with data.columns)")

    def name(key: str) -> str:
        return columns.get(key, key)

    examples, bad = [], []
    for index, row in enumerate(_each(rows)):
        try:
            examples.append(convert(row, name))
        except ValueError as exc:
            bad.append(f"  row {index + 1}: {exc}")
    if bad:
        more = f"\n  ... and {len(bad) - MAX_REPORTED} more" if len(bad) > MAX_REPORTED else ""
        raise UserError(f"{where}: {len(bad)} row(s) don't fit the {fmt!r} format:\n"
                        + "\n".join(bad[:MAX_REPORTED]) + more)
    if not examples:
        raise UserError(f"{where}: the dataset has no rows")
    return examples


def unpair(examples: list[Example]) -> list[Example]:
    """Preference pairs as unpaired rows (``data.unpair``): each pair's prompt with its chosen answer (label true),
    then with its rejected answer (label false); other kinds of rows are left as they are."""
    out = []
    for e in examples:
        if not e.is_preference:
            out.append(e)
            continue
        out += [Example(messages=e.messages, completion=e.chosen, label=True, extra=e.extra),
                Example(messages=e.messages, completion=e.rejected, label=False, extra=e.extra)]
    return out


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


