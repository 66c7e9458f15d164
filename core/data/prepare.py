"""An experiment's rows, ready to train on: read from its dataset source, split, rendered through its template and
tokenized as its method trains on them. Everything a user can get wrong here is refused before a run exists."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fx.config import Experiment
from fx.data.formats import Example, expect_problem, expected, split, to_examples, unpair
from fx.data.tokenize import Tokenized
from fx.errors import UserError


@dataclass
class Prepared:
    """What a run needs that can be checked without loading weights."""

    source: Any
    tokenizer: Any
    template: Any
    method: Any
    train: Tokenized
    held_out: Tokenized
    held_out_examples: list[Example]
    train_examples: list[Example]


def refuse(exp: Experiment, problems: list[str]) -> None:
    if problems:
        raise UserError("\n".join(f"{exp.path}: {p}" for p in problems))


# each kind of rows (Example.kind): what the data are, what a method trains on, and the formats that give them
KINDS = {"answers": ("have one answer per row", "one answer per row", "'messages', 'sharegpt', 'alpaca' or 'text'"),
         "pairs": ("are preference pairs (a prompt with chosen and rejected answers)", "preference pairs",
                   "'preference' or 'sharegpt_preference'"),
         "unpaired": ("are unpaired rows (a prompt, one answer and a label: true for desirable, false for not)",
                      "unpaired rows", "'unpaired'")}


def load_examples(exp: Experiment) -> tuple[list[Example], list[Example]]:
    """The experiment's rows as examples: the training split and the held-out split (``data.unpair``: preference
    pairs as unpaired rows, after the split, so that both answers of a pair stay on one side)."""
    dataset = exp.built.dataset
    refuse(exp, dataset.check())
    train_rows, eval_rows = dataset.load()
    if exp.data.max_rows:
        train_rows = train_rows.select(range(min(exp.data.max_rows, len(train_rows))))
    train = to_examples(train_rows, exp.data.format, dataset.origin(), exp.data.columns)
    held = (to_examples(eval_rows, exp.data.format, dataset.origin(held_out=True), exp.data.columns)
            if eval_rows is not None else None)
    train, held = split(train, held, exp.data.eval_fraction, exp.experiment.seed)
    if exp.data.unpair:
        other = next((e.kind for e in train + held if not e.is_preference), None)
        if other is not None:
            raise UserError(f"{exp.path}: data.unpair = true turns preference pairs into unpaired rows, but the "
                            f"data {KINDS[other][0]}")
        train, held = unpair(train), unpair(held)
    return train, held


def method_kind(cls) -> str:
    """The kind of rows a method class trains on (``Method.preference``, ``Method.unpaired``)."""
    return "pairs" if cls.preference else "unpaired" if cls.unpaired else "answers"


def check_kind(exp: Experiment, examples: list[Example]) -> None:
    """Refuse rows of another kind than the method trains on, saying what would fit."""
    wanted = method_kind(exp.method.cls)
    have = next((e.kind for e in examples if e.kind != wanted), None)
    if have is None:
        return
    hint = f"give a dataset in the {KINDS[wanted][2]} format"
    if wanted == "unpaired" and have == "pairs":
        hint = ("set data.unpair = true to train on each pair as its prompt with the chosen answer (label true) and "
                "with the rejected one (label false), or " + hint)
    elif wanted == "answers":
        hint = f"choose a method that trains on {KINDS[have][1]}, or {hint}"
    raise UserError(f"{exp.path}: the data {KINDS[have][0]}, but method {exp.method.name!r} trains on "
                    f"{KINDS[wanted][1]}; {hint}")


def metric_problems(settings, examples: list[Example], where: str) -> list[str]:
    """Why ``[stages.evaluate] metric`` can't measure anything on these held-out examples: ``contains`` scores each
    row's ``expect`` strings, so rows whose ``expect`` is malformed, or no scored row with one, are refused."""
    if not settings.enabled or settings.metric != "contains" or not examples:
        return []
    scored = examples[: settings.max_examples]
    bad = [f"{where} row {i}: {problem}" for i, e in enumerate(scored, 1) if (problem := expect_problem(e))]
    if bad:
        return bad[:20]
    if not any(expected(e) for e in scored):
        return [f"stages.evaluate.metric = 'contains' scores each answer against its row's 'expect' column (the "
                f"strings that must all appear in it), but none of the {len(scored)} {where} rows it scores has one: "
                "add an 'expect' column to them (docs/data.md) or set stages.evaluate.metric to 'exact_match' or "
                "'none'"]
    return []


def prepare(exp: Experiment) -> Prepared:
    """The rows, tokenizer and template of ``exp``, every row checked against its method."""
    train, held = load_examples(exp)
    check_kind(exp, train + held)
    method = exp.built.method
    refuse(exp, method.check() + metric_problems(exp.stages.evaluate, held, "held-out"))
    source = exp.built.source
    refuse(exp, source.check())
    tokenizer, template = exp.built.tokenizer, exp.built.template
    try:
        train_tok = method.tokenize(train, template, tokenizer, exp.data.max_length)
        held_tok = method.tokenize(held, template, tokenizer, exp.data.max_length)
    except ValueError as exc:
        raise UserError(f"template {exp.template.name!r}: {exc}") from None
    if not train_tok.rows:
        raise UserError(f"{exp.path}: no training row has an answer left within "
                        f"data.max_length = {exp.data.max_length}")
    return Prepared(source, tokenizer, template, method, train_tok, held_tok, held, train)
