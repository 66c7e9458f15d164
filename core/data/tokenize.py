"""Examples -> token ids and labels through the experiment's template: loss on the answers, or a preference pair's
prompt and its two answers."""

from __future__ import annotations

from dataclasses import dataclass, field

from fx.data.formats import Example
from fx.data.templating import Message, Rendered, Template, encode, encode_all


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
    if any(example.is_preference for example in examples):
        raise ValueError("preference rows (prompt, chosen, rejected) have two answers; a method that "
                         "trains on one answer per row cannot use them")
    for row, length in encode_all(tokenizer, [render(template, e) for e in examples], max_length):
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
