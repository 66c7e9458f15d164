"""Template ``vicuna``: Vicuna v1.1, as FastChat's ``vicuna_v1.1`` conversation builds it.

``{system} USER: {user} ASSISTANT: {answer}</s>USER: {user} ASSISTANT:``
The system prompt defaults to Vicuna's own; each answer (from the space after ``ASSISTANT:``) and its ``</s>``
carry the loss. ``</s>`` is the tokenizer's end-of-sequence token (Llama's is exactly this).
"""

from __future__ import annotations

import fx
from fx.data.templating import Message, Rendered, Template, content

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


class Vicuna(Template):
    description = "Vicuna v1.1: {system} USER: ... ASSISTANT: ...</s>"

    def render(self, messages: list[Message]) -> Rendered:
        system, turns = self.split_system(messages)
        text, spans = (SYSTEM if system is None else system) + " ", []
        for message in turns:
            if message["role"] == "user":
                text += f"USER: {content(message)} ASSISTANT:"
            else:
                start = len(text)
                text += f" {message['content']}{self.eos}"
                spans.append((start, len(text)))
        return Rendered(text, tuple(spans))


@fx.hookimpl
def fx_register_templates(register):
    register("vicuna", Vicuna)
