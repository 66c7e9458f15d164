"""Template ``alpaca``: the Stanford Alpaca format, with and without an input field.

``{preamble}\\n\\n### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n{output}</s>``
The preamble is Stanford Alpaca's (one sentence longer when the row has an input); a configured system prompt
replaces it. Rows without an input have no ``### Input:`` block. The answer and the end-of-sequence token carry
the loss; a further turn opens another ``### Instruction:`` block after a blank line.
"""

from __future__ import annotations

import json

import fx
from fx.data.ollama import Wrapping
from fx.data.templating import Message, Rendered, Template

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.")

# The same rendering as Alpaca.render, for tokenizers saved with a merged or exported model.
CHAT_TEMPLATE = """\
{%- if messages and messages[0]['role'] == 'system' %}
{%- set system = messages[0]['content'] %}
{%- set messages = messages[1:] %}
{%- elif messages and messages[0]['role'] == 'user' and messages[0]['input'] %}
{%- set system = """ + json.dumps(PREAMBLE_INPUT) + """ %}
{%- else %}
{%- set system = """ + json.dumps(PREAMBLE) + """ %}
{%- endif %}
{{- system }}
{%- for message in messages %}
{%- if message['role'] == 'user' %}
{{- '\\n\\n### Instruction:\\n' + message['content'] }}
{%- if message['input'] %}{{- '\\n\\n### Input:\\n' + message['input'] }}{%- endif %}
{{- '\\n\\n### Response:\\n' }}
{%- elif message['role'] == 'assistant' %}
{{- message['content'] + eos_token }}
{%- else %}
{{- raise_exception('alpaca has no place for a ' + message['role'] + ' message after the first') }}
{%- endif %}
{%- endfor %}
"""


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

    def chat_template(self) -> str:
        return self.system_prelude() + CHAT_TEMPLATE

    def ollama_template(self) -> str:
        """Ollama's messages have no input field: the preamble is the one for rows without an input."""
        return Wrapping(system=("", ""), no_system=PREAMBLE, user=("\n\n### Instruction:\n", "\n\n### Response:\n"),
                        assistant=("", self.eos), generation="").go()


@fx.hookimpl
def fx_register_templates(register):
    register("alpaca", Alpaca)
