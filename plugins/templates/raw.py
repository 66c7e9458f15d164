"""Template ``raw``: no template, for text that is already formatted or a base model that never learnt one.

A text row is trained on as it is, every token carrying loss. A conversation becomes its messages' texts, one
per line, each answer closed by the end-of-sequence token: ``{system}\\n{user}\\n{answer}</s>\\n{user}\\n...``;
the answers and their end tokens carry the loss, and the generation prompt ends with the newline after the
last user message.
"""

from __future__ import annotations

import fx
from fx.data.ollama import Wrapping
from fx.data.templating import Message, Rendered, Template, content

# The same rendering as Raw.render for conversations, for tokenizers saved with a merged or exported model.
CHAT_TEMPLATE = """\
{%- if messages and messages[0]['role'] == 'system' %}
{{- messages[0]['content'] + '\\n' }}
{%- set messages = messages[1:] %}
{%- endif %}
{%- for message in messages %}
{%- if message['role'] == 'user' %}
{{- message['content'] + '\\n' }}
{%- elif message['role'] == 'assistant' %}
{{- message['content'] + eos_token }}
{%- if not loop.last %}{{- '\\n' }}{%- endif %}
{%- else %}
{{- raise_exception('raw has no place for a ' + message['role'] + ' message after the first') }}
{%- endif %}
{%- endfor %}
"""


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

    def chat_template(self) -> str:
        return self.system_prelude() + CHAT_TEMPLATE

    def ollama_template(self) -> str:
        """Every answer in a prompt is followed by a user turn, so each closes with its newline."""
        return Wrapping(system=("", "\n"), no_system="", user=("", "\n"), assistant=("", self.eos + "\n"),
                        generation="").go()


@fx.hookimpl
def fx_register_templates(register):
    register("raw", Raw)
