"""An experiment's rows, ready to train on: read from its dataset source, split, rendered through its template and
tokenized as its method trains on them. Everything a user can get wrong here is refused before a run exists."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fx.config import Experiment
from fx.data.formats import Example, split, to_examples
from fx.data.tokenize import Tokenized
from fx.errors import UserError


@dataclass
class Prepared:
    """What a run needs that can be checked without loading weights."""

    source: Any
    tokenizer: Any
    template: Any
    train: Tokenized
    held_out: Tokenized
    held_out_examples: list[Example]
    train_examples: list[Example]


def refuse(exp: Experiment, problems: list[str]) -> None:
    if problems:
        raise UserError("\n".join(f"{exp.path}: {p}" for p in problems))


def load_examples(exp: Experiment) -> tuple[list[Example], list[Example]]:
    """The experiment's rows as examples: the training split and the held-out split."""
    dataset = exp.dataset.cls(exp.dataset.settings, exp.base_dir)
    refuse(exp, dataset.check())
    train_rows, eval_rows = dataset.load()
    if exp.data.max_rows:
        train_rows = train_rows.select(range(min(exp.data.max_rows, len(train_rows))))
    train = to_examples(train_rows, exp.data.format, dataset.origin(), exp.data.columns)
    held = (to_examples(eval_rows, exp.data.format, dataset.origin(held_out=True), exp.data.columns)
            if eval_rows is not None else None)
    return split(train, held, exp.data.eval_fraction, exp.experiment.seed)


def prepare(exp: Experiment) -> Prepared:
    """The rows, tokenizer and template of ``exp``, every row checked against its method."""
    train, held = load_examples(exp)
    preference = exp.method.cls.preference
    if train[0].is_preference and not preference:
        raise UserError(f"{exp.path}: the data are preference pairs (a prompt with chosen and rejected answers), "
                        f"but method {exp.method.name!r} trains on one answer per row; choose a preference method "
                        "or a dataset of answers")
    if preference and not all(e.is_preference for e in train + held):
        raise UserError(f"{exp.path}: method {exp.method.name!r} trains on preference pairs (a prompt with chosen and "
                        "rejected answers), but the data have one answer per row; give a dataset in the 'preference' "
                        "or 'sharegpt_preference' format")
    method = exp.method.cls(exp.method.settings)
    refuse(exp, method.check())
    source = exp.model.cls(exp.model.settings)
    refuse(exp, source.check())
    tokenizer = source.tokenizer()
    template = exp.template.cls(exp.template.settings, tokenizer)
    try:
        train_tok = method.tokenize(train, template, tokenizer, exp.data.max_length)
        held_tok = method.tokenize(held, template, tokenizer, exp.data.max_length)
    except ValueError as exc:
        raise UserError(f"template {exp.template.name!r}: {exc}") from None
    if not train_tok.rows:
        raise UserError(f"{exp.path}: no training row has an answer left within "
                        f"data.max_length = {exp.data.max_length}")
    return Prepared(source, tokenizer, template, train_tok, held_tok, held, train)
