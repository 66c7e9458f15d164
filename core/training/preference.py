"""What preference methods share: fx's tokenized rows in the shape trl's trainers read, the trainer glue that skips
trl's own tokenization for them, and the settings and checks every such method has.

fx tokenizes preference rows with the experiment's template (``fx.data.tokenize``): ``prompt_ids`` with
``chosen_ids`` and ``rejected_ids`` (pairs), or with ``completion_ids`` and ``label`` (unpaired rows). trl's
DPOTrainer and KTOTrainer take those names as they are; its ORPO and CPO trainers (``trl.experimental`` in trl 1.16)
tokenize text in their constructor with ``tokenize_row``, so :func:`paired_trainer` gives them rows already in the
form ``tokenize_row`` returns, and counts the tokens they train on.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import Field

from fx.settings import Settings


class PromptLengthSettings(Settings):
    """How fx truncates a preference row while tokenizing it (``fx.data.tokenize``); ``data.max_length`` bounds the
    prompt with each answer."""

    max_prompt_length: int | None = Field(None, ge=1, le=131072)  # a longer prompt keeps its end
    max_completion_length: int | None = Field(None, ge=1, le=131072)  # a longer answer keeps its start


def with_lengths(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the ``length`` column ``group_by_length`` reads: the prompt with its longest answer."""
    answers = ("chosen_ids", "rejected_ids", "completion_ids")
    return [{**r, "length": len(r["prompt_ids"]) + max(len(r[a]) for a in answers if a in r)} for r in rows]


def paired_sequences(row: dict[str, Any]) -> dict[str, Any]:
    """One tokenized pair as trl's ORPO and CPO trainers' ``tokenize_row`` returns it for a decoder-only model: the
    prompt, and the prompt with each answer, its labels -100 on the prompt."""
    prompt = row["prompt_ids"]
    out: dict[str, Any] = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        answer = row[f"{side}_ids"]
        out[f"{side}_input_ids"] = prompt + answer
        out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
        out[f"{side}_labels"] = [-100] * len(prompt) + answer
    return out


def paired_rows(rows: list[dict[str, Any]]):
    """fx's tokenized pairs as the ``datasets.Dataset`` a :func:`paired_trainer` trains on."""
    import datasets

    return datasets.Dataset.from_list([{**paired_sequences(r), "length": r["length"]} for r in with_lengths(rows)])


@cache
def paired_trainer(base: type) -> type:
    """``base`` (trl's ORPOTrainer or CPOTrainer) for rows from :func:`paired_rows`: its tokenization is skipped
    (each row already is what ``tokenize_row`` would return), and the tokens it trains on are counted (its batches
    have no ``input_ids`` for the Trainer's own count): both answers with their prompt, padding excluded."""

    class TokenizedPairs(base):
        def tokenize_row(self, feature, model=None):
            return feature

        def _track_num_input_tokens(self, inputs):
            if self.args.include_num_input_tokens_seen == "no":
                return
            tokens = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    TokenizedPairs.__name__ = TokenizedPairs.__qualname__ = f"Tokenized{base.__name__}"
    return TokenizedPairs


def reference_problems(method) -> list[str]:
    """What a method whose reference is the policy training starts from can't do: with LoftQ the fresh adapter is not
    zero, so the base with the adapter off is not that policy, and fx has no copy of it to measure against after the
    run (``fx eval``)."""
    if method.starts_as_base:
        return []
    return ["method.lora.init = 'loftq' starts the adapter away from the base, but this method's reference is the "
            "base with the adapter off, the policy training should start from: use init = 'default', or a method "
            "without a reference model (orpo, simpo)"]
