"""Template ``alpaca``: the Stanford Alpaca format, with and without an input field.

``{preamble}\\n\\n### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n{output}</s>``
The preamble is Stanford Alpaca's (one sentence longer when the row has an input); a configured system prompt
replaces it. Rows without an input have no ``### Input:`` block. The answer and the end-of-sequence token carry
the loss; a further turn opens another ``### Instruction:`` block after a blank line.
"""

from __future__ import annotations

import fx
from fx.data.templating import Message, Rendered, Template

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.")


class Alpaca(Template):
    description = "Stanford Alpaca: ### Instruction: / ### Input: / ### Response:"

    def render(self, messages: list[Message]) -> Rendered:
        system, turns = self.split_system(messages)
        if system is None:
            has_input = bool(turns and turns[0]["role"] == "user" and turns[0].get("input"))
            system = PREAMBLE_INPUT if has_input else PREAMBLE
        text, spans = system, []
        for message in turns:
            if message["role"] == "user":
                text += f"\n\n### Instruction:\n{message['content']}"
                if message.get("input"):
                    text += f"\n\n### Input:\n{message['input']}"
                text += "\n\n### Response:\n"
            else:
                start = len(text)
                text += f"{message['content']}{self.eos}"
                spans.append((start, len(text)))
        return Rendered(text, tuple(spans))


@fx.hookimpl
def fx_register_templates(register):
    register("alpaca", Alpaca)
