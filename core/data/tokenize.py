"""Examples -> token ids and labels through the experiment's template: loss on the answers, a preference pair's
prompt and its two answers, or an unpaired row's prompt, its answer and its label."""

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


def answers(example: Example) -> list[str]:
    """The answers a preference or unpaired row gives to its prompt (chosen and rejected, or its completion)."""
    return [example.chosen, example.rejected] if example.is_preference else [example.completion]


def renderings(template: Template, example: Example) -> list[Rendered]:
    """What a row trains on: its rendering, or the prompt with each of a preference row's two answers (with an
    unpaired row's one answer)."""
    if not (example.is_preference or example.is_unpaired):
        return [render(template, example)]
    return [template.render([*example.messages, {"role": "assistant", "content": answer}])
            for answer in answers(example)]


@dataclass
class Tokenized:
    rows: list[dict[str, list[int]]]
    truncated: int
    dropped: int  # rows left with no loss-bearing token after truncation
    lengths: list[int] = field(default_factory=list)  # every row's token count before truncation


def tokenize(examples: list[Example], template: Template, tokenizer, max_length: int) -> Tokenized:
    rows, truncated, dropped, lengths = [], 0, 0, []
    if any(example.is_preference or example.is_unpaired for example in examples):
        raise ValueError("preference and unpaired rows (a prompt with answers to prefer or not) are not "
                         "conversations; a method that trains on one answer per row cannot use them")
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


def _split_prompt(template: Template, tokenizer, example: Example) -> tuple[list[int], list[list[int]]]:
    """A preference or unpaired row's prompt ids and the ids of each of its answers: each answer rendered after the
    prompt by the template and tokenized in one piece with it, the answer being its loss span (closed with the
    template's end of turn) and the prompt everything before it. Where the answers' tokenizations disagree about the
    prompt's last token (a merge across the boundary), the prompt stops where they part."""
    prompts, out = [], []
    for rendered in renderings(template, example):
        row, _ = encode(tokenizer, rendered, 1 << 62)
        inside = [i for i, label in enumerate(row["labels"]) if label != -100]
        if not inside:
            raise ValueError("an answer rendered to no tokens")
        prompts.append(row["input_ids"][: inside[0]])
        out.append(row["input_ids"][inside[0] : inside[-1] + 1])
    shared = min(_common_prefix(prompts[0], p) for p in prompts)
    return prompts[0][:shared], [p[shared:] + a for p, a in zip(prompts, out)]


def _truncated(prompt: list[int], answers: list[list[int]], max_length: int, max_prompt_length: int | None,
               max_completion_length: int | None) -> tuple[list[int], list[list[int]], bool] | None:
    """The prompt cut to ``max_prompt_length`` (keeping its end) and the answers to ``max_completion_length`` and to
    what ``max_length`` leaves (keeping their start), and whether anything was cut; None when no answer fits."""
    cut = prompt[-max_prompt_length:] if max_prompt_length and len(prompt) > max_prompt_length else prompt
    room = max_length - len(cut)
    if max_completion_length:
        room = min(room, max_completion_length)
    if room < 1:
        return None
    return cut, [a[:room] for a in answers], len(cut) < len(prompt) or any(len(a) > room for a in answers)


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
                             "answers); this row is not one")
        prompt, both = _split_prompt(template, tokenizer, example)
        lengths.append(len(prompt) + max(len(a) for a in both))
        cut = _truncated(prompt, both, max_length, max_prompt_length, max_completion_length)
        if cut is None:
            dropped += 1
            continue
        prompt, (chosen, rejected), was_cut = cut
        truncated += was_cut
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return Tokenized(rows, truncated, dropped, lengths)


def tokenize_unpaired(examples: list[Example], template: Template, tokenizer, max_length: int,
                      max_prompt_length: int | None = None, max_completion_length: int | None = None) -> Tokenized:
    """Unpaired rows as trl's KTOTrainer takes them tokenized: ``prompt_ids``, ``completion_ids`` and ``label``,
    rendered, tokenized and truncated as :func:`tokenize_preferences` does a pair's prompt and answers."""
    rows, truncated, dropped, lengths = [], 0, 0, []
    for example in examples:
        if not example.is_unpaired:
            raise ValueError("an unpaired method trains on unpaired rows (a prompt, one answer and a label); this "
                             "row is not one")
        prompt, answer = _split_prompt(template, tokenizer, example)
        lengths.append(len(prompt) + len(answer[0]))
        cut = _truncated(prompt, answer, max_length, max_prompt_length, max_completion_length)
        if cut is None:
            dropped += 1
            continue
        prompt, (completion,), was_cut = cut
        truncated += was_cut
        rows.append({"prompt_ids": prompt, "completion_ids": completion, "label": example.label})
    return Tokenized(rows, truncated, dropped, lengths)


def prompt_of(template: Template, example: Example) -> tuple[list[Message], str] | None:
    """The conversation up to the last answer, and that answer (a pair's chosen one); None for text rows the template
    can't parse and for undesirable unpaired rows, which have no answer to aim for."""
    if example.is_preference:
        return example.messages, example.chosen
    if example.is_unpaired:
        return (example.messages, example.completion) if example.label else None
    messages = example.messages if example.messages is not None else template.parse_text(example.text)
    if not messages or messages[-1]["role"] != "assistant":
        return None
    return messages[:-1], messages[-1]["content"]
