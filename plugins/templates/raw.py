"""Template ``raw``: no template, for text that is already formatted or a base model that never learnt one.

A text row is trained on as it is, every token carrying loss. A conversation becomes its messages' texts, one
per line, each answer closed by the end-of-sequence token: ``{system}\\n{user}\\n{answer}</s>\\n{user}\\n...``;
the answers and their end tokens carry the loss, and the generation prompt ends with the newline after the
last user message.
"""

from __future__ import annotations

import fx
from fx.data.templating import Message, Rendered, Template, content


class Raw(Template):
    description = "no template: text as it is; conversations as plain lines, answers closed by </s>"

    def render(self, messages: list[Message]) -> Rendered:
        system, turns = self.split_system(messages)
        text = "" if system is None else f"{system}\n"
        spans = []
        for i, message in enumerate(turns):
            if message["role"] == "user":
                text += f"{content(message)}\n"
            else:
                start = len(text)
                text += f"{message['content']}{self.eos}"
                spans.append((start, len(text)))
                if i + 1 < len(turns):
                    text += "\n"
        return Rendered(text, tuple(spans))


@fx.hookimpl
def fx_register_templates(register):
    register("raw", Raw)
