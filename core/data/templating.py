"""Prompt templates: one class renders a conversation for training (text and the character spans that carry loss)
and for generation (the same text, cut where the next answer begins), so the two cannot disagree about the prompt."""

from __future__ import annotations

import json
from dataclasses import dataclass

from fx import settings
from fx.errors import UserError

Message = dict[str, str]


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: tuple[tuple[int, int], ...]  # [start, end) character ranges that carry loss


class Template:
    """Base class of template plugins. Subclasses implement :meth:`render` and :meth:`prompt`."""

    description = ""

    class Settings(settings.Settings):
        system_prompt: str | None = None

    def __init__(self, settings: Settings, tokenizer=None):
        self.settings = settings
        self.tokenizer = tokenizer

    @property
    def bos(self) -> str:
        """The beginning-of-sequence token as text: the tokenizer's, or Llama's ``<s>`` without one."""
        return getattr(self.tokenizer, "bos_token", None) or "<s>"

    @property
    def eos(self) -> str:
        """The end-of-sequence token as text: the tokenizer's, or Llama's ``</s>`` without one.

        Formats that close an answer with the model's end-of-sequence token (Llama 2, Alpaca, Vicuna) use the
        tokenizer's, so a trained model learns to emit the token generation stops on.
        """
        return getattr(self.tokenizer, "eos_token", None) or "</s>"

    @property
    def stop(self) -> str:
        """The text that ends an answer: generation stops there and the answer is cut before it."""
        return self.eos

    def with_system(self, messages: list[Message]) -> list[Message]:
        """The conversation with the configured system prompt first, unless it already has one."""
        if self.settings.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.settings.system_prompt}, *messages]
        return list(messages)

    def split_system(self, messages: list[Message]) -> tuple[str | None, list[Message]]:
        """The system prompt (the row's, else the configured one, else None) and the turns after it."""
        messages = self.with_system(messages)
        system = None
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        for message in messages:
            if message["role"] not in ("user", "assistant"):
                raise ValueError(f"a {message['role']!r} message can only come first in a conversation")
        return system, messages

    def render(self, messages: list[Message]) -> Rendered:
        """The whole conversation, with every assistant answer (and its end-of-turn marker) as a loss span."""
        raise NotImplementedError

    def prompt(self, messages: list[Message]) -> str:
        """The text a model continues to answer the last user turn of ``messages``.

        By default the rendering of the conversation itself, which for a format that opens the answer at the end
        of the user turn ends exactly where the answer begins; formats that add a generation prefix override it.
        """
        ends_with_user(messages)
        return self.render(messages).text

    def parse_text(self, text: str) -> list[Message] | None:
        """A pre-formatted training text split back into a conversation, or None when this template can't."""
        return None

    def chat_template(self) -> str | None:
        """A Jinja chat template that renders conversations exactly as :meth:`render` and :meth:`prompt` do (the
        configured system prompt included). It is saved with a merged model, so that plain transformers'
        ``apply_chat_template`` prompts the model the way it was trained. None when this template has none."""
        return None

    def ollama_template(self) -> str:
        """A Go template with which Ollama prompts conversations exactly as :meth:`prompt` does (``fx export
        --format ollama`` writes it into the Modelfile; the configured system prompt becomes its ``SYSTEM``, and
        :attr:`stop` its stop parameter). Formats that wrap each message in fixed text can return
        ``fx.data.ollama.Wrapping(...).go()``. The default refuses."""
        raise UserError(f"template {type(self).__name__}: this template can't describe itself for Ollama (it has no "
                        "ollama_template()); export --format gguf instead, whose chat template llama.cpp applies")

    def system_prelude(self) -> str:
        """Jinja that puts the configured system prompt first unless the conversation has one (:meth:`with_system`)."""
        if self.settings.system_prompt is None:
            return ""
        system = json.dumps(self.settings.system_prompt)  # a valid Jinja string literal
        return ("{%- if not messages or messages[0]['role'] != 'system' %}"
                f"{{%- set messages = [{{'role': 'system', 'content': {system}}}] + messages %}}"
                "{%- endif %}")


def content(message: Message) -> str:
    """A message's text; an Alpaca row's user turn carries its ``input`` apart, joined here after a blank line."""
    extra = message.get("input")
    return f"{message['content']}\n\n{extra}" if extra else message["content"]


def ends_with_user(messages: list[Message]) -> None:
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a generation prompt must end with a user message")


def encode(tokenizer, rendered: Rendered, max_length: int) -> tuple[dict[str, list[int]], int]:
    """Token ids and labels (-100 outside the loss spans) truncated to ``max_length``, and the untruncated length.

    Tokens are assigned to a span by where they start, so a token that begins an answer with a space
    belongs to the answer.
    """
    return encode_all(tokenizer, [rendered], max_length)[0]


def encode_all(tokenizer, renderings: list[Rendered], max_length: int,
               batch: int = 512) -> list[tuple[dict[str, list[int]], int]]:
    """:func:`encode` of each rendering, tokenized a batch at a time (one call into the tokenizer per batch, not per
    row: the per-call overhead dominated on large files)."""
    out = []
    for first in range(0, len(renderings), batch):
        chunk = renderings[first : first + batch]
        enc = tokenizer([r.text for r in chunk], add_special_tokens=False, return_offsets_mapping=True,
                        truncation=False)
        for rendered, ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            out.append(({"input_ids": ids[:max_length], "labels": _labels(ids[:max_length], offsets, rendered.spans)},
                        len(ids)))
    return out


def _labels(ids: list[int], offsets, spans) -> list[int]:
    """Each token's id where it starts inside a loss span, else -100 (one walk over tokens and sorted spans)."""
    spans, labels, j = sorted(spans), [], 0
    for token_id, (start, _end) in zip(ids, offsets):
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        labels.append(token_id if j < len(spans) and spans[j][0] <= start else -100)
    return labels


def encode_prompt(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]
