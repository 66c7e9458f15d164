"""Template ``chatml``: OpenAI's ChatML, as Qwen, SmolLM and many fine-tunes use it.

``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n``
No system block without a system prompt. Each answer and its ``<|im_end|>`` carry the loss; the generation
prompt ends with ``<|im_start|>assistant\\n``.
"""

from __future__ import annotations

import fx
from fx.data.templating import Message, Rendered, Template, content, ends_with_user


class ChatML(Template):
    description = "ChatML: <|im_start|>role\\n...<|im_end|>"
    stop = "<|im_end|>"

    def _build(self, messages: list[Message], generation: bool) -> Rendered:
        system, turns = self.split_system(messages)
        text = "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
        spans = []
        for message in turns:
            if message["role"] == "user":
                text += f"<|im_start|>user\n{content(message)}<|im_end|>\n"
            else:
                text += "<|im_start|>assistant\n"
                start = len(text)
                text += f"{message['content']}<|im_end|>"
                spans.append((start, len(text)))
                text += "\n"
        if generation:
            text += "<|im_start|>assistant\n"
        return Rendered(text, tuple(spans))

    def render(self, messages: list[Message]) -> Rendered:
        return self._build(messages, generation=False)

    def prompt(self, messages: list[Message]) -> str:
        ends_with_user(messages)
        return self._build(messages, generation=True).text


@fx.hookimpl
def fx_register_templates(register):
    register("chatml", ChatML)
