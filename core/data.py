"""Rows from a dataset source -> conversations -> token ids and labels, through the experiment's template.

Rows that do not fit the format are reported with their row numbers (all of them, up to a limit), never
crashed on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

from fx.config import did_you_mean
from fx.errors import UserError
from fx.templating import Message, Rendered, Template, encode

MAX_REPORTED = 20
ROLES = {"system", "user", "assistant"}
# sharegpt's speakers; "user"/"assistant" appear in many sharegpt-style files too
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Example:
    """One row: a conversation, or a pre-formatted text. ``extra`` keeps the row's other columns.

    A preference row's ``messages`` is the prompt conversation (ending with the user's turn) and ``chosen``
    and ``rejected`` are the two answers to it.
    """

    messages: list[Message] | None = None
    text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    chosen: str | None = None
    rejected: str | None = None

    @property
    def is_preference(self) -> bool:
        return self.chosen is not None


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
        raise ValueError(f"the last message of {column!r} must be the user's (the answers are in chosen/rejected)")
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


def _preference(row: dict[str, Any], n: Names) -> Example:
    prompt, chosen, rejected = n("prompt"), n("chosen"), n("rejected")
    value = row.get(prompt)
    if isinstance(value, str) and value.strip():
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        messages = _asking(_turns(value, prompt, n("role"), n("content"), {r: r for r in ROLES}), prompt)
    else:
        raise ValueError(f"{prompt!r} must be a non-empty string or a list of messages")
    answers = [_answer(row, c, n("role"), n("content"), {"assistant"}) for c in (chosen, rejected)]
    return Example(messages=messages, chosen=answers[0], rejected=answers[1], extra=_rest(row, prompt, chosen, rejected))


def _sharegpt_preference(row: dict[str, Any], n: Names) -> Example:
    column, chosen, rejected = n("conversations"), n("chosen"), n("rejected")
    messages = _asking(_turns(row.get(column), column, n("from"), n("value"), SHAREGPT_ROLES), column)
    speakers = {k for k, v in SHAREGPT_ROLES.items() if v == "assistant"}
    answers = [_answer(row, c, n("from"), n("value"), speakers) for c in (chosen, rejected)]
    return Example(messages=messages, chosen=answers[0], rejected=answers[1], extra=_rest(row, column, chosen, rejected))


@dataclass(frozen=True)
class Format:
    """A dataset format: the columns that identify it, optional columns, keys inside its turns, its converter."""

    columns: tuple[str, ...]
    convert: Callable[[dict[str, Any], Names], Example]
    optional: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every name ``data.columns`` may map for this format."""
        return self.columns + self.optional + self.keys


# In detection order: the first format whose columns are all in the file wins.
FORMATS: dict[str, Format] = {
    "sharegpt_preference": Format(("conversations", "chosen", "rejected"), _sharegpt_preference, keys=("from", "value")),
    "preference": Format(("prompt", "chosen", "rejected"), _preference, keys=("role", "content")),
    "messages": Format(("messages",), _messages, keys=("role", "content")),
    "sharegpt": Format(("conversations",), _sharegpt, keys=("from", "value")),
    "alpaca": Format(("instruction", "output"), _alpaca, optional=("input",)),
    "text": Format(("text",), _text),
}


def column_problems(fmt: str, columns: dict[str, str]) -> list[str]:
    """``data.columns`` keys that no format (or not the declared one) has; one line each."""
    known = set(FORMATS[fmt].names) if fmt in FORMATS else {n for f in FORMATS.values() for n in f.names}
    where = f"the {fmt!r} format" if fmt in FORMATS else "any format"
    return [f"data.columns.{key}: {where} has no column {key!r}{did_you_mean(key, known)} "
            f"(it has: {', '.join(sorted(known))})" for key in columns if key not in known]


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
    spec = FORMATS[fmt]
    missing = [c for c in spec.columns if columns.get(c, c) not in present]
    if missing:
        names = ", ".join(repr(columns.get(c, c)) for c in missing)
        raise UserError(f"{where}: the {fmt!r} format needs the column(s) {names}; the file has {present} "
                        f"(map other names with data.columns)")

    def name(key: str) -> str:
        return columns.get(key, key)

    examples, bad = [], []
    for index, row in enumerate(rows):
        try:
            examples.append(spec.convert(row, name))
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


def renderings(template: Template, example: Example) -> list[Rendered]:
    """What a row trains on: its rendering, or for a preference row the prompt with each of its two answers."""
    if not example.is_preference:
        return [render(template, example)]
    return [template.render([*example.messages, {"role": "assistant", "content": answer}])
            for answer in (example.chosen, example.rejected)]


@dataclass
class Tokenized:
    rows: list[dict[str, list[int]]]
    truncated: int
    dropped: int  # rows left with no loss-bearing token after truncation
    lengths: list[int] = field(default_factory=list)  # every row's token count before truncation


def tokenize(examples: list[Example], template: Template, tokenizer, max_length: int) -> Tokenized:
    rows, truncated, dropped, lengths = [], 0, 0, []
    for example in examples:
        if example.is_preference:
            raise ValueError("preference rows (prompt, chosen, rejected) have two answers; a method that "
                             "trains on one answer per row cannot use them")
        rendered = render(template, example)
        row, length = encode(tokenizer, rendered, max_length)
        lengths.append(length)
        truncated += length > max_length
        if all(label == -100 for label in row["labels"]):
            dropped += 1
            continue
        rows.append(row)
    return Tokenized(rows, truncated, dropped, lengths)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_preferences(examples: list[Example], template: Template, tokenizer, max_length: int,
                         max_prompt_length: int | None = None, max_completion_length: int | None = None) -> Tokenized:
    """Preference rows as trl's DPOTrainer takes them tokenized: ``prompt_ids``, ``chosen_ids``, ``rejected_ids``.

    Each answer is rendered after its prompt by the template and tokenized in one piece, exactly as SFT renders and
    tokenizes a conversation: the answer is its loss span, closed with the template's end of turn (the tokenizer's
    end-of-sequence token in the formats that use it), and the prompt is everything before it, which is what the
    template's generation prompt renders. Where the two answers' tokenizations disagree about the prompt's last
    token (a merge across the boundary), the prompt stops where they part and the rest belongs to each answer.

    A prompt longer than ``max_prompt_length`` keeps its end (the last user turn and the answer's opening); answers
    keep their start, cut to ``max_completion_length`` and so that prompt + answer fit ``max_length``. A row whose
    prompt leaves no room for an answer is dropped. ``lengths`` holds each row's longer sequence before truncation.
    """
    rows, truncated, dropped, lengths = [], 0, 0, []
    for example in examples:
        if not example.is_preference:
            raise ValueError("a preference method trains on preference rows (a prompt with chosen and rejected "
                             "answers); this row has a single answer")
        prompts, answers = [], []
        for rendered in renderings(template, example):
            row, _ = encode(tokenizer, rendered, 1 << 62)
            inside = [i for i, label in enumerate(row["labels"]) if label != -100]
            if not inside:
                raise ValueError("an answer rendered to no tokens")
            prompts.append(row["input_ids"][: inside[0]])
            answers.append(row["input_ids"][inside[0] : inside[-1] + 1])
        shared = _common_prefix(*prompts)
        prompt = prompts[0][:shared]
        answers = [p[shared:] + a for p, a in zip(prompts, answers)]
        lengths.append(len(prompt) + max(len(a) for a in answers))
        cut_prompt = prompt[-max_prompt_length:] if max_prompt_length and len(prompt) > max_prompt_length else prompt
        room = max_length - len(cut_prompt)
        if max_completion_length:
            room = min(room, max_completion_length)
        if room < 1:
            dropped += 1
            continue
        truncated += len(cut_prompt) < len(prompt) or any(len(a) > room for a in answers)
        rows.append({"prompt_ids": cut_prompt, "chosen_ids": answers[0][:room], "rejected_ids": answers[1][:room]})
    return Tokenized(rows, truncated, dropped, lengths)


def prompt_of(template: Template, example: Example) -> tuple[list[Message], str] | None:
    """The conversation up to the last answer, and that answer; None for text rows the template can't parse."""
    if example.is_preference:
        return example.messages, example.chosen
    messages = example.messages if example.messages is not None else template.parse_text(example.text)
    if not messages or messages[-1]["role"] != "assistant":
        return None
    return messages[:-1], messages[-1]["content"]
